"""How a run ends for the shell: exit statuses, and the error that carries one.

====  =====================================================================
 2    bad usage or a bad option, or a guest image that cannot be built/loaded
 3    the guest died: triple fault, deadlock, instruction limit reached, an access
      outside its guest-physical memory
 4    the host failed: out of machine memory, an engine fault
====  =====================================================================

Otherwise a run's status is the guest's own (what it wrote to the debug-exit port, 0 for
``cli; hlt``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..vm.vm import VMResult

EXIT_USAGE = 2
EXIT_GUEST_DIED = 3
EXIT_HOST_FAILED = 4


class RunError(Exception):
    """A run that cannot be started or finished: one clear line, and the exit status to end with."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def exit_status(result: "VMResult") -> int:
    """The exit status a VM's result stands for."""
    if result.exit_status is not None:
        return result.exit_status
    if result.stop_reason in ("host_failure", "error"):
        return EXIT_HOST_FAILED
    return EXIT_GUEST_DIED


__all__ = ["EXIT_GUEST_DIED", "EXIT_HOST_FAILED", "EXIT_USAGE", "RunError", "exit_status"]
