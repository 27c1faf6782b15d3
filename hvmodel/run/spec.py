"""A run as a value: :class:`RunSpec`, and its serialised form, the ``hvmodel run`` arguments.

With time counted in guest instructions, a run is a function of (image, scenario, seed,
armed faults) — all of which are in its ``hvmodel run`` arguments. So the argument list
*is* the run: the campaign executes exactly the list it prints as the command that
reproduces a run, a recording stores it, replay runs it again. :meth:`RunSpec.from_argv`
parses one (bad usage is a :class:`~hvmodel.run.errors.RunError` with status 2, never a
program exit); :meth:`RunSpec.to_argv` writes the canonical list for a spec built in code;
``from_argv(spec.to_argv()) == spec`` (tests/run/test_spec.py). A spec parsed from an
argument list keeps that list (``argv``): it is what reproduce commands and recordings show.

The option definitions live here too (``add_run_options`` and its parts), so the ``hvmodel``
command's ``run``, ``map``, ``info`` … subcommands and this parser cannot drift apart.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shlex
from dataclasses import dataclass, field, fields

from ..host.host import DEFAULT_HOST_MEM
from ..host.scenario import size_bytes
from ..inject import InjectError, parse_fault
from ..inject.registry import FaultSpec
from ..mmu.modes import MODES, VMM_MODES
from ..vm.vm import DEFAULT_MAX_INSNS, DEFAULT_MEM, MIB
from .errors import EXIT_USAGE, RunError

MMU_NAMES = tuple(MODES)


# -- argument types -----------------------------------------------------------------------------

def parse_size(text: str) -> int:
    """``64M``, ``64MiB``, ``1g``, ``4096`` → bytes (binary units)."""
    try:
        return size_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def positive_int(text: str) -> int:
    """A positive integer (``_`` separators, ``0x`` allowed)."""
    try:
        v = int(text.replace("_", ""), 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return v


def mode_list(text: str) -> list[str]:
    """``nested,shadow`` → the VMM modes named (the reference is not one)."""
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in VMM_MODES]
    if not modes or bad:
        raise argparse.ArgumentTypeError(
            f"unknown MMU mode(s) {', '.join(bad) or text!r}; VMM modes: {', '.join(VMM_MODES)}")
    return modes


def fault_arg(text: str) -> FaultSpec:
    """``--fault NAME[:K=V,...]``."""
    try:
        return parse_fault(text)
    except InjectError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# -- option groups --------------------------------------------------------------------------------

def add_vm_options(p: argparse.ArgumentParser) -> None:
    """The VM and host options every command that builds a host takes."""
    p.add_argument("--mem", type=parse_size, default=DEFAULT_MEM,
                   help=f"guest memory (default {DEFAULT_MEM // MIB}M)")
    p.add_argument("--host-mem", type=parse_size, default=None,
                   help=f"machine memory of the host (default {DEFAULT_HOST_MEM // MIB}M, or the scenario's)")
    p.add_argument("--mmu", choices=MMU_NAMES, default="nested",
                   help="MMU virtualization: nested (EPT), shadow (software MMU), native (the reference: "
                        "Unicorn's own MMU, no VMM)")
    p.add_argument("--max-insns", type=positive_int, default=DEFAULT_MAX_INSNS,
                   help=f"stop the guest after this many instructions (default {DEFAULT_MAX_INSNS:,})")
    p.add_argument("--swap-dir", help="where VM swap files (.vswp) go (default: a temporary folder)")
    p.add_argument("--no-swap", action="store_true",
                   help="give VMs no swap file: a VM must then fit in free host memory")
    p.add_argument("--no-large-pages", action="store_true",
                   help="back guest memory with 4 KiB pages only (Mem.AllocGuestLargePage = 0)")
    p.add_argument("--swap-policy", choices=("random", "clock"), default=None,
                   help="hypervisor swap victims: random (ESXi) or clock over accessed bits")


def add_sharing_options(p: argparse.ArgumentParser) -> None:
    """Several copies of one guest, and the page-sharing settings."""
    p.add_argument("--vms", type=positive_int, default=1, help="run N copies of the guest on one host")
    p.add_argument("--salt", help="give every VM this page-sharing salt (Mem.ShareForceSalting 1): "
                                  "pages are shared across the VMs")
    p.add_argument("--share-scan-time", type=float, default=None, metavar="MIN",
                   help="Mem.ShareScanTime: guest minutes to scan a whole VM (default 60)")
    p.add_argument("--share-rate-max", type=positive_int, default=None, metavar="PAGES",
                   help="Mem.ShareRateMax: pages per guest second per VM (default 1024)")


def add_kernel_options(p: argparse.ArgumentParser) -> None:
    """A kernel's command line and modules."""
    p.add_argument("--append", metavar="ARGS", help="kernel command line after the file name (QEMU -append)")
    p.add_argument("--initrd", "--module", dest="modules", action="append", default=None, metavar="FILE",
                   help="a Multiboot module, 'FILE [ARGS]'; repeat, or separate with commas (QEMU -initrd)")


def add_fault_options(p: argparse.ArgumentParser) -> None:
    """The run's seed and its armed faults."""
    p.add_argument("--seed", type=int, default=None,
                   help="the run's seed: the host's random choices and the faults' triggers and targets")
    p.add_argument("--fault", dest="faults", type=fault_arg, action="append", metavar="NAME[:K=V,...]",
                   help="arm a named fault, e.g. swap-read-error:nth=2 or inject-exception:13,at=50000 "
                        "(repeatable; docs/FAULTS.md lists them)")


def add_run_options(p: argparse.ArgumentParser) -> None:
    """Every argument of ``hvmodel run``."""
    p.add_argument("target", metavar="guest",
                   help="guest image: .asm source (assembled on the fly) or flat binary; "
                        "or a scenario file (.toml) describing a host and its VMs")
    add_vm_options(p)
    add_sharing_options(p)
    p.add_argument("--top", action="store_true", help="show the esxtop memory view live while running")
    p.add_argument("--plot", metavar="FILE", help="draw memory over guest time per VM and the host state "
                                                  "(.png, .svg or .html)")
    p.add_argument("--stats", action="store_true", help="print the VM's counters at the end")
    p.add_argument("--json", action="store_true", help="print one JSON object with results and counters")
    p.add_argument("--quiet", action="store_true", help="do not echo the guest console")
    add_kernel_options(p)
    p.add_argument("--gdb", metavar="tcp::PORT", help="serve the GDB remote protocol on 127.0.0.1:PORT "
                                                      "(0: any free port, printed on stderr)")
    p.add_argument("-S", dest="gdb_wait", action="store_true",
                   help="with --gdb: stop before the first instruction until the debugger continues")
    add_fault_options(p)
    p.add_argument("--record", metavar="FILE", help="record the run (inputs, faults fired, checkpoints, "
                                                    "final state) for `hvmodel replay FILE`")


# -- the spec ------------------------------------------------------------------------------------

@dataclass
class RunSpec:
    """Everything that defines one ``hvmodel run`` (see the module docstring)."""

    target: str                              # a guest image or a scenario file (.toml)
    mem: int = DEFAULT_MEM
    host_mem: int | None = None              # None: the scenario's, else DEFAULT_HOST_MEM
    mmu: str = "nested"
    max_insns: int = DEFAULT_MAX_INSNS
    swap_dir: str | None = None
    no_swap: bool = False
    no_large_pages: bool = False
    swap_policy: str | None = None
    vms: int = 1
    salt: str | None = None
    share_scan_time: float | None = None
    share_rate_max: int | None = None
    top: bool = False
    plot: str | None = None
    stats: bool = False
    json: bool = False
    quiet: bool = False
    append: str | None = None
    modules: list[str] | None = None         # as given: "FILE [ARGS]", possibly comma-separated
    gdb: str | None = None
    gdb_wait: bool = False
    seed: int | None = None
    faults: list[FaultSpec] = field(default_factory=list)
    record: str | None = None
    argv: list[str] | None = field(default=None, compare=False)   # the list it was parsed from

    # -- serialised form ----------------------------------------------------------------------

    @classmethod
    def from_argv(cls, argv: list[str]) -> "RunSpec":
        """Parse ``hvmodel run`` arguments (bad usage: RunError, status 2; no program exit)."""
        err = io.StringIO()
        parser = argparse.ArgumentParser(prog="hvmodel run", add_help=False)
        add_run_options(parser)
        try:
            with contextlib.redirect_stderr(err):
                ns = parser.parse_args(list(argv))
        except SystemExit:
            msg = err.getvalue().strip().splitlines()
            raise RunError(f"bad run arguments {list(argv)!r}: {msg[-1] if msg else 'see hvmodel run --help'}",
                           EXIT_USAGE) from None
        spec = cls.from_namespace(ns)
        spec.argv = list(argv)
        return spec

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace, **overrides: object) -> "RunSpec":
        """The spec of parsed arguments (and ``overrides``); options a subcommand does not take
        keep their defaults."""
        given = {**vars(ns), **overrides}
        spec = cls(**{f.name: given[f.name] for f in fields(cls) if f.name in given and f.name != "argv"})
        if spec.faults is None:
            spec.faults = []
        return spec

    def to_argv(self) -> list[str]:
        """The canonical ``hvmodel run`` arguments of this spec (defaults left out)."""
        out = [self.target]
        default = RunSpec(self.target)
        for f in fields(self):
            name, value = f.name, getattr(self, f.name)
            if name in ("target", "argv") or value == getattr(default, name):
                continue
            flag = _FLAGS.get(name, "--" + name.replace("_", "-"))
            if isinstance(value, bool):
                out.append(flag)
            elif name in ("mem", "host_mem"):
                out += [flag, _size_text(value)]
            elif name == "modules":
                for m in value:
                    out += [f"{flag}={m}"] if m.startswith("-") else [flag, m]
            elif name == "faults":
                for fs in value:
                    out += [flag, fs.text()]
            elif isinstance(value, str) and value.startswith("-"):
                out.append(f"{flag}={value}")     # a value that looks like an option
            else:
                out += [flag, str(value)]
        return out

    @property
    def command(self) -> str:
        """The one shell command that runs this run again."""
        return command(self.argv if self.argv is not None else self.to_argv())

    # -- derived ----------------------------------------------------------------------------

    def seed_for(self, host_seed: int) -> int:
        """The run's seed: ``--seed``, else the host's (a scenario's ``seed``)."""
        return self.seed if self.seed is not None else host_seed

    def module_list(self) -> list[str]:
        """The kernel modules, commas split."""
        return [m.strip() for item in (self.modules or []) for m in item.split(",") if m.strip()]

    def gdb_port(self) -> int | None:
        """The ``--gdb`` port (``tcp::PORT``, ``tcp:127.0.0.1:PORT``, ``tcp:localhost:PORT``,
        ``PORT``), or None; RunError (status 2) for a bad spec, or -S without --gdb."""
        if self.gdb_wait and not self.gdb:
            raise RunError("-S needs --gdb", EXIT_USAGE)
        if not self.gdb:
            return None
        spec = self.gdb
        rest = spec[4:] if spec.startswith("tcp:") else ":" + spec
        host, _, port = rest.rpartition(":")
        if host not in ("", "127.0.0.1", "localhost"):
            raise RunError(f"--gdb: the stub listens on the loopback interface only, not {host!r}", EXIT_USAGE)
        try:
            value = int(port)
        except ValueError:
            raise RunError(f"--gdb: expected tcp::PORT, got {spec!r}", EXIT_USAGE) from None
        if not 0 <= value <= 65535:
            raise RunError(f"--gdb: port {value} out of range", EXIT_USAGE)
        return value


_FLAGS = {"faults": "--fault", "modules": "--initrd", "gdb_wait": "-S"}


def _size_text(n: int) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def command(argv: list[str]) -> str:
    """The shell command that runs ``argv`` (arguments of ``hvmodel run``)."""
    return "hvmodel run " + shlex.join(argv)


__all__ = ["RunSpec", "add_fault_options", "add_kernel_options", "add_run_options", "add_sharing_options",
           "add_vm_options", "command", "fault_arg", "mode_list", "parse_size", "positive_int"]
