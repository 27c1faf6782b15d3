"""Emulated nested paging (EPT): the hardware-assisted MMU mode.

The VMM keeps EPT-format 4-level tables in its own machine frames, derived from
the p2m: a leaf exists only for a gfn the p2m has resolved. A TLB fill performs
the 2D walk the hardware would: every guest paging-structure read is itself a
guest-physical address, translated through the nested tables (4 references)
before the entry is read (1 more); the final GPA takes 4 more — 24 for a 4 KiB
page under 4 KiB nested tables, (4 + 1) · (4 + 1) − 1.

A nested walk that finds no entry, or lacks the right, is an EPT violation: the
p2m resolver decides (first touch, later copy-on-write and swap-in), the leaf is
(re)installed and the walk retried, as the hardware would after the exit.

A *nested TLB* (Bhargava et al., ASPLOS 2008: a page-walk cache for the nested
dimension) remembers the EPT leaves of recently translated guest-physical pages:
direct-mapped, ``ntlb_entries`` slots (64 by default, 0 turns it off), kept coherent
with the p2m by the same listener that zaps EPT leaves. A hit costs no memory
reference in the nested dimension, so a warm 4 KiB walk makes 4 references (the
guest entries) instead of 24; ``walk_refs`` counts only what misses it.

Large pages: a 2 MiB range the p2m backs with a 2 MiB machine page (512 contiguous,
aligned frames) gets one EPT 2 MiB leaf (bit 7, PS, at level 2): the nested walk of any
GPA in it takes 3 references instead of 4, so a cold 2D walk of a 4 KiB guest page
whose tables and data all lie in large pages costs (4 + 1) · (3 + 1) − 1 = 19. While
active-memory sampling watches pages of a large range, or a p2m change touches one page
of it (the host broke the large page), the 2 MiB leaf is *split in place* into a table
of 512 4 KiB leaves with the same frames and bits (KVM's eager page split), and only the
page concerned loses its leaf — a sampled page faults on its own, not with its 511
neighbours. When sampling stops watching a range that is still a large page, the table
is dropped and the next access maps 2 MiB again.

Guest large pages and INVLPG: the fill hook can only give Unicorn 4 KiB entries, so a
guest 2 MiB / 1 GiB page is cached as 4 KiB pieces, and a guest INVLPG of one address
would drop one piece where the hardware drops the whole large translation. Rather than
intercepting INVLPG (a Unicorn code hook taxes every instruction), the nested MMU
write-protects, in its EPT tables, each guest table page on the walk to a large leaf
whose pieces it handed out (``large_tables``: the PML4, PDPT and PD pages for a 2 MiB
page). A guest write to such a page — the only way the large mapping can change — is an
EPT violation that drops every cached translation at
once (before the write), then lets the page be written. A fill that hands out a piece
again protects the page again. The VMM's own A/D updates do not count as changes.

EPT entry bits (Intel SDM vol. 3 §29.3.2): R, W, X in bits 0-2, memory type in
5:3 of a leaf (WB = 6), PS in bit 7 of a level-2/3 entry, A in bit 8, D in bit 9,
address in 51:12. Write is granted
to the guest's TLB only when the leaf is already dirty or the access is a write,
so the first write to every page reaches the VMM: that is the dirty log.
"""

from __future__ import annotations

from ..machine.pool import LARGE_FRAMES, OWNER_VMM, PAGE_SHIFT, ZERO_FRAME, HostOutOfMemory, MachinePool
from .base import TableEntry, VmmTable
from .p2m import P2M
from .walk import ACC_WRITE, ADDR_MASK, PERM_RWX, PERM_W, PERM_X, WALK_LARGE, static_assert_layout, walk

EPT_R = 1 << 0
EPT_W = 1 << 1
EPT_X = 1 << 2
EPT_RWX = EPT_R | EPT_W | EPT_X
EPT_MT_WB = 6 << 3
EPT_PS = 1 << 7
EPT_A = 1 << 8
EPT_D = 1 << 9

NESTED_LEVELS = 4


def ept_layout_problems(c) -> list[str]:
    """What is wrong with the EPT entry layout in namespace ``c`` (empty: nothing)."""
    out = []
    bits = ("EPT_R", "EPT_W", "EPT_X", "EPT_PS", "EPT_A", "EPT_D")
    seen = 0
    for n in bits:
        if c[n] & (c[n] - 1) or seen & c[n]:
            out.append(f"{n} = {c[n]:#x} is not a bit of its own")
        seen |= c[n]
    if seen & c["EPT_MT_WB"]:
        out.append("the memory type (bits 5:3) overlaps another EPT bit")
    if c["EPT_RWX"] != 7:
        out.append("EPT_RWX must be bits 2:0 (an entry is present iff e & EPT_RWX)")
    if (seen | c["EPT_MT_WB"]) & ADDR_MASK:
        out.append("EPT flag bits must be clear of the address bits (ADDR_MASK)")
    return out
EPT_NAMES = {4: "EPT PML4E", 3: "EPT PDPTE", 2: "EPT PDE", 1: "EPT PTE"}


static_assert_layout(ept_layout_problems(globals()), __name__)


class NestedMMU:
    """2D page walks through guest tables and VMM-owned EPT tables."""

    kind = "nested"
    intercepts_invlpg = False   # large-page pieces are kept coherent by write protection

    reference = False

    @classmethod
    def for_vm(cls, memory, pool, config) -> "NestedMMU":
        """This mode for a VM (mmu/modes.py): ``memory`` is its p2m."""
        return cls(memory, pool)

    def __init__(self, p2m: P2M, pool: MachinePool, *, ntlb_entries: int = 64) -> None:
        if ntlb_entries & (ntlb_entries - 1):
            raise ValueError(f"the nested TLB size must be a power of two or 0, got {ntlb_entries}")
        self.p2m = p2m
        self.pool = pool
        self.q = pool.q
        self.table_frames: set[int] = set()
        self.root = self._new_table()
        # The nested TLB: slot = gfn & mask; tag = gfn, value = index of its EPT leaf.
        self.ntlb_on = ntlb_entries > 0
        self.ntlb_mask = max(ntlb_entries, 1) - 1
        self.ntlb_tag = [-1] * max(1, ntlb_entries)
        self.ntlb_idx = [0] * max(1, ntlb_entries)
        # Counters.
        self.walks = 0          # 2D walks (one per TLB fill that translates)
        self.walk_refs = 0      # memory references made by the walks (nested TLB misses only)
        self.ntlb_hits = 0
        self.ept_violations = 0
        self.large_leaves = 0   # 2 MiB leaves installed
        self.large_splits = 0   # 2 MiB leaves split into 4 KiB tables
        # Guest table pages holding a large leaf whose pieces may be in Unicorn's TLB:
        # write-protected in the EPT tables (see the module docstring).
        self.large_tables: set[int] = set()
        self.large_table_writes = 0
        self._path: list[int] = []   # GPAs of the entries the current guest walk read
        # Set when a present leaf was replaced by another frame: Unicorn's TLB of
        # every vCPU of this VM may hold the old one and must be flushed.
        self.flush_pending = False
        p2m.listeners.append(self.zap)
        p2m.watch_listeners.append(self.collapse)

    # -- the fill path ----------------------------------------------------------

    def translate(self, cr3: int, va: int, acc: int, user: bool, ctl: int) -> int:
        """GVA → machine page for one TLB fill: ``mpa_page | perms`` or ``~fault``."""
        self.walks += 1
        self._path.clear()
        r = walk(self, cr3, va, acc, user, ctl)
        if r < 0:
            return r
        gpa = r & ADDR_MASK
        if r & WALK_LARGE:
            for g in self._path:
                if g >> PAGE_SHIFT not in self.large_tables:
                    self._protect_table(g >> PAGE_SHIFT)
        leaf = self._leaf(gpa >> PAGE_SHIFT, acc == ACC_WRITE)
        perms = r & (PERM_RWX | WALK_LARGE)
        if not leaf & EPT_X:
            perms &= ~PERM_X
        if not (leaf & EPT_W and leaf & EPT_D):
            perms &= ~PERM_W
        return (leaf & ADDR_MASK) | perms

    # TableMemory for the guest walk: each entry read costs a nested walk + 1.
    def read_pte(self, gpa: int) -> int:
        gfn = gpa >> PAGE_SHIFT
        self.walk_refs += 1
        self._path.append(gpa)
        slot = gfn & self.ntlb_mask
        if self.ntlb_tag[slot] == gfn:
            # The common case inline (it is 4 of the 5 nested lookups of a fill): a nested-TLB
            # hit on a leaf already readable and accessed; anything else goes through _leaf.
            e = self.q[self.ntlb_idx[slot]]
            if e & (EPT_R | EPT_A) == EPT_R | EPT_A:
                self.ntlb_hits += 1
                if e & EPT_PS:
                    e += (gfn & (LARGE_FRAMES - 1)) << PAGE_SHIFT
                return self.q[((e & ADDR_MASK) | (gpa & 0xFFF)) >> 3]
        leaf = self._leaf(gfn, False)
        return self.q[((leaf & ADDR_MASK) | (gpa & 0xFFF)) >> 3]

    def write_pte(self, gpa: int, value: int) -> None:
        gfn = gpa >> PAGE_SHIFT
        if gfn in self.large_tables:
            # An A/D update changes no translation, so the page stays write-protected
            # in the EPT tables; it is still a write to guest memory, so the p2m gets it
            # as one first: a shared table page is un-shared (copy-on-write) like a
            # guest store would un-share it, and only then is its own frame written.
            self.p2m.frame_for_write(gfn)
            leaf = self._leaf(gfn, False)
            self.q[self._leaf_index(gfn)] |= EPT_D   # the EPT D bit records the write
        else:
            # The A/D update is a write to the guest table page: it needs EPT write
            # permission and dirties that page, exactly like a guest store.
            leaf = self._leaf(gfn, True)
        self.q[((leaf & ADDR_MASK) | (gpa & 0xFFF)) >> 3] = value

    # -- the nested dimension -------------------------------------------------------

    def _leaf(self, gfn: int, write: bool) -> int:
        """The EPT leaf for ``gfn`` with the right for the access, resolving violations.

        Sets the leaf's A bit (and D on a write) as EPT A/D hardware does.
        """
        q = self.q
        slot = gfn & self.ntlb_mask
        if self.ntlb_tag[slot] == gfn:
            self.ntlb_hits += 1
            idx = self.ntlb_idx[slot]
        else:
            idx = self._leaf_index(gfn)
            self.walk_refs += NESTED_LEVELS - 1 if idx >= 0 and q[idx] & EPT_PS else NESTED_LEVELS
            if idx >= 0 and self.ntlb_on:
                self.ntlb_tag[slot] = gfn
                self.ntlb_idx[slot] = idx
        if idx >= 0:
            e = q[idx]
            if e & EPT_R and (not write or e & EPT_W):
                want = e | EPT_A | (EPT_D if write else 0)
                if want != e:
                    q[idx] = want
                if want & EPT_PS:  # the 4 KiB piece of a 2 MiB leaf
                    return want + ((gfn & (LARGE_FRAMES - 1)) << PAGE_SHIFT)
                return want
        return self._violation(gfn, write)

    def _leaf_index(self, gfn: int) -> int:
        """Index into the pool's qword view of gfn's EPT leaf slot (a 4 KiB slot, or the
        2 MiB leaf that covers it), or -1 if unmapped."""
        q = self.q
        table = self.root << PAGE_SHIFT
        for shift in (27, 18):
            e = q[(table | ((gfn >> shift) & 0x1FF) << 3) >> 3]
            if not e & EPT_RWX:
                return -1
            table = e & ADDR_MASK
        i = (table | ((gfn >> 9) & 0x1FF) << 3) >> 3
        e = q[i]
        if e & EPT_PS:
            return i
        if not e & EPT_RWX:
            return -1
        return ((e & ADDR_MASK) | (gfn & 0x1FF) << 3) >> 3

    def _violation(self, gfn: int, write: bool) -> int:
        """EPT violation exit: ask the p2m, install the leaf, return it."""
        self.ept_violations += 1
        self.p2m.topup()   # table frames first: nothing may be reclaimed once gfn is resolved
        large_table = gfn in self.large_tables
        if large_table and write:
            # The guest writes a table whose large leaf may be cached in pieces: drop
            # every cached translation now, before the write (INVLPG of one piece must
            # not leave the others), and let it write until a piece is handed out again.
            self.large_tables.discard(gfn)
            large_table = False
            self.large_table_writes += 1
            self.flush_pending = True
        # An untouched page read maps the zero frame read-only; a write allocates.
        p2m = self.p2m
        frame, writable = p2m.map_for(gfn, write)
        p2m.note_mapped(gfn)
        region = gfn >> 9
        if region < len(p2m.large) and p2m.large[region] and not self._holds_large_table(region):
            l2 = self.q[self._l2_slot(gfn)]
            watched = region in p2m.watch_regions
            if not watched or not l2 & EPT_RWX or l2 & EPT_PS:
                return self._map_large(gfn, write, watched)
        idx = self._slot(gfn)
        old = self.q[idx]
        if old & EPT_RWX and (old & ADDR_MASK) >> PAGE_SHIFT != frame:
            self.flush_pending = True
        leaf = (frame << PAGE_SHIFT) | EPT_R | EPT_X | EPT_MT_WB | EPT_A
        if writable and not large_table:
            leaf |= EPT_W
            if write:
                leaf |= EPT_D
        self.q[idx] = leaf
        return leaf

    def _protect_table(self, gfn: int) -> None:
        """Write-protect the guest table page ``gfn`` (it holds a large leaf being cached)."""
        self.large_tables.add(gfn)
        idx = self._leaf_index(gfn)
        if idx >= 0 and self.q[idx] & EPT_PS:
            idx = self._leaf_index(gfn) if self._split_large(idx, gfn >> 9) else -1
        if idx >= 0:
            self.q[idx] &= ~EPT_W
        # A writable translation of the table page may be cached: it goes too.
        self.flush_pending = True

    def _holds_large_table(self, region: int) -> bool:
        return any(g >> 9 == region for g in self.large_tables)

    def _map_large(self, gfn: int, write: bool, watched: bool) -> int:
        """Install the 2 MiB leaf for gfn's large page; return gfn's piece of it.

        In a range sampling watches, the leaf is split at once and the other watched
        pages lose their 4 KiB leaves, so each still faults on its own first access."""
        i = self._l2_slot(gfn)
        e = self.q[i]
        if e & EPT_RWX and not e & EPT_PS:
            self._drop_table(i, gfn >> 9)  # 4 KiB leaves from before (sampling, a zero-page read)
        first = int(self.p2m.value[gfn & ~(LARGE_FRAMES - 1)])
        leaf = (first << PAGE_SHIFT) | EPT_PS | EPT_RWX | EPT_MT_WB | EPT_A | (EPT_D if write else 0)
        if e & EPT_RWX and (e & ADDR_MASK) >> PAGE_SHIFT != first:
            self.flush_pending = True
        self.q[i] = leaf
        self.large_leaves += 1
        if watched and self._split_large(i, gfn >> 9):
            region = gfn >> 9
            for g in self.p2m.watch:
                if g >> 9 == region and g != gfn:
                    self.q[self._leaf_index(g)] = 0
        return leaf + ((gfn & (LARGE_FRAMES - 1)) << PAGE_SHIFT)

    def _l2_slot(self, gfn: int) -> int:
        """The level-2 slot for gfn (where a 2 MiB leaf goes), creating tables above it."""
        q = self.q
        table = self.root << PAGE_SHIFT
        for shift in (27, 18):
            i = (table | ((gfn >> shift) & 0x1FF) << 3) >> 3
            e = q[i]
            if not e & EPT_RWX:
                e = (self._new_table(gfn) << PAGE_SHIFT) | EPT_RWX
                q[i] = e
            table = e & ADDR_MASK
        return (table | ((gfn >> 9) & 0x1FF) << 3) >> 3

    def _slot(self, gfn: int) -> int:
        """The 4 KiB leaf slot for gfn, creating intermediate tables on the way."""
        q = self.q
        i = self._l2_slot(gfn)
        e = q[i]
        if e & EPT_PS:
            self._drop_large(i, gfn >> 9)  # no longer mapped 2 MiB (sampling watches it)
            e = 0
        if not e & EPT_RWX:
            e = (self._new_table(gfn) << PAGE_SHIFT) | EPT_RWX
            q[i] = e
        return ((e & ADDR_MASK) | (gfn & 0x1FF) << 3) >> 3

    def _new_table(self, gfn: int = -1) -> int:
        # Serving gfn: reclaim if the pool is empty, else stop the VM naming the page.
        frame = self.pool.alloc(OWNER_VMM) if gfn < 0 else self.p2m.alloc_vmm(gfn)
        self.table_frames.add(frame)
        return frame

    def _drop_table(self, i: int, region: int) -> None:
        """Free the 4 KiB leaf table the level-2 slot ``i`` (2 MiB ``region``) points to."""
        frame = (self.q[i] & ADDR_MASK) >> PAGE_SHIFT
        self.q[i] = 0
        self.table_frames.discard(frame)
        self.pool.put(frame)
        self._ntlb_drop_region(region)
        self.flush_pending = True

    def _drop_large(self, i: int, region: int) -> None:
        self.q[i] = 0
        self._ntlb_drop_region(region)
        self.flush_pending = True

    def _ntlb_drop_region(self, region: int) -> None:
        # Nested-TLB slots hold entry indices: those inside a 2 MiB leaf or a dropped
        # table would now point at something else (INVEPT for the range).
        tag = self.ntlb_tag
        for s, g in enumerate(tag):
            if g >= 0 and g >> 9 == region:
                tag[s] = -1

    def collapse(self, region: int) -> None:
        """p2m watch listener: sampling stopped watching ``region``; if it is a large page
        mapped by 4 KiB leaves, drop them so the next access maps it 2 MiB again."""
        if not self.p2m.large[region] or self._holds_large_table(region):
            return
        gfn = region << 9
        table = self.root << PAGE_SHIFT
        q = self.q
        for shift in (27, 18):
            e = q[(table | ((gfn >> shift) & 0x1FF) << 3) >> 3]
            if not e & EPT_RWX:
                return
            table = e & ADDR_MASK
        i = (table | ((gfn >> 9) & 0x1FF) << 3) >> 3
        if q[i] & EPT_RWX and not q[i] & EPT_PS:
            self._drop_table(i, region)

    # -- coherence with the p2m -------------------------------------------------------

    def overhead_frames(self) -> int:
        """Machine frames the VMM spends on this VM's nested tables."""
        return len(self.table_frames)

    def test_and_clear_accessed(self, gfn: int) -> bool:
        """Was gfn accessed since the last call? (the EPT leaf's A bit, cleared here).

        The translation is also dropped, so only a new access can set A again.
        """
        idx = self._leaf_index(gfn)
        if idx < 0 or not self.q[idx] & EPT_A:
            return False
        self.zap(gfn)
        return True

    def pinned(self, gfn: int) -> bool:
        """Nested paging pins no guest page."""
        return False

    def ntlb_flush(self) -> None:
        """Empty the nested TLB (tests measure cold walks with it)."""
        self.ntlb_tag = [-1] * len(self.ntlb_tag)

    def zap(self, gfn: int) -> None:
        """Drop gfn's leaf (p2m listener): the next access takes a violation.

        A 2 MiB leaf goes as a whole (the host broke the large page, or sampling
        wants one of its pages to fault on its own)."""
        slot = gfn & self.ntlb_mask
        if self.ntlb_tag[slot] == gfn:
            self.ntlb_tag[slot] = -1  # INVEPT for this translation
        idx = self._leaf_index(gfn)
        if idx >= 0 and self.q[idx]:
            if self.q[idx] & EPT_PS:
                if not self._split_large(idx, gfn >> 9):
                    return
                idx = self._leaf_index(gfn)
            self.q[idx] = 0
            self.flush_pending = True

    def _split_large(self, i: int, region: int) -> bool:
        """Replace the 2 MiB leaf at level-2 slot ``i`` by a table of 512 equivalent 4 KiB
        leaves; False if no frame was free for the table (the 2 MiB leaf is dropped instead)."""
        q = self.q
        e = q[i]
        try:
            table = self._new_table()
        except HostOutOfMemory:
            self._drop_large(i, region)
            return False
        bits = e & (EPT_RWX | EPT_MT_WB | EPT_A | EPT_D)
        first = e & ADDR_MASK
        base = table << (PAGE_SHIFT - 3)
        for k in range(LARGE_FRAMES):
            q[base + k] = (first + (k << PAGE_SHIFT)) | bits
        q[i] = (table << PAGE_SHIFT) | EPT_RWX
        self._ntlb_drop_region(region)
        self.large_splits += 1
        return True

    def lookup(self, gfn: int) -> int:
        """The leaf for gfn without side effects (0 if none): for reports and tests.

        For a page inside a 2 MiB leaf: that leaf with the page's own frame in it."""
        idx = self._leaf_index(gfn)
        if idx < 0:
            return 0
        e = self.q[idx]
        return e + ((gfn & (LARGE_FRAMES - 1)) << PAGE_SHIFT) if e & EPT_PS else e

    def on_exit(self) -> None:
        """Nothing deferred to finish (the shadow MMU processes traced writes here)."""

    def peek_gpa(self, gpa: int) -> int:
        """GPA → machine address with no side effects (reports, diagnostics); -1 if outside."""
        gfn = gpa >> PAGE_SHIFT
        if gfn >= self.p2m.npages:
            return -1
        leaf = self.lookup(gfn)
        if leaf & EPT_R:
            return (leaf & ADDR_MASK) | (gpa & 0xFFF)
        frame = self.p2m.frame_of(gfn)
        return ((frame if frame >= 0 else ZERO_FRAME) << PAGE_SHIFT) | (gpa & 0xFFF)

    # -- reports, the debugger, fault injection -----------------------------------------

    def entries(self, gfn: int) -> list[TableEntry]:
        """The EPT entries translating ``gfn``, root first, down to its leaf (4 KiB, or the
        2 MiB leaf at level 2) or the first entry not present. No side effects."""
        q = self.q
        table = self.root << PAGE_SHIFT
        out = []
        for level, shift in ((4, 27), (3, 18), (2, 9), (1, 0)):
            idx = (table | ((gfn >> shift) & 0x1FF) << 3) >> 3
            e = q[idx]
            present = bool(e & EPT_RWX)
            leaf = present and (level == 1 or (level == 2 and bool(e & EPT_PS)))
            out.append(TableEntry(level, idx, e, leaf))
            if not present or leaf:
                break
            table = e & ADDR_MASK
        return out

    def describe_gpa(self, gpa: int) -> list[str]:
        """The nested (EPT) entries that translate ``gpa`` now, one line each."""
        gfn = gpa >> PAGE_SHIFT
        out = []
        for t in self.entries(gfn):
            e = t.value
            rights = "".join(ch for bit, ch in ((EPT_R, "R"), (EPT_W, "W"), (EPT_X, "X"), (EPT_A, "A"),
                                                (EPT_D, "D")) if e & bit)
            large = " (2 MiB page)" if t.leaf and t.level == 2 else ""
            out.append(f"{EPT_NAMES[t.level]} at machine {t.index << 3:#x}: {e:#018x} [{rights}]{large}")
            if not e & EPT_RWX:
                out.append("  (not present: the next access is an EPT violation)")
                return out
            if t.leaf:
                base = e & ADDR_MASK
                if t.level == 2:
                    base += (gfn & (LARGE_FRAMES - 1)) << PAGE_SHIFT
                out.append(f"  -> machine {(base | (gpa & 0xFFF)):#x}")
        return out

    def describe_va(self, cr3: int, va: int, gpa: int, user: bool, ctl: int) -> list[str]:
        """The final guest-physical page through the nested tables."""
        return ["final page through the nested tables:"] + ["    " + s for s in self.describe_gpa(gpa)]

    def describe(self, gfn: int) -> list[str]:
        """gfn's EPT leaf."""
        leaf = self.lookup(gfn)
        return [f"  EPT leaf: {leaf:#018x}" if leaf else "  EPT leaf: none"]

    def tables(self) -> list[VmmTable]:
        """The EPT tables, depth first from the root."""
        q = self.q
        out: list[VmmTable] = []

        def visit(frame: int, level: int) -> None:
            out.append(VmmTable(level, frame, -1))
            if level == 1:
                return
            base = frame << (PAGE_SHIFT - 3)
            for i in range(512):
                e = q[base + i]
                if e & EPT_RWX and not e & EPT_PS:
                    visit((e & ADDR_MASK) >> PAGE_SHIFT, level - 1)

        visit(self.root, NESTED_LEVELS)
        return out

    def counters(self) -> dict[str, int]:
        """This MMU's counters for reports."""
        return {
            "walks": self.walks,
            "walk_refs": self.walk_refs,
            "ntlb_hits": self.ntlb_hits,
            "ept_violations": self.ept_violations,
            "nested_table_frames": len(self.table_frames),
            "ept_large_leaves": self.large_leaves,
            "ept_large_splits": self.large_splits,
            "large_table_writes": self.large_table_writes,
        }

    def release(self) -> None:
        """Free the nested tables (VM power-off)."""
        for f in self.table_frames:
            self.pool.put(f)
        self.table_frames.clear()
