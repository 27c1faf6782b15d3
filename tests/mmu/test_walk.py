"""walk(): one behaviour per test, then hypothesis properties over random tables."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hvmodel.mmu.walk import (
    ACC_FETCH, ACC_READ, ACC_WRITE, ADDR_MASK, CR0_PG, CR0_WP, CR4_SMAP, CR4_SMEP, CTL_NXE, CTL_PG,
    CTL_SMAP, CTL_SMEP, CTL_WP, EFER_NXE, FAULT_GP, PERM_R, PERM_RWX, PERM_W, PERM_X, PFEC_I,
    PFEC_P, PFEC_RSVD, PFEC_U, PFEC_W, RFLAGS_AC, WALK_1G, WALK_2M, WALK_LARGE, paging_ctl, walk,
)

P, RW, US, A, D, PS = 1, 2, 4, 0x20, 0x40, 0x80
NX = 1 << 63
AD = A | D

CR3 = 0x10_0000
PDPT = 0x10_1000
PD = 0x10_2000
PT = 0x10_3000
FRAME = 0x4567_8000            # a 4 KiB frame
FRAME_2M = 0x4560_0000         # 2 MiB aligned
FRAME_1G = 0x40_0000_0000 - (1 << 30)  # 1 GiB aligned, just under MAXPHYADDR = 40 bits
VA = 0xFFFF_9234_0060_1234     # indices 0x124, 0xd0, 3, 1

BASE_CTL = CTL_PG | CTL_WP | CTL_NXE


def idx(va: int, level: int) -> int:
    return (va >> (12 + 9 * (level - 1))) & 0x1FF


class Memory:
    """Dict-backed table memory that counts reads and writes."""

    def __init__(self, entries: dict[int, int] | None = None):
        self.e = dict(entries or {})
        self.reads = 0
        self.writes: list[tuple[int, int]] = []

    def read_pte(self, gpa: int) -> int:
        self.reads += 1
        return self.e.get(gpa, 0)

    def write_pte(self, gpa: int, value: int) -> None:
        self.writes.append((gpa, value))
        self.e[gpa] = value


class NoMemory:
    def read_pte(self, gpa: int) -> int:
        raise AssertionError("no table may be read")

    def write_pte(self, gpa: int, value: int) -> None:
        raise AssertionError("no table may be written")


def slot(level: int, va: int = VA) -> int:
    return {4: CR3, 3: PDPT, 2: PD, 1: PT}[level] + 8 * idx(va, level)


def tables(va: int = VA, *, l4: int = P | RW | US, l3: int = P | RW | US, l2: int = P | RW | US,
           l1: int | None = P | RW | US, leaf: int = 1) -> Memory:
    """A 4-level path for ``va``; ``lN`` are the flag bits (and extra bits) of each level.

    ``leaf`` = 2 or 3 makes that level a 2 MiB / 1 GiB leaf (PS is added).
    """
    e = {slot(4, va): PDPT | l4}
    if leaf == 3:
        e[slot(3, va)] = FRAME_1G | PS | l3
        return Memory(e)
    e[slot(3, va)] = PD | l3
    if leaf == 2:
        e[slot(2, va)] = FRAME_2M | PS | l2
        return Memory(e)
    e[slot(2, va)] = PT | l2
    assert l1 is not None
    e[slot(1, va)] = FRAME | l1
    return Memory(e)


def err(r: int) -> int:
    assert r < 0, f"expected a fault, got {r:#x}"
    return ~r


def ok(r: int) -> int:
    assert r >= 0, f"expected a translation, got fault {~r:#x}"
    return r


# ---------------------------------------------------------------------------- basics

def test_paging_off_is_identity_and_reads_nothing():
    for va in (0, 0x1234_5678, 0xFFFF_F000):
        assert walk(NoMemory(), CR3, va, ACC_WRITE, True, CTL_WP | CTL_NXE) == (va & ADDR_MASK) | PERM_RWX


@pytest.mark.parametrize("va", [0x0000_8000_0000_0000, 0xFFFF_7FFF_FFFF_F000, 0x0001_0000_0000_0000,
                                0x8000_0000_0000_0000])
def test_non_canonical_address_is_gp_without_reading_tables(va):
    assert err(walk(NoMemory(), CR3, va, ACC_READ, False, BASE_CTL)) == FAULT_GP


@pytest.mark.parametrize("va", [0x0000_7FFF_FFFF_F000, 0xFFFF_8000_0000_0000])
def test_canonical_edges_are_walked(va):
    mem = tables(va)
    assert ok(walk(mem, CR3, va, ACC_READ, False, BASE_CTL)) & ~0xFFF == FRAME


def test_entry_index_per_level():
    """Each level is indexed with its own 9 bits of the address: entry = table + 8 * index."""
    trace: list = []
    mem = tables()
    ok(walk(mem, CR3, VA, ACC_READ, False, BASE_CTL, trace))
    assert [(lvl, gpa) for lvl, gpa, _ in trace] == [
        (4, CR3 + 8 * 0x124), (3, PDPT + 8 * 0xD0), (2, PD + 8 * 3), (1, PT + 8 * 1)]


def test_trace_lists_four_levels_with_the_values_read():
    trace: list = []
    mem = tables(l1=P | RW | US | AD)
    before = dict(mem.e)
    ok(walk(mem, CR3, VA, ACC_READ, False, BASE_CTL, trace))
    assert [lvl for lvl, _, _ in trace] == [4, 3, 2, 1]
    assert all(before[gpa] == value for _, gpa, value in trace)


def test_trace_stops_at_a_large_leaf():
    trace: list = []
    ok(walk(tables(leaf=2), CR3, VA, ACC_READ, False, BASE_CTL, trace))
    assert [lvl for lvl, _, _ in trace] == [4, 3, 2]


def test_4k_leaf_gives_frame_and_rights():
    r = ok(walk(tables(l1=P | RW | US | AD), CR3, VA, ACC_READ, False, BASE_CTL))
    assert r & ~0xFFF == FRAME and r & 0xFFF == PERM_RWX  # a 4 KiB leaf: no WALK_LARGE


@pytest.mark.parametrize("off", [0, 0x1000, 0x1234, 0x10_0000, 0x1F_F000, 0x1F_FFFF])
def test_2m_leaf_gpa_for_offsets_inside(off):
    va = 0xFFFF_9234_0060_0000 + off   # 2 MiB aligned base (PD index 3)
    mem = tables(va, leaf=2)
    r = ok(walk(mem, CR3, va, ACC_READ, False, BASE_CTL))
    assert r & ~0xFFF == FRAME_2M + (off & ~0xFFF)
    assert r & WALK_LARGE == WALK_2M


@pytest.mark.parametrize("off", [0, 0x1000, 0x20_1234, 0x1234_5678, 0x3FFF_F000, 0x3FFF_FFFF])
def test_1g_leaf_gpa_for_offsets_inside(off):
    va = 0xFFFF_9234_0000_0000 + off   # 1 GiB aligned base (PDPT index 0xd0)
    mem = tables(va, leaf=3)
    r = ok(walk(mem, CR3, va, ACC_READ, False, BASE_CTL))
    assert r & ~0xFFF == FRAME_1G + (off & ~0xFFF)
    assert r & WALK_LARGE == WALK_1G


def test_pat_bit_12_of_a_2m_leaf_is_not_reserved_nor_address():
    mem = tables(leaf=2, l2=P | RW | 0x1000)
    r = ok(walk(mem, CR3, VA, ACC_READ, False, BASE_CTL))
    assert r & ~0xFFF == FRAME_2M + (VA & 0x1F_F000)


# ------------------------------------------------------------------ reserved bits

LEVEL_KW = {4: "l4", 3: "l3", 2: "l2", 1: "l1"}
FULL = P | RW | US


@pytest.mark.parametrize("level", [4, 3, 2, 1])
@pytest.mark.parametrize("bit", [51, 40, 45])
def test_address_bits_above_maxphyaddr_are_reserved_at_every_level(level, bit):
    mem = tables(**{LEVEL_KW[level]: FULL | (1 << bit)})
    assert err(walk(mem, CR3, VA, ACC_READ, False, BASE_CTL)) == PFEC_P | PFEC_RSVD


def test_bit_39_is_a_legal_address_bit():
    # MAXPHYADDR = 40: bit 39 is the top physical-address bit, not reserved.
    mem = tables(l1=FULL | (1 << 39))
    assert ok(walk(mem, CR3, VA, ACC_READ, False, BASE_CTL)) & ~0xFFF == FRAME | (1 << 39)


def test_ps_in_pml4e_is_reserved():
    mem = tables(l4=FULL | PS)
    assert err(walk(mem, CR3, VA, ACC_WRITE, True, BASE_CTL)) == PFEC_P | PFEC_RSVD | PFEC_W | PFEC_U


@pytest.mark.parametrize("bit", range(13, 21))
def test_low_address_bits_of_a_2m_leaf_are_reserved(bit):
    mem = tables(leaf=2, l2=FULL | (1 << bit))
    assert err(walk(mem, CR3, VA, ACC_READ, False, BASE_CTL)) == PFEC_P | PFEC_RSVD


@pytest.mark.parametrize("bit", range(13, 30))
def test_low_address_bits_of_a_1g_leaf_are_reserved(bit):
    mem = tables(leaf=3, l3=FULL | (1 << bit))
    assert err(walk(mem, CR3, VA, ACC_READ, False, BASE_CTL)) == PFEC_P | PFEC_RSVD


@pytest.mark.parametrize("level", [4, 3, 2, 1])
def test_nx_is_reserved_when_nxe_is_clear(level):
    mem = tables(**{LEVEL_KW[level]: FULL | NX})
    ctl = CTL_PG | CTL_WP
    assert err(walk(mem, CR3, VA, ACC_READ, False, ctl)) == PFEC_P | PFEC_RSVD
    # ... and the fetch bit is not reported without NXE or SMEP
    assert err(walk(mem, CR3, VA, ACC_FETCH, True, ctl)) == PFEC_P | PFEC_RSVD | PFEC_U
    # with EFER.NXE it is a permission bit
    assert walk(mem, CR3, VA, ACC_READ, False, ctl | CTL_NXE) >= 0


@pytest.mark.parametrize("level", [4, 3, 2, 1])
def test_reserved_entry_is_not_marked_accessed_but_levels_above_are(level):
    mem = tables(**{LEVEL_KW[level]: FULL | (1 << 51)})
    err(walk(mem, CR3, VA, ACC_READ, False, BASE_CTL))
    assert not mem.e[slot(level)] & A
    for upper in range(4, level, -1):
        assert mem.e[slot(upper)] & A


@pytest.mark.parametrize("level", [4, 3, 2, 1])
def test_not_present_at_every_level(level):
    mem = tables(**{LEVEL_KW[level]: RW | US | (1 << 51)})   # P = 0: other bits don't matter
    assert err(walk(mem, CR3, VA, ACC_WRITE, True, BASE_CTL)) == PFEC_W | PFEC_U
    assert err(walk(mem, CR3, VA, ACC_FETCH, False, BASE_CTL)) == PFEC_I
    assert mem.e[slot(level)] == RW | US | (1 << 51) | {4: PDPT, 3: PD, 2: PT, 1: FRAME}[level]


# ------------------------------------------------------------------ accessed / dirty

@pytest.mark.parametrize("leaf", [1, 2, 3])
@pytest.mark.parametrize("why", ["not-present", "protection"])
def test_non_leaf_levels_get_a_even_when_the_leaf_faults(leaf, why):
    kw = {LEVEL_KW[leaf]: (RW if why == "not-present" else P | US)}
    mem = tables(leaf=leaf, **kw)
    err(walk(mem, CR3, VA, ACC_WRITE, True, BASE_CTL))   # read-only or absent leaf
    for level in range(4, leaf, -1):
        assert mem.e[slot(level)] & AD == A, level
    if leaf == 3 and why == "protection":
        # A 1 GiB leaf is marked accessed before it is checked, as QEMU does.
        assert mem.e[slot(leaf)] & AD == A
    else:
        assert not mem.e[slot(leaf)] & AD


@pytest.mark.parametrize("leaf", [1, 2, 3])
def test_d_only_on_writes(leaf):
    mem = tables(leaf=leaf)
    ok(walk(mem, CR3, VA, ACC_READ, False, BASE_CTL))
    assert mem.e[slot(leaf)] & AD == A
    ok(walk(mem, CR3, VA, ACC_FETCH, False, BASE_CTL))
    assert mem.e[slot(leaf)] & AD == A
    ok(walk(mem, CR3, VA, ACC_WRITE, False, BASE_CTL))
    assert mem.e[slot(leaf)] & AD == AD
    for level in range(4, leaf, -1):   # never D on a non-leaf entry
        assert mem.e[slot(level)] & AD == A


def test_write_on_a_leaf_with_d_but_not_a_sets_a():
    mem = tables(l1=FULL | D)
    ok(walk(mem, CR3, VA, ACC_WRITE, False, BASE_CTL))
    assert mem.e[slot(1)] & AD == AD


def test_d_in_a_non_leaf_pde_is_ignored():
    mem = tables(l2=FULL | D)
    r = ok(walk(mem, CR3, VA, ACC_WRITE, True, BASE_CTL))
    assert r & ~0xFFF == FRAME and mem.e[slot(2)] & AD == AD


def test_no_a_d_on_a_faulting_leaf():
    mem = tables(l1=P | US)  # read-only
    err(walk(mem, CR3, VA, ACC_WRITE, True, BASE_CTL))
    assert mem.e[slot(1)] == FRAME | P | US


def test_write_is_withheld_on_a_clean_leaf_for_a_read():
    mem = tables()
    r = ok(walk(mem, CR3, VA, ACC_READ, False, BASE_CTL))
    assert r & 7 == PERM_R | PERM_X
    r = ok(walk(mem, CR3, VA, ACC_WRITE, False, BASE_CTL))
    assert r & 7 == PERM_RWX
    r = ok(walk(mem, CR3, VA, ACC_READ, False, BASE_CTL))   # now dirty: W may be cached
    assert r & 7 == PERM_RWX


def test_already_set_bits_are_not_rewritten():
    mem = tables(l4=FULL | A, l3=FULL | A, l2=FULL | A, l1=FULL | AD)
    ok(walk(mem, CR3, VA, ACC_WRITE, True, BASE_CTL))
    assert mem.writes == []


# ------------------------------------------------------------------ rights

@pytest.mark.parametrize("level", [4, 3, 2, 1])
def test_rw_and_us_combine_over_every_level(level):
    ro = tables(**{LEVEL_KW[level]: P | US})
    assert err(walk(ro, CR3, VA, ACC_WRITE, True, BASE_CTL)) == PFEC_P | PFEC_W | PFEC_U
    assert ok(walk(ro, CR3, VA, ACC_READ, True, BASE_CTL)) & PERM_W == 0
    sup = tables(**{LEVEL_KW[level]: P | RW})
    assert err(walk(sup, CR3, VA, ACC_READ, True, BASE_CTL)) == PFEC_P | PFEC_U
    assert ok(walk(sup, CR3, VA, ACC_READ, False, BASE_CTL)) >= 0


@pytest.mark.parametrize("level", [4, 3, 2, 1])
def test_nx_at_any_level_forbids_fetch(level):
    mem = tables(**{LEVEL_KW[level]: FULL | NX})
    assert err(walk(mem, CR3, VA, ACC_FETCH, True, BASE_CTL)) == PFEC_P | PFEC_I | PFEC_U
    assert ok(walk(mem, CR3, VA, ACC_READ, True, BASE_CTL)) & PERM_X == 0


def test_cr0_wp_governs_supervisor_writes_only():
    mem = tables(l1=P | US | AD)
    assert err(walk(mem, CR3, VA, ACC_WRITE, False, BASE_CTL)) == PFEC_P | PFEC_W
    assert ok(walk(mem, CR3, VA, ACC_WRITE, False, BASE_CTL & ~CTL_WP)) & PERM_W
    assert err(walk(mem, CR3, VA, ACC_WRITE, True, BASE_CTL & ~CTL_WP)) == PFEC_P | PFEC_W | PFEC_U


def test_fetch_bit_in_error_code_needs_nxe_or_smep():
    mem = tables(l1=US)   # PTE not present
    assert err(walk(mem, CR3, VA, ACC_FETCH, False, CTL_PG)) == 0
    assert err(walk(mem, CR3, VA, ACC_FETCH, False, CTL_PG | CTL_NXE)) == PFEC_I
    assert err(walk(mem, CR3, VA, ACC_FETCH, False, CTL_PG | CTL_SMEP)) == PFEC_I


def test_smep_forbids_supervisor_fetch_from_user_pages():
    user_page = tables()
    assert err(walk(user_page, CR3, VA, ACC_FETCH, False, BASE_CTL | CTL_SMEP)) == PFEC_P | PFEC_I
    r = ok(walk(user_page, CR3, VA, ACC_READ, False, BASE_CTL | CTL_SMEP))
    assert r & PERM_X == 0 and r & PERM_R
    # user fetches are not affected; nor supervisor pages
    assert ok(walk(user_page, CR3, VA, ACC_FETCH, True, BASE_CTL | CTL_SMEP)) & PERM_X
    sup_page = tables(l1=P | RW)
    assert ok(walk(sup_page, CR3, VA, ACC_FETCH, False, BASE_CTL | CTL_SMEP)) & PERM_X
    # SMEP without NXE still reports I (and still works)
    assert err(walk(user_page, CR3, VA, ACC_FETCH, False, CTL_PG | CTL_SMEP)) == PFEC_P | PFEC_I


def test_smap_forbids_supervisor_data_access_to_user_pages():
    user_page = tables()
    ctl = BASE_CTL | CTL_SMAP
    assert err(walk(user_page, CR3, VA, ACC_READ, False, ctl)) == PFEC_P
    assert err(walk(user_page, CR3, VA, ACC_WRITE, False, ctl)) == PFEC_P | PFEC_W
    assert err(walk(user_page, CR3, VA, ACC_WRITE, False, ctl & ~CTL_WP)) == PFEC_P | PFEC_W
    assert ok(walk(user_page, CR3, VA, ACC_FETCH, False, ctl)) & PERM_X   # SMAP is data only
    assert ok(walk(user_page, CR3, VA, ACC_READ, True, ctl)) >= 0          # CTL_SMAP is supervisor-only
    sup_page = tables(l2=P | RW)
    assert ok(walk(sup_page, CR3, VA, ACC_WRITE, False, ctl)) >= 0


def test_paging_ctl_packs_smap_with_ac_and_implicit_accesses():
    cr0, cr4, efer = CR0_PG | CR0_WP, CR4_SMAP | CR4_SMEP, EFER_NXE
    base = CTL_PG | CTL_WP | CTL_NXE | CTL_SMEP
    assert paging_ctl(cr0, cr4, efer, 0, user=False) == base | CTL_SMAP
    assert paging_ctl(cr0, cr4, efer, RFLAGS_AC, user=False) == base
    assert paging_ctl(cr0, cr4, efer, RFLAGS_AC, user=False, implicit=True) == base | CTL_SMAP
    assert paging_ctl(cr0, cr4, efer, 0, user=True) == base
    assert paging_ctl(0, cr4, efer, 0, user=False) & CTL_PG == 0


def test_smap_with_ac_allows_the_access():
    mem = tables()
    ctl = paging_ctl(CR0_PG | CR0_WP, CR4_SMAP, EFER_NXE, RFLAGS_AC, user=False)
    assert ok(walk(mem, CR3, VA, ACC_WRITE, False, ctl)) & PERM_W


# ------------------------------------------------------------------ properties

ENTRY_BITS = st.integers(0, 0x1FF)   # P RW US PWT PCD A D PS G
LEVEL_TABLES = {4: CR3, 3: PDPT, 2: PD, 1: PT}
NEXT = {4: PDPT, 3: PD, 2: PT, 1: FRAME}
LEAF_FRAME = {3: FRAME_1G, 2: FRAME_2M, 1: FRAME}


@st.composite
def entry(draw, level: int) -> int:
    low = draw(ENTRY_BITS)
    if draw(st.integers(0, 9)) < 8:
        low |= P   # mostly present so walks get deep
    if level == 4 and draw(st.integers(0, 9)) < 9:
        low &= ~PS  # PS is reserved in a PML4E: only sometimes
    ps = low & PS and level in (2, 3)
    addr = LEAF_FRAME[level] if ps else NEXT[level]
    value = addr | low
    if draw(st.integers(0, 3)) == 0:
        value |= NX
    extra = draw(st.sampled_from([0] * 40 + [1 << 51, 1 << 40, 1 << 13, 1 << 20, 1 << 29, 1 << 12,
                                             1 << 52, 1 << 62]))
    return value | extra


@st.composite
def scenario(draw):
    va = draw(st.integers(0, (1 << 48) - 1).map(lambda v: v - (1 << 48) if v >> 47 else v))
    va &= (1 << 64) - 1
    e: dict[int, int] = {}
    for level in (4, 3, 2, 1):
        e[LEVEL_TABLES[level] + 8 * idx(va, level)] = draw(entry(level))
    # a few unrelated entries in the same tables
    for _ in range(draw(st.integers(0, 4))):
        level = draw(st.sampled_from([4, 3, 2, 1]))
        e.setdefault(LEVEL_TABLES[level] + 8 * draw(st.integers(0, 511)), draw(entry(level)))
    acc = draw(st.sampled_from([ACC_READ, ACC_WRITE, ACC_FETCH]))
    user = draw(st.booleans())
    ctl = CTL_PG | draw(st.integers(0, 0x1F)) & (CTL_WP | CTL_NXE | CTL_SMEP | CTL_SMAP)
    if user:
        ctl &= ~CTL_SMAP
    return e, va, acc, user, ctl


PROPS = settings(max_examples=400, deadline=None)


@PROPS
@given(scenario())
def test_property_success_grants_the_requested_access(s):
    e, va, acc, user, ctl = s
    r = walk(Memory(e), CR3, va, acc, user, ctl)
    if r >= 0:
        assert r & (1 << acc)
        assert r & 0xFE0 == 0        # page-aligned GPA | rights | WALK_2M/1G
    else:
        fault = ~r
        assert fault & ~(PFEC_P | PFEC_W | PFEC_U | PFEC_RSVD | PFEC_I) == 0
        assert bool(fault & PFEC_W) == (acc == ACC_WRITE)
        assert bool(fault & PFEC_U) == user
        if fault & PFEC_RSVD:
            assert fault & PFEC_P


@PROPS
@given(scenario())
def test_property_walking_twice_is_stable_and_second_walk_writes_nothing(s):
    e, va, acc, user, ctl = s
    mem = Memory(e)
    first = walk(mem, CR3, va, acc, user, ctl)
    mem.writes.clear()
    second = walk(mem, CR3, va, acc, user, ctl)
    assert mem.writes == []
    assert second == first   # same GPA and rights, or the same fault


@PROPS
@given(scenario())
def test_property_walk_only_sets_a_and_d_bits(s):
    e, va, acc, user, ctl = s
    mem = Memory(e)
    trace: list = []
    r = walk(mem, CR3, va, acc, user, ctl, trace)
    read_at = {gpa for _, gpa, _ in trace}
    leaf_gpa = trace[-1][1]
    for gpa, after in mem.e.items():
        before = e.get(gpa, 0)
        changed = before ^ after
        assert changed & ~AD == 0, f"{gpa:#x}: {before:#x} -> {after:#x}"
        assert after & before == before   # bits are only set, never cleared
        if changed:
            assert gpa in read_at
            if changed & D:
                assert gpa == leaf_gpa and acc == ACC_WRITE and r >= 0
    if r < 0:   # a faulting walk never touches its last entry (a PDPTE gets A, as QEMU)
        last_level = trace[-1][0]
        before, after = e.get(leaf_gpa, 0), mem.e.get(leaf_gpa, 0)
        assert after == before or (last_level == 3 and after == before | A)
