"""Fault-injection campaigns: many (guest x scenario x fault x seed) runs, classified.

A campaign file (TOML)::

    seeds = 20                      # seeds 1..20 (or a list: [3, 7])
    max_insns = 40_000_000          # per run

    [[target]]                      # an image with its scenario: `hvmodel run` arguments
    name = "hog"
    guest = "../guests/hog.asm"     # or scenario = "tiny.toml"; relative to this file
    args = ["--mem", "8M", "--host-mem", "4M"]
    insns = 4_000_000               # about how long it runs: `at=10%..90%` scales by it

    [[fault]]
    fault = "swap-read-error:nth=1" # --fault syntax (docs/FAULTS.md)
    targets = ["hog"]               # default: every target

Every run is ``hvmodel run TARGET ARGS --seed S --fault F`` (hvmodel/run/spec.py), judged
against its reference: the same arguments with the fault's triggers armed dry
(hvmodel/run/outcome.py). References are shared by runs whose slices end at the same
points. Runs go to a local process pool (one worker per CPU by default) or, with
``cluster=ADDRESS``, to an existing Dask cluster (``pip install 'hvmodel[cluster]'``;
workers need hvmodel and the same paths). The report counts outcomes per fault and gives,
for each unexpected run, the one command that reproduces it.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

from ..host import scenario
from ..inject import InjectError, parse_fault
from .digest import RunDigest
from .errors import RunError
from .outcome import Outcome, classify
from .session import execute
from .spec import RunSpec, command

COLUMNS = ("recovered", "detected", "visible", "not-fired")


class CampaignError(ValueError):
    """A campaign file that cannot be run, with the reason."""


@dataclass
class Target:
    """An image with its scenario: the ``hvmodel run`` arguments before seed and faults."""

    name: str
    path: str           # guest image or scenario file, as the commands give it
    args: list[str]
    insns: int = 0
    mmus: tuple[str, ...] = ("nested",)


@dataclass
class CampaignSpec:
    """A parsed campaign file."""

    targets: list[Target]
    faults: list[tuple[str, list[str]]]      # (fault text, target names)
    seeds: list[int]
    max_insns: int = 50_000_000
    workers: int | None = None

    def runs(self) -> list[tuple[str, str, int, list[str]]]:
        """Every run: (target name, fault text, seed, argv)."""
        by_name = {t.name: t for t in self.targets}
        out = []
        for text, names in self.faults:
            for name in names:
                t = by_name[name]
                ftext = _scale_at(text, t.insns)
                for seed in self.seeds:
                    argv = [t.path, *t.args, "--seed", str(seed), "--max-insns", str(self.max_insns),
                            "--quiet", "--fault", ftext]
                    out.append((name, text, seed, argv))
        return out


_PCT = re.compile(r"at=(\d+(?:\.\d+)?)%\.\.(\d+(?:\.\d+)?)%")


def _scale_at(text: str, insns: int) -> str:
    """``at=10%..90%`` → absolute instruction numbers for a target that runs ``insns``."""
    def sub(m: re.Match) -> str:
        if not insns:
            raise CampaignError(f"fault {text}: at in % needs the target's `insns`")
        lo, hi = float(m.group(1)), float(m.group(2))
        return f"at={int(insns * lo / 100)}..{int(insns * hi / 100)}"
    return _PCT.sub(sub, text)


def _rel(p: Path) -> str:
    try:
        return os.path.relpath(p)
    except ValueError:
        return str(p)


def load_spec(path: str | Path) -> CampaignSpec:
    """Read and check a campaign file (CampaignError says what is wrong)."""
    p = Path(path)
    data = scenario.read_toml(p, "campaign", CampaignError)
    bad = set(data) - {"seeds", "max_insns", "workers", "target", "fault"}
    if bad:
        raise CampaignError(f"campaign {p}: unknown key(s) {', '.join(sorted(bad))}")
    seeds = data.get("seeds", 1)
    seeds = list(range(1, int(seeds) + 1)) if isinstance(seeds, int) else [int(s) for s in seeds]
    targets = []
    for i, t in enumerate(data.get("target", [])):
        where = f"campaign {p} target #{i + 1}"
        bad = set(t) - {"name", "guest", "scenario", "args", "insns"}
        if bad:
            raise CampaignError(f"{where}: unknown key(s) {', '.join(sorted(bad))}")
        if ("guest" in t) == ("scenario" in t):
            raise CampaignError(f"{where}: give either guest or scenario")
        src = (p.parent / (t.get("guest") or t.get("scenario"))).resolve()
        if not src.exists():
            raise CampaignError(f"{where}: {src} does not exist")
        args = [str(a) for a in t.get("args", [])]
        try:
            parsed = RunSpec.from_argv([str(src), *args])
        except RunError as e:
            raise CampaignError(f"{where}: {e}") from None
        if "scenario" in t:
            try:
                mmus = tuple(s.config.mmu for s in scenario.load(src)[1])
            except scenario.ScenarioError as e:
                raise CampaignError(f"{where}: {e}") from None
        else:
            mmus = (parsed.mmu,)
        targets.append(Target(str(t.get("name", src.stem)), _rel(src), args, int(t.get("insns", 0)), mmus))
    if not targets:
        raise CampaignError(f"campaign {p}: no [[target]]")
    names = {t.name for t in targets}
    if len(names) != len(targets):
        raise CampaignError(f"campaign {p}: target names must be unique")
    faults = []
    for i, f in enumerate(data.get("fault", [])):
        where = f"campaign {p} fault #{i + 1}"
        if "fault" not in f:
            raise CampaignError(f"{where}: `fault` is required")
        want = [str(x) for x in f.get("targets", [t.name for t in targets])]
        unknown = [n for n in want if n not in names]
        if unknown:
            raise CampaignError(f"{where}: unknown target(s) {', '.join(unknown)}")
        text = str(f["fault"])
        for t in targets:
            if t.name not in want:
                continue
            try:
                spec = parse_fault(_scale_at(text, t.insns))
            except InjectError as e:
                raise CampaignError(f"{where}: {e}") from None
            need = spec.fault.needs
            if need is not None and need not in t.mmus:
                raise CampaignError(f"{where}: {spec.name} needs {need} paging; target {t.name} runs "
                                    f"{', '.join(sorted(set(t.mmus)))}")
        faults.append((text, want))
    if not faults:
        raise CampaignError(f"campaign {p}: no [[fault]]")
    return CampaignSpec(targets, faults, seeds, int(data.get("max_insns", 50_000_000)),
                        int(data["workers"]) if "workers" in data else None)


def run_task(task: dict) -> dict:
    """One run in a worker: ``{"argv": [...], "dry": bool}`` → its RunDigest as a dict."""
    try:
        return execute(task["argv"], dry=task["dry"]).as_dict()
    except RunError as e:
        return RunDigest(argv=task["argv"], error=f"bad run: {e}", dry=task["dry"]).as_dict()


@dataclass
class RunOutcome:
    """One campaign run and how it ended."""

    target: str
    fault: str
    seed: int
    command: str
    outcome: Outcome
    fired: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"target": self.target, "fault": self.fault, "seed": self.seed, "command": self.command,
                "outcome": self.outcome.kind, "unexpected": self.outcome.unexpected,
                "expected": sorted(self.outcome.expected), "detail": self.outcome.detail, "fired": self.fired}


@dataclass
class CampaignReport:
    """Every run's outcome, the summary table, the reproduce commands of unexpected runs."""

    runs: list[RunOutcome]
    references: int = 0

    @property
    def unexpected(self) -> list[RunOutcome]:
        return [r for r in self.runs if r.outcome.unexpected]

    @property
    def ok(self) -> bool:
        return not self.unexpected

    def table(self) -> dict[str, Counter]:
        """Outcome counts per fault (``unexpected`` counted too)."""
        t: dict[str, Counter] = {}
        for r in self.runs:
            c = t.setdefault(r.fault.split(":")[0], Counter())
            c[r.outcome.kind] += 1
            if r.outcome.unexpected:
                c["unexpected"] += 1
        return t

    def text(self) -> str:
        """The summary table and the unexpected runs, as plain text."""
        t = self.table()
        cols = list(COLUMNS) + sorted({k for c in t.values() for k in c} - set(COLUMNS) - {"unexpected"}) + \
            ["unexpected"]
        w = max([len("fault")] + [len(k) for k in t])
        lines = [f"{'fault':<{w}}  {'runs':>5}  " + "  ".join(f"{c:>10}" for c in cols)]
        total: Counter = Counter()
        for name, c in t.items():
            n = sum(v for k, v in c.items() if k != "unexpected")
            total.update(c)
            lines.append(f"{name:<{w}}  {n:>5}  " + "  ".join(f"{c.get(k, 0):>10}" for k in cols))
        n = sum(v for k, v in total.items() if k != "unexpected")
        lines.append(f"{'total':<{w}}  {n:>5}  " + "  ".join(f"{total.get(k, 0):>10}" for k in cols))
        lines.append(f"{len(self.runs)} runs, {self.references} reference runs, "
                     f"{len(self.unexpected)} unexpected outcomes")
        for r in self.unexpected:
            lines.append(f"UNEXPECTED {r.outcome.kind} ({r.target}, {r.fault}, seed {r.seed}): {r.outcome.detail}")
            lines.append(f"  reproduce: {r.command}")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"runs": [r.as_dict() for r in self.runs], "references": self.references,
                "unexpected": len(self.unexpected),
                "table": {k: dict(v) for k, v in self.table().items()}}


def _reference_key(target: str, seed: int, fault_text: str) -> tuple:
    # A site fault's dry run is the plain run (its wrappers change nothing): one reference
    # per (target, seed) serves them all. A slice fault ends slices where its trigger and
    # its own "nothing to act on yet" retries say, so its dry run is its own.
    spec = parse_fault(fault_text)
    return (target, seed, fault_text) if spec.fault.site == "slice" else (target, seed, "")


def run_campaign(spec: CampaignSpec, *, workers: int | None = None, cluster: str | None = None,
                 progress: bool = True, connect_timeout: float = 30) -> CampaignReport:
    """Run every (target, fault, seed) of ``spec`` and its references; classify each run.

    ``cluster``: a Dask scheduler address (``connect_timeout`` seconds to reach it);
    otherwise ``workers`` local processes (default: the spec's, else one per CPU).
    """
    runs = spec.runs()
    refs: dict[tuple, list[str]] = {}
    run_ref: list[tuple] = []
    for name, _text, seed, argv in runs:
        key = _reference_key(name, seed, argv[-1])
        refs.setdefault(key, argv)
        run_ref.append(key)
    tasks = [{"argv": argv, "dry": True} for argv in refs.values()] + \
            [{"argv": argv, "dry": False} for *_, argv in runs]
    results = _execute(tasks, workers or spec.workers, cluster, progress, connect_timeout)
    ref_digest = dict(zip(refs, (RunDigest.from_dict(d) for d in results[:len(refs)])))
    out = []
    for (name, text, seed, argv), key, d in zip(runs, run_ref, results[len(refs):]):
        run = RunDigest.from_dict(d)
        out.append(RunOutcome(name, text, seed, command(argv), classify(run, ref_digest[key]), run.fired))
    return CampaignReport(out, references=len(refs))


def _execute(tasks: list[dict], workers: int | None, cluster: str | None, progress: bool,
             connect_timeout: float) -> list[dict]:
    """Run tasks on the local pool or a Dask cluster; results in task order."""
    results: list[dict | None] = [None] * len(tasks)
    bar = _progress(len(tasks), progress)
    if cluster:
        try:
            from distributed import Client, as_completed as dask_completed
        except ImportError:
            raise CampaignError("--cluster needs Dask: pip install 'hvmodel[cluster]'") from None
        try:
            client = Client(cluster, timeout=connect_timeout)
        except (OSError, TimeoutError) as e:
            raise CampaignError(f"cannot reach the Dask scheduler at {cluster}: {e}") from None
        try:
            futures = client.map(run_task, tasks, pure=False)
            index = {f.key: i for i, f in enumerate(futures)}
            with bar:
                for fut in dask_completed(futures):
                    results[index[fut.key]] = fut.result()
                    bar.advance()
        finally:
            client.close()
    else:
        n = workers or os.cpu_count() or 1
        # forkserver: workers do not inherit the progress bar's thread or the parent's engines.
        with ProcessPoolExecutor(max_workers=n, mp_context=get_context("forkserver")) as pool:
            futures = {pool.submit(run_task, t): i for i, t in enumerate(tasks)}
            with bar:
                for fut in as_completed(futures):
                    results[futures[fut]] = fut.result()
                    bar.advance()
    return results   # type: ignore[return-value]


class _Bar:
    """A rich progress bar (or nothing), used as a context manager."""

    def __init__(self, total: int, show: bool) -> None:
        self.total = total
        self.show = show
        self._p = None

    def __enter__(self) -> "_Bar":
        if self.show:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn
            self._p = Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                               TimeRemainingColumn(), transient=True)
            self._p.start()
            self._task = self._p.add_task("campaign runs", total=self.total)
        return self

    def advance(self) -> None:
        if self._p is not None:
            self._p.advance(self._task)

    def __exit__(self, *exc) -> None:
        if self._p is not None:
            self._p.stop()


def _progress(total: int, show: bool) -> _Bar:
    return _Bar(total, show)


__all__ = ["CampaignError", "CampaignReport", "CampaignSpec", "RunOutcome", "Target", "load_spec",
           "run_campaign", "run_task"]
