"""Applying one mutant: a private copy of the hvmodel package with exactly one change."""

from __future__ import annotations

import shutil
from pathlib import Path

from .catalogue import Mutant


class MutantError(Exception):
    """A mutant does not apply to the current source (its snippet is missing or ambiguous)."""


def package_dir() -> Path:
    """The hvmodel package being tested (the one this module belongs to)."""
    return Path(__file__).resolve().parents[2]


def mutated_source(m: Mutant, root: Path | None = None) -> str:
    """The text of ``m.file`` with the mutant applied; MutantError unless the original
    snippet occurs exactly once."""
    path = (root or package_dir()) / m.file
    try:
        text = path.read_text()
    except OSError as e:
        raise MutantError(f"mutant {m.name}: cannot read {m.file}: {e.strerror}") from None
    n = text.count(m.original)
    if n != 1:
        raise MutantError(f"mutant {m.name}: its original snippet occurs {n} times in {m.file} "
                          f"(it must occur exactly once; the source changed: update the catalogue)")
    return text.replace(m.original, m.replacement)


def make_copy(m: Mutant | None, dest: Path) -> Path:
    """Copy the package into ``dest`` (which the caller owns) and apply ``m`` (None: a clean
    copy). Returns the directory to put on PYTHONPATH. The guests folder next to the package
    is linked, not copied: the copy finds the same guests and runtime."""
    src = package_dir()
    shutil.copytree(src, dest / "hvmodel", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    guests = src.parent / "guests"
    if guests.is_dir():
        (dest / "guests").symlink_to(guests, target_is_directory=True)
    if m is not None:
        text = mutated_source(m, src)
        (dest / "hvmodel" / m.file).write_text(text)
    return dest
