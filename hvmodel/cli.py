"""The ``hvmodel`` command.

Exit status: the guest's own status (what it wrote to the debug-exit port, 0 for
``cli; hlt``) when it powers off; otherwise

====  =====================================================================
 2    bad usage or a bad option, or a guest image that cannot be built/loaded
 3    the guest died: triple fault, deadlock, instruction limit reached, an access
      outside its guest-physical memory
 4    the host failed: out of machine memory, an engine fault
====  =====================================================================

Every failure prints one clear line on stderr (plus a crash report for a triple
fault), never a Python traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .check.lockstep import DEFAULT_EVERY, check
from .report.cost import explain, modeled_cycles
from .guest.image import GuestBuildError
from .guest.load import load_guest
from .report.milestones import format_milestones, milestones
from .host import scenario
from .report import stats
from .host.host import DEFAULT_HOST_MEM, Host, HostConfig
from .host.scenario import size_bytes
from .vm.vm import DEFAULT_MAX_INSNS, DEFAULT_MEM, MIB, MMU_MODES, VMConfig, VMError, VMResult

EXIT_USAGE = 2
EXIT_GUEST_DIED = 3
EXIT_HOST_FAILED = 4

def parse_size(text: str) -> int:
    """``64M``, ``64MiB``, ``1g``, ``4096`` → bytes (binary units)."""
    try:
        return size_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive_int(text: str) -> int:
    try:
        v = int(text.replace("_", ""), 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return v


def repo_guests_dir() -> Path:
    """The guests/ folder next to the package (the demo's guest lives there)."""
    return Path(__file__).resolve().parent.parent / "guests"


class CliError(Exception):
    """One clear line for the user, and the exit status to end with."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hvmodel", description=(
        "A model of a bare-metal hypervisor's memory virtualization running real x86-64 guests."))
    sub = p.add_subparsers(dest="cmd", required=True)

    run = sub.add_parser("run", help="run a guest (.asm source or flat binary) or a scenario (.toml)")
    run.add_argument("guest", help="guest image: .asm source (assembled on the fly) or flat binary; "
                                   "or a scenario file (.toml) describing a host and its VMs")
    _add_vm_options(run)
    run.add_argument("--vms", type=_positive_int, default=1, help="run N copies of the guest on one host")
    run.add_argument("--salt", help="give every VM this page-sharing salt (Mem.ShareForceSalting 1): "
                                    "pages are shared across the VMs")
    run.add_argument("--share-scan-time", type=float, default=None, metavar="MIN",
                     help="Mem.ShareScanTime: guest minutes to scan a whole VM (default 60)")
    run.add_argument("--share-rate-max", type=_positive_int, default=None, metavar="PAGES",
                     help="Mem.ShareRateMax: pages per guest second per VM (default 1024)")
    run.add_argument("--top", action="store_true", help="show the esxtop memory view live while running")
    run.add_argument("--plot", metavar="FILE", help="draw memory over guest time per VM and the host state "
                                                    "(.png, .svg or .html)")
    run.add_argument("--stats", action="store_true", help="print the VM's counters at the end")
    run.add_argument("--json", action="store_true", help="print one JSON object with results and counters")
    run.add_argument("--quiet", action="store_true", help="do not echo the guest console")
    _add_kernel_options(run)
    run.add_argument("--gdb", metavar="tcp::PORT", help="serve the GDB remote protocol on 127.0.0.1:PORT "
                                                        "(0: any free port, printed on stderr)")
    run.add_argument("-S", dest="gdb_wait", action="store_true",
                     help="with --gdb: stop before the first instruction until the debugger continues")
    _add_fault_options(run)
    run.add_argument("--record", metavar="FILE", help="record the run (inputs, faults fired, checkpoints, "
                                                      "final state) for `hvmodel replay FILE`")

    rp = sub.add_parser("replay", help="run a recorded run again and check it reaches the same state")
    rp.add_argument("recording", help="a file written by `hvmodel run ... --record FILE`")

    fl = sub.add_parser("faults", help="list the named faults, their parameters and expected outcomes")
    fl.add_argument("name", nargs="?", help="one fault")

    cp = sub.add_parser("campaign", help="run many (guest x scenario x fault x seed) runs and classify "
                                         "their outcomes")
    cp.add_argument("spec", help="campaign file (TOML; see docs/FAULTS.md)")
    cp.add_argument("--workers", type=_positive_int, default=None,
                    help="local worker processes (default: one per CPU)")
    cp.add_argument("--cluster", metavar="ADDRESS",
                    help="run on an existing Dask cluster (scheduler address, e.g. tcp://host:8786); "
                         "needs the `cluster` extra")
    cp.add_argument("--seeds", type=_positive_int, default=None, metavar="N",
                    help="override the spec: seeds 1..N")
    cp.add_argument("--json", metavar="FILE", help="also write every run's outcome as JSON")
    cp.add_argument("--quiet", action="store_true", help="no progress bar")

    demo = sub.add_parser("demo", help="run the hello guest and explain what the hypervisor did")
    _add_vm_options(demo)

    chk = sub.add_parser("check", help="run a guest under MMU modes and the reference MMU in lock-step "
                                       "and compare")
    chk.add_argument("guest", nargs="?", help="guest image (.asm or flat binary); omit with --matrix")
    chk.add_argument("--matrix", action="store_true",
                     help="run the access matrix (kvm-unit-tests access.c style) instead of a guest")
    chk.add_argument("--sample", type=_positive_int, default=1,
                     help="with --matrix: run every Kth legal combination (default 1: all)")
    chk.add_argument("--mmu", type=_mode_list, default=list(VMM_MODES),
                     help=f"comma-separated VMM modes to check against the reference "
                          f"(default {','.join(VMM_MODES)})")
    chk.add_argument("--every", type=_positive_int, default=DEFAULT_EVERY,
                     help=f"also compare every N instructions (default {DEFAULT_EVERY:,})")
    chk.add_argument("--mem", type=parse_size, default=DEFAULT_MEM, help="guest memory")
    chk.add_argument("--max-insns", type=_positive_int, default=DEFAULT_MAX_INSNS,
                     help="stop the guest after this many instructions")
    _add_kernel_options(chk)
    chk.add_argument("--pressure", type=int, default=0, metavar="PAGES",
                     help="memory management on: share every identical page and swap out PAGES pages "
                          "after every checkpoint (the guest must not notice)")
    _add_fault_options(chk)

    mp = sub.add_parser("map", help="run a guest or scenario, then draw guest virtual → guest physical → "
                                     "machine for some of its pages (SVG)")
    mp.add_argument("guest", help="guest image or scenario file (.toml)")
    _add_vm_options(mp)
    mp.add_argument("--vms", type=_positive_int, default=1, help="run N copies of the guest on one host")
    mp.add_argument("--salt", help="a common page-sharing salt for every VM (Mem.ShareForceSalting 1)")
    mp.add_argument("--share-scan-time", type=float, default=None, metavar="MIN", help="Mem.ShareScanTime")
    mp.add_argument("--share-rate-max", type=_positive_int, default=None, metavar="PAGES", help="Mem.ShareRateMax")
    mp.add_argument("--svg", required=True, metavar="FILE", help="where to write the figure")
    mp.add_argument("--per-kind", type=_positive_int, default=1,
                    help="pages of each kind (shared, zero, compressed, swapped, ballooned, private) per VM")

    cmp = sub.add_parser("compare", help="run a guest under nested and shadow paging and compare "
                                         "their modeled cost")
    cmp.add_argument("guest", help="guest image (.asm or flat binary)")
    cmp.add_argument("--mem", type=parse_size, default=DEFAULT_MEM, help="guest memory")
    cmp.add_argument("--host-mem", type=parse_size, default=DEFAULT_HOST_MEM, help="host memory")
    cmp.add_argument("--max-insns", type=_positive_int, default=DEFAULT_MAX_INSNS,
                     help="stop the guest after this many instructions")
    cmp.add_argument("--json", action="store_true", help="print the comparison as JSON")

    inf = sub.add_parser("info", help="run a guest (to its end, or stop it after --at instructions) and show "
                                      "the hypervisor's view, like QEMU's monitor: mem, tlb or p2m")
    inf.add_argument("what", choices=("mem", "tlb", "p2m"),
                     help="mem: mapped virtual ranges; tlb: every page, virtual -> physical -> machine; "
                          "p2m: guest pages by p2m state")
    inf.add_argument("guest", help="guest image (.asm, kernel or flat binary)")
    _add_vm_options(inf)
    _add_kernel_options(inf)
    inf.add_argument("--at", type=_positive_int, default=None, metavar="N",
                     help="stop the running guest after N instructions and show it then")

    fz = sub.add_parser("fuzz", help="generate page-table programs and check every MMU mode on them")
    fz.add_argument("--seed", type=int, default=1, help="generator seed (default 1)")
    fz.add_argument("--count", type=_positive_int, default=100, help="programs to run (default 100)")
    fz.add_argument("--start", type=int, default=0, help="index of the first program (replay one)")
    fz.add_argument("--mmu", type=_mode_list, default=list(VMM_MODES),
                    help=f"comma-separated VMM modes (default {','.join(VMM_MODES)})")
    fz.add_argument("--no-shrink", action="store_true", help="report a failure without shrinking it")

    bn = sub.add_parser("bench", help="benchmark the VMM modes against native Unicorn (workloads W1-W6)")
    bn.add_argument("--quick", action="store_true", help="a smoke run: reduced sizes, one repetition")
    bn.add_argument("--reps", type=_positive_int, default=None,
                    help="repetitions per workload and mode (default 5; 1 with --quick)")
    bn.add_argument("--only", type=_workload_list, default=None, metavar="W1,W2,...",
                    help="run only these workloads")
    bn.add_argument("--json", action="store_true", help="print the results as JSON")
    return p


def _workload_list(text: str) -> tuple[str, ...]:
    from .bench import ALL
    names = tuple(n.strip().upper() for n in text.split(",") if n.strip())
    bad = [n for n in names if n not in ALL]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"unknown workload(s) {', '.join(bad) or text!r}; have {', '.join(ALL)}")
    return names


VMM_MODES = tuple(m for m in MMU_MODES if m != "native")


def _fault(text: str):
    from .inject import InjectError, parse_fault
    try:
        return parse_fault(text)
    except InjectError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_fault_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=None,
                   help="the run's seed: the host's random choices and the faults' triggers and targets")
    p.add_argument("--fault", type=_fault, action="append", metavar="NAME[:K=V,...]",
                   help="arm a named fault, e.g. swap-read-error:nth=2 or inject-exception:13,at=50000 "
                        "(repeatable; docs/FAULTS.md lists them)")


def parse_run_args(argv: list[str]) -> argparse.Namespace:
    """Parse the arguments of ``hvmodel run`` (no program exit: CliError on bad usage)."""
    import contextlib
    import io
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = _build_parser().parse_args(["run", *argv])
    except SystemExit:
        msg = err.getvalue().strip().splitlines()
        raise CliError(f"bad run arguments {argv!r}: {msg[-1] if msg else 'see hvmodel run --help'}",
                       EXIT_USAGE) from None
    args.argv = list(argv)
    return args


def run_seed(args: argparse.Namespace, host: Host) -> int:
    """The seed of a run: ``--seed``, else the host's (scenario) seed."""
    return args.seed if getattr(args, "seed", None) is not None else host.config.seed


def _mode_list(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MMU_MODES or m == "native"]
    if not modes or bad:
        raise argparse.ArgumentTypeError(
            f"unknown MMU mode(s) {', '.join(bad) or text!r}; VMM modes: "
            f"{', '.join(m for m in MMU_MODES if m != 'native')}")
    return modes


def _add_kernel_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--append", metavar="ARGS", help="kernel command line after the file name (QEMU -append)")
    p.add_argument("--initrd", "--module", dest="modules", action="append", default=None, metavar="FILE",
                   help="a Multiboot module, 'FILE [ARGS]'; repeat, or separate with commas (QEMU -initrd)")


def _load(path: Path, args: argparse.Namespace):
    """The guest image, with the kernel options of ``args`` (bad input: CliError, status 2)."""
    modules = [m.strip() for spec in (getattr(args, "modules", None) or []) for m in spec.split(",") if m.strip()]
    try:
        return load_guest(path, append=getattr(args, "append", None), modules=modules)
    except GuestBuildError as e:
        raise CliError(str(e), EXIT_USAGE) from None


def _add_vm_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mem", type=parse_size, default=DEFAULT_MEM,
                   help=f"guest memory (default {DEFAULT_MEM // MIB}M)")
    p.add_argument("--host-mem", type=parse_size, default=DEFAULT_HOST_MEM,
                   help=f"machine memory of the host (default {DEFAULT_HOST_MEM // MIB}M)")
    p.add_argument("--mmu", choices=MMU_MODES, default="nested",
                   help="MMU virtualization: nested (EPT), shadow (software MMU), native (the reference: "
                        "Unicorn's own MMU, no VMM)")
    p.add_argument("--max-insns", type=_positive_int, default=DEFAULT_MAX_INSNS,
                   help=f"stop the guest after this many instructions (default {DEFAULT_MAX_INSNS:,})")
    p.add_argument("--swap-dir", help="where VM swap files (.vswp) go (default: a temporary folder)")
    p.add_argument("--no-swap", action="store_true",
                   help="give VMs no swap file: a VM must then fit in free host memory")
    p.add_argument("--no-large-pages", action="store_true",
                   help="back guest memory with 4 KiB pages only (Mem.AllocGuestLargePage = 0)")
    p.add_argument("--swap-policy", choices=("random", "clock"), default=None,
                   help="hypervisor swap victims: random (ESXi) or clock over accessed bits")


def _host_config(args: argparse.Namespace, base: HostConfig | None = None) -> HostConfig:
    """The host configuration from a scenario (``base``) and command-line overrides."""
    cfg = base or HostConfig(memsize=getattr(args, "host_mem", DEFAULT_HOST_MEM))
    if base is not None and getattr(args, "host_mem_given", False):
        cfg.memsize = args.host_mem
    if getattr(args, "swap_dir", None):
        cfg.swap_dir = Path(args.swap_dir)
    if getattr(args, "no_swap", False):
        cfg.swap = False
    if getattr(args, "swap_policy", None):
        cfg.swap_policy = args.swap_policy
    if getattr(args, "no_large_pages", False):
        cfg.large_pages = False
    if getattr(args, "share_scan_time", None) is not None:
        cfg.sharing.scan_time_min = args.share_scan_time
    if getattr(args, "share_rate_max", None) is not None:
        cfg.sharing.rate_max = args.share_rate_max
    if getattr(args, "salt", None) is not None:
        cfg.sharing.force_salting = 1
    if getattr(args, "seed", None) is not None:
        cfg.seed = args.seed
    return cfg


def _build_host(args: argparse.Namespace, echo: bool, images: dict | None = None) -> Host:
    """Power on the VMs of a scenario file, or ``--vms`` copies of one guest.

    ``images`` (guest path -> GuestImage) is used and filled as the image cache: a
    recording keeps the images a run used, a replay hands them back.
    """
    target = Path(args.guest)
    if target.suffix == ".toml":
        try:
            base, specs = scenario.load(target)
        except scenario.ScenarioError as e:
            raise CliError(str(e), EXIT_USAGE) from None
        cfg = _host_config(args, base)
    else:
        cfg = _host_config(args)
        specs = [scenario.VMSpec(VMConfig(name=target.stem if getattr(args, "vms", 1) == 1
                                          else f"{target.stem}-{i + 1}",
                                          memsize=args.mem, mmu=args.mmu,
                                          pshare_salt=getattr(args, "salt", None)), target)
                 for i in range(getattr(args, "vms", 1))]
    if images is None:
        images = {}
    out = sys.stdout.buffer

    def echo_fn(data: bytes) -> None:
        out.write(data)
        out.flush()

    try:
        host = Host(cfg)
    except VMError as e:
        raise CliError(str(e), EXIT_USAGE) from None
    try:
        for i, spec in enumerate(specs):
            if spec.guest not in images:
                images[spec.guest] = _load(spec.guest, args)
            if len(specs) > 1:
                spec.config.guest_arg = i + 1
            elif echo:
                spec.config.echo = echo_fn
            host.power_on(spec.config, images[spec.guest])
    except VMError as e:
        host.close()
        raise CliError(str(e), EXIT_USAGE) from None
    return host


def _run_one(guest: Path, args: argparse.Namespace, echo: bool) -> tuple[Host, VMResult]:
    """One guest on its own host (demo, compare)."""
    args.guest = str(guest)
    host = _build_host(args, echo)
    results = host.run(args.max_insns)
    vm = host.vms[0]
    if vm.triple_fault_report:
        results[0].message = vm.triple_fault_report
    return host, results[0]


def _exit_status(result: VMResult) -> int:
    if result.exit_status is not None:
        return result.exit_status
    if result.stop_reason in ("host_failure", "error"):
        return EXIT_HOST_FAILED
    return EXIT_GUEST_DIED


def _print_stats(result: VMResult, mode: str, file=sys.stdout) -> None:
    print(f"--- {result.name}: {result.stop_reason}, exit status {result.exit_status}", file=file)
    for k, v in result.counters.items():
        if isinstance(v, dict):
            v = ", ".join(f"{a}={b}" for a, b in v.items()) or "-"
        elif isinstance(v, int):
            v = f"{v:,}"
        print(f"  {k:<22} {v}", file=file)
    cost = modeled_cycles(mode, result.counters)
    print(f"--- modeled cycles ({mode}; costs in hvmodel/report/cost.py): {cost.total:,}", file=file)
    for k, v in cost.items.items():
        if v:
            print(f"  {k:<22} {v:>16,}  {100 * v / max(1, cost.total):5.1f} %", file=file)


def _gdb_port(spec: str) -> int:
    """``tcp::PORT``, ``tcp:127.0.0.1:PORT``, ``tcp:localhost:PORT`` or ``PORT`` → the port."""
    rest = spec[4:] if spec.startswith("tcp:") else ":" + spec
    host, _, port = rest.rpartition(":")
    if host not in ("", "127.0.0.1", "localhost"):
        raise CliError(f"--gdb: the stub listens on the loopback interface only, not {host!r}", EXIT_USAGE)
    try:
        value = int(port)
    except ValueError:
        raise CliError(f"--gdb: expected tcp::PORT, got {spec!r}", EXIT_USAGE) from None
    if not 0 <= value <= 65535:
        raise CliError(f"--gdb: port {value} out of range", EXIT_USAGE)
    return value


def _run_gdb(host: Host, args: argparse.Namespace) -> list[VMResult]:
    from .debug.gdbstub import GdbStub, GdbStubError
    if len(host.vms) != 1:
        raise CliError("--gdb debugs one VM: not with --vms or a scenario of several VMs", EXIT_USAGE)
    try:
        stub = GdbStub(host.vms[0], host, port=_gdb_port(args.gdb), wait=args.gdb_wait, max_insns=args.max_insns)
    except GdbStubError as e:
        raise CliError(str(e), EXIT_USAGE) from None
    stub.serve()
    return [host.vms[0].result()]


def cmd_run(args: argparse.Namespace) -> int:
    echo = not (args.json or args.quiet or args.top)
    if args.gdb_wait and not args.gdb:
        raise CliError("-S needs --gdb", EXIT_USAGE)
    if args.gdb:
        _gdb_port(args.gdb)  # a bad spec is a usage error before anything starts
    images: dict | None = {} if args.record else None
    host = _build_host(args, echo, images)
    try:
        session = _session(host, args)
        rounds = session.on_round if session is not None else None
        try:
            if args.gdb:
                results = _run_gdb(host, args)
            elif args.top:
                from rich.console import Console
                from rich.live import Live
                console = Console()
                if not console.is_terminal:
                    console = Console(width=160)  # a pipe or a file: keep every column readable
                with Live(stats.rich_table(host), console=console, refresh_per_second=4, transient=False) as live:
                    def top(h: Host) -> None:
                        if rounds is not None:
                            rounds(h)
                        live.update(stats.rich_table(h))
                    results = host.run(args.max_insns, on_round=top)
            else:
                results = host.run(args.max_insns, on_round=rounds)
        except Exception:
            if session is None or not args.fault:
                raise
            import traceback
            print("hvmodel: the VMM crashed under fault injection (a bug):\n" + traceback.format_exc(),
                  file=sys.stderr, end="")
            print(f"hvmodel: reproduce: {_reproduce(args)}", file=sys.stderr)
            return EXIT_HOST_FAILED
        for vm, r in zip(host.vms, results):
            if vm.triple_fault_report:
                r.message = vm.triple_fault_report
        digest = session.finish(results) if session is not None else None
        if args.record:
            from .run import replay
            try:
                replay.write(args.record, digest, images)
            except OSError as e:
                raise CliError(f"--record: cannot write {args.record}: {e.strerror}", EXIT_USAGE) from None
        if args.plot:
            from .report import plot
            try:
                plot.write(host.timeline, args.plot, title=f"hvmodel: {Path(args.guest).name}")
            except (ValueError, OSError) as e:
                raise CliError(f"--plot: {e}", EXIT_USAGE) from None
        if args.json:
            out = {
                "vms": [{"name": r.name, "exit_status": r.exit_status, "stop_reason": r.stop_reason,
                         "message": r.message, "console": r.console, "counters": r.counters,
                         "modeled_cycles": modeled_cycles(vm.config.mmu, r.counters).items}
                        for vm, r in zip(host.vms, results)],
                "host": host.counters(),
                "esxtop": stats.rows(host),
                "milestones": milestones(host.timeline),
            }
            if digest is not None:
                out["faults"] = digest.fired
                out["memory_hash"] = {v.name: v.memory_hash for v in digest.vms}
            print(json.dumps(out, indent=2))
        else:
            if len(results) == 1 and results[0].console and not results[0].console.endswith("\n") and echo:
                print()
            if args.stats:
                if len(results) == 1:
                    _print_stats(results[0], host.vms[0].config.mmu)
                print(stats.table(host))
                if len(results) > 1:
                    print(format_milestones(milestones(host.timeline)))
            if digest is not None and args.fault:
                for f in digest.fired:
                    print(f"hvmodel: fault {f['fault']} fired in {f['vm']} at instruction {f['insns']:,}: "
                          f"{f['detail']}", file=sys.stderr)
                if not digest.fired:
                    print("hvmodel: no armed fault fired", file=sys.stderr)
        status = 0
        for r in results:
            if r.exit_status is None:
                print(f"hvmodel: {r.name}: {r.message}", file=sys.stderr)
            if not status:
                status = _exit_status(r)
        if status and args.fault:
            print(f"hvmodel: reproduce: {_reproduce(args)}", file=sys.stderr)
        return status
    finally:
        host.close()


def _session(host: Host, args: argparse.Namespace):
    """Arm the run's faults and record checkpoints when faults or a recording are asked for."""
    if not (args.fault or args.record):
        return None
    from .inject import InjectError
    from .run.session import Session
    try:
        return Session(host, args.fault or [], run_seed(args, host), getattr(args, "argv", []))
    except InjectError as e:
        raise CliError(str(e), EXIT_USAGE) from None


def _reproduce(args: argparse.Namespace) -> str:
    """The one command that runs this run again."""
    from .run.session import command
    return command(getattr(args, "argv", []))


def cmd_demo(args: argparse.Namespace) -> int:
    guest = repo_guests_dir() / "hello.asm"
    print(f"hvmodel demo: running {guest.name} on a {args.host_mem // MIB} MiB host, "
          f"{args.mem // MIB} MiB guest, {args.mmu} paging\n--- guest console ---")
    host, r = _run_one(guest, args, echo=True)
    c = r.counters
    if r.console and not r.console.endswith("\n"):
        print()
    print("--- what the hypervisor did ---")
    print(f"  the guest ran {c['instructions']:,} instructions and ended: {r.message}")
    print(f"  Unicorn asked the VMM {c['tlb_fills']:,} times to translate a guest-virtual page;")
    print(f"  each was a 2D walk through the guest's tables and the VMM's nested tables: "
          f"{c['walk_refs']:,} memory references in {c['walks']:,} walks "
          f"({c['walk_refs'] / max(1, c['walks']):.1f} per walk, 24 at most)")
    lp = c.get("large_pages_backed", 0)
    print(f"  {c['ept_violations']:,} EPT violations; {c['frames_allocated']:,} first touches backed "
          f"{c['guest_pages_backed']:,} guest pages with machine frames"
          + (f", as {lp} large pages (2 MiB, 512 frames each: backed whole when the host has "
             f"memory to spare, Mem.AllocGuestLargePage)" if lp else "")
          + f"; the VMM's nested tables use {c['nested_table_frames']} frames")
    print(f"  host: {host.pool.used_frames:,} of {host.pool.nframes:,} machine frames in use")
    return _exit_status(r)


def cmd_check(args: argparse.Namespace) -> int:
    if args.matrix:
        if args.guest:
            raise CliError("check: give either a guest or --matrix, not both", EXIT_USAGE)
        from .check.matrix import run_matrix
        res = run_matrix(args.mmu, sample=args.sample)
        print("\n".join(res.lines()))
        return 0 if res.ok else 1
    if not args.guest:
        raise CliError("check: a guest image (or --matrix) is required", EXIT_USAGE)
    image = _load(Path(args.guest), args)
    # Faults go into the VMM modes (the reference has no VMM): the lock-step comparison shows
    # the first instruction at which a fault became visible.
    from .inject import InjectError, Injector
    injector = Injector(args.fault or [], args.seed or 0)
    try:
        res = check(image, args.mmu, memsize=args.mem, every=args.every, max_insns=args.max_insns,
                    pressure=args.pressure, configure=injector.arm_vm if args.fault else None)
    except (VMError, InjectError) as e:
        raise CliError(str(e), EXIT_USAGE) from None
    finally:
        injector.detach()
    if not res.ok:
        print(res.report)
    print(res.summary())
    for f in injector.log:
        print(f"  fault {f.fault} fired in {f.vm} at instruction {f.insns:,}: {f.detail}")
    for mode, m in res.memory.items():
        print(f"  {mode}: {m['SWW']} pages swapped out, {m['SWR']} swapped in, {m['SHRD']} shared at the end "
              f"({m['ZERO']} zero), {m['COW_breaks']} copy-on-write breaks")
    return 0 if res.ok else 1


def cmd_compare(args: argparse.Namespace) -> int:
    costs = {}
    results = {}
    for mode in VMM_MODES:
        args.mmu = mode
        _, r = _run_one(Path(args.guest), args, echo=False)
        if r.exit_status != 0:
            print(f"hvmodel: {r.name} under {mode}: {r.stop_reason}: {r.message}", file=sys.stderr)
            return _exit_status(r)
        results[mode] = r
        costs[mode] = modeled_cycles(mode, r.counters)
    a, b = costs["nested"], costs["shadow"]
    if args.json:
        print(json.dumps({m: {"total": c.total, "overhead": c.overhead, "items": c.items,
                              "counters": results[m].counters} for m, c in costs.items()}, indent=2))
        return 0
    print(f"{Path(args.guest).name}: {results['nested'].counters['instructions']:,} guest instructions")
    keys = list(dict.fromkeys([*a.items, *b.items]))
    print(f"  {'modeled cycles':<22} {'nested':>16} {'shadow':>16}")
    for k in keys:
        print(f"  {k:<22} {a.items.get(k, 0):>16,} {b.items.get(k, 0):>16,}")
    print(f"  {'total':<22} {a.total:>16,} {b.total:>16,}")
    print(explain(a, b))
    return 0


def cmd_map(args: argparse.Namespace) -> int:
    from .report import mapfig
    host = _build_host(args, echo=False)
    try:
        results = host.run(args.max_insns)
        vms = [vm for vm in host.vms if vm.p2m is not None]
        try:
            Path(args.svg).write_text(mapfig.svg(vms, args.per_kind))
        except OSError as e:
            raise CliError(f"--svg: cannot write {args.svg}: {e.strerror}", EXIT_USAGE) from None
        print(f"wrote {args.svg}: {len(vms)} VM(s)")
        return next((_exit_status(r) for r in results if _exit_status(r)), 0)
    finally:
        host.close()


def cmd_info(args: argparse.Namespace) -> int:
    from .debug import monitor
    host = _build_host(args, echo=False)
    try:
        vm = host.vms[0]
        limit = args.at if args.at is not None else args.max_insns
        while vm.running and vm.vcpu.insns < limit:
            vm.step(args.max_insns, limit - vm.vcpu.insns)
        state = "running" if vm.running else f"{vm.stop_reason}, exit status {vm.exit_status}"
        print(f"# {vm.config.name} ({vm.config.mmu}) after {vm.vcpu.insns:,} instructions: {state}")
        print("\n".join(monitor.INFO[args.what](vm)))
        return 0
    finally:
        host.close()


def cmd_fuzz(args: argparse.Namespace) -> int:
    from .check.fuzz import format_result, fuzz
    res = fuzz(args.seed, args.count, args.mmu, start=args.start, shrink_failures=not args.no_shrink)
    print(format_result(res))
    return 0 if res.ok else 1


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import ALL, BenchError, format_table, run_suite
    from .bench.suite import progress_to_stderr
    try:
        res = run_suite(quick=args.quick, reps=args.reps, only=args.only or ALL,
                        progress=None if args.json else progress_to_stderr)
    except BenchError as e:
        raise CliError(f"bench: {e}", 1) from None
    print(json.dumps(res, indent=2) if args.json else format_table(res))
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from .run.replay import ReplayError, replay
    try:
        res = replay(args.recording)
    except ReplayError as e:
        raise CliError(str(e), EXIT_USAGE) from None
    print("\n".join(res.lines))
    return 0 if res.ok else 1


def cmd_campaign(args: argparse.Namespace) -> int:
    from .run.campaign import CampaignError, load_spec, run_campaign
    try:
        spec = load_spec(args.spec)
        if args.seeds:
            spec.seeds = list(range(1, args.seeds + 1))
        report = run_campaign(spec, workers=args.workers, cluster=args.cluster, progress=not args.quiet)
    except CampaignError as e:
        raise CliError(str(e), EXIT_USAGE) from None
    print(report.text())
    if args.json:
        try:
            Path(args.json).write_text(json.dumps(report.as_dict(), indent=2))
        except OSError as e:
            raise CliError(f"--json: cannot write {args.json}: {e.strerror}", EXIT_USAGE) from None
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hvmodel`` console script."""
    parser = _build_parser()
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(raw)
    try:
        if args.cmd == "run":
            args.argv = raw[1:]   # what reproduces this run (and what a recording keeps)
            return cmd_run(args)
        if args.cmd == "replay":
            return cmd_replay(args)
        if args.cmd == "campaign":
            return cmd_campaign(args)
        if args.cmd == "faults":
            from .inject import InjectError
            from .inject.faults import describe
            try:
                print(describe(args.name))
            except InjectError as e:
                raise CliError(str(e), EXIT_USAGE) from None
            return 0
        if args.cmd == "demo":
            return cmd_demo(args)
        if args.cmd == "check":
            return cmd_check(args)
        if args.cmd == "fuzz":
            return cmd_fuzz(args)
        if args.cmd == "compare":
            return cmd_compare(args)
        if args.cmd == "map":
            return cmd_map(args)
        if args.cmd == "bench":
            return cmd_bench(args)
        if args.cmd == "info":
            return cmd_info(args)
    except CliError as e:
        print(f"hvmodel: {e}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        print("hvmodel: interrupted", file=sys.stderr)
        return 130
    parser.error(f"unknown command {args.cmd}")
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
