"""``hvmodel check --mutants``: every mutant of the catalogue against the checkers.

For each mutant the runner makes a private copy of the package in a temporary directory
it owns, applies the mutant, and runs the checkers there in a subprocess (the copy first
on ``PYTHONPATH``, the working directory inside the copy), cheapest first, stopping at the
first that kills it (:mod:`hvmodel.check.mutants.probe`). Two mutants run at a time. The
subprocess reports which package it imported, so a mutant can never be "tested" against
the unmutated code by accident. A mutant that makes a checker raise counts as killed by a
*crash*, listed as such; one whose checkers run past the time limit as a *timeout*.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from .apply import MutantError, make_copy, mutated_source
from .catalogue import CATALOGUE, Mutant

# The checkers, cheapest first (8 MiB guests). ``edges`` is the guest written to reach
# what the others do not (large-page INVLPG, A/D aging, 1 GiB pages, NX in a PDE, IST).
LADDER = (
    "lockstep:hello",
    "lockstep:edges",
    "lockstep:edges:nolarge",
    "lockstep:usermode",
    "lockstep:faults",
    "lockstep:ptchurn",
    "lockstep:pagefault",
    "matrix:499",
    "fuzz:1:12",
)
# Memory-management mutants first meet guests under memory pressure: sharing (with the
# witness VM), compression and swapping after every checkpoint.
PRESSURE = (
    "lockstep:edges:pressure=32:every=2000:nolarge",
    "lockstep:edges:pressure=32:every=2000",
    "lockstep:hello:pressure=32:every=2000",
    "lockstep:usermode:pressure=32",
    "lockstep:memtest:pressure=64",
    "lockstep:pagefault:pressure=32",
    "lockstep:dedup:pressure=32",
)
TIMEOUT = 1200.0


@dataclass
class MutantResult:
    """What the checkers did to one mutant."""

    name: str
    description: str
    killed: bool
    how: str = ""                 # mismatch | guest | crash | timeout | error
    by: str = ""                  # the checker that killed it
    insns: int | None = None      # guest instructions when the divergence showed
    detail: str = ""
    seconds: float = 0.0
    checkers: list[dict] = field(default_factory=list)   # every checker run: name, killed, seconds

    def line(self) -> str:
        """One line: name, killed/SURVIVED, by which checker, after how many instructions."""
        if not self.killed:
            return f"{self.name:<36} SURVIVED  ({len(self.checkers)} checkers, {self.seconds:.0f} s)"
        what = "killed" if self.how in ("mismatch", "guest") else self.how
        after = f"after {self.insns:,} instructions" if self.insns is not None else "after - instructions"
        via = " (the guest's own check)" if self.how == "guest" else ""
        return f"{self.name:<36} {what:<8}  by {self.by}{via}, {after}"


def checkers_for(m: Mutant) -> list[str]:
    """The checkers a mutant meets, in order."""
    return list(PRESSURE + LADDER) if m.pressure else list(LADDER)


def run_one(m: Mutant, *, timeout: float = TIMEOUT, checkers: list[str] | None = None) -> MutantResult:
    """Apply ``m`` to a fresh copy of the package and run its checkers there."""
    t0 = time.perf_counter()
    res = MutantResult(m.name, m.description, killed=False)
    with tempfile.TemporaryDirectory(prefix="hvmodel-mutant-") as tmp:
        root = make_copy(m, Path(tmp))
        env = dict(os.environ, PYTHONPATH=str(root), PYTHONDONTWRITEBYTECODE="1")
        cmd = [sys.executable, "-m", "hvmodel.check.mutants.probe", *(checkers or checkers_for(m))]
        try:
            proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            res.checkers = _parse(out, root)
            res.killed, res.how, res.by = True, "timeout", (res.checkers[-1]["checker"] if res.checkers else "")
            res.detail = f"the checkers ran longer than {timeout:.0f} s"
            res.seconds = time.perf_counter() - t0
            return res
        res.checkers = _parse(proc.stdout, root)
    res.seconds = time.perf_counter() - t0
    last = res.checkers[-1] if res.checkers else None
    if proc.returncode != 0 or last is None:
        # The probe itself died (a signal, an import error in the mutated package): a crash.
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        res.killed, res.how, res.detail = True, "crash", f"exit status {proc.returncode}: {tail}"
        res.by = last["checker"] if last else "import"
        return res
    if last["killed"]:
        res.killed, res.how, res.by = True, last["how"], last["checker"]
        res.insns, res.detail = last.get("insns"), last.get("detail", "")
    return res


def _parse(stdout: str, root: Path) -> list[dict]:
    out = []
    for line in stdout.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if not str(rec.get("package", "")).startswith(str(root)):
            raise MutantError(f"the checkers imported {rec.get('package')}, not the mutated copy in {root}")
        out.append(rec)
    return out


def run_mutants(mutants: Iterable[Mutant] = CATALOGUE, *, workers: int = 2, timeout: float = TIMEOUT,
                progress: Callable[[MutantResult], None] | None = None) -> list[MutantResult]:
    """Every mutant against its checkers, ``workers`` at a time; results in catalogue order."""
    mutants = list(mutants)
    for m in mutants:
        mutated_source(m)   # every mutant applies before any runs (MutantError otherwise)

    def one(m: Mutant) -> MutantResult:
        r = run_one(m, timeout=timeout)
        if progress is not None:
            progress(r)
        return r

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, mutants))


def summary(results: list[MutantResult]) -> str:
    """The closing line: ``N mutants, K killed``."""
    return f"{len(results)} mutants, {sum(r.killed for r in results)} killed"


def as_json(results: list[MutantResult]) -> str:
    """The results as JSON: one object per mutant, then the totals."""
    return json.dumps({"mutants": [asdict(r) for r in results], "total": len(results),
                       "killed": sum(r.killed for r in results)}, indent=2)
