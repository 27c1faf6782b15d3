"""Mutation testing of the checkers: seeded VMM bugs, each of which some checker must catch.

``hvmodel check --mutants`` applies each mutant of :data:`CATALOGUE` to a private copy of
the package and runs the checkers against it in a subprocess, cheapest first, until one
kills it (:mod:`hvmodel.check.mutants.runner`).
"""

from .apply import MutantError, make_copy, mutated_source
from .catalogue import CATALOGUE, Mutant, by_name

__all__ = ["CATALOGUE", "Mutant", "MutantError", "by_name", "make_copy", "mutated_source"]
