"""The MMU modes by name: ``--mmu MODE``, ``VMConfig.mmu``, scenario files.

Each class builds itself for a VM with ``for_vm(memory, pool, config)``: ``memory`` is the
VM's p2m (or, for the reference mode, its flat guest RAM), ``config`` the VM's
configuration (:class:`hvmodel.vm.vm.VMConfig`: each mode reads the options it has).
``reference`` says the mode is Unicorn's own MMU over flat memory, with no VMM, no p2m
and no machine pool.
"""

from __future__ import annotations

from .native import NativeMMU
from .nested import NestedMMU
from .shadow import ShadowMMU

MODES: dict[str, type] = {"nested": NestedMMU, "shadow": ShadowMMU, "native": NativeMMU}
VMM_MODES = tuple(name for name, cls in MODES.items() if not cls.reference)

__all__ = ["MODES", "VMM_MODES"]
