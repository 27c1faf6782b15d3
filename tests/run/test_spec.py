"""A run as a value: RunSpec and its serialised form, the ``hvmodel run`` argument list."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hvmodel.inject import parse_fault
from hvmodel.run.errors import EXIT_USAGE, RunError
from hvmodel.run.spec import RunSpec, command

GUESTS = Path(__file__).resolve().parents[2] / "guests"

sizes = st.sampled_from([2 << 20, 4 << 20, 16 << 20, 3 << 30, (64 << 20) + 4096])
faults = st.lists(st.sampled_from(["swap-read-error:nth=2", "inject-exception:13,at=1000..2000",
                                   "frame-bitflip", "alloc-fail:at=50,count=3"]), max_size=2)
specs = st.builds(
    RunSpec, target=st.sampled_from(["guests/hello.asm", "scenarios/dedup-8vm.toml", "/tmp/a b/k.elf"]),
    mem=sizes, host_mem=st.none() | sizes, mmu=st.sampled_from(["nested", "shadow", "native"]),
    max_insns=st.integers(1, 10**9), swap_dir=st.none() | st.just("/tmp/swap dir"),
    no_swap=st.booleans(), no_large_pages=st.booleans(), swap_policy=st.sampled_from([None, "random", "clock"]),
    vms=st.integers(1, 8),
    # "-a" must survive too; "--" cannot: argparse takes it for the end of the options, even in --salt=--
    salt=st.none() | st.text("abc xyz-", min_size=1, max_size=6).filter(lambda t: "--" not in t),
    share_scan_time=st.none() | st.sampled_from([0.02, 1.5, 60.0]), share_rate_max=st.none() | st.integers(1, 10**6),
    top=st.booleans(), plot=st.none() | st.just("out.png"), stats=st.booleans(), json=st.booleans(),
    quiet=st.booleans(), append=st.none() | st.just("exit=7 console=ttyS0"),
    modules=st.none() | st.just(["initrd.img root=/dev/ram", "extra.bin"]),
    gdb=st.none() | st.just("tcp::1234"), gdb_wait=st.booleans(), seed=st.none() | st.integers(-5, 10**6),
    faults=faults.map(lambda xs: [parse_fault(x) for x in xs]), record=st.none() | st.just("r.json"))


@settings(max_examples=200, deadline=None)
@given(specs)
def test_a_spec_survives_its_argument_list(spec):
    argv = spec.to_argv()
    back = RunSpec.from_argv(argv)
    assert back == spec
    assert back.argv == argv and back.to_argv() == argv
    assert spec.command == command(argv)


def test_an_argument_list_is_kept_as_given_and_parses_to_the_same_spec():
    argv = [str(GUESTS / "hello.asm"), "--mem", "4096K", "--host-mem", "16M", "--seed", "3", "--quiet",
            "--fault", "inject-exception:13,at=20000..40000"]
    spec = RunSpec.from_argv(argv)
    assert spec.argv == argv                       # reproduce commands show what was typed
    assert spec.mem == 4 << 20 and spec.host_mem == 16 << 20 and spec.seed == 3 and spec.quiet
    assert [f.name for f in spec.faults] == ["inject-exception"]
    assert spec.command == "hvmodel run " + " ".join(argv)
    assert RunSpec.from_argv(spec.to_argv()) == spec
    assert replace(spec, seed=4) != spec


def test_a_value_that_looks_like_an_option_is_written_attached():
    spec = RunSpec("g.asm", salt="-a", append="-v x")
    assert spec.to_argv() == ["g.asm", "--salt=-a", "--append=-v x"]
    assert RunSpec.from_argv(spec.to_argv()) == spec


def test_defaults_are_left_out_of_the_canonical_list():
    assert RunSpec("g.asm").to_argv() == ["g.asm"]
    assert RunSpec("g.asm", mem=32 << 20, no_swap=True, gdb_wait=True, gdb="0").to_argv() == \
        ["g.asm", "--mem", "32M", "--no-swap", "--gdb", "0", "-S"]


@pytest.mark.parametrize("argv, words", [
    ([], "the following arguments are required: guest"),
    (["g.asm", "--mem", "lots"], "not a size"),
    (["g.asm", "--mmu", "ept"], "invalid choice"),
    (["g.asm", "--fault", "nope"], "unknown fault 'nope'"),
    (["g.asm", "--vms", "0"], "must be positive"),
])
def test_bad_arguments_are_a_run_error_with_status_2(argv, words):
    with pytest.raises(RunError) as e:
        RunSpec.from_argv(argv)
    assert e.value.status == EXIT_USAGE and words in str(e.value)


@pytest.mark.parametrize("gdb, wait, port, words", [
    ("tcp::1234", False, 1234, None), ("tcp:localhost:99", True, 99, None), ("77", False, 77, None),
    (None, False, None, None), (None, True, None, "-S needs --gdb"),
    ("tcp:10.0.0.1:5", False, None, "loopback"), ("tcp::x", False, None, "expected tcp::PORT"),
    ("tcp::70000", False, None, "out of range")])
def test_the_gdb_port(gdb, wait, port, words):
    spec = RunSpec("g.asm", gdb=gdb, gdb_wait=wait)
    if words is None:
        assert spec.gdb_port() == port
    else:
        with pytest.raises(RunError, match=words):
            spec.gdb_port()


def test_modules_split_at_commas():
    spec = RunSpec.from_argv(["k.elf", "--initrd", "a.img x=1, b.bin", "--module", "c"])
    assert spec.module_list() == ["a.img x=1", "b.bin", "c"]
