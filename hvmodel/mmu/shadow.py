"""The software MMU: shadow page tables, kept coherent with the guest's own tables.

The VMM builds guest-virtual → machine tables ("shadow pages", real x86-64 page
tables in machine frames it owns) that the hardware would walk instead of the
guest's. Here the hardware is the TLB-fill hook: a fill walks the shadow tables
with the same ``walk()`` the guest walk uses — 4 references, no guest tables, no
p2m. Only when the shadow has no answer does the VMM do the expensive part.

Design (after KVM's arch/x86/kvm/mmu and Xen's shadow code; docs/SHADOW.md has
the long form):

* **Shadow pages** are keyed by (guest frame, role). The role is the level plus,
  for a *direct* page that shadows part of a guest 2 MiB / 1 GiB leaf, the dirty
  state of that leaf. Shadow entries copy the guest's P/RW/US/NX bits, so the
  fill-time walk — run with the guest's own CR0.WP, EFER.NXE, SMEP, SMAP and CPL,
  as hardware would — reaches the same verdict as a guest walk; that is why the
  role needs no WP/NXE/CPL variants (KVM needs them because its hardware runs
  with its own control bits). A leaf entry is clean (no D) until the guest PTE is
  dirty, so the first write misses and sets the guest's D bit.
* **Hidden page faults**: a shadow miss walks the guest tables (setting A/D as the
  hardware would), asks the p2m for the frame and installs the entries along the
  path; the guest never sees it. A guest walk that faults is a real #PF.
* **Host-side write restrictions** live per machine frame, not in shadow entries:
  ``nowrite`` for frames holding a shadowed guest page table, and the pool's ``cow``
  for shared frames and the zero frame. A write to such a frame misses the shadow
  even if the entry allows it.
* **Tracing**: a guest write to a write-protected page table is a tracing fault.
  The fill lends the write right for that page and the real instruction does the
  write (no decoder of ours to get wrong: flags, partial and string writes all
  happen as the CPU does them). Before the next fill is served — and whenever the
  vCPU stops — the page is compared with its snapshot, every shadow entry derived
  from a changed guest entry is zapped, and the TLB is flushed to take the lent
  right back. Until then the guest can only reach translations still in the TLB,
  which it must invalidate before relying on a changed entry anyway. (Stopping
  right after the instruction does not work on Unicorn 2.1.4: ``emu_stop`` from a
  fill hook lets the store happen but leaves RIP on the instruction, which would
  run twice — see docs/ARCHITECTURE.md.)
* **Out of sync**: a leaf table written ``OOS_AFTER_WRITES`` times becomes out of
  sync (Xen's OOS, KVM's unsync): write protection is dropped, the snapshot kept,
  and no fill trusts its shadow entries (they miss and walk the guest) until it is
  resynced — on a root switch (KVM syncs on a CR3 load), or when more than
  ``max_oos`` pages are out of sync — by diffing it against the snapshot and
  zapping what changed. A non-leaf table written ``FLOOD_THRESHOLD`` times with no
  fault using it in between is unshadowed (zapped): KVM's write-flooding rule.
* **Roots** are cached per guest CR3; the guest's ``mov cr3`` is not seen, so a
  switch is noticed at the first fill under the new CR3. As in KVM, a switch to one
  of the 4 most recent roots is a fast switch; any other counts as a reload.
* **Coherence with the p2m**: a p2m change zaps the leaf entries that map the gfn,
  found through the reverse map, and flushes the TLB.
* **Large pages**: a guest 2 MiB leaf over a range the p2m backs with a 2 MiB machine
  page is shadowed by one 2 MiB shadow leaf (no direct pages below it), reverse-mapped
  under the region (key ``~region``) so a change of any page in it — the host breaking
  the large page, sampling watching one of its pages — drops the whole leaf. While
  sampling watches pages of the range, it gets a fully populated direct page instead,
  less the watched pages, so each of those still faults on its own.
* **Budget**: at most ``max_pages`` shadow pages (KVM: 2 % of guest pages, at least
  64); the least recently used one is evicted (zapped) to make room.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..machine.pool import LARGE_FRAMES, PAGE_SHIFT, ZERO_FRAME, MachinePool
from .base import TableEntry, VmmTable
from .p2m import P2M
from .walk import (ACC_READ, ACC_WRITE, ADDR_MASK, CTL_PG, LEVEL_NAMES, PERM_RWX, PERM_W, PTE_A, PTE_D,
                   PTE_NX, PTE_P, PTE_PS, PTE_RW, PTE_US, WALK_1G, WALK_2M, WALK_LARGE, pte_flags,
                   static_assert_layout, walk)

FLOOD_THRESHOLD = 3        # traced writes to a non-leaf table, with no fault using it, before unshadowing
OOS_AFTER_WRITES = 2       # traced writes to a leaf table before it goes out of sync
DEFAULT_MAX_OOS = 8
RECENT_ROOTS = 4           # the current root + KVM_MMU_NUM_PREV_ROOTS (3)
_COPY_BITS = PTE_P | PTE_RW | PTE_US | PTE_NX
_ROLE_DIRECT = 1 << 3
_ROLE_DIRTY = 1 << 4
_ROLE_1G = 1 << 5


def role_layout_problems(c) -> list[str]:
    """What is wrong with the shadow page role and entry layout in namespace ``c``."""
    out = []
    flags = (c["_ROLE_DIRECT"], c["_ROLE_DIRTY"], c["_ROLE_1G"])
    if any(f & 7 for f in flags) or len(set(flags)) != 3 or any(f & (f - 1) for f in flags):
        out.append("role flags must be distinct single bits above the level (bits 2:0)")
    if c["_COPY_BITS"] & ADDR_MASK:
        out.append("copied entry bits must be clear of the address bits")
    if c["WALK_1G"] > 0xFF:
        out.append("direct_frame (uint8) must hold WALK_2M / WALK_1G")
    return out


def role_of(level: int, direct: bool = False, dirty: bool = False, huge: bool = False) -> int:
    """Pack a shadow page role: level, direct, and for direct pages the dirty state and
    size (2 MiB or 1 GiB) of the guest leaf they split."""
    return level | (_ROLE_DIRECT if direct else 0) | (_ROLE_DIRTY if dirty else 0) | \
        (_ROLE_1G if huge else 0)


static_assert_layout(role_layout_problems(globals()), __name__)


@dataclass(eq=False)
class ShadowPage:
    """512 shadow entries in one machine frame, shadowing one guest table (or large page part)."""

    gfn: int
    role: int
    frame: int
    parents: list = field(default_factory=list)   # (parent ShadowPage, index) entries pointing here
    children: dict = field(default_factory=dict)  # index -> child ShadowPage
    leaves: dict = field(default_factory=dict)    # index -> gfn mapped by a leaf entry
    last_use: int = 0

    @property
    def level(self) -> int:
        return self.role & 7

    @property
    def direct(self) -> bool:
        return bool(self.role & _ROLE_DIRECT)


class _ShadowWalkMemory:
    """The shadow tables as the fill-time walk sees them.

    An entry in an out-of-sync page reads as not present, and any A/D update the
    walk would make means the guest's own bits must change first: both are misses.
    """

    def __init__(self, mmu: "ShadowMMU") -> None:
        self.q = mmu.pool.q
        self.unsync = mmu.unsync_frame
        self.miss = False
        self.last = 0

    def read_pte(self, mpa: int) -> int:
        if self.unsync[mpa >> PAGE_SHIFT]:
            self.miss = True
            return 0
        self.last = mpa  # the entry read last is the leaf's, when the walk succeeds
        return self.q[mpa >> 3]

    def write_pte(self, mpa: int, value: int) -> None:
        self.miss = True


class _GuestTableMemory:
    """The guest's tables through the p2m, keeping snapshots in step with our A/D writes."""

    def __init__(self, mmu: "ShadowMMU") -> None:
        self.mmu = mmu
        self.p2m = mmu.p2m
        self.q = mmu.pool.q

    def read_pte(self, gpa: int) -> int:
        frame, _ = self.p2m.map_for(gpa >> PAGE_SHIFT, False)
        return self.q[((frame << PAGE_SHIFT) | (gpa & 0xFFF)) >> 3]

    def write_pte(self, gpa: int, value: int) -> None:
        gfn = gpa >> PAGE_SHIFT
        frame = self.p2m.frame_for_write(gfn)   # un-shares a shared table page first
        i = ((frame << PAGE_SHIFT) | (gpa & 0xFFF)) >> 3
        old = self.q[i]
        self.q[i] = value
        snap = self.mmu.snapshots.get(gfn)
        # Our own A/D update is not a guest change -- but only when the snapshot still holds
        # the entry as it was: a guest change not yet looked at (an out-of-sync table, a
        # traced write pending) must still show at the next diff, not be absorbed here
        # (found by the lock-step access checks on guests/edges.asm: a PTE changed while its
        # table was out of sync, then walked, kept its stale shadow entry after the resync).
        if snap is not None and snap[(gpa & 0xFFF) >> 3] == old:
            snap[(gpa & 0xFFF) >> 3] = value


class _ReadOnlyTables:
    """Shadow tables for a report's walk: reads only, the walk's A/D updates dropped."""

    def __init__(self, q: memoryview) -> None:
        self.q = q

    def read_pte(self, mpa: int) -> int:
        return self.q[mpa >> 3]

    def write_pte(self, mpa: int, value: int) -> None:
        pass


class ShadowMMU:
    """Shadow page tables for one VM (one vCPU)."""

    kind = "shadow"
    intercepts_invlpg = True   # KVM's shadow MMU exits on INVLPG; large-page pieces need it

    reference = False

    @classmethod
    def for_vm(cls, memory, pool, config) -> "ShadowMMU":
        """This mode for a VM (mmu/modes.py): ``memory`` is its p2m."""
        return cls(memory, pool, max_pages=config.shadow_max_pages)

    def __init__(self, p2m: P2M, pool: MachinePool, *, max_pages: int | None = None,
                 max_oos: int = DEFAULT_MAX_OOS) -> None:
        self.p2m = p2m
        self.pool = pool
        self.q = pool.q
        self.max_pages = max_pages if max_pages is not None else max(64, p2m.npages * 2 // 100)
        self.max_oos = max_oos
        self.pages: dict[tuple[int, int], ShadowPage] = {}
        self.shadowed: dict[int, list[ShadowPage]] = {}     # guest table gfn -> its shadow pages
        self.snapshots: dict[int, np.ndarray] = {}           # guest table gfn -> 512 entries
        self.rmap: dict[int, set] = {}                       # data gfn -> {(ShadowPage, index)}
        self.flood: dict[int, int] = {}      # non-leaf table gfn -> traced writes since a fault used it
        self.leaf_writes: dict[int, int] = {}  # leaf table gfn -> traced writes since it was synced
        self.oos: list[int] = []                             # out-of-sync gfns, oldest first
        self.oos_set: set[int] = set()
        self.table_frame: dict[int, int] = {}                # guest table gfn -> write-protected frame
        self.nowrite = np.zeros(pool.nframes, dtype=np.bool_)  # frames of write-protected guest tables
        self.cow = pool.cow                                      # shared frames and the zero frame
        self.unsync_frame = np.zeros(pool.nframes, dtype=np.bool_)
        # Frames of direct shadow pages: WALK_2M or WALK_1G, the size of the guest leaf.
        self.direct_frame = np.zeros(pool.nframes, dtype=np.uint8)
        self.smem = _ShadowWalkMemory(self)
        self.gmem = _GuestTableMemory(self)
        self.last_cr3 = -1
        self.last_root: ShadowPage | None = None
        self.pending_traces: list[int] = []  # traced pages whose lent write right is out
        self.flush_pending = False
        self._tick = 0
        self._install_tick = 0
        self._trace: list = []
        # Counters (KVM/Xen names).
        self.hits = 0
        self.hidden_faults = 0
        self.tracing_faults = 0
        self.shadow_pages_created = 0
        self.shadow_evictions = 0
        self.oos_events = 0
        self.resyncs = 0
        self.zaps = 0
        self.root_switches = 0
        self.root_reloads = 0
        self.recent_roots: list[int] = []
        self.guest_walks = 0
        self.large_leaves = 0
        p2m.listeners.append(self.zap)

    # -- the fill path --------------------------------------------------------------

    def translate(self, cr3: int, va: int, acc: int, user: bool, ctl: int) -> int:
        """GVA → machine page for one fill: ``mpa | perms`` or ``~fault``."""
        if self.pending_traces:
            self.on_exit()
        if not ctl & CTL_PG:
            return self._unpaged(va, acc)
        root = self.last_root if cr3 == self.last_cr3 else self._switch_root(cr3)
        smem = self.smem
        smem.miss = False
        r = walk(smem, root.frame << PAGE_SHIFT, va, acc, user, ctl)
        if r >= 0 and not smem.miss:
            # A piece of a guest large page (see vm/intercept.py): WALK_2M / WALK_1G.
            r |= int(self.direct_frame[smem.last >> PAGE_SHIFT])
            frame = r >> PAGE_SHIFT
            if not (self.nowrite[frame] or self.cow[frame]):
                self.hits += 1
                return r
            if acc != ACC_WRITE:
                self.hits += 1
                return r & ~PERM_W
        return self._hidden_fault(root, cr3, va, acc, user, ctl)

    def _unpaged(self, va: int, acc: int) -> int:
        # CR0.PG = 0: guest-virtual = guest-physical; nothing to shadow, but a write to
        # a page that is still shadowed as a table (from an earlier PG = 1) is traced.
        gfn = va >> PAGE_SHIFT
        write = acc == ACC_WRITE
        frame, writable = self.p2m.map_for(gfn, write)
        self.p2m.note_mapped(gfn)
        if write:
            self._maybe_trace(gfn)
            return (frame << PAGE_SHIFT) | PERM_RWX
        if not writable or self.nowrite[frame] or self.cow[frame]:
            return (frame << PAGE_SHIFT) | (PERM_RWX & ~PERM_W)
        return (frame << PAGE_SHIFT) | PERM_RWX

    def _maybe_trace(self, gfn: int) -> None:
        if gfn in self.shadowed and not self._is_oos(gfn):
            # A tracing fault: lend the write right; the change is looked at before
            # the next fill (on_exit).
            self.tracing_faults += 1
            self.pending_traces.append(gfn)

    def _hidden_fault(self, root: ShadowPage, cr3: int, va: int, acc: int, user: bool, ctl: int) -> int:
        self.guest_walks += 1
        self.p2m.topup()   # shadow pages first: nothing may be reclaimed once gfn is resolved
        trace = self._trace
        trace.clear()
        r = walk(self.gmem, cr3, va, acc, user, ctl, trace)
        if r < 0:
            return r  # the guest's own #PF: reflected to it
        self.hidden_faults += 1
        gfn = r >> PAGE_SHIFT
        write = acc == ACC_WRITE
        frame, writable = self.p2m.map_for(gfn, write)
        self.p2m.note_mapped(gfn)
        perms = r & (PERM_RWX | WALK_LARGE)
        self._install(root, va, trace, gfn, write)
        if write:
            self._maybe_trace(gfn)
        elif not writable or self.nowrite[frame] or self.cow[frame]:
            perms &= ~PERM_W
        return (frame << PAGE_SHIFT) | perms

    # -- building shadow entries ------------------------------------------------------

    def _switch_root(self, cr3: int) -> ShadowPage:
        self.p2m.topup()
        if self.last_cr3 != -1:
            self.root_switches += 1
            # KVM switches fast to the current root or one of KVM_MMU_NUM_PREV_ROOTS (3)
            # previous ones; any other CR3 unloads and reloads the MMU (a "reload").
            if cr3 not in self.recent_roots:
                self.root_reloads += 1
            self.resync_all()  # KVM syncs unsync pages on a CR3 load
        if cr3 in self.recent_roots:
            self.recent_roots.remove(cr3)
        self.recent_roots.insert(0, cr3)
        del self.recent_roots[RECENT_ROOTS:]
        gfn = (cr3 & ADDR_MASK) >> PAGE_SHIFT
        root = self._get_page(gfn, role_of(4), None)
        self.last_cr3 = cr3
        self.last_root = root
        return root

    def _install(self, root: ShadowPage, va: int, trace: list, gfn: int, write: bool) -> None:
        """Install the shadow entries for a successful guest walk along ``trace``."""
        sp = root
        self._install_tick = self._tick + 1
        self._touch(sp)
        n = len(trace)
        for i, (level, _egpa, e) in enumerate(trace):
            idx = (va >> (12 + 9 * (level - 1))) & 0x1FF
            slot = ((sp.frame << PAGE_SHIFT) | idx << 3) >> 3
            is_leaf = i == n - 1
            if is_leaf and level == 1:
                if sp.direct or not self._is_oos(sp.gfn):
                    dirty = write or e & PTE_D
                    self._set_leaf(sp, idx, slot, gfn, (e & _COPY_BITS) | PTE_A | (PTE_D if dirty else 0))
                return
            if is_leaf:
                # A guest 2 MiB / 1 GiB leaf: shadow it with direct pages down to 4 KiB.
                dirty = bool(write or e & PTE_D)
                huge = level == 3
                base = (e & ADDR_MASK) >> PAGE_SHIFT
                if level == 2 and self._map_large(sp, idx, slot, base, e, dirty, gfn):
                    return
                child = self._link(sp, idx, e, base_gfn=base, level=level - 1, direct=True, dirty=dirty,
                                   huge=huge)
                sp = child
                for lvl in range(level - 1, 0, -1):
                    idx = (va >> (12 + 9 * (lvl - 1))) & 0x1FF
                    slot = ((sp.frame << PAGE_SHIFT) | idx << 3) >> 3
                    if lvl == 1:
                        self._set_leaf(sp, idx, slot, gfn,
                                       PTE_P | PTE_RW | PTE_US | PTE_A | (PTE_D if dirty else 0))
                    else:
                        sub = sp.gfn + (idx << (9 * (lvl - 1)))
                        sp = self._link(sp, idx, PTE_P | PTE_RW | PTE_US, base_gfn=sub, level=lvl - 1,
                                        direct=True, dirty=dirty, huge=huge)
                return
            next_gfn = (e & ADDR_MASK) >> PAGE_SHIFT
            sp = self._link(sp, idx, e, base_gfn=next_gfn, level=level - 1, direct=False, dirty=False)
            self.flood.pop(next_gfn, None)  # used by a fault: not flooding (KVM resets the count)

    def _map_large(self, sp: ShadowPage, idx: int, slot: int, base: int, e: int, dirty: bool,
                   gfn: int) -> bool:
        """Shadow a guest 2 MiB leaf with one 2 MiB leaf if a 2 MiB machine page backs it."""
        p2m = self.p2m
        region = base // LARGE_FRAMES
        if region >= len(p2m.large) or not p2m.large[region]:
            return False
        if region in p2m.watch_regions:
            child = self._link(sp, idx, e, base_gfn=base, level=1, direct=True, dirty=dirty)
            bits = PTE_P | PTE_RW | PTE_US | PTE_A | (PTE_D if dirty else 0)
            first = (child.frame << PAGE_SHIFT) >> 3
            watch = p2m.watch
            for k in range(LARGE_FRAMES):
                g = base + k
                if g == gfn or g not in watch:
                    self._set_leaf(child, k, first + k, g, bits)
            return True
        new = (int(p2m.value[base]) << PAGE_SHIFT) | (e & _COPY_BITS) | PTE_PS | PTE_A | \
            (PTE_D if dirty else 0)
        if idx in sp.children:
            self._unlink(sp, idx)   # direct pages from before no longer reached from here
        old = self.q[slot]
        if old & PTE_P and (old ^ new) & ADDR_MASK:
            self.flush_pending = True
        self.q[slot] = new
        self._add_leaf(sp, idx, ~region)
        self.large_leaves += 1
        return True

    def p2m_frame(self, gfn: int) -> int:
        frame = self.p2m.frame_of(gfn)
        return frame if frame >= 0 else ZERO_FRAME

    def _link(self, sp: ShadowPage, idx: int, e: int, *, base_gfn: int, level: int, direct: bool,
              dirty: bool, huge: bool = False) -> ShadowPage:
        """Point ``sp[idx]`` at the shadow page for (base_gfn, role), creating it if needed."""
        child = self._get_page(base_gfn, role_of(level, direct, dirty, huge), sp)
        old = sp.children.get(idx)
        if old is not child:
            if old is not None:
                self._unlink(sp, idx)
            sp.children[idx] = child
            child.parents.append((sp, idx))
        self.q[((sp.frame << PAGE_SHIFT) | idx << 3) >> 3] = \
            (child.frame << PAGE_SHIFT) | (e & _COPY_BITS) | PTE_A
        self._touch(child)
        return child

    def _get_page(self, gfn: int, role: int, keep: ShadowPage | None) -> ShadowPage:
        sp = self.pages.get((gfn, role))
        if sp is not None:
            return sp
        if len(self.pages) >= self.max_pages:
            self._evict(keep)
        frame = self.p2m.alloc_vmm(gfn)
        sp = ShadowPage(gfn, role, frame)
        self.pages[(gfn, role)] = sp
        if role & _ROLE_DIRECT:
            self.direct_frame[frame] = WALK_1G if role & _ROLE_1G else WALK_2M
        self.shadow_pages_created += 1
        if not role & _ROLE_DIRECT:
            self._protect(gfn, sp)
        return sp

    def _protect(self, gfn: int, sp: ShadowPage) -> None:
        """``gfn`` is now a guest page table: snapshot it and write-protect its frame."""
        sps = self.shadowed.setdefault(gfn, [])
        sps.append(sp)
        if gfn in self.snapshots:
            if self._is_oos(gfn):
                self.unsync_frame[sp.frame] = True
            return
        frame, _ = self.p2m.map_for(gfn, True)
        self.snapshots[gfn] = np.frombuffer(self.pool.frame_bytes(frame), dtype="<u8").copy()
        self.nowrite[frame] = True
        self.table_frame[gfn] = frame
        # Translations that may already allow writes to this frame must go.
        self.flush_pending = True

    def _set_leaf(self, sp: ShadowPage, idx: int, slot: int, gfn: int, bits: int) -> None:
        new = (self.p2m_frame(gfn) << PAGE_SHIFT) | bits
        old = self.q[slot]
        if old & PTE_P and (old ^ new) & ADDR_MASK:
            # A present leaf replaced by another frame: cached translations are stale.
            self.flush_pending = True
        self.q[slot] = new
        self._add_leaf(sp, idx, gfn)

    def _add_leaf(self, sp: ShadowPage, idx: int, gfn: int) -> None:
        old = sp.leaves.get(idx)
        if old is not None and old != gfn:
            self.rmap.get(old, set()).discard((sp, idx))
        sp.leaves[idx] = gfn
        self.rmap.setdefault(gfn, set()).add((sp, idx))

    def _touch(self, sp: ShadowPage) -> None:
        self._tick += 1
        sp.last_use = self._tick

    # -- tracing, out of sync, resync ---------------------------------------------------

    def on_exit(self) -> None:
        """Process traced writes: diff each page, zap what changed, take the write right back.

        Called before every fill and whenever the vCPU stops.
        """
        traces, self.pending_traces = self.pending_traces, []
        for gfn in dict.fromkeys(traces):
            sps = self.shadowed.get(gfn)
            if not sps:
                continue
            self._diff_and_zap(gfn)
            if all(sp.level == 1 for sp in sps):
                self.leaf_writes[gfn] = n = self.leaf_writes.get(gfn, 0) + 1
                if n >= OOS_AFTER_WRITES:
                    self._unsync(gfn)
            else:
                self.flood[gfn] = n = self.flood.get(gfn, 0) + 1
                if n >= FLOOD_THRESHOLD:
                    for sp in list(sps):
                        self._zap_page(sp)
        if traces:
            self.flush_pending = True  # take back the write right lent for the trace

    def _diff_and_zap(self, gfn: int) -> None:
        snap = self.snapshots[gfn]
        cur = np.frombuffer(self.pool.frame_bytes(self.p2m_frame(gfn)), dtype="<u8")
        changed = np.flatnonzero(cur != snap)
        if not len(changed):
            return
        for sp in list(self.shadowed.get(gfn, ())):
            for idx in changed:
                self._zap_entry(sp, int(idx))
        snap[:] = cur

    def _is_oos(self, gfn: int) -> bool:
        return gfn in self.oos_set

    def _unsync(self, gfn: int) -> None:
        if self._is_oos(gfn):
            return
        self.oos.append(gfn)
        self.oos_set.add(gfn)
        self.oos_events += 1
        for sp in self.shadowed.get(gfn, ()):
            self.unsync_frame[sp.frame] = True
        self.nowrite[self.table_frame[gfn]] = False
        self.leaf_writes.pop(gfn, None)
        while len(self.oos) > self.max_oos:
            self.resync(self.oos[0])

    def resync(self, gfn: int) -> None:
        """Bring an out-of-sync table back: zap what changed, write-protect it again."""
        self.oos.remove(gfn)
        self.oos_set.discard(gfn)
        self.resyncs += 1
        for sp in self.shadowed.get(gfn, ()):
            self.unsync_frame[sp.frame] = False
        if gfn in self.shadowed:
            self._diff_and_zap(gfn)
            self.nowrite[self.table_frame[gfn]] = True
        self.flush_pending = True

    def resync_all(self) -> None:
        for gfn in list(self.oos):
            self.resync(gfn)

    # -- zapping ------------------------------------------------------------------------------

    def _zap_entry(self, sp: ShadowPage, idx: int) -> None:
        slot = ((sp.frame << PAGE_SHIFT) | idx << 3) >> 3
        if not self.q[slot]:
            return
        self.q[slot] = 0
        self.zaps += 1
        if idx in sp.children:
            self._unlink(sp, idx)
        g = sp.leaves.pop(idx, None)
        if g is not None:
            self.rmap.get(g, set()).discard((sp, idx))

    def _unlink(self, sp: ShadowPage, idx: int) -> None:
        child = sp.children.pop(idx)
        try:
            child.parents.remove((sp, idx))
        except ValueError:
            pass

    def _zap_page(self, sp: ShadowPage) -> None:
        """Remove a shadow page entirely (flooding, eviction)."""
        for parent, idx in list(sp.parents):
            slot = ((parent.frame << PAGE_SHIFT) | idx << 3) >> 3
            self.q[slot] = 0
            parent.children.pop(idx, None)
        sp.parents.clear()
        for idx, child in list(sp.children.items()):
            try:
                child.parents.remove((sp, idx))
            except ValueError:
                pass
        sp.children.clear()
        for idx, g in sp.leaves.items():
            self.rmap.get(g, set()).discard((sp, idx))
        sp.leaves.clear()
        del self.pages[(sp.gfn, sp.role)]
        self.unsync_frame[sp.frame] = False
        self.direct_frame[sp.frame] = 0
        self.pool.put(sp.frame)
        self.zaps += 1
        if sp is self.last_root:
            self.last_root = None
            self.last_cr3 = -1
        if not sp.direct:
            sps = self.shadowed.get(sp.gfn, [])
            if sp in sps:
                sps.remove(sp)
            if not sps:
                self._unprotect(sp.gfn)

    def _unprotect(self, gfn: int) -> None:
        self.shadowed.pop(gfn, None)
        self.snapshots.pop(gfn, None)
        self.flood.pop(gfn, None)
        self.leaf_writes.pop(gfn, None)
        if self._is_oos(gfn):
            self.oos.remove(gfn)
            self.oos_set.discard(gfn)
        frame = self.table_frame.pop(gfn, ZERO_FRAME)
        if frame != ZERO_FRAME:
            self.nowrite[frame] = False

    def _evict(self, keep: ShadowPage | None) -> None:
        # Never the root or a page on the path being installed (touched since it began).
        protect = {id(keep), id(self.last_root)}
        victims = sorted((sp for sp in self.pages.values()
                          if id(sp) not in protect and sp.last_use < self._install_tick),
                         key=lambda sp: sp.last_use)
        if not victims:
            return
        self._zap_page(victims[0])
        self.shadow_evictions += 1

    def zap(self, gfn: int) -> None:
        """p2m listener: gfn's frame or rights changed; drop every leaf that maps it."""
        for sp, idx in list(self.rmap.get(gfn, ())):
            self._zap_entry(sp, idx)
        for sp, idx in list(self.rmap.get(~(gfn // LARGE_FRAMES), ())):
            self._zap_entry(sp, idx)   # a 2 MiB leaf over the large page gfn is part of
        if gfn in self.shadowed:
            # A guest table's frame changed (shared, swapped): stop shadowing it; it is
            # shadowed again, from its new frame, at the next walk that uses it.
            for sp in list(self.shadowed[gfn]):
                self._zap_page(sp)
        self.flush_pending = True

    def overhead_frames(self) -> int:
        """Machine frames the VMM spends on this VM's shadow pages."""
        return len(self.pages)

    def test_and_clear_accessed(self, gfn: int) -> bool:
        """Was gfn accessed since the last call? (it has shadow leaves; they are zapped)."""
        if not self.rmap.get(gfn) and not self.rmap.get(~(gfn // LARGE_FRAMES)):
            return False
        self.zap(gfn)
        return True

    def pinned(self, gfn: int) -> bool:
        """Pages the host should not swap: guest page tables this MMU shadows."""
        return gfn in self.shadowed

    # -- reports --------------------------------------------------------------------------------

    def peek_gpa(self, gpa: int) -> int:
        """GPA → machine address with no side effects; -1 outside guest memory."""
        gfn = gpa >> PAGE_SHIFT
        if gfn >= self.p2m.npages:
            return -1
        return (self.p2m_frame(gfn) << PAGE_SHIFT) | (gpa & 0xFFF)

    def describe(self, gfn: int) -> list[str]:
        """Whether ``gfn`` holds guest page tables this MMU shadows."""
        if gfn in self.shadowed:
            return ["  shadowed: this page holds guest page tables (write-protected)"]
        return []

    def describe_gpa(self, gpa: int) -> list[str]:
        """Shadow paging has no guest-physical tables of its own."""
        return []

    def describe_va(self, cr3: int, va: int, gpa: int, user: bool, ctl: int) -> list[str]:
        """The shadow entries the hardware would walk for ``va`` (read-only)."""
        if not ctl & CTL_PG:
            return ["shadow: paging off, nothing shadowed"]
        root = self.pages.get(((cr3 & ADDR_MASK) >> PAGE_SHIFT, role_of(4)))
        if root is None:
            return ["shadow: no shadow root for this CR3 yet (built on the next fill)"]
        trace: list = []
        res = walk(_ReadOnlyTables(self.q), root.frame << PAGE_SHIFT, va, ACC_READ, user, ctl, trace)
        out = [f"shadow root: machine frame {root.frame:#x}"]
        for level, empa, e in trace:
            out.append(f"shadow {LEVEL_NAMES[level]:<5} at machine {empa:#x}: {e:#018x} [{pte_flags(e)}]")
        if res < 0:
            out.append("shadow: not filled in yet (the next access is a hidden fault)")
        else:
            out.append(f"  -> machine {(res & ADDR_MASK) | (va & 0xFFF):#x}")
        return out

    def tables(self) -> list[VmmTable]:
        """The shadow pages, by (guest frame, role)."""
        return [VmmTable(sp.level, sp.frame, sp.gfn, sp.role)
                for sp in sorted(self.pages.values(), key=lambda sp: (sp.gfn, sp.role))]

    def entries(self, gfn: int) -> list[TableEntry]:
        """Shadow paging has no guest-physical tables of its own."""
        return []

    def counters(self) -> dict[str, int]:
        return {
            "shadow_hits": self.hits,
            "hidden_faults": self.hidden_faults,
            "tracing_faults": self.tracing_faults,
            "shadow_pages": len(self.pages),
            "shadow_pages_created": self.shadow_pages_created,
            "shadow_evictions": self.shadow_evictions,
            "oos_pages": len(self.oos),
            "oos_events": self.oos_events,
            "resyncs": self.resyncs,
            "zaps": self.zaps,
            "root_switches": self.root_switches,
            "root_reloads": self.root_reloads,
            "guest_walks": self.guest_walks,
            "shadow_large_leaves": self.large_leaves,
        }

    def release(self) -> None:
        for sp in list(self.pages.values()):
            self.pool.put(sp.frame)
        self.pages.clear()
