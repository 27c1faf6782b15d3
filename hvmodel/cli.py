"""The ``hvmodel`` command: an adapter from arguments to the library and back.

Each subcommand parses its arguments (argparse), turns them into the library's values (a
:class:`~hvmodel.run.spec.RunSpec` for everything that builds a host), calls the library
(:mod:`hvmodel.run`, :mod:`hvmodel.check`, :mod:`hvmodel.bench`, …) and prints the result;
the exit status is the library's (hvmodel/run/errors.py):

====  =====================================================================
 2    bad usage or a bad option, or a guest image that cannot be built/loaded
 3    the guest died: triple fault, deadlock, instruction limit reached, an access
      outside its guest-physical memory
 4    the host failed: out of machine memory, an engine fault
====  =====================================================================

or the guest's own status when it powers off. Every failure prints one clear line on
stderr (plus a crash report for a triple fault), never a Python traceback. Nothing in
the library imports this module.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from .check.lockstep import DEFAULT_EVERY, check
from .host.host import DEFAULT_HOST_MEM, Host
from .mmu.modes import VMM_MODES
from .report import stats
from .report.cost import explain, modeled_cycles
from .report.milestones import format_milestones, milestones
from .run.build import build_host, load_image
from .run.errors import EXIT_HOST_FAILED, EXIT_USAGE, RunError, exit_status
from .run.session import Run
from .run.spec import (RunSpec, add_fault_options, add_kernel_options, add_run_options, add_sharing_options,
                       add_vm_options, mode_list, parse_size, positive_int)
from .vm.vm import DEFAULT_MAX_INSNS, DEFAULT_MEM, MIB, VMError, VMResult

CliError = RunError   # one clear line and an exit status (the library's own error)


def repo_guests_dir() -> Path:
    """The guests/ folder next to the package (the demo's guest lives there)."""
    return Path(__file__).resolve().parent.parent / "guests"


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hvmodel", description=(
        "A model of a bare-metal hypervisor's memory virtualization running real x86-64 guests."))
    sub = p.add_subparsers(dest="cmd", required=True)

    run = sub.add_parser("run", help="run a guest (.asm source or flat binary) or a scenario (.toml)")
    add_run_options(run)

    rp = sub.add_parser("replay", help="run a recorded run again and check it reaches the same state")
    rp.add_argument("recording", help="a file written by `hvmodel run ... --record FILE`")

    fl = sub.add_parser("faults", help="list the named faults, their parameters and expected outcomes")
    fl.add_argument("name", nargs="?", help="one fault")

    cp = sub.add_parser("campaign", help="run many (guest x scenario x fault x seed) runs and classify "
                                         "their outcomes")
    cp.add_argument("spec", help="campaign file (TOML; see docs/FAULTS.md)")
    cp.add_argument("--workers", type=positive_int, default=None,
                    help="local worker processes (default: one per CPU)")
    cp.add_argument("--cluster", metavar="ADDRESS",
                    help="run on an existing Dask cluster (scheduler address, e.g. tcp://host:8786); "
                         "needs the `cluster` extra")
    cp.add_argument("--seeds", type=positive_int, default=None, metavar="N",
                    help="override the spec: seeds 1..N")
    cp.add_argument("--json", metavar="FILE", help="also write every run's outcome as JSON")
    cp.add_argument("--quiet", action="store_true", help="no progress bar")

    demo = sub.add_parser("demo", help="run the hello guest and explain what the hypervisor did")
    add_vm_options(demo)

    chk = sub.add_parser("check", help="run a guest under MMU modes and the reference MMU in lock-step "
                                       "and compare")
    chk.add_argument("guest", nargs="?", help="guest image (.asm or flat binary); omit with --matrix or --mutants")
    chk.add_argument("--matrix", action="store_true",
                     help="run the access matrix (kvm-unit-tests access.c style) instead of a guest")
    chk.add_argument("--delivery", action="store_true",
                     help="run the delivery matrix (events through the IDT, against the SDM oracle) instead")
    chk.add_argument("--mutants", action="store_true",
                     help="mutation score: run every seeded VMM bug of the catalogue against the checkers")
    chk.add_argument("--only", metavar="NAME,...", default=None,
                     help="with --mutants: only these mutants")
    chk.add_argument("--json", action="store_true", help="with --mutants: print the results as JSON")
    chk.add_argument("--sample", type=positive_int, default=1,
                     help="with --matrix or --delivery: run one in K combinations (default 1: all)")
    chk.add_argument("--mmu", type=mode_list, default=list(VMM_MODES),
                     help=f"comma-separated VMM modes to check against the reference "
                          f"(default {','.join(VMM_MODES)})")
    chk.add_argument("--every", type=positive_int, default=DEFAULT_EVERY,
                     help=f"also compare every N instructions (default {DEFAULT_EVERY:,})")
    chk.add_argument("--mem", type=parse_size, default=DEFAULT_MEM, help="guest memory")
    chk.add_argument("--max-insns", type=positive_int, default=DEFAULT_MAX_INSNS,
                     help="stop the guest after this many instructions")
    add_kernel_options(chk)
    chk.add_argument("--pressure", type=int, default=0, metavar="PAGES",
                     help="memory management on: share every identical page and swap out PAGES pages "
                          "after every checkpoint (the guest must not notice)")
    chk.add_argument("--no-large-pages", action="store_true",
                     help="no 2 MiB pages in the VMM modes (Mem.AllocGuestLargePage 0)")
    add_fault_options(chk)

    mp = sub.add_parser("map", help="run a guest or scenario, then draw guest virtual → guest physical → "
                                     "machine for some of its pages (SVG)")
    mp.add_argument("target", metavar="guest", help="guest image or scenario file (.toml)")
    add_vm_options(mp)
    add_sharing_options(mp)
    mp.add_argument("--svg", required=True, metavar="FILE", help="where to write the figure")
    mp.add_argument("--per-kind", type=positive_int, default=1,
                    help="pages of each kind (shared, zero, compressed, swapped, ballooned, private) per VM")

    cmp = sub.add_parser("compare", help="run a guest under nested and shadow paging and compare "
                                         "their modeled cost")
    cmp.add_argument("target", metavar="guest", help="guest image (.asm or flat binary)")
    cmp.add_argument("--mem", type=parse_size, default=DEFAULT_MEM, help="guest memory")
    cmp.add_argument("--host-mem", type=parse_size, default=None, help="host memory")
    cmp.add_argument("--max-insns", type=positive_int, default=DEFAULT_MAX_INSNS,
                     help="stop the guest after this many instructions")
    cmp.add_argument("--json", action="store_true", help="print the comparison as JSON")

    inf = sub.add_parser("info", help="run a guest (to its end, or stop it after --at instructions) and show "
                                      "the hypervisor's view, like QEMU's monitor: mem, tlb or p2m")
    inf.add_argument("what", choices=("mem", "tlb", "p2m"),
                     help="mem: mapped virtual ranges; tlb: every page, virtual -> physical -> machine; "
                          "p2m: guest pages by p2m state")
    inf.add_argument("target", metavar="guest", help="guest image (.asm, kernel or flat binary)")
    add_vm_options(inf)
    add_kernel_options(inf)
    inf.add_argument("--at", type=positive_int, default=None, metavar="N",
                     help="stop the running guest after N instructions and show it then")

    fz = sub.add_parser("fuzz", help="generate page-table programs and check every MMU mode on them")
    fz.add_argument("--seed", type=int, default=1, help="generator seed (default 1)")
    fz.add_argument("--count", type=positive_int, default=100, help="programs to run (default 100)")
    fz.add_argument("--start", type=int, default=0, help="index of the first program (replay one)")
    fz.add_argument("--mmu", type=mode_list, default=list(VMM_MODES),
                    help=f"comma-separated VMM modes (default {','.join(VMM_MODES)})")
    fz.add_argument("--no-shrink", action="store_true", help="report a failure without shrinking it")

    bn = sub.add_parser("bench", help="benchmark the VMM modes against native Unicorn (workloads W1-W6)")
    bn.add_argument("--quick", action="store_true", help="a smoke run: reduced sizes, one repetition")
    bn.add_argument("--reps", type=positive_int, default=None,
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


def _echo(data: bytes) -> None:
    out = sys.stdout.buffer
    out.write(data)
    out.flush()


def _run_one(spec: RunSpec, echo: bool) -> tuple[Host, VMResult]:
    """One guest on its own host (demo, compare); the caller closes the host."""
    host = build_host(spec, echo=_echo if echo else None)
    try:
        results = host.run(spec.max_insns)
    except BaseException:
        host.close()
        raise
    vm = host.vms[0]
    if vm.triple_fault_report:
        results[0].message = vm.triple_fault_report
    return host, results[0]


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


def cmd_run(spec: RunSpec) -> int:
    echo = not (spec.json or spec.quiet or spec.top)
    with Run(spec, echo=_echo if echo else None) as run:
        host = run.host
        if spec.top and not spec.gdb:
            from rich.console import Console
            from rich.live import Live
            console = Console()
            if not console.is_terminal:
                console = Console(width=160)  # a pipe or a file: keep every column readable
            with Live(stats.rich_table(host), console=console, refresh_per_second=4, transient=False) as live:
                results = run.execute(on_round=lambda h: live.update(stats.rich_table(h)))
        else:
            results = run.execute()
        if results is None:
            print("hvmodel: the VMM crashed under fault injection (a bug):\n" + run.crash, file=sys.stderr, end="")
            print(f"hvmodel: reproduce: {run.command}", file=sys.stderr)
            return EXIT_HOST_FAILED
        digest = run.digest
        if spec.plot:
            from .report import plot
            try:
                plot.write(host.timeline, spec.plot, title=f"hvmodel: {Path(spec.target).name}")
            except (ValueError, OSError) as e:
                raise RunError(f"--plot: {e}", EXIT_USAGE) from None
        if spec.json:
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
            if spec.stats:
                if len(results) == 1:
                    _print_stats(results[0], host.vms[0].config.mmu)
                print(stats.table(host))
                if len(results) > 1:
                    print(format_milestones(milestones(host.timeline)))
            if digest is not None and spec.faults:
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
                status = exit_status(r)
        if status and spec.faults:
            print(f"hvmodel: reproduce: {run.command}", file=sys.stderr)
        return status


def cmd_demo(args: argparse.Namespace) -> int:
    guest = repo_guests_dir() / "hello.asm"
    spec = RunSpec.from_namespace(args, target=str(guest))
    host_mem = spec.host_mem if spec.host_mem is not None else DEFAULT_HOST_MEM
    print(f"hvmodel demo: running {guest.name} on a {host_mem // MIB} MiB host, "
          f"{spec.mem // MIB} MiB guest, {spec.mmu} paging\n--- guest console ---")
    host, r = _run_one(spec, echo=True)
    try:
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
        return exit_status(r)
    finally:
        host.close()


def cmd_mutants(args: argparse.Namespace) -> int:
    from .check.mutants import CATALOGUE, MutantError, by_name
    from .check.mutants.runner import as_json, run_mutants, summary
    if args.guest or args.matrix:
        raise RunError("check: --mutants takes no guest and no --matrix", EXIT_USAGE)
    try:
        mutants = [by_name(n.strip()) for n in args.only.split(",") if n.strip()] if args.only else list(CATALOGUE)
    except KeyError as e:
        raise RunError(f"check --only: no mutant {e.args[0]!r} (hvmodel check --mutants lists them)", EXIT_USAGE) \
            from None

    def show(r) -> None:
        if not args.json:
            print(r.line(), flush=True)
    try:
        results = run_mutants(mutants, progress=show)
    except MutantError as e:
        raise RunError(str(e), EXIT_USAGE) from None
    print(as_json(results) if args.json else summary(results))
    return 0 if all(r.killed for r in results) else 1


def cmd_check(args: argparse.Namespace) -> int:
    if args.mutants:
        return cmd_mutants(args)
    if args.only or args.json:
        raise RunError("check: --only and --json go with --mutants", EXIT_USAGE)
    if args.delivery:
        if args.guest or args.matrix:
            raise RunError("check: --delivery takes no guest and no --matrix", EXIT_USAGE)
        from .check.delivery_matrix import run_matrix as run_delivery
        res = run_delivery(args.mmu, sample=args.sample)
        print("\n".join(res.lines()))
        return 0 if res.ok else 1
    if args.matrix:
        if args.guest:
            raise RunError("check: give either a guest or --matrix, not both", EXIT_USAGE)
        from .check.matrix import run_matrix
        res = run_matrix(args.mmu, sample=args.sample)
        print("\n".join(res.lines()))
        return 0 if res.ok else 1
    if not args.guest:
        raise RunError("check: a guest image (or --matrix) is required", EXIT_USAGE)
    image = load_image(Path(args.guest), RunSpec(args.guest, append=args.append, modules=args.modules))
    # Faults go into the VMM modes (the reference has no VMM): the lock-step comparison shows
    # the first instruction at which a fault became visible.
    from .inject import InjectError, Injector
    faults = args.faults or []
    injector = Injector(faults, args.seed or 0)
    try:
        res = check(image, args.mmu, memsize=args.mem, every=args.every, max_insns=args.max_insns,
                    pressure=args.pressure, configure=injector.arm_vm if faults else None,
                    large_pages=not args.no_large_pages)
    except (VMError, InjectError) as e:
        raise RunError(str(e), EXIT_USAGE) from None
    finally:
        injector.detach()
    if not res.ok:
        print(res.report)
    print(res.summary())
    for f in injector.log:
        print(f"  fault {f.fault} fired in {f.vm} at instruction {f.insns:,}: {f.detail}")
    for mode, m in res.memory.items():
        print(f"  {mode}: {m['ZIP']} pages compressed, {m['SWW']} swapped out, {m['SWR']} swapped in, "
              f"{m['SHRD']} shared at the end ({m['ZERO']} zero), {m['COW_breaks']} copy-on-write breaks")
    return 0 if res.ok else 1


def cmd_compare(args: argparse.Namespace) -> int:
    spec = RunSpec.from_namespace(args)
    costs = {}
    results = {}
    for mode in VMM_MODES:
        host, r = _run_one(dataclasses.replace(spec, mmu=mode), echo=False)
        host.close()
        if r.exit_status != 0:
            print(f"hvmodel: {r.name} under {mode}: {r.stop_reason}: {r.message}", file=sys.stderr)
            return exit_status(r)
        results[mode] = r
        costs[mode] = modeled_cycles(mode, r.counters)
    a, b = costs["nested"], costs["shadow"]
    if args.json:
        print(json.dumps({m: {"total": c.total, "overhead": c.overhead, "items": c.items,
                              "counters": results[m].counters} for m, c in costs.items()}, indent=2))
        return 0
    print(f"{Path(spec.target).name}: {results['nested'].counters['instructions']:,} guest instructions")
    keys = list(dict.fromkeys([*a.items, *b.items]))
    print(f"  {'modeled cycles':<22} {'nested':>16} {'shadow':>16}")
    for k in keys:
        print(f"  {k:<22} {a.items.get(k, 0):>16,} {b.items.get(k, 0):>16,}")
    print(f"  {'total':<22} {a.total:>16,} {b.total:>16,}")
    print(explain(a, b))
    return 0


def cmd_map(args: argparse.Namespace) -> int:
    from .report import mapfig
    spec = RunSpec.from_namespace(args)
    host = build_host(spec)
    try:
        results = host.run(spec.max_insns)
        vms = [vm for vm in host.vms if vm.p2m is not None]
        try:
            Path(args.svg).write_text(mapfig.svg(vms, args.per_kind))
        except OSError as e:
            raise RunError(f"--svg: cannot write {args.svg}: {e.strerror}", EXIT_USAGE) from None
        print(f"wrote {args.svg}: {len(vms)} VM(s)")
        return next((exit_status(r) for r in results if exit_status(r)), 0)
    finally:
        host.close()


def cmd_info(args: argparse.Namespace) -> int:
    from .debug import monitor
    spec = RunSpec.from_namespace(args)
    host = build_host(spec)
    try:
        vm = host.vms[0]
        limit = args.at if args.at is not None else spec.max_insns
        while vm.running and vm.vcpu.insns < limit:
            vm.step(spec.max_insns, limit - vm.vcpu.insns)
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
        raise RunError(f"bench: {e}", 1) from None
    print(json.dumps(res, indent=2) if args.json else format_table(res))
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from .run.replay import ReplayError, replay
    try:
        res = replay(args.recording)
    except ReplayError as e:
        raise RunError(str(e), EXIT_USAGE) from None
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
        raise RunError(str(e), EXIT_USAGE) from None
    print(report.text())
    if args.json:
        try:
            Path(args.json).write_text(json.dumps(report.as_dict(), indent=2))
        except OSError as e:
            raise RunError(f"--json: cannot write {args.json}: {e.strerror}", EXIT_USAGE) from None
    return 0 if report.ok else 1


def cmd_faults(args: argparse.Namespace) -> int:
    from .inject import InjectError
    from .inject.registry import describe
    try:
        print(describe(args.name))
    except InjectError as e:
        raise RunError(str(e), EXIT_USAGE) from None
    return 0


COMMANDS = {"replay": cmd_replay, "campaign": cmd_campaign, "faults": cmd_faults, "demo": cmd_demo,
            "check": cmd_check, "fuzz": cmd_fuzz, "compare": cmd_compare, "map": cmd_map, "bench": cmd_bench,
            "info": cmd_info}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hvmodel`` console script."""
    parser = _build_parser()
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(raw)
    try:
        if args.cmd == "run":
            spec = RunSpec.from_namespace(args)
            spec.argv = raw[1:]   # what reproduces this run (and what a recording keeps)
            return cmd_run(spec)
        return COMMANDS[args.cmd](args)
    except RunError as e:
        print(f"hvmodel: {e}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        print("hvmodel: interrupted", file=sys.stderr)
        return 130


__all__ = ["CliError", "main", "parse_size"]


if __name__ == "__main__":
    sys.exit(main())
