"""Running programs in lock-step against the reference MMU, and the ``hvmodel fuzz`` loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from ...guest.asm import build
from ..lockstep import check
from .generation import program_for_seed
from .program import EVERY, HOST_MEM, MAX_INSNS, MEMSIZE, Program
from .rendering import render
from .shrinking import shrink


# ------------------------------------------------------------------------------------
# running


@dataclass
class RunOutcome:
    ok: bool
    kind: str                  # "" | "mismatch" | "invalid" (the reference did not finish well)
    report: str
    summary: str
    instructions: int = 0


def run_program(program: Program, modes: list[str], *, configure=None,
                every: int = EVERY) -> RunOutcome:
    """Build ``program`` and check it in lock-step; also check that the reference finished."""
    image = build(render(program), source_name=program.name)
    seen: dict[str, object] = {}

    def conf(vm):
        seen[vm.config.name] = vm
        if configure is not None:
            configure(vm)

    res = check(image, list(modes), memsize=MEMSIZE, host_mem=HOST_MEM, every=every,
                max_insns=MAX_INSNS, configure=conf)
    if not res.ok:
        return RunOutcome(False, "mismatch", res.report, res.summary(), res.instructions)
    ref = seen["native"]
    bad = ""
    if ref.stop_reason != "power_off" or ref.exit_status != 0:
        bad = f"the reference did not finish: {ref.stop_reason} {ref.message}"
    else:
        for v, err, _cr2, rip in ref.events.log:
            if v not in (13, 14, 0x80) or v == 13 and err != 0:
                bad = f"unexpected event in the reference: vector {v} err {err} at {rip:#x}"
                break
    if bad:
        return RunOutcome(False, "invalid", bad, res.summary(), res.instructions)
    return RunOutcome(True, "", "", res.summary(), res.instructions)


@dataclass
class FuzzFailure:
    seed: int
    index: int
    kind: str                  # mismatch | invalid (a generator bug: the program is not well formed)
    original: Program
    program: Program           # shrunk
    text: str                  # the shrunk program's assembly
    report: str                # the check report of the shrunk program
    original_report: str
    shrink_runs: int = 0


@dataclass
class FuzzResult:
    seed: int
    start: int
    count: int
    modes: list[str]
    programs_run: int = 0
    failures: int = 0
    instructions: int = 0
    elapsed: float = 0.0
    first_failure: FuzzFailure | None = None

    @property
    def ok(self) -> bool:
        return self.failures == 0

    @property
    def replay_command(self) -> str:
        i = self.first_failure.index if self.first_failure else self.start
        return f"hvmodel fuzz --seed {self.seed} --count 1 --start {i} --mmu {','.join(self.modes)}"

    def summary(self) -> str:
        s = (f"{self.programs_run} programs, {self.failures} mismatches "
             f"({', '.join(self.modes)} vs native, seed {self.seed}, start {self.start}, "
             f"{self.instructions:,} instructions, {self.elapsed:.1f} s)")
        return s


def fuzz(seed: int, count: int, modes: list[str], *, start: int = 0, configure=None,
         progress: Callable[[int, RunOutcome], None] | None = None, shrink_failures: bool = True,
         max_shrink_runs: int = 400) -> FuzzResult:
    """Run programs ``start .. start+count-1`` of ``seed``; shrink and stop at the first failure.

    ``configure(vm)`` is passed to the checker (tests arm a broken MMU with it);
    ``progress(index, outcome)`` is called after each program.
    """
    t0 = time.perf_counter()
    res = FuzzResult(seed=seed, start=start, count=count, modes=list(modes))
    for index in range(start, start + count):
        program = program_for_seed(seed, index)
        out = run_program(program, modes, configure=configure)
        res.programs_run += 1
        res.instructions += out.instructions
        if progress is not None:
            progress(index, out)
        if out.ok:
            continue
        res.failures += 1
        small, runs = program, 0
        final = out
        if shrink_failures:
            calls = [0]

            def still_fails(p: Program, kind=out.kind) -> bool:
                calls[0] += 1
                o = run_program(p, modes, configure=configure)
                return not o.ok and o.kind == kind
            small = shrink(program, still_fails, max_runs=max_shrink_runs)
            runs = calls[0]
            final = run_program(small, modes, configure=configure)
        res.first_failure = FuzzFailure(seed, index, out.kind, program, small, render(small),
                                        final.report or out.report, out.report, runs)
        break
    res.elapsed = time.perf_counter() - t0
    return res


def format_result(res: FuzzResult) -> str:
    """What ``hvmodel fuzz`` prints."""
    lines = [res.summary()]
    f = res.first_failure
    if f is not None:
        what = ("the VMM disagrees with the reference" if f.kind == "mismatch"
                else "GENERATOR BUG: the program is not well formed (the reference did not run it cleanly)")
        lines += [f"program {f.index} of seed {f.seed} fails: {what}",
                  f"shrunk from {len(f.original)} to {len(f.program)} operations "
                  f"({f.shrink_runs} shrink runs):",
                  f.program.describe(), "", "check report:", f.report, "",
                  f"replay: {res.replay_command}"]
    return "\n".join(lines)
