"""Differential validation: every MMU mode in lock-step with the reference MMU.

The same guest image runs under each VMM mode (nested, shadow) and under the reference
(``native``: Unicorn's own x86 MMU over flat memory, no VMM at all). All runs are
deterministic and keep time in instructions, so they must agree exactly, access by
access:

* **every guest load and store** -- guest-physical address, size, value, and the
  instruction that made it -- is recorded in the reference and checked in each mode as
  it happens (:mod:`hvmodel.check.stream`), and every translation a mode hands to
  Unicorn (data and instruction fetches) must be the one the guest's tables give;
* at every VM exit and every ``every`` instructions (a *checkpoint*): RIP, the general
  registers, RFLAGS, CR0/CR2/CR3/CR4, EFER, the six segment registers with their hidden
  caches (selector, base, limit, flags), FS_BASE/GS_BASE/KERNEL_GS_BASE,
  GDTR/IDTR/TR/LDTR, the sequence of delivered events (vector, error code, CR2), the
  console, whether the guest is still running, and an xxh3 digest of the guest pages the
  mode holds (:mod:`hvmodel.check.digest`);
* at the end, every byte of guest-physical memory, which includes the A/D bits each MMU
  wrote into the guest's own page tables.

The first divergence ends the check with a report a person can act on: for an access,
the instruction (capstone), the access in both runs (value, and the guest-physical page
it reached), and the walk of its address in both, level by level -- the reference is run
again from the start to the instruction before it, which determinism makes exact; for a
checkpoint, both register sets and the walk of the relevant address.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from unicorn import x86_const as X

from ..guest.image import GuestImage
from ..host.host import Host, HostConfig
from ..memory.sharing import SharingConfig
from ..mmu.p2m import GuestMemoryError
from ..vm.disasm import disassemble_at
from ..vm.vm import DEFAULT_MAX_INSNS, VM, VMConfig
from . import digest
from .divergence import describe_walk
from .witness import Witness
from .stream import AccessDivergence, ReferenceStream, StreamVerifier, format_divergence

REGS = [("rip", X.UC_X86_REG_RIP), ("rax", X.UC_X86_REG_RAX), ("rbx", X.UC_X86_REG_RBX),
        ("rcx", X.UC_X86_REG_RCX), ("rdx", X.UC_X86_REG_RDX), ("rsi", X.UC_X86_REG_RSI),
        ("rdi", X.UC_X86_REG_RDI), ("rbp", X.UC_X86_REG_RBP), ("rsp", X.UC_X86_REG_RSP),
        ("r8", X.UC_X86_REG_R8), ("r9", X.UC_X86_REG_R9), ("r10", X.UC_X86_REG_R10),
        ("r11", X.UC_X86_REG_R11), ("r12", X.UC_X86_REG_R12), ("r13", X.UC_X86_REG_R13),
        ("r14", X.UC_X86_REG_R14), ("r15", X.UC_X86_REG_R15), ("rflags", X.UC_X86_REG_RFLAGS),
        ("cr0", X.UC_X86_REG_CR0), ("cr2", X.UC_X86_REG_CR2), ("cr3", X.UC_X86_REG_CR3),
        ("cr4", X.UC_X86_REG_CR4), ("cs", X.UC_X86_REG_CS), ("ss", X.UC_X86_REG_SS)]

# Compared at checkpoints besides REGS: (name, register id) read as one value each...
SYSTEM_REGS = [("efer", None), ("fs_base", X.UC_X86_REG_FS_BASE), ("gs_base", X.UC_X86_REG_GS_BASE),
               ("kernel_gs_base", None), ("ds", X.UC_X86_REG_DS), ("es", X.UC_X86_REG_ES),
               ("fs", X.UC_X86_REG_FS), ("gs", X.UC_X86_REG_GS)]
# ... and the system-table registers as (selector, base, limit, flags).
TABLE_REGS = [("gdtr", X.UC_X86_REG_GDTR), ("idtr", X.UC_X86_REG_IDTR), ("tr", X.UC_X86_REG_TR),
              ("ldtr", X.UC_X86_REG_LDTR)]
SEGMENTS = ("es", "cs", "ss", "ds", "fs", "gs")
MSR_KERNEL_GS_BASE = 0xC0000102

_REG_NAMES = [n for n, _ in REGS]
_REG_IDS = [r for _, r in REGS]

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
    exit_status: int | None = None   # the reference's: the guest's own verdict
    memory: dict = field(default_factory=dict)   # sharing/swapping counters under pressure
    accesses: int = 0           # guest loads and stores compared, all modes
    fills: int = 0              # translations checked against the guest's tables, all modes
    digests: int = 0            # checkpoint memory digests compared, all modes
    diverged_at: int | None = None   # the instruction of the first divergence (1-based), if any

    @property
    def ok(self) -> bool:
        return self.mismatches == 0

    def summary(self) -> str:
        return (f"{self.guest}: {', '.join(self.modes)} vs native: {self.checkpoints} checkpoints, "
                f"{self.accesses:,} accesses, {self.fills:,} fills, {self.digests:,} memory digests and "
                f"{self.pages_compared} pages compared, {self.mismatches} mismatches")


@dataclass
class _Run:
    name: str
    vm: VM
    events_seen: int = 0
    diffs: list[str] = field(default_factory=list)


def registers(vm: VM) -> dict[str, int]:
    """The compared register set of a VM's vCPU."""
    return dict(zip(_REG_NAMES, vm.vcpu.uc.reg_read_batch(_REG_IDS)))


def system_state(vm: VM) -> dict[str, object]:
    """EFER, segment selectors and caches, FS/GS/KERNEL_GS bases, GDTR/IDTR/TR/LDTR."""
    v = vm.vcpu
    out: dict[str, object] = {}
    for name, rid in SYSTEM_REGS:
        if name == "efer":
            out[name] = v.efer()
        elif name == "kernel_gs_base":
            out[name] = v.uc.reg_read(X.UC_X86_REG_MSR, MSR_KERNEL_GS_BASE)
        else:
            out[name] = v.reg(rid)
    for name, rid in TABLE_REGS:
        out[name] = tuple(v.table_reg(rid))
    for name, seg in zip(SEGMENTS, v.state.segments()):
        out[name + "_cache"] = (seg.selector, seg.base, seg.limit, seg.flags)
    return out


def _fmt(v: object) -> str:
    return f"{v:#x}" if isinstance(v, int) else "(" + ", ".join(f"{x:#x}" for x in v) + ")"


def check(image: GuestImage, modes: list[str], *, memsize: int = 64 << 20, host_mem: int = 256 << 20,
          every: int = DEFAULT_EVERY, max_insns: int = DEFAULT_MAX_INSNS,
          configure=None, pressure: int = 0, accesses: bool = True,
          large_pages: bool = True) -> CheckResult:
    """Run ``image`` under each mode and the reference in lock-step and compare.

    ``configure(vm)``, if given, is called on every VM before it runs (tests use it to
    arm a deliberately broken MMU and prove the checker can fail).

    ``pressure`` > 0 turns memory management on for the VMM modes, none of which the
    guest may notice: after every step the sharing scanner visits 16 × ``pressure``
    of each VM's pages (all VMs share one salt, so identical pages are shared across
    modes too) and ``pressure`` of its private pages leave RAM: half of them through
    reclaim (compressed when they compress to 2 KiB, else swapped), half swapped out; a
    witness VM that never runs takes copies of the first mode's pages, which sharing merges
    with theirs, so that a write into a shared frame shows (:mod:`hvmodel.check.witness`).

    ``large_pages=False`` gives the VMM modes no 2 MiB pages (``--no-large-pages``).

    ``accesses=False`` leaves out the access stream and the fill checks (checkpoints and
    the final memory only): what the checker was before them, kept to show what they add.
    """
    result = CheckResult(guest=image.source_name, modes=list(modes))
    ref = VM(VMConfig(name="native", memsize=memsize, mmu="native"), image)
    host = Host(HostConfig(memsize=host_mem * (max(1, len(modes)) + (1 if pressure else 0)),
                           sharing=SharingConfig(force_salting=1)))
    runs = [_Run("native", ref)] + [
        _Run(m, host.power_on(VMConfig(name=m, memsize=memsize, mmu=m, pshare_salt="check",
                                       large_pages=large_pages), image))
        for m in modes]
    for r in runs:
        r.vm.events.keep_log = True
        if configure is not None:
            configure(r.vm)
    witness = Witness(host, image, memsize, "check") if pressure and len(runs) > 1 else None
    # The access stream: after configure, so a deliberately broken MMU is the one checked.
    recorder = ReferenceStream(ref) if accesses else None
    verifiers = [StreamVerifier(r.vm) for r in runs[1:]] if accesses else []

    try:
        while True:
            limit = every - ref.vcpu.insns % every
            ref.step(max_insns, limit)
            target = ref.vcpu.insns
            expected = np.zeros(0, dtype=np.int64)
            if recorder is not None:
                if recorder.error is not None:
                    raise recorder.error
                expected = recorder.take()
            bad: AccessDivergence | None = None
            failed = ""
            for i, r in enumerate(runs[1:]):
                # A mode may exit more often than the reference: step it until it reaches
                # the reference's instruction count.
                vm = r.vm
                if verifiers:
                    verifiers[i].begin(expected)
                while vm.running:
                    vm.step(max_insns, max(1, target - vm.vcpu.insns))
                    if vm.vcpu.insns >= target:
                        break
                found = verifiers[i].end() if verifiers else None
                if found is not None and (bad is None or found.insn < bad.insn):
                    bad = found
                if pressure and vm.running and not failed:
                    failed = _apply_pressure(host, vm, pressure)
            result.checkpoints += 1
            if bad is not None:
                result.mismatches = 1
                result.diverged_at = bad.insn
                result.report = (f"divergence at checkpoint {result.checkpoints}:\n"
                                 + format_divergence(bad, _reference_walk(image, memsize, every, max_insns, bad))
                                 + _state_lines(runs, bad.mode))
                break
            # Memory digests at the periodic checkpoints (and the last): their cost is the size
            # of the guest's memory, which at every exit would dominate the check.
            periodic = target % every == 0 or not ref.running
            try:
                report = failed or _compare(runs) or (periodic and _compare_digests(runs, result))
                if not report and witness is not None:
                    report = witness.changed()
                    if not report and runs[1].vm.running:
                        witness.copy_from(runs[1].vm, 16 * pressure)
            except digest.UnreadablePage as e:
                report = f"  {e}"
            except GuestMemoryError as e:
                report = f"  the VMM failed while the witness took its copies: {e}"
            if report:
                result.mismatches = 1
                result.diverged_at = target
                result.report = f"divergence at checkpoint {result.checkpoints} (instruction {target:,}):\n{report}"
                break
            if not ref.running:
                break
    finally:
        result.accesses = sum(v.accesses for v in verifiers)
        result.fills = sum(v.fills_checked for v in verifiers)

    result.instructions = ref.vcpu.insns
    result.stop_reason = ref.stop_reason
    result.exit_status = ref.exit_status
    if result.ok:
        try:
            pages, report = _compare_memory(runs, memsize)
        except digest.UnreadablePage as e:
            pages, report = 0, f"guest-physical memory differs:\n  {e}"
        result.pages_compared = pages
        if report:
            result.mismatches = report.count("\n  page ") or 1
            result.report = report
            result.diverged_at = result.instructions
    result.memory = {r.name: {k: r.vm.memory_counters().get(k, 0)
                              for k in ("SHRD", "ZERO", "ZIP", "UNZIP", "SWW", "SWR", "COW_breaks")}
                     for r in runs[1:]} if pressure else {}
    host.close()
    return result


def _apply_pressure(host: Host, vm: VM, pressure: int) -> str:
    """Share, compress and swap some of ``vm``'s pages; why the VMM failed doing it, or ""."""
    try:
        host.sharing.scan(vm, 16 * pressure)
        # half through reclaim (compressed when it pays), half straight to swap
        host.swapper.reclaim(vm, pressure // 2)
        host.swapper.swap_out(vm, pressure - pressure // 2)
    except GuestMemoryError as e:
        # In a run the host stops the VM with this message; here it is a divergence.
        return f"  {vm.config.name}: the VMM failed while managing memory: {e}"
    return ""


def _reference_walk(image: GuestImage, memsize: int, every: int, max_insns: int,
                    bad: AccessDivergence) -> list[str]:
    """The reference's walk of the diverging access's address, just before its instruction:
    a fresh reference run to that instruction (deterministic, so the same state), stepped
    with the check's own slice ends."""
    if bad.va is None:
        return []
    ref = VM(VMConfig(name="native", memsize=memsize, mmu="native"), image)
    stop = bad.insn - 1
    while ref.running and ref.vcpu.insns < stop:
        ref.step(max_insns, min(every - ref.vcpu.insns % every, stop - ref.vcpu.insns))
    lines = [f"native: {disassemble_at(ref.vcpu, ref.vcpu.rip)} (after {ref.vcpu.insns:,} instructions)"]
    return lines + describe_walk(ref, bad.va)


def _state_lines(runs: list[_Run], mode: str) -> str:
    """What else differs at the checkpoint where an access diverged."""
    r = next(x for x in runs if x.name == mode)
    what = _differences(runs[0], r)
    return "".join(f"\n  also at the checkpoint: {w}" for w in what)


def _compare_digests(runs: list[_Run], result: CheckResult) -> str:
    ref = runs[0].vm
    for r in runs[1:]:
        gfns = digest.held_pages(r.vm)
        result.digests += 1
        if digest.digest(r.vm, gfns) != digest.digest(ref, gfns):
            diff = digest.first_difference(ref, r.vm, gfns)
            if diff is None:
                continue
            gpa, mine, theirs = diff
            return (f"  {r.name} vs native: guest-physical memory differs (checkpoint digest of "
                    f"{len(gfns)} pages): {r.name} has {mine:#018x} at gpa {gpa:#x}, native {theirs:#018x}")
    return ""


def _differences(ref: _Run, r: _Run) -> list[str]:
    vm = r.vm
    what: list[str] = []
    if vm.vcpu.insns != ref.vm.vcpu.insns:
        what.append(f"instruction count {vm.vcpu.insns} vs {ref.vm.vcpu.insns}")
    if vm.running != ref.vm.running or vm.exit_status != ref.vm.exit_status:
        what.append(f"state {vm.stop_reason or 'running'}/{vm.exit_status} vs "
                    f"{ref.vm.stop_reason or 'running'}/{ref.vm.exit_status}")
    regs, ref_regs = registers(vm), registers(ref.vm)
    bad = [k for k in ref_regs if regs[k] != ref_regs[k]]
    if bad:
        what.append("registers " + ", ".join(f"{k} {regs[k]:#x} vs {ref_regs[k]:#x}" for k in bad))
    sys_, ref_sys = system_state(vm), system_state(ref.vm)
    bad = [k for k in ref_sys if sys_[k] != ref_sys[k]]
    if bad:
        what.append("system registers " + ", ".join(f"{k} {_fmt(sys_[k])} vs {_fmt(ref_sys[k])}" for k in bad))
    ref_events = ref.vm.events.log
    if vm.events.log != ref_events:
        i = next((i for i, (a, b) in enumerate(zip(vm.events.log, ref_events)) if a != b),
                 min(len(vm.events.log), len(ref_events)))
        mine = vm.events.log[i] if i < len(vm.events.log) else None
        theirs = ref_events[i] if i < len(ref_events) else None
        what.append(f"event #{i}: {_fmt_event(mine)} vs {_fmt_event(theirs)}")
    if vm.uart.output != ref.vm.uart.output:
        what.append(f"console {bytes(vm.uart.output[-40:])!r} vs {bytes(ref.vm.uart.output[-40:])!r}")
    return what


def _compare(runs: list[_Run]) -> str:
    ref = runs[0]
    for r in runs[1:]:
        what = _differences(ref, r)
        if what:
            return _divergence_report(r, ref, what, registers(r.vm), registers(ref.vm))
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


def _compare_memory(runs: list[_Run], memsize: int) -> tuple[int, str]:
    ref = runs[0].vm
    pages = memsize >> 12
    every_page = np.arange(pages)
    theirs = digest.contents(ref, every_page).view("<u8").reshape(pages, 512)
    bad: list[str] = []
    for r in runs[1:]:
        mine = digest.contents(r.vm, every_page).view("<u8").reshape(pages, 512)
        for gfn in np.flatnonzero((mine != theirs).any(axis=1))[:20]:
            q = int(np.flatnonzero(mine[gfn] != theirs[gfn])[0])
            bad.append(f"  page {int(gfn):#x}: {r.name} has {int(mine[gfn, q]):#018x} at gpa "
                       f"{(int(gfn) << 12) + 8 * q:#x}, native {int(theirs[gfn, q]):#018x}")
        if len(bad) >= 20:
            break
    report = ("guest-physical memory differs:\n" + "\n".join(bad)) if bad else ""
    return pages * (len(runs) - 1), report
