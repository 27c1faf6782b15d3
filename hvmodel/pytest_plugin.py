"""pytest plugin for fault-injection tests (registered as ``hvmodel`` through the ``pytest11``
entry point; without the installed package, load it with ``-p hvmodel.pytest_plugin``).

Markers
    ``@pytest.mark.fault(NAME, [VALUE], **params)``  arm a named fault (repeatable), as
    ``--fault NAME:VALUE,k=v`` would: ``@pytest.mark.fault("swap-read-error", nth=1)``,
    ``@pytest.mark.fault("inject-exception", 13, at=20_000)``.
    ``@pytest.mark.seed(N)``  the run's seed (default 0).
    ``@pytest.mark.host(memsize="16M", **HostConfig fields)``  the ``host`` fixture's host.

Fixtures
    ``hvrun(target, *args, **options)``  run ``hvmodel run TARGET ARGS`` with the marked
    faults and its dry reference; returns a :class:`FaultRun` (outcome, digests, what
    fired, the reproduce command). Options are long options: ``mem="4M"`` is
    ``--mem 4M``, ``no_swap=True`` is ``--no-swap``.
    ``guest(source)``  a guest image from a path (``.asm`` or flat binary) or from
    assembly text.
    ``host``  a :class:`hvmodel.host.Host` (``@pytest.mark.host``), swap files in the
    test's tmp_path, closed afterwards; the marked faults are armed on every VM that
    ``vm`` powers on. ``faults`` is that :class:`hvmodel.inject.Injector`.
    ``vm(image, mem="16M", **VMConfig fields)``  power on a VM on ``host``, armed.

Assertion helpers (importable: ``from hvmodel.pytest_plugin import assert_outcome``)
    ``assert_outcome(run, *kinds)``, ``assert_fired(run_or_injector, fault=None, times=None)``,
    ``assert_counter(obj, name, op, value, vm=None)``; a failure message always carries
    the command that reproduces the run.

hvmodel itself is imported only when a fixture is used, so the plugin costs nothing
in test sessions that do not use it.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import pytest

if TYPE_CHECKING:
    from .guest.image import GuestImage
    from .host.host import Host
    from .inject import Injector
    from .run.outcome import Outcome
    from .run.digest import RunDigest, VMDigest
    from .vm.vm import VM


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "fault(name, [value], **params): arm a named hvmodel fault "
                                       "(docs/FAULTS.md) for the hvrun / host / vm fixtures")
    config.addinivalue_line("markers", "seed(n): the seed of hvmodel runs in this test (default 0)")
    config.addinivalue_line("markers", "host(**config): HostConfig of the hvmodel `host` fixture "
                                       "(sizes as '16M')")


def marked_faults(node: pytest.Item) -> list:
    """The FaultSpecs of a test's ``fault`` markers, in decorator order (top first)."""
    from .inject.registry import make_spec
    marks = list(node.iter_markers("fault"))
    marks.reverse()   # iter_markers yields the closest (lowest) decorator first
    specs = []
    for m in marks:
        if not m.args:
            raise pytest.UsageError("@pytest.mark.fault needs a fault name")
        specs.append(make_spec(m.args[0], tuple(m.args[1:]), **m.kwargs))
    return specs


def marked_seed(node: pytest.Item) -> int:
    m = node.get_closest_marker("seed")
    return int(m.args[0]) if m is not None and m.args else 0


# -- the high-level fixture ------------------------------------------------------------------------

@dataclass
class FaultRun:
    """A run with faults, its dry reference, and the outcome."""

    run: "RunDigest"
    ref: "RunDigest"
    outcome: "Outcome"

    @property
    def command(self) -> str:
        """The one command that reproduces the faulty run."""
        return self.run.command

    @property
    def fired(self) -> list[dict]:
        return [f for f in self.run.fired if not f.get("dry")]

    def vm(self, name: str | None = None) -> "VMDigest":
        """A VM's digest (the first VM by default)."""
        if name is None:
            return self.run.vms[0]
        return next(v for v in self.run.vms if v.name == name)

    def __str__(self) -> str:
        return f"{self.outcome}\n  reproduce: {self.command}"


def _argv(target: str | Path, args: tuple, options: dict) -> list[str]:
    argv = [str(target), *(str(a) for a in args)]
    for k, v in options.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            argv.append(flag)
        elif v is not False and v is not None:
            argv += [flag, str(v)]
    return argv


@pytest.fixture
def hvrun(request: pytest.FixtureRequest) -> Callable[..., FaultRun]:
    """``hvrun(target, *args, **options)``: the run with the test's faults, and its outcome."""
    def run(target: str | Path, *args: object, **options: object) -> FaultRun:
        from .run.outcome import classify
        from .run.session import execute
        argv = _argv(target, args, options)
        if "--seed" not in argv:
            argv += ["--seed", str(marked_seed(request.node))]
        for spec in marked_faults(request.node):
            argv += ["--fault", spec.text()]
        ref = execute(argv, dry=True)
        got = execute(argv)
        return FaultRun(got, ref, classify(got, ref))
    return run


# -- building blocks ----------------------------------------------------------------------------------

@pytest.fixture
def guest() -> Callable[..., "GuestImage"]:
    """``guest(source)``: a guest image from a file path or from assembly text."""
    def build(source: str | Path, **kw: Any) -> "GuestImage":
        from .guest.asm import build as assemble
        from .guest.load import load_guest
        if isinstance(source, Path) or ("\n" not in source and Path(source).suffix
                                        and Path(source).exists()):
            return load_guest(source, **kw)
        return assemble(source, source_name="test", **kw)
    return build


def _size(v: object) -> int:
    from .host.scenario import size_bytes
    return v if isinstance(v, int) else size_bytes(str(v))


@pytest.fixture
def faults(request: pytest.FixtureRequest) -> "Injector":
    """The test's marked faults, as the Injector the ``host`` fixture arms."""
    from .inject import Injector
    return Injector(marked_faults(request.node), marked_seed(request.node))


@pytest.fixture
def host(request: pytest.FixtureRequest, tmp_path: Path, faults: "Injector"):
    """A Host from ``@pytest.mark.host(...)`` (swap files in tmp_path), closed after the test."""
    from .host.host import Host, HostConfig
    m = request.node.get_closest_marker("host")
    kw = dict(m.kwargs) if m is not None else {}
    if "memsize" in kw:
        kw["memsize"] = _size(kw["memsize"])
    kw.setdefault("swap_dir", tmp_path / "swap")
    kw.setdefault("seed", marked_seed(request.node))
    h = Host(HostConfig(**kw))
    faults.attach(h, validate=False)   # VMs come later, through the vm fixture
    yield h
    faults.detach()
    h.close()


@pytest.fixture
def vm(host: "Host", faults: "Injector") -> Callable[..., "VM"]:
    """``vm(image_or_source, mem="16M", **VMConfig fields)``: a VM on ``host``, with the faults armed."""
    def power_on(image: Any, mem: str | int = "16M", **cfg: Any) -> "VM":
        from .guest.image import GuestImage
        from .vm.vm import VMConfig
        if not isinstance(image, GuestImage):
            from .guest.load import load_guest
            image = load_guest(image)
        v = host.power_on(VMConfig(memsize=_size(mem), **cfg), image)
        faults.arm_vm(v)
        return v
    return power_on


# -- assertions --------------------------------------------------------------------------------------

def assert_outcome(run: FaultRun, *kinds: str) -> None:
    """The run's outcome is one of ``kinds`` (default: what its faults allow) and not a bug."""
    want = set(kinds) or set(run.outcome.expected)
    assert run.outcome.kind in want and (kinds or not run.outcome.unexpected), \
        f"outcome {run.outcome.kind}, wanted {'/'.join(sorted(want))}: {run}"
    assert run.outcome.kind not in ("crash", "unnamed-stop", "nondeterministic"), str(run)


def assert_fired(obj: "FaultRun | Injector", fault: str | None = None, times: int | None = None) -> None:
    """A fault (any, or ``fault``) fired — ``times`` times if given."""
    log = obj.fired if isinstance(obj, FaultRun) else [f.as_dict() for f in obj.log if not f.dry]
    n = sum(1 for f in log if fault is None or f["fault"] == fault)
    where = f"\n  reproduce: {obj.command}" if isinstance(obj, FaultRun) else ""
    if times is None:
        assert n > 0, f"{fault or 'no fault'} never fired{where}"
    else:
        assert n == times, f"{fault or 'faults'} fired {n} times, wanted {times}{where}"


_OPS = {"==": operator.eq, "!=": operator.ne, ">": operator.gt, ">=": operator.ge, "<": operator.lt,
        "<=": operator.le}


def assert_counter(obj: Any, name: str, op: str = ">", value: float = 0, vm: str | None = None) -> None:
    """``counter OP value`` for a FaultRun (its VM ``vm``, default the first), a VM, a VMResult or a
    Host (host counters): ``assert_counter(run, "balloon_violations", ">", 0)``."""
    if isinstance(obj, FaultRun):
        counters = obj.vm(vm).counters
        where = f"\n  reproduce: {obj.command}"
    elif hasattr(obj, "counters") and callable(obj.counters):
        counters, where = obj.counters(), ""
    else:
        counters, where = obj.counters, ""
    assert name in counters, f"no counter {name!r} (have: {', '.join(sorted(counters))}){where}"
    got = counters[name]
    assert _OPS[op](got, value), f"{name} = {got}, wanted {op} {value}{where}"


__all__ = ["FaultRun", "assert_counter", "assert_fired", "assert_outcome", "marked_faults", "marked_seed"]
