"""The mutation score: every seeded bug applies to the current source, and the checkers catch them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hvmodel.check.mutants import CATALOGUE, Mutant, MutantError, by_name, mutated_source
from hvmodel.check.mutants.apply import package_dir
from hvmodel.check.mutants.runner import checkers_for, run_mutants, run_one, summary

ROOT = Path(__file__).resolve().parents[2]


def test_the_catalogue_has_at_least_30_distinct_mutants():
    names = [m.name for m in CATALOGUE]
    assert len(names) >= 30 and len(set(names)) == len(names)
    assert all(m.description and m.original != m.replacement for m in CATALOGUE)


@pytest.mark.parametrize("m", CATALOGUE, ids=lambda m: m.name)
def test_every_mutant_applies_once_to_the_current_source_and_compiles(m):
    # A refactoring that moves a snippet shows here: the catalogue must follow the code.
    assert not m.file.startswith("check/"), "mutants are VMM bugs, never changes to the checkers"
    text = mutated_source(m)
    compile(text, m.file, "exec")
    assert text != (package_dir() / m.file).read_text()


def test_a_mutant_whose_snippet_is_gone_is_refused():
    ghost = Mutant("ghost", "a snippet that is not there", "mmu/walk.py", "no such code\n", "x\n")
    with pytest.raises(MutantError, match="occurs 0 times"):
        mutated_source(ghost)
    twice = Mutant("twice", "a snippet that occurs often", "mmu/walk.py", "return", "return")
    with pytest.raises(MutantError, match="exactly once"):
        run_mutants([twice])


def test_memory_management_mutants_meet_pressure_first():
    m = by_name("swap-in-wrong-slot")
    assert m.pressure and "pressure=" in checkers_for(m)[0]
    assert not any("pressure=" in c for c in checkers_for(by_name("walk-smep-ignored")))


def test_a_mutant_is_killed_in_its_own_copy_and_reported_with_the_instruction():
    r = run_one(by_name("shadow-trace-no-zap"), checkers=["lockstep:edges"])
    assert r.killed and r.how == "mismatch" and r.by == "lockstep:edges"
    assert r.insns and r.insns > 0
    assert r.line().startswith("shadow-trace-no-zap") and f"after {r.insns:,} instructions" in r.line()
    assert all("hvmodel-mutant-" in c["package"] for c in r.checkers)   # the mutated copy ran


def test_a_harmless_change_survives_and_a_raising_one_is_a_crash():
    harmless = Mutant("harmless", "a comment changed", "mmu/walk.py",
                      "# Accesses, as Unicorn's UC_MEM_READ/WRITE/FETCH (16/17/18) minus 16.",
                      "# Accesses (changed comment).")
    r = run_one(harmless, checkers=["lockstep:hello"])
    assert not r.killed and "SURVIVED" in r.line()
    raising = Mutant("raising", "the walk raises", "mmu/walk.py",
                     "    if not ctl & CTL_PG:\n        return (va & ADDR_MASK) | PERM_RWX",
                     "    if not ctl & CTL_PG:\n        raise RuntimeError('seeded')")
    r = run_one(raising, checkers=["lockstep:hello"])
    assert r.killed and r.how == "crash" and "seeded" in r.detail
    assert summary([r]) == "1 mutants, 1 killed"


def test_cli_mutants_json():
    out = subprocess.run([sys.executable, "-m", "hvmodel", "check", "--mutants", "--only",
                          "nested-large-table-not-protected", "--json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["total"] == 1 and doc["killed"] == 1
    (m,) = doc["mutants"]
    assert m["name"] == "nested-large-table-not-protected" and m["killed"] and m["insns"] > 0
    bad = subprocess.run([sys.executable, "-m", "hvmodel", "check", "--mutants", "--only", "nope"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "no mutant 'nope'" in bad.stderr


def test_every_mutant_is_killed():
    """The whole catalogue, two at a time (about 2 minutes): the mutation score is 100 %."""
    results = run_mutants()
    survivors = [r.line() for r in results if not r.killed]
    assert not survivors, "\n".join(survivors)
    assert summary(results) == f"{len(CATALOGUE)} mutants, {len(CATALOGUE)} killed"
