"""Generated page-table programs, run in lock-step against the reference MMU.

``hvmodel check`` compares the VMM's MMUs with the reference on hand-written guests;
this module writes the guests. A *program* is a short list of operations on the
guest's own page tables and of memory accesses through them; :func:`render` turns it
into a complete guest kernel (assembly text), :func:`fuzz` runs many of them under
:func:`hvmodel.check.lockstep.check` and, on the first disagreement, shrinks the
failing program to a few operations (delta debugging, after hypothesis).

Operations
----------
``Map(space, va, level, pa, flags, tflags, flush)``
    Install a leaf (level 1/2/3 = 4 KiB / 2 MiB / 1 GiB) for ``va``; missing tables on
    the way are created (entries ``tflags``), a large leaf in the way is replaced by a
    fresh table, a table in the way of a large leaf is replaced by the leaf.
``Unmap(space, va, level, flush)``
    Clear the entry of that level on the walk of ``va`` (a leaf, or a whole subtree).
``Protect(space, va, level, flags, flush)``
    Rewrite the flags of an existing entry (leaf or not), keeping its address.
``Share(dst, src, slot, flush)``
    ``dst``'s PML4 entry ``slot`` points to ``src``'s PDPT: one subtree in two spaces.
``SwitchCR3(space)``
    ``mov cr3`` (to the current space: a reload).
``SetCtl(wp, nxe, smep, smap)``
    CR0.WP, EFER.NXE, CR4.SMEP, CR4.SMAP, followed by a CR3 reload.
``Access(va, kind, cpl, value, ac)``
    A qword read / write, or a fetch (``call`` of a ``ret``), at CPL 0 or 3 (``ac``:
    a supervisor access under ``stac``), in the current address space.

Every program is architecturally determined, whatever subset of its operations is
kept (so the shrinker cannot produce an ill-defined program): :func:`render` replays
the operations on a model of the tables, and

* every entry change is followed by ``invlpg`` of each virtual page whose translation
  went through the old entry (or by a CR3 reload when there are many, or when the
  operation asks for one); only a change of not-present entries to present ones may go
  without (the SDM does not require an invalidation for it); ``SwitchCR3`` and
  ``SetCtl`` flush everything; no global pages (CR4.PGE stays 0, G never set);
* tables are fresh pages of a pool (never reused), the kernel (code, stacks, tables,
  GDT/IDT/TSS, result log) lives in the identity-mapped first 2 MiB, shared by every
  space through PML4 entry 0, which no operation touches; generated mappings only
  point into the data region (2-8 MiB) — except 1 GiB leaves, which can only map
  physical 0 and are then used only at offsets in the data region;
* an access whose translation (by the model, ignoring rights) would reach anything
  but the data region is dropped by :func:`render`; writes stay below offset 0xF80 of
  their page, whose last 128 bytes are ``ret`` (0xC3) wherever a fetch may land, so
  no code is ever modified; no access straddles a page;
* #PF and #GP handlers log (vector, error code, CR2) in the result log and resume at
  the recovery address the access put in R15, in ring 0 on the kernel stack; a read
  logs the value it loaded (a faulting read logs its preset marker), so a wrong
  translation shows in the final memory comparison as well as in the registers.

Guest-physical layout (``MEMSIZE`` = 8 MiB)::

    0x001000-0x004fff  PML4 of spaces 0-3      0x005000-0x007fff  kernel PDPT, PD, PT
    0x008000 GDT, 0x009000 IDT, 0x00a000 TSS   0x010000-0x07ffff  table pool (112 pages)
    0x080000-0x08ffff  result log              0x09e000 kernel stack, 0x09f000 user stack
    0x100000-          kernel code; the last page holds the ring-3 stubs (US)
    0x200000-0x7fffff  data pages
"""

from .driver import EVERY, FuzzFailure, FuzzResult, RunOutcome, format_result, fuzz, run_program
from .generation import generate, program_for_seed
from .program import MEMSIZE, Access, Map, Program, Protect, SetCtl, Share, SwitchCR3, Unmap
from .rendering import render
from .shrinking import shrink

__all__ = ["Map", "Unmap", "Protect", "Share", "SwitchCR3", "SetCtl", "Access", "Program",
           "generate", "render", "program_for_seed", "shrink", "fuzz", "run_program",
           "format_result", "FuzzResult", "FuzzFailure", "RunOutcome", "MEMSIZE", "EVERY"]
