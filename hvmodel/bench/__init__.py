"""``hvmodel bench``: the VMM's cost measured against native Unicorn.

``workloads`` defines W1-W4 (guests), ``runner`` runs them under every mode,
alternating, and times their measured regions; ``scans`` runs W5 (page sharing)
and W6 (swapping) on the host side; ``suite`` puts it together for the CLI.
"""

from .runner import BenchError
from .suite import ALL, format_table, run_suite

__all__ = ["run_suite", "format_table", "BenchError", "ALL"]
