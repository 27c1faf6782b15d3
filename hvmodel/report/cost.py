"""A cost model: turn a run's counters into modeled CPU cycles, per MMU mode.

Wall-clock time in this model says little about real hardware: a Python fill hook
costs the same whatever it models. What does carry over is *what happened* — how
many TLB misses, how many memory references their walks made, how many VM exits
of which kind. This module prices each event with a documented default and adds
them up, so ``hvmodel compare`` can say which MMU a workload favours and why.

Default costs (cycles; override any of them with ``CostModel(**{name: value})``):

==================  ======  ===============================================================
event               cycles  basis
==================  ======  ===============================================================
instruction              1  the baseline both modes share (CPI 1)
walk_ref                20  one page-walk memory reference; most hit L1/L2 (Intel optimization
                            manual: L2 hit ~12-14 cycles, L3 ~40+), so 20 is a middle value
vmexit                1200  VM exit + VM entry round trip with a minimal handler; kvm-unit-tests'
                            vmexit "cpuid" test reports on the order of 1,000-1,500 cycles on
                            recent Intel cores (hardware transition alone ~500)
ept_violation         1000  handler beyond the exit: p2m lookup, install the EPT leaf
page_alloc            1000  both modes: allocate and zero a 4 KiB frame on a guest page's first
                            touch (clearing 4 KiB at ~4-8 bytes/cycle, plus bookkeeping)
hidden_fault          2500  handler beyond the exit: software walk of the guest tables through
                            the p2m, A/D updates, shadow entries installed (Adams & Agesen,
                            ASPLOS 2006, put shadow "hidden" faults in the thousands of cycles)
tracing_fault         3000  handler beyond the exit: decode and emulate the guest's page-table
                            write, update/zap the shadow entries it affects
guest_fault_reflect   1000  shadow only: a guest #PF first exits to the VMM (which walks to
                            prove it is real), then is injected; nested delivers it in hardware
root_switch            300  shadow only, beyond the exit: a guest CR3 load traps; KVM finds the
                            root among the current and KVM_MMU_NUM_PREV_ROOTS (3) previous ones
root_reload           5000  shadow only, beyond the exit: a CR3 load to any other root unloads
                            and reloads the MMU (KVM: free roots, allocate/find the new root in
                            the hash, sync its out-of-sync children, request a TLB flush)
invlpg                 500  shadow only, beyond the exit: a guest INVLPG traps (INVLPG exiting
                            is on without EPT); the VMM syncs or zaps the shadow entry
shadow_page_create    1500  allocate and zero a frame for a shadow page, hash it
resync                2000  diff an out-of-sync table against its snapshot (512 entries)
zap                     50  clear one shadow entry and its reverse-map link
==================  ======  ===============================================================

The model charges nested mode its 2D walks (``walk_refs`` × walk_ref — up to 24
references per TLB miss, fewer when the nested TLB hits) and EPT violations (exits); shadow mode pays 4
references per TLB miss when the shadow has the answer (the hardware walks
shadow tables like native ones), and an exit for every hidden fault, tracing
fault, guest page fault and CR3 switch. Those are the trade-offs the literature
reports (VMware's EPT/RVI white papers; Bhargava et al., ASPLOS 2008).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

SHADOW_WALK_REFS = 4  # the hardware walks 4-level shadow tables like native ones


@dataclass(frozen=True)
class CostModel:
    """Cycles per event (see the module docstring for the basis of each default)."""

    instruction: int = 1
    walk_ref: int = 20
    vmexit: int = 1200
    ept_violation: int = 1000
    page_alloc: int = 1000
    hidden_fault: int = 2500
    tracing_fault: int = 3000
    guest_fault_reflect: int = 1000
    root_switch: int = 300
    root_reload: int = 5000
    invlpg: int = 500
    shadow_page_create: int = 1500
    resync: int = 2000
    zap: int = 50

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class Breakdown:
    """Modeled cycles of one run, by item."""

    mode: str
    items: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.items.values())

    @property
    def overhead(self) -> int:
        """Everything but the instructions themselves."""
        return self.total - self.items.get("instructions", 0)


def modeled_cycles(mode: str, counters: dict, model: CostModel = CostModel()) -> Breakdown:
    """Price a run's counters under ``model``."""
    m = model
    c = lambda k: int(counters.get(k, 0))  # noqa: E731 - a short local accessor
    items = {"instructions": c("instructions") * m.instruction,
             "first touches": c("frames_allocated") * m.page_alloc}
    if mode == "nested":
        items["2D page walks"] = c("walk_refs") * m.walk_ref
        items["EPT violations"] = c("ept_violations") * (m.vmexit + m.ept_violation)
    elif mode == "shadow":
        items["shadow walks"] = c("tlb_fills") * SHADOW_WALK_REFS * m.walk_ref
        items["hidden faults"] = c("hidden_faults") * (m.vmexit + m.hidden_fault)
        items["tracing faults"] = c("tracing_faults") * (m.vmexit + m.tracing_fault)
        items["guest #PF reflected"] = c("guest_page_faults") * (m.vmexit + m.guest_fault_reflect)
        reloads = c("root_reloads")
        items["CR3 switches"] = (c("root_switches") - reloads) * (m.vmexit + m.root_switch)
        items["CR3 reloads"] = reloads * (m.vmexit + m.root_reload)
        items["INVLPG exits"] = c("invlpg_exits") * (m.vmexit + m.invlpg)
        items["shadow pages built"] = c("shadow_pages_created") * m.shadow_page_create
        items["resyncs"] = c("resyncs") * m.resync
        items["zaps"] = c("zaps") * m.zap
    elif mode == "native":
        items["page walks"] = c("tlb_fills") * 4 * m.walk_ref
    return Breakdown(mode, items)


def explain(a: Breakdown, b: Breakdown) -> str:
    """Which mode the model favours, by how much, and the items that decide it."""
    cheap, dear = (a, b) if a.total <= b.total else (b, a)
    ratio = dear.total / max(1, cheap.total)
    lines = [f"the model favours {cheap.mode}: {cheap.total:,} vs {dear.total:,} modeled cycles "
             f"({ratio:.2f}x)"]
    shared = ("instructions", "first touches")  # the same in every mode
    top = sorted(((v, k) for k, v in dear.items.items() if k not in shared), reverse=True)[:2]
    for v, k in top:
        if v:
            lines.append(f"  {dear.mode} pays {v:,} cycles for {k}")
    top = sorted(((v, k) for k, v in cheap.items.items() if k not in shared), reverse=True)[:1]
    for v, k in top:
        if v:
            lines.append(f"  {cheap.mode}'s largest cost is {k}: {v:,} cycles")
    return "\n".join(lines)
