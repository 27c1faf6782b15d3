"""The pytest plugin as a user meets it: the README's examples run in a pytest session of their own."""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[2]

USER_TESTS = '''
import pytest
from hvmodel.pytest_plugin import assert_counter, assert_fired, assert_outcome

GUESTS = "{guests}"


@pytest.mark.fault("swap-read-error", nth=1)
def test_a_swap_read_error_stops_the_vm(hvrun):
    run = hvrun(GUESTS + "/memtest.asm", mem="4M", host_mem="2M")
    assert_outcome(run, "detected")              # stopped, and the message names the guest page
    assert "cannot swap in" in run.vm().message


@pytest.mark.seed(3)
@pytest.mark.fault("frame-bitflip", at=1_000_000)
def test_a_dram_bit_flip_is_what_the_fault_allows(hvrun):
    run = hvrun(GUESTS + "/memtest.asm", mem="4M", host_mem="2M")
    assert_outcome(run)                          # any outcome frame-bitflip documents, never a bug
    assert_fired(run, "frame-bitflip", times=1)


@pytest.mark.host(memsize="16M")
@pytest.mark.fault("inject-exception", 13, at=60_000)   # after boot.inc set up the IDT
def test_my_kernel_handles_an_injected_gp(host, vm, guest, faults):
    kernel = guest("""
        %include "runtime/boot.inc"
        main:
            mov edi, 13
            lea rsi, [rip + on_gp]
            call set_handler
            mov ecx, 0x40000
        spin:
            dec ecx
            jnz spin
            lea rsi, [rip + no_gp]
            jmp fail
        on_gp:
            lea rsi, [rip + got_gp]
            call puts
            jmp pass
        got_gp: .asciz "got #GP"
        no_gp:  .asciz "no #GP"
    """)
    v = vm(kernel, mem="4M")
    result = host.run()[0]
    assert_fired(faults, "inject-exception", times=1)
    assert result.exit_status == 0 and "got #GP" in result.console
    assert_counter(v, "instructions", "<", 200_000)       # the handler ended the spin early


@pytest.mark.fault("ept-corrupt", at=1_000_000)
def test_this_one_fails_and_says_how_to_reproduce(hvrun):
    run = hvrun(GUESTS + "/memtest.asm", mem="4M", host_mem="2M")
    assert_outcome(run, "detected")              # wrong on purpose: ept-corrupt is recovered
'''


def _plugin_args() -> list[str]:
    installed = any(ep.value == "hvmodel.pytest_plugin" for ep in entry_points(group="pytest11"))
    return [] if installed else ["-p", "hvmodel.pytest_plugin"]


def test_fixtures_markers_and_helpers_in_a_user_test_session(pytester: pytest.Pytester):
    pytester.makepyfile(test_user=USER_TESTS.replace("{guests}", str(ROOT / "guests")))
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
