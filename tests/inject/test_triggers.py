"""Fault specs and triggers: parsing, errors, determinism, exact firing points, disarming."""

from __future__ import annotations

from pathlib import Path

import pytest

from hvmodel import Host, HostConfig, VMConfig, load_guest
from hvmodel.cli import main
from hvmodel.inject import InjectError, Injector, parse_fault
from hvmodel.inject.arm import Trigger
from hvmodel.inject.registry import make_spec
from hvmodel.machine.swap import SwapDevice
from hvmodel.run.session import execute

GUESTS = Path(__file__).resolve().parents[2] / "guests"
MEMTEST = [str(GUESTS / "memtest.asm"), "--mem", "4M", "--host-mem", "2M"]


def test_specs_parse_with_defaults_and_a_positional_value():
    s = parse_fault("inject-exception:14,at=1_000,cr2=0x1000")
    assert (s.get("vector"), s.get("at"), s.get("cr2"), s.get("count")) == (14, 1000, 0x1000, 1)
    assert parse_fault(s.text()) == s
    assert parse_fault("frame-bitflip:shared=yes,at=10..20").get("shared") is True
    assert make_spec("swap-read-error", nth=2).text() == "swap-read-error:nth=2"


@pytest.mark.parametrize("text, needle", [
    ("no-such-fault", "unknown fault"),
    ("swap-read-error:bogus=1", "unknown parameter 'bogus'"),
    ("swap-read-error:nth=0", "must be >= 1"),
    ("swap-read-error:nth=1,p=0.5", "nth or p, not both"),
    ("swap-read-error:p=2", "probability"),
    ("swap-read-error:on=slice", "`on` is for slice faults"),
    ("inject-exception", "vector is required"),
    ("inject-exception:40", "0-31"),
    ("frame-bitflip:at=9..3", "empty range"),
    ("ept-corrupt:kind=misconfig,level=2", "leaf"),
    ("spurious-interrupt:irq=3", "7 or 15"),
])
def test_bad_specs_say_what_is_wrong(text, needle):
    with pytest.raises(InjectError, match=needle.replace("(", r"\(").replace("*", r"\*")):
        parse_fault(text)


def test_a_bad_fault_on_the_command_line_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", str(GUESTS / "hello.asm"), "--fault", "swap-read-error:nth=x"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "hvmodel run: error: argument --fault: fault swap-read-error: nth='x': not a whole number"


@pytest.mark.parametrize("fault, needle", [
    ("shadow-drop", "needs a VM under shadow paging"),
    ("frame-bitflip:vm=nope", "no VM 'nope'"),
])
def test_faults_that_cannot_be_armed_on_the_host_exit_2(capsys, fault, needle):
    assert main(["run", str(GUESTS / "hello.asm"), "--mem", "4M", "--host-mem", "16M", "--quiet",
                 "--fault", fault]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


def test_ranges_are_drawn_under_the_seed_and_triggers_repeat():
    spec = parse_fault("frame-bitflip:at=1000..2000")
    draws = {seed: Injector([spec], seed).armed[0].trigger.at for seed in range(20)}
    assert all(1000 <= v <= 2000 for v in draws.values())
    assert len(set(draws.values())) > 10
    assert Injector([spec], 7).armed[0].trigger.at == draws[7]


def test_nth_and_count_fire_at_consecutive_events_and_p_follows_its_seed():
    t = Trigger(parse_fault("lost-tlb-flush:nth=2,count=3,at=10"), None)
    assert [t.hit(n) for n in (5, 10, 11, 12, 13, 14)] == [False, False, True, True, True, False]
    spec = parse_fault("lost-tlb-flush:p=0.3,count=0")
    hits = []
    for seed in (1, 1, 2):
        t = Injector([spec], seed).armed[0].trigger
        hits.append([t.hit(0) for _ in range(50)])
    assert hits[0] == hits[1] != hits[2]
    assert 5 < sum(hits[0]) < 30


def test_a_slice_fault_fires_exactly_at_its_instruction():
    run = execute([str(GUESTS / "hello.asm"), "--mem", "4M", "--host-mem", "16M",
                   "--fault", "inject-exception:3,at=12345"])
    assert [(f["fault"], f["insns"]) for f in run.fired] == [("inject-exception", 12345)]


def test_runs_are_a_function_of_their_inputs():
    argv = MEMTEST + ["--seed", "5", "--fault", "frame-bitflip:at=100000..2000000",
                      "--fault", "alloc-fail:p=0.01,count=0"]
    a, b = execute(argv), execute(argv)
    assert a.fired and a.fired == b.fired
    assert a.checkpoints == b.checkpoints and [v.memory_hash for v in a.vms] == [v.memory_hash for v in b.vms]
    c = execute(MEMTEST + ["--seed", "6"] + argv[len(MEMTEST) + 2:])
    assert c.fired != a.fired


def test_unarmed_vms_keep_their_own_methods_and_detach_restores_them(tmp_path):
    h = Host(HostConfig(memsize=2 << 20, swap_dir=tmp_path))
    vm = h.power_on(VMConfig(memsize=4 << 20), load_guest(GUESTS / "memtest.asm"))
    assert vm.inject is None and "flush_tlb" not in vars(vm.vcpu) and "read" not in vars(vm.swap)
    inj = Injector([parse_fault("swap-read-error"), parse_fault("lost-tlb-flush:nth=1000"),
                    parse_fault("alloc-fail:nth=100000")]).attach(h)
    assert vm.inject is inj and "read" in vars(vm.swap) and "flush_tlb" in vars(vm.vcpu)
    assert "alloc" in vars(h.pool)
    inj.detach()
    assert vm.inject is None and "flush_tlb" not in vars(vm.vcpu) and "alloc" not in vars(h.pool)
    assert vm.swap.read.__func__ is SwapDevice.read
    h.close()
