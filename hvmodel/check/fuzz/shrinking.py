"""Shrinking: a failing program cut down to a few operations that still fail (delta debugging).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from .program import Program, SetCtl
from .tables import TableModel


# ------------------------------------------------------------------------------------
# shrinking


def shrink(program: Program, still_fails: Callable[[Program], bool], *,
           max_runs: int = 400) -> Program:
    """A smaller program that still fails: delta debugging over the operation list.

    First drops the operations that no longer do anything, then removes chunks of
    operations (halves, quarters, ... single ops) while ``still_fails`` holds, until no
    single operation can go; finally simplifies flushes to ``invlpg``, the start
    controls to WP+NXE and the pre-filled pages to none. Any subset of a program is a
    valid program (render replays it on the model: a Map that loses its tables
    recreates them, an access whose page is gone faults or is dropped), so a Map can go
    without its dependents and every candidate is well defined. ``max_runs`` bounds
    the calls of ``still_fails``.
    """
    runs = 0
    best = program

    def attempt(cand: Program) -> bool:
        nonlocal runs, best
        if runs >= max_runs:
            return False
        runs += 1
        if still_fails(cand):
            best = cand
            return True
        return False

    # drop the effect-less ops first (one run)
    live = _live_ops(best)
    if len(live) < len(best.ops):
        attempt(best.with_ops(live))

    chunk = max(1, len(best.ops) // 2)
    while True:
        progress = False
        i = 0
        while i < len(best.ops):
            ops = best.ops
            if attempt(best.with_ops(ops[:i] + ops[i + chunk:])):
                progress = True
            else:
                i += chunk
        if chunk == 1:
            if not progress:
                break
        else:
            chunk = max(1, chunk // 2)
        if runs >= max_runs:
            break

    # simplify what is left: plain invlpg flushes, then plain start controls
    for i, op in enumerate(best.ops):
        if getattr(op, "flush", "invlpg") != "invlpg":
            attempt(best.with_ops(best.ops[:i] + (replace(op, flush="invlpg"),) + best.ops[i + 1:]))
    if best.ctl != SetCtl(True, True, False, False):
        attempt(replace(best, ctl=SetCtl(True, True, False, False)))
    if best.pool:
        attempt(replace(best, pool=()))
    return best


def _live_ops(program: Program) -> list:
    model = TableModel(program)
    return [op for n, op in enumerate(program.ops) if model.apply(op, n) is not None]
