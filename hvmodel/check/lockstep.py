"""Differential validation: every MMU mode in lock-step with the reference MMU.

The same guest image runs under each VMM mode (nested, later shadow) and under the
reference (``native``: Unicorn's own x86 MMU over flat memory, no VMM at all). All
runs are deterministic and keep time in instructions, so they must agree exactly:
the checker advances them slice by slice to the same instruction counts and, at
every VM exit and every ``every`` instructions, compares RIP, the general
registers, RFLAGS, CR0/CR2/CR3/CR4, CS/SS, the sequence of delivered events
(vector, error code, CR2), the console, and whether the guest is still running.
At the end it compares every byte of guest-physical memory, which includes the
A/D bits each MMU wrote into the guest's own page tables.

The first divergence ends the check with a report a person can act on: the
instruction (capstone), both register sets, and the walk of the relevant address
in each mode, level by level (with the machine address of each table under the
nested MMU).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from unicorn import x86_const as X

from ..guest.image import GuestImage
from ..host.host import Host, HostConfig
from ..memory.sharing import SharingConfig
from ..mmu.walk import ADDR_MASK, PTE_PS, paging_ctl, walk
from ..vm.disasm import disassemble_at
from ..vm.vcpu import PeekMemory
from ..vm.vm import DEFAULT_MAX_INSNS, VM, VMConfig

REGS = [("rip", X.UC_X86_REG_RIP), ("rax", X.UC_X86_REG_RAX), ("rbx", X.UC_X86_REG_RBX),
        ("rcx", X.UC_X86_REG_RCX), ("rdx", X.UC_X86_REG_RDX), ("rsi", X.UC_X86_REG_RSI),
        ("rdi", X.UC_X86_REG_RDI), ("rbp", X.UC_X86_REG_RBP), ("rsp", X.UC_X86_REG_RSP),
        ("r8", X.UC_X86_REG_R8), ("r9", X.UC_X86_REG_R9), ("r10", X.UC_X86_REG_R10),
        ("r11", X.UC_X86_REG_R11), ("r12", X.UC_X86_REG_R12), ("r13", X.UC_X86_REG_R13),
        ("r14", X.UC_X86_REG_R14), ("r15", X.UC_X86_REG_R15), ("rflags", X.UC_X86_REG_RFLAGS),
        ("cr0", X.UC_X86_REG_CR0), ("cr2", X.UC_X86_REG_CR2), ("cr3", X.UC_X86_REG_CR3),
        ("cr4", X.UC_X86_REG_CR4), ("cs", X.UC_X86_REG_CS), ("ss", X.UC_X86_REG_SS)]

DEFAULT_EVERY = 100_000


@dataclass
class CheckResult:
    """The outcome of one lock-step check."""

    guest: str
    modes: list[str]
    checkpoints: int = 0
    pages_compared: int = 0
    mismatches: int = 0
    report: str = ""
    instructions: int = 0
    stop_reason: str = ""
    memory: dict = field(default_factory=dict)   # sharing/swapping counters under pressure

    @property
    def ok(self) -> bool:
        return self.mismatches == 0

    def summary(self) -> str:
        return (f"{self.guest}: {', '.join(self.modes)} vs native: {self.checkpoints} checkpoints, "
                f"{self.pages_compared} pages compared, {self.mismatches} mismatches")


@dataclass
class _Run:
    name: str
    vm: VM
    events_seen: int = 0
    diffs: list[str] = field(default_factory=list)


def registers(vm: VM) -> dict[str, int]:
    """The compared register set of a VM's vCPU."""
    return {name: vm.vcpu.reg(rid) for name, rid in REGS}


def check(image: GuestImage, modes: list[str], *, memsize: int = 64 << 20, host_mem: int = 256 << 20,
          every: int = DEFAULT_EVERY, max_insns: int = DEFAULT_MAX_INSNS,
          configure=None, pressure: int = 0) -> CheckResult:
    """Run ``image`` under each mode and the reference in lock-step and compare.

    ``configure(vm)``, if given, is called on every VM before it runs (tests use it to
    arm a deliberately broken MMU and prove the checker can fail).

    ``pressure`` > 0 turns memory management on for the VMM modes, none of which the
    guest may notice: after every step the sharing scanner visits 16 × ``pressure``
    of each VM's pages (all VMs share one salt, so identical pages are shared across
    modes too) and ``pressure`` of its private pages are swapped out.
    """
    result = CheckResult(guest=image.source_name, modes=list(modes))
    ref = VM(VMConfig(name="native", memsize=memsize, mmu="native"), image)
    host = Host(HostConfig(memsize=host_mem * max(1, len(modes)),
                           sharing=SharingConfig(force_salting=1)))
    runs = [_Run("native", ref)] + [
        _Run(m, host.power_on(VMConfig(name=m, memsize=memsize, mmu=m, pshare_salt="check"), image))
        for m in modes]
    for r in runs:
        r.vm.events.keep_log = True
        if configure is not None:
            configure(r.vm)

    while True:
        limit = every - ref.vcpu.insns % every
        ref.step(max_insns, limit)
        target = ref.vcpu.insns
        for r in runs[1:]:
            # A mode may exit more often than the reference (a shadow MMU's traced
            # writes): step it until it reaches the reference's instruction count.
            vm = r.vm
            while vm.running:
                vm.step(max_insns, max(1, target - vm.vcpu.insns))
                if vm.vcpu.insns >= target:
                    break
            if pressure and vm.running:
                host.sharing.scan(vm, 16 * pressure)
                host.swapper.swap_out(vm, pressure)
        result.checkpoints += 1
        report = _compare(runs)
        if report:
            result.mismatches = 1
            result.report = f"divergence at checkpoint {result.checkpoints}:\n{report}"
            break
        if not ref.running:
            break

    result.instructions = ref.vcpu.insns
    result.stop_reason = ref.stop_reason
    if result.ok:
        pages, report = _compare_memory(runs, memsize)
        result.pages_compared = pages
        if report:
            result.mismatches = report.count("\n  page ") or 1
            result.report = report
    result.memory = {r.name: {k: r.vm.memory_counters()[k] for k in ("SHRD", "ZERO", "SWW", "SWR", "COW_breaks")}
                     for r in runs[1:]} if pressure else {}
    host.close()
    return result


def _compare(runs: list[_Run]) -> str:
    ref = runs[0]
    ref_regs = registers(ref.vm)
    ref_events = ref.vm.events.log
    ref_console = ref.vm.uart.output
    for r in runs[1:]:
        vm = r.vm
        what: list[str] = []
        if vm.vcpu.insns != ref.vm.vcpu.insns:
            what.append(f"instruction count {vm.vcpu.insns} vs {ref.vm.vcpu.insns}")
        if vm.running != ref.vm.running or vm.exit_status != ref.vm.exit_status:
            what.append(f"state {vm.stop_reason or 'running'}/{vm.exit_status} vs "
                        f"{ref.vm.stop_reason or 'running'}/{ref.vm.exit_status}")
        regs = registers(vm)
        bad = [k for k in ref_regs if regs[k] != ref_regs[k]]
        if bad:
            what.append("registers " + ", ".join(f"{k} {regs[k]:#x} vs {ref_regs[k]:#x}" for k in bad))
        if vm.events.log != ref_events:
            i = next((i for i, (a, b) in enumerate(zip(vm.events.log, ref_events)) if a != b),
                     min(len(vm.events.log), len(ref_events)))
            mine = vm.events.log[i] if i < len(vm.events.log) else None
            theirs = ref_events[i] if i < len(ref_events) else None
            what.append(f"event #{i}: {_fmt_event(mine)} vs {_fmt_event(theirs)}")
        if vm.uart.output != ref_console:
            what.append(f"console {bytes(vm.uart.output[-40:])!r} vs {bytes(ref_console[-40:])!r}")
        if what:
            return _divergence_report(r, ref, what, regs, ref_regs)
    return ""


def _first_diff(a: list, b: list) -> tuple:
    for x, y in zip(a, b):
        if x != y:
            return x, y
    if len(a) != len(b):
        return (a[len(b)] if len(a) > len(b) else None, b[len(a)] if len(b) > len(a) else None)
    return ()


def _fmt_event(e) -> str:
    if e is None:
        return "(none)"
    v, err, cr2, rip = e
    s = f"vector {v} at RIP {rip:#x}"
    if err is not None:
        s += f" err {err:#x}"
    if cr2 is not None:
        s += f" cr2 {cr2:#x}"
    return s


def _divergence_report(r: _Run, ref: _Run, what: list[str], regs: dict, ref_regs: dict) -> str:
    lines = [f"  {r.name} vs native:"] + [f"    - {w}" for w in what]
    diverged = [e for e in (_first_diff(r.vm.events.log, ref.vm.events.log)) if e is not None]
    if diverged:
        lines.append(f"  the event was raised by: {disassemble_at(ref.vm.vcpu, diverged[0][3])}")
    for run, rg in ((r, regs), (ref, ref_regs)):
        lines.append(f"  {run.name}: {disassemble_at(run.vm.vcpu, rg['rip'])}")
        lines.append("    " + " ".join(f"{k}={v:#x}" for k, v in rg.items()))
    addr = ref_regs["cr2"] if regs["cr2"] != ref_regs["cr2"] else ref_regs["rip"]
    if ref.vm.events.log or r.vm.events.log:
        last = (r.vm.events.log or ref.vm.events.log)[-1]
        if last[2] is not None:
            addr = last[2]
    lines.append(f"  page walk of {addr:#x}:")
    for run in (r, ref):
        lines.extend("    " + s for s in describe_walk(run.vm, addr))
    return "\n".join(lines)


def describe_walk(vm: VM, va: int) -> list[str]:
    """The guest walk of ``va`` in ``vm``, level by level, without side effects."""
    v = vm.vcpu
    cr0, cr3, cr4 = v.reg(X.UC_X86_REG_CR0), v.reg(X.UC_X86_REG_CR3), v.reg(X.UC_X86_REG_CR4)
    ctl = paging_ctl(cr0, cr4, v.efer(), v.reg(X.UC_X86_REG_RFLAGS), v.cpl() == 3)

    trace: list = []
    res = walk(PeekMemory(v), cr3, va, 0, v.cpl() == 3, ctl, trace)
    names = {4: "PML4E", 3: "PDPTE", 2: "PDE", 1: "PTE"}
    out = [f"{vm.config.name}: cr3={cr3:#x}"]
    for level, egpa, e in trace:
        where = f"gpa {egpa:#x}"
        if vm.p2m is not None:
            where += f" (machine {vm.mmu.peek_gpa(egpa):#x})"
        flags = "".join(ch for bit, ch in ((1, "P"), (2, "W"), (4, "U"), (32, "A"), (64, "D"),
                                           (PTE_PS, "S")) if e & bit)
        nx = " NX" if e >> 63 else ""
        out.append(f"  {names[level]:<5} at {where}: {e:#018x} [{flags}{nx}] -> {e & ADDR_MASK:#x}")
    if res < 0:
        out.append(f"  -> fault {~res:#x}")
    else:
        out.append(f"  -> gpa {res & ADDR_MASK:#x} perms {res & 7}")
    return out


def _compare_memory(runs: list[_Run], memsize: int) -> tuple[int, str]:
    ref = runs[0].vm
    pages = memsize >> 12
    bad: list[str] = []
    for r in runs[1:]:
        for gfn in range(pages):
            a = ref.ram.read_gpa(gfn << 12, 4096)
            b = r.vm.ram.read_gpa(gfn << 12, 4096)
            if a != b:
                off = next(i for i in range(4096) if a[i] != b[i])
                qoff = off & ~7
                qa = int.from_bytes(a[qoff:qoff + 8], "little")
                qb = int.from_bytes(b[qoff:qoff + 8], "little")
                bad.append(f"  page {gfn:#x}: {r.name} has {qb:#018x} at gpa {(gfn << 12) + qoff:#x}, "
                           f"native {qa:#018x}")
                if len(bad) >= 20:
                    break
    report = ("guest-physical memory differs:\n" + "\n".join(bad)) if bad else ""
    return pages * (len(runs) - 1), report
