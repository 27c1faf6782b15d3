"""Generation: random programs drawn from a seed (the same seed and index, the same program).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ...mmu.walk import PTE_A, PTE_D, PTE_NX, PTE_P, PTE_PCD, PTE_PS, PTE_PWT, PTE_RW, PTE_US
from .program import (FRAMES_2M, MAX_SPACES, PD_IDX, PDPT_IDX, PT_IDX, RET_ZONE, RSVD_HIGH, RSVD_LOW, SIZE,
                      SLOTS, Access, Map, Program, Protect, SetCtl, sext, Share, SwitchCR3, Unmap)
from .tables import TableModel


# ------------------------------------------------------------------------------------
# generation


def _rand_flags(rng: random.Random, leaf: bool, level: int) -> int:
    f = 0
    if rng.random() < 0.75:
        f |= PTE_RW
    if rng.random() < 0.7:
        f |= PTE_US
    if rng.random() < 0.5:
        f |= PTE_A
    if leaf and rng.random() < 0.3:
        f |= PTE_D
    if rng.random() < 0.2:
        f |= PTE_NX
    if rng.random() < 0.08:
        f |= rng.choice((PTE_PWT, PTE_PCD, PTE_PWT | PTE_PCD))
    if rng.random() < 0.08:
        f |= rng.choice((1 << 9, 1 << 11, 1 << 52, 1 << 58))
    if rng.random() < 0.04:
        f |= RSVD_LOW if leaf and level > 1 and rng.random() < 0.5 else rng.choice(RSVD_HIGH)
    return f


def _table_flags(rng: random.Random) -> int:
    f = 0
    if rng.random() < 0.9:
        f |= PTE_RW
    if rng.random() < 0.85:
        f |= PTE_US
    if rng.random() < 0.5:
        f |= PTE_A
    if rng.random() < 0.06:
        f |= PTE_NX
    return f


def _grid_va(rng: random.Random, level: int) -> int:
    va = rng.choice(SLOTS) << 39 | rng.choice(PDPT_IDX) << 30
    if level <= 2:
        va |= rng.choice(PD_IDX) << 21
    if level == 1:
        va |= rng.choice(PT_IDX) << 12
    return sext(va)


def _flush(rng: random.Random) -> str:
    r = rng.random()
    return "invlpg" if r < 0.7 else "cr3" if r < 0.85 else "none"


def generate(rng: random.Random, size: int, name: str = "<fuzz>") -> Program:
    """A random program of ``size`` operations (deterministic for the state of ``rng``)."""
    nspaces = rng.randint(2, MAX_SPACES)
    pool: list[int] = []
    for frame in FRAMES_2M:
        for _ in range(rng.randint(2, 5)):
            pool.append(frame + (rng.choice((0, 1, 2, 3, 0x1ff)) if rng.random() < 0.6
                                 else rng.randrange(512)) * 0x1000)
    pool = sorted(set(pool))
    pages = list(pool)
    for _ in range(2):      # data pages nobody pre-fills (first touch through the fuzzed maps)
        pages.append(rng.choice(FRAMES_2M) + rng.randrange(512) * 0x1000)
    filled = tuple(p for p in pool if rng.random() < 0.85)
    ctl = SetCtl(wp=rng.random() < 0.7, nxe=rng.random() < 0.8, smep=rng.random() < 0.3,
                 smap=rng.random() < 0.3)
    base = Program(ops=(), ctl=ctl, pool=filled, name=name)
    model = TableModel(base)
    ops: list = []
    while len(ops) < size:
        op = _gen_op(rng, model, nspaces, pages)
        if op is None:
            continue
        if model.apply(op, len(ops)) is None:
            continue
        ops.append(op)
    return base.with_ops(ops)


def _gen_op(rng: random.Random, m: TableModel, nspaces: int, pages: list[int]):
    r = rng.random()
    leaves = m.leaves(m.cur)
    if r < 0.24 or not leaves and r < 0.5:
        space = m.cur if rng.random() < 0.65 else rng.randrange(nspaces)
        level = rng.choices((1, 2, 3), (0.6, 0.27, 0.13))[0]
        if level == 1:
            pa = rng.choice(pages)
        elif level == 2:
            pa = rng.choice(FRAMES_2M)
        else:
            pa = 0
        if rng.random() < 0.3:   # an alias of something mapped already
            others = [lf for lf in leaves if lf[1] == level]
            if others:
                pa = rng.choice(others)[2]
        return Map(space, _grid_va(rng, level), level, pa, _rand_flags(rng, True, level),
                   _table_flags(rng), _flush(rng))
    if r < 0.68:
        return _gen_access(rng, m, leaves, pages)
    if r < 0.75:
        space = m.cur if rng.random() < 0.7 else rng.randrange(nspaces)
        lv = m.leaves(space)
        if not lv:
            return None
        va, level, _ = rng.choice(lv)
        if rng.random() < 0.3:
            level = rng.randint(level, 4)
        return Unmap(space, va, level, _flush(rng))
    if r < 0.86:
        space = m.cur if rng.random() < 0.75 else rng.randrange(nspaces)
        lv = m.leaves(space)
        if not lv:
            return None
        va, level, _ = rng.choice(lv)
        if rng.random() < 0.35:
            level = rng.randint(level, 4)
            flags = _table_flags(rng) if rng.random() < 0.7 else _rand_flags(rng, False, level)
            if level == 4 and rng.random() < 0.1:
                flags |= PTE_PS     # reserved in a PML4E; render clears PS below PML4
            return Protect(space, va, level, flags if level == 4 else flags & ~PTE_PS, _flush(rng))
        return Protect(space, va, level, _rand_flags(rng, True, level), _flush(rng))
    if r < 0.92:
        space = rng.randrange(nspaces)
        if space == m.cur:
            space = rng.randrange(nspaces)
        return SwitchCR3(space)
    if r < 0.96:
        return SetCtl(wp=rng.random() < 0.7, nxe=rng.random() < 0.8, smep=rng.random() < 0.3,
                      smap=rng.random() < 0.3)
    src = rng.randrange(nspaces)
    slots = [i for i, e in m.roots[src].ent.items() if e.child is not None]
    if not slots or nspaces < 2:
        return None
    dst = rng.choice([s for s in range(nspaces) if s != src])
    return Share(dst, src, rng.choice(slots), _flush(rng))


def _gen_access(rng: random.Random, m: TableModel, leaves, pages):
    kind = rng.choices(("read", "write", "fetch"), (0.45, 0.35, 0.2))[0]
    cpl = 3 if rng.random() < 0.35 else 0
    ac = cpl == 0 and m.ctl.smap and rng.random() < 0.4
    if kind == "fetch":
        off = RET_ZONE + rng.randrange(0x1000 - RET_ZONE)
    elif kind == "write":
        off = rng.randrange(RET_ZONE // 8) * 8
    else:
        off = rng.randrange(0x1000 // 8) * 8
    r = rng.random()
    if leaves and r < 0.85:
        va, level, pa = rng.choice(leaves)
        if level == 1:
            target = va
        else:
            size = SIZE[level]
            inside = [p for p in pages if pa <= p < pa + size]
            page = rng.choice(inside) if inside and rng.random() < 0.8 else \
                (pa + rng.randrange(size >> 12) * 0x1000 if level == 2 else rng.choice(pages))
            target = va + (page - pa)
        va = target + off
    elif r < 0.97 or kind == "fetch":
        va = _grid_va(rng, 1) + off
    else:
        va = rng.choice((0x0000_8000_0000_0000, 0xFFFF_7FFF_FFFF_F000, 0x1234_0000_0000_0000)) + off
    value = rng.getrandbits(64)
    return Access(va, kind, cpl, value, ac)


def program_for_seed(seed: int, index: int, size: int | None = None) -> Program:
    """Program ``index`` of the run with ``seed``: the same on every machine and every run."""
    rng = random.Random(f"hvmodel-fuzz:{seed}:{index}")
    n = size if size is not None else rng.randint(20, 60)
    return generate(rng, n, name=f"fuzz-{seed}-{index}")
