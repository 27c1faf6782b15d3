"""The pytest plugin as a user meets it: the README's examples run in a pytest session of their own."""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[2]

FAILING = '''

@pytest.mark.fault("ept-corrupt", at=1_000_000)
def test_this_one_fails_and_says_how_to_reproduce(hvrun):
    run = hvrun("guests/memtest.asm", mem="4M", host_mem="2M")
    assert_outcome(run, "detected")              # wrong on purpose: ept-corrupt is recovered
'''


def readme_example() -> str:
    """The Python block of the README's "In pytest" section, exactly as users read it."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### In pytest"):]
    return section[section.index("```python\n") + 10:section.index("```\n", section.index("```python"))]


def _plugin_args() -> list[str]:
    installed = any(ep.value == "hvmodel.pytest_plugin" for ep in entry_points(group="pytest11"))
    return [] if installed else ["-p", "hvmodel.pytest_plugin"]


def test_fixtures_markers_and_helpers_in_a_user_test_session(pytester: pytest.Pytester):
    code = (readme_example() + FAILING).replace('"guests/', f'"{ROOT}/guests/')
    pytester.makepyfile(test_user=code)
    res = pytester.runpytest_inprocess(*_plugin_args(), "-q", "-p", "no:cacheprovider")
    res.assert_outcomes(passed=3, failed=1)
    out = res.stdout.str()
    assert "outcome recovered, wanted detected" in out
    assert "reproduce: hvmodel run " in out and "--fault ept-corrupt:at=1000000" in out


def test_the_plugin_is_a_pytest11_entry_point():
    import tomllib
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert data["project"]["entry-points"]["pytest11"] == {"hvmodel": "hvmodel.pytest_plugin"}
    assert any("dask[distributed]" in d for d in data["project"]["optional-dependencies"]["test"])
