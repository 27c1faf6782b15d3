"""The checkers as the mutation runner calls them, inside a mutated copy of the package.

``python -m hvmodel.check.mutants.probe CHECKER...`` (with the copy first on the path)
runs the checkers in order and stops at the first that fails; it prints one JSON object
per checker run::

    {"checker": "lockstep:usermode", "killed": true, "how": "mismatch", "insns": 41210,
     "detail": "...", "seconds": 2.1, "package": "/tmp/.../hvmodel/__init__.py"}

``how`` is ``mismatch`` (a checker saw a difference: lock-step against the reference, the
matrix against the oracle, a fuzz program), ``guest`` (the guest's own checks failed in the
reference run: the bug is in code the reference shares, event delivery), or ``crash``
(the checker raised: a traceback, reported as such). ``insns`` is the guest instruction
at which the first divergence showed (for the matrix: the instructions the matrix guest
had run when it recorded the first wrong combination).

Checker names: ``lockstep:GUEST[:pressure=N][:every=N][:nolarge]`` (guests/GUEST.asm in
nested and shadow against the reference, 8 MiB of guest memory; ``nolarge``: no 2 MiB pages), ``matrix:SAMPLE`` (every SAMPLE-th
legal combination of the access matrix, both modes), ``fuzz:SEED:COUNT`` (generated
programs SEED/0..COUNT-1).
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

MODES = ["nested", "shadow"]
MEMSIZE = 8 << 20


def _guest(name: str):
    from ...guest.load import load_guest
    return load_guest(Path(__file__).resolve().parents[3] / "guests" / f"{name}.asm")


def run_lockstep(guest: str, pressure: int = 0, every: int | None = None, large: bool = True) -> dict:
    from ..lockstep import DEFAULT_EVERY, check
    res = check(_guest(guest), MODES, memsize=MEMSIZE, every=every or DEFAULT_EVERY, pressure=pressure,
                large_pages=large)
    if not res.ok:
        first = res.report.splitlines()[1:3]
        return {"killed": True, "how": "mismatch", "insns": res.diverged_at,
                "detail": " / ".join(s.strip() for s in first)}
    if res.stop_reason != "power_off" or res.exit_status != 0:
        return {"killed": True, "how": "guest", "insns": res.instructions,
                "detail": f"the guest failed its own checks in every run ({res.stop_reason})"}
    return {"killed": False, "insns": res.instructions}


def run_matrix(sample: int) -> dict:
    from .. import matrix as mx
    from .. import oracle as o
    cases = [c for c in o.enumerate_cases() if c.index % sample == 0]
    res = mx.run_matrix(MODES, cases=cases)
    bad = [(mode, line) for mode, lines in res.mismatches.items() for line in lines]
    if not bad and not res.reference_deviations:
        return {"killed": False}
    if not bad:
        return {"killed": True, "how": "guest", "insns": None,
                "detail": "the reference disagrees with the oracle: " + res.reference_deviations[0]}
    mode, line = bad[0]
    first = int(line.split()[0].lstrip("#"))
    upto = [c for c in cases if c.index <= first]
    insns: list[int] = []
    mx.run_cases(upto, mode, insns=insns)
    return {"killed": True, "how": "mismatch", "insns": sum(insns), "detail": f"{mode}: {line}"}


def run_fuzz(seed: int, count: int) -> dict:
    from ...guest.asm import build
    from ..fuzz.driver import run_program
    from ..fuzz.generation import program_for_seed
    from ..fuzz.program import EVERY, HOST_MEM, MAX_INSNS, MEMSIZE
    from ..fuzz.rendering import render
    from ..lockstep import check
    for index in range(count):
        program = program_for_seed(seed, index)
        out = run_program(program, MODES)
        if out.ok:
            continue
        res = check(build(render(program), source_name=program.name), MODES, memsize=MEMSIZE,
                    host_mem=HOST_MEM, every=EVERY, max_insns=MAX_INSNS)
        first = (out.report.splitlines() or [""])[1:2]
        return {"killed": True, "how": "mismatch" if out.kind == "mismatch" else "guest",
                "insns": res.diverged_at, "detail": f"program {index} of seed {seed}: {out.kind}: "
                                                    + " ".join(s.strip() for s in first)}
    return {"killed": False}


def run_checker(spec: str) -> dict:
    """Run one checker by name (see the module docstring)."""
    kind, *args = spec.split(":")
    if kind == "lockstep":
        opts = dict(a.split("=") if "=" in a else (a, "1") for a in args[1:])
        return run_lockstep(args[0], int(opts.get("pressure", 0)), int(opts["every"]) if "every" in opts else None,
                            large="nolarge" not in opts)
    if kind == "matrix":
        return run_matrix(int(args[0]))
    if kind == "fuzz":
        return run_fuzz(int(args[0]), int(args[1]))
    raise ValueError(f"unknown checker {spec!r}")


def main(argv: list[str]) -> int:
    # This very file lives in the package copy under test: its path proves which one ran.
    package = str(Path(__file__).resolve().parents[2] / "__init__.py")
    for spec in argv:
        t0 = time.perf_counter()
        try:
            out = run_checker(spec)
        except Exception:
            tb = traceback.format_exc().strip().splitlines()
            out = {"killed": True, "how": "crash", "insns": None, "detail": tb[-1]}
        out.update(checker=spec, seconds=round(time.perf_counter() - t0, 2), package=package)
        print(json.dumps(out), flush=True)
        if out["killed"]:
            break
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
