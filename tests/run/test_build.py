"""Building a run's host from its spec: scenario overrides, and no file left behind on failure."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from hvmodel.cli import main
from hvmodel.run.build import build_host
from hvmodel.run.errors import RunError
from hvmodel.run.spec import RunSpec

GUESTS = Path(__file__).resolve().parents[2] / "guests"


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """Temporary folders (the default swap directory) go to a folder of this test."""
    d = tmp_path / "tmp"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


def scenario(tmp_path: Path, *guests: str) -> Path:
    text = '[host]\nmemsize = "32M"\n'
    for i, g in enumerate(guests):
        text += f'[[vm]]\nname = "v{i}"\nguest = "{g}"\nmemsize = "4M"\n'
    p = tmp_path / "s.toml"
    p.write_text(text)
    return p


def test_host_mem_overrides_the_scenarios_memsize(tmp_path):
    # Regression: the override was read from an attribute nothing set, so --host-mem was
    # silently ignored for scenario files.
    sc = scenario(tmp_path, str(GUESTS / "hello.asm"))
    for host_mem, want in ((None, 32 << 20), (64 << 20, 64 << 20)):
        host = build_host(RunSpec(str(sc), host_mem=host_mem))
        try:
            assert host.config.memsize == want
        finally:
            host.close()


def test_a_guest_that_fails_to_load_leaves_no_swap_file(tmp_path, private_tmp):
    # Regression: the first VM's swap file stayed behind when the second VM's guest was missing.
    sc = scenario(tmp_path, str(GUESTS / "hello.asm"), str(tmp_path / "missing.asm"))
    with pytest.raises(RunError, match="no such file"):
        build_host(RunSpec(str(sc)))
    assert list(private_tmp.iterdir()) == []


@pytest.mark.parametrize("argv", [["demo", "--mem", "4M", "--host-mem", "16M"],
                                  ["compare", str(GUESTS / "hello.asm"), "--mem", "4M", "--host-mem", "16M"]])
def test_demo_and_compare_power_their_hosts_off(argv, private_tmp, capsys):
    # Regression: demo and compare never closed their hosts: each left a swap folder in /tmp.
    assert main(argv) == 0
    assert "Traceback" not in capsys.readouterr().err
    assert list(private_tmp.iterdir()) == []
