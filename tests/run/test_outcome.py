"""The outcome checker must be able to fail: every class, on hand-made digests."""

from __future__ import annotations

import dataclasses

import pytest

from hvmodel.run.outcome import classify
from hvmodel.run.digest import RunDigest, VMDigest

FIRED = [{"fault": "swap-read-error", "index": 0, "vm": "g", "insns": 10, "detail": "raised", "dry": False}]


def vm(**kw) -> VMDigest:
    base = dict(name="g", mmu="nested", exit_status=0, stop_reason="power_off", message="", instructions=1000,
                console_hash="c", console_tail="ok", memory_hash="m", swap=True)
    base.update(kw)
    return VMDigest(**base)


def digest(fault: str, fired=FIRED, **kw) -> RunDigest:
    return RunDigest(argv=["g.asm", "--fault", fault], vms=[vm(**kw)], fired=list(fired))


REF = digest("swap-read-error", fired=[])


@pytest.mark.parametrize("fault, run, kind, unexpected", [
    # what the fault allows
    ("swap-read-error", dict(stop_reason="host_failure", exit_status=None,
                             message="guest page 0x2cd (GPA 0x2cd000): cannot swap in: ..."), "detected", False),
    ("swap-bitflip", dict(bad_pages=["guest page 0x3 (GPA 0x3000): swap slot 1 fails its checksum"]),
     "detected", False),
    ("ept-corrupt", {}, "recovered", False),
    ("inject-exception:13", dict(exit_status=127, events={"#GP": 1}), "visible", False),
    ("lost-tlb-flush", dict(memory_hash="other"), "visible", False),
    # what it does not: silent wrong memory, a stop that names no page, a repair that did not happen
    ("swap-read-error", dict(memory_hash="other"), "visible", True),
    ("ept-corrupt", dict(exit_status=2), "visible", True),
    ("alloc-fail", dict(stop_reason="host_failure", exit_status=None,
                        message="guest page 0x5 (GPA 0x5000): host out of memory"), "detected", True),
    ("swap-read-error", dict(stop_reason="error", exit_status=None, message="engine error at RIP 0x1"),
     "unnamed-stop", True),
])
def test_each_outcome_class(fault, run, kind, unexpected):
    o = classify(digest(fault, **run), REF)
    assert (o.kind, o.unexpected) == (kind, unexpected), o


def test_a_crash_is_always_unexpected():
    run = dataclasses.replace(digest("frame-bitflip"), error="Traceback ...\nIndexError: index out of range")
    o = classify(run, REF)
    assert o.kind == "crash" and o.unexpected and "IndexError" in o.detail


def test_a_difference_without_a_fault_firing_is_nondeterminism():
    o = classify(digest("frame-bitflip", fired=[], instructions=999), REF)
    assert o.kind == "nondeterministic" and o.unexpected
    o = classify(digest("frame-bitflip", fired=[]), REF)
    assert o.kind == "not-fired" and not o.unexpected


def test_the_worst_vm_decides_and_dry_firings_do_not_count():
    run = RunDigest(argv=["s.toml", "--fault", "frame-bitflip:shared=1"], fired=FIRED,
                    vms=[vm(name="a", stop_reason="host_failure", exit_status=None,
                            message="guest page 0x10 (GPA 0x10000): shared frame 0x1b fails its content checksum"),
                         vm(name="b", exit_status=3)])
    ref = RunDigest(argv=run.argv, vms=[vm(name="a"), vm(name="b")])
    o = classify(run, ref)
    assert o.kind == "visible" and not o.unexpected and "b: the guest saw it" in o.detail
    dry = dataclasses.replace(run, fired=[dict(FIRED[0], dry=True)])
    assert classify(dry, ref).kind == "nondeterministic"
