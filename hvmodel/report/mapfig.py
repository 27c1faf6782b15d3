"""The mapping figure (ESXi memory mapping), drawn from live state: ``hvmodel map … --svg``.

Three columns, as in VMware's resource-management guide: guest virtual pages,
guest physical pages, machine pages. The arrows between the first two are the
guest's own page tables; between the last two, the VMM's p2m. A machine frame
that several guest pages map (page sharing, within or across VMs) is drawn once
with all its arrows; pages that left RAM go to the lanes below the machine
column — the compression cache, the swap file — and a ballooned page has no
frame at all.

Which pages: for each VM, a few guest-physical pages of each kind found in its
p2m (shared across VMs, shared with the zero frame, compressed, swapped,
ballooned, private), each with a guest-virtual address that maps it in the
guest's current page tables (found by enumerating them) when there is one.
"""

from __future__ import annotations

from html import escape

from ..machine.pool import PAGE_SHIFT, ZERO_FRAME
from ..mmu.p2m import P2MState
from ..mmu.walk import ADDR_MASK, PTE_P, PTE_PS

KINDS = ("shared", "zero", "compressed", "swapped", "ballooned", "private")
COLORS = {"shared": "#72b7b2", "zero": "#bab0ac", "compressed": "#e45756", "swapped": "#54a24b",
          "ballooned": "#f58518", "private": "#4c78a8"}


def guest_mappings(vm, limit: int = 1 << 16) -> dict[int, int]:
    """gfn → one guest-virtual address mapping it, from the vCPU's current CR3 (no side effects)."""
    from unicorn import x86_const as X

    from ..vm.vcpu import PeekMemory
    v = vm.vcpu
    if not v.reg(X.UC_X86_REG_CR0) & (1 << 31):
        return {}
    rd = PeekMemory(v).read_pte

    out: dict[int, int] = {}
    stack = [((v.reg(X.UC_X86_REG_CR3) & ADDR_MASK), 4, 0)]
    while stack and len(out) < limit:
        table, level, base = stack.pop()
        for i in range(512):
            e = rd(table + 8 * i)
            if not e & PTE_P:
                continue
            va = base | (i << (12 + 9 * (level - 1)))
            if level == 4 and i >= 256:
                va |= 0xFFFF << 48
            if level == 1 or (level < 4 and e & PTE_PS):
                first = (e & ADDR_MASK) >> PAGE_SHIFT
                first &= ~((1 << (9 * (level - 1))) - 1)
                for k in range(1 << (9 * (level - 1))):
                    out.setdefault(first + k, va + (k << PAGE_SHIFT))
            else:
                stack.append((e & ADDR_MASK, level - 1, va))
    return out


def pick_pages(vms: list, per_kind: int = 1) -> dict[str, list[tuple[int, str]]]:
    """Per VM name: [(gfn, kind)], a few of each kind present."""
    frame_users: dict[int, set] = {}
    for vm in vms:
        st, val = vm.p2m.state, vm.p2m.value
        for g in range(vm.p2m.npages):
            if st[g] == P2MState.SHARED and val[g] != ZERO_FRAME:
                frame_users.setdefault(int(val[g]), set()).add(vm.id)
    out: dict[str, list[tuple[int, str]]] = {}
    for vm in vms:
        st, val = vm.p2m.state, vm.p2m.value
        found: dict[str, list[int]] = {k: [] for k in KINDS}
        # Shared frames used by more than one VM come first, so arrows cross VMs.
        for g in range(vm.p2m.npages):
            s = st[g]
            if s == P2MState.SHARED:
                kind = "zero" if val[g] == ZERO_FRAME else "shared"
                if kind == "shared" and len(frame_users.get(int(val[g]), ())) < 2 and found["shared"]:
                    continue
            elif s == P2MState.COMPRESSED:
                kind = "compressed"
            elif s == P2MState.SWAPPED:
                kind = "swapped"
            elif s == P2MState.BALLOONED:
                kind = "ballooned"
            elif s == P2MState.PRIVATE:
                kind = "private"
            else:
                continue
            if len(found[kind]) < per_kind:
                found[kind].append(g)
        out[vm.config.name] = [(g, k) for k in KINDS for g in found[k]]
    return out


def svg(vms: list, per_kind: int = 1) -> str:
    """The figure as an SVG document."""
    picks = pick_pages(vms, per_kind)
    rows = [(vm, g, k) for vm in vms for g, k in picks[vm.config.name]]
    maps = {vm.id: guest_mappings(vm) for vm in vms}
    row_h, top = 34, 70
    x_va, x_gpa, x_m = 40, 330, 620
    box_w, box_h = 220, 24
    height = top + row_h * (len(rows) + 1) + 160
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="900" height="{height}" font-family="sans-serif" '
             'font-size="12">',
             '<defs><marker id="a" markerWidth="8" markerHeight="8" refX="8" refY="4" orient="auto">'
             '<path d="M0,0 L8,4 L0,8 z" fill="#333"/></marker></defs>',
             '<text x="40" y="24" font-size="16">hvmodel: guest virtual → guest physical → machine</text>']
    for x, label in ((x_va, "guest virtual (guest page tables)"), (x_gpa, "guest physical (VMM p2m)"),
                     (x_m, "machine")):
        parts.append(f'<text x="{x}" y="52" font-weight="bold">{label}</text>')
    machine_y: dict[object, float] = {}
    m_rows: list[tuple[object, str, str]] = []
    for vm, g, k in rows:
        p2m = vm.p2m
        if k in ("shared", "zero", "private"):
            key = ("frame", int(p2m.value[g]))
            text = "zero frame" if k == "zero" else f"frame {int(p2m.value[g]):#x}"
        elif k == "swapped":
            key = ("swap", vm.id, g)
            text = f"{vm.config.name}.vswp slot {int(p2m.value[g])}"
        elif k == "compressed":
            key = ("zip", vm.id, g)
            text = f"{vm.config.name} compression cache"
        else:
            key = ("balloon", vm.id, g)
            text = "ballooned: no frame"
        if key not in machine_y:
            machine_y[key] = top + row_h * len(m_rows)
            m_rows.append((key, text, k))
    for i, (vm, g, k) in enumerate(rows):
        y = top + row_h * i
        va = maps[vm.id].get(g)
        va_text = f"{vm.config.name} VA {va:#x}" if va is not None else f"{vm.config.name}: not mapped now"
        parts.append(f'<rect x="{x_va}" y="{y}" width="{box_w}" height="{box_h}" fill="#eef" stroke="#557"/>'
                     f'<text x="{x_va + 6}" y="{y + 16}">{escape(va_text)}</text>')
        parts.append(f'<rect x="{x_gpa}" y="{y}" width="{box_w}" height="{box_h}" fill="{COLORS[k]}" '
                     f'fill-opacity="0.35" stroke="#555"/><text x="{x_gpa + 6}" y="{y + 16}">'
                     f'{escape(vm.config.name)} GPA {g << PAGE_SHIFT:#x} ({k})</text>')
        if va is not None:
            parts.append(f'<line x1="{x_va + box_w}" y1="{y + 12}" x2="{x_gpa}" y2="{y + 12}" stroke="#333" '
                         'marker-end="url(#a)"/>')
        key = next(kk for kk, _, _ in m_rows if _key_for(vm, g, k, kk))
        my = machine_y[key]
        parts.append(f'<line x1="{x_gpa + box_w}" y1="{y + 12}" x2="{x_m}" y2="{my + 12}" stroke="#333" '
                     'marker-end="url(#a)"/>')
    for key, text, k in m_rows:
        y = machine_y[key]
        dash = ' stroke-dasharray="4 3"' if k in ("swapped", "compressed", "ballooned") else ""
        parts.append(f'<rect x="{x_m}" y="{y}" width="{box_w + 30}" height="{box_h}" fill="{COLORS[k]}" '
                     f'fill-opacity="0.6" stroke="#333"{dash}/><text x="{x_m + 6}" y="{y + 16}">{escape(text)}</text>')
    ly = top + row_h * (len(rows) + 1)
    for i, k in enumerate(KINDS):
        parts.append(f'<rect x="{40 + 140 * i}" y="{ly}" width="14" height="14" fill="{COLORS[k]}"/>'
                     f'<text x="{60 + 140 * i}" y="{ly + 12}">{k}</text>')
    parts.append(f'<text x="40" y="{ly + 40}">Arrows: guest VA → GPA through the guest\'s page tables; '
                 'GPA → machine through the VMM\'s p2m. One machine box with several arrows = a shared frame.</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def _key_for(vm, g: int, k: str, key: object) -> bool:
    p2m = vm.p2m
    if k in ("shared", "zero", "private"):
        return key == ("frame", int(p2m.value[g]))
    return key == ({"swapped": "swap", "compressed": "zip", "ballooned": "balloon"}[k], vm.id, g)
