"""One virtual machine: configuration, memory, MMU, devices, a vCPU and the exit dispatcher.

The run loop is the whole life of a VM::

    while running:
        deliver a pending interrupt if the guest can take one
        exit = vcpu.run(budget)          # budget ends at the next timer event
        dispatch(exit)                   # one place that handles every reason

Time is the guest instruction count (plus time skipped while the guest halts
waiting for an interrupt), so a run is a function of its inputs alone.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import numpy as np
from typing import Callable

from unicorn import x86_const as X

from ..devices.apic import APIC_BASE, APIC_SIZE, LocalApic
from ..devices.bus import IOBus
from ..devices.backdoor import BackdoorBalloon
from ..devices.cmos import Cmos
from ..devices.fwcfg import FwCfg
from ..devices.pci import PciHostNoDevices
from ..devices.shutdown import BochsShutdown
from ..devices.debugexit import DebugExit
from ..devices.pic import Pic8259Pair
from ..devices.pit import Pit8254
from ..devices.uart import Uart16550
from ..guest.image import BootError, GuestImage
from ..machine.pool import OWNER_VMM, PAGE_SHIFT, PAGE_SIZE, HostOutOfMemory, MachinePool
from ..mmu.modes import MODES
from ..mmu.native import FlatRAM
from ..mmu.p2m import P2M, GuestMemoryError, P2MState
from ..machine.swap import SwapDevice
from .balloon import Balloon
from .events import EventInjector, TripleFault
from .exits import PF, ExitReason, VmExit, vector_name
from .intercept import InvlpgIntercept
from .vcpu import UnsupportedPagingMode, VCpu

MIB = 1 << 20
DEFAULT_MEM = 64 * MIB
DEFAULT_SLICE = 2_000_000
DEFAULT_MAX_INSNS = 500_000_000
MMU_MODES = tuple(MODES)   # ("nested", "shadow", "native")


class VMError(Exception):
    """A VM cannot be configured or started (bad option, guest does not fit)."""


@dataclass
class VMConfig:
    """What a user configures per VM (VMware's names where they exist)."""

    name: str = "vm0"
    memsize: int = DEFAULT_MEM      # bytes of guest-physical memory
    mmu: str = "nested"
    slice_insns: int = DEFAULT_SLICE
    echo: Callable[[bytes], None] | None = None
    shadow_max_pages: int | None = None  # shadow page budget (default: 2 % of guest pages, >= 64)
    pshare_enable: bool = True           # sched.mem.pshare.enable
    pshare_salt: str | None = None       # sched.mem.pshare.salt
    guest_arg: int = 0                   # RSI at entry (multi-VM runs: the VM's index + 1)
    maxmemctl: int | None = None         # sched.mem.maxmemctl in bytes: the balloon's per-VM cap
    shares: str | int = "normal"         # sched.mem.shares: low / normal / high (5/10/20 per MB) or a number
    reservation: int = 0                 # sched.mem.min in bytes: never reclaimed
    limit: int = 0                       # sched.mem.max in bytes (0: the configured memory)
    large_pages: bool = True             # Mem.AllocGuestLargePage: back 2 MiB ranges with 2 MiB pages

    def validate(self) -> None:
        if self.mmu not in MMU_MODES:
            raise VMError(f"unknown MMU mode {self.mmu!r} (have: {', '.join(MMU_MODES)})")
        if self.memsize < 2 * MIB or self.memsize % PAGE_SIZE:
            raise VMError(f"guest memory must be a multiple of 4 KiB and at least 2 MiB, got {self.memsize}")
        if self.slice_insns < 1:
            raise VMError("the slice must be at least one instruction")


@dataclass
class VMResult:
    """How a VM ended, for reports and `--json`."""

    name: str
    exit_status: int | None
    stop_reason: str
    message: str
    console: str
    counters: dict[str, object] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.exit_status == 0


class VM:
    """A VM on a machine pool, ready to run one guest image."""

    def __init__(self, config: VMConfig, image: GuestImage, pool: MachinePool | None = None,
                 vm_id: int = 1, *, swap: "SwapDevice | None" = None, host=None) -> None:
        config.validate()
        self.config = config
        self.pool = pool
        self.id = vm_id
        # A stable identity (the default page-sharing salt under Mem.ShareForceSalting 2).
        self.uuid = str(uuid.uuid5(uuid.NAMESPACE_OID, f"hvmodel/{vm_id}/{config.name}"))
        npages = config.memsize >> PAGE_SHIFT
        if image.load_addr + len(image.code) > config.memsize:
            raise VMError(f"guest image ({len(image.code)} bytes at {image.load_addr:#x}) "
                          f"does not fit in {config.memsize // MIB} MiB of guest memory")
        mode = MODES[config.mmu]
        self.native = mode.reference
        self.host = host
        self.swap = swap
        if self.native:
            # The reference: flat guest-physical memory, Unicorn's own MMU, no p2m.
            ram = FlatRAM(config.memsize)
            self.p2m = None
            self.ram = ram
            self.mmu = mode.for_vm(ram, None, config)
            phys = (ram.host_addr, ram.size, ram.q, ram.mv)
        else:
            if pool is None:
                raise VMError(f"MMU mode {config.mmu} needs a machine pool")
            self.p2m = P2M(pool, npages, vm_id)
            self.p2m.swap = swap
            self.p2m.large_enabled = config.large_pages
            if host is not None:
                host.attach(self.p2m)
            self.ram = self.p2m
            try:
                self.mmu = mode.for_vm(self.p2m, pool, config)
            except HostOutOfMemory as e:
                raise VMError(f"cannot create the {config.mmu} page tables: {e}") from None
            # Unicorn maps RAM up to the pool's device window (the APIC's MMIO page).
            phys = (pool.host_addr, pool.device_frame << PAGE_SHIFT, pool.q, pool.mv)

        self.idle_insns = 0
        self.io = IOBus()
        self.uart = Uart16550(echo=config.echo)
        self.debug_exit = DebugExit(self._on_debug_exit)
        self.pit = Pit8254(self.clock)
        self.pic = Pic8259Pair()
        # The PC devices toy kernels poke (what QEMU's pc machine has at these ports).
        self.fw_cfg = FwCfg(config.memsize, uuid.UUID(self.uuid).bytes)
        self.cmos = Cmos(self.clock, config.memsize)
        self.pci = PciHostNoDevices()
        self.shutdown = BochsShutdown(self._on_shutdown_port)
        for dev in (self.uart, self.debug_exit, self.pit, self.pic, self.fw_cfg, self.cmos, self.pci,
                    self.shutdown):
            self.io.attach(dev)

        self.vcpu = VCpu(*phys, self.mmu, self.io, native=self.native)
        if self.mmu.intercepts_invlpg:
            self.vcpu.invlpg = InvlpgIntercept(self.vcpu)
        self.vcpu.kick_ports = frozenset(self.pit.ports) | frozenset(self.pic.ports)
        self.apic = self._map_apic(pool) if config.memsize <= APIC_BASE else None
        # Ballooning (vm/balloon.py) through the back-door port 0x5670; native: target 0.
        self.balloon = Balloon(self.p2m, maxmemctl=config.maxmemctl) if self.p2m is not None else None
        self.backdoor = BackdoorBalloon(self.balloon, self.vcpu.reg, self.vcpu.set_reg,
                                        on_change=lambda: self.mmu.flush_pending and self.vcpu.flush_tlb())
        self.io.attach(self.backdoor)
        self._irq_since: int | None = None
        if pool is not None and not self.native:
            self.vcpu.fetched = pool.fetched
            self.vcpu.pool = pool
            pool.on_launder.append(self._drop_code)
        self.events = EventInjector(self.vcpu)
        self.guest_page_faults = 0
        self.blocked_exits = 0
        # Armed fault injection (hvmodel/inject/arm.py), or None: then step() pays one check.
        self.inject = None
        self.exit_status: int | None = None
        self.stop_reason = ""
        self.message = ""
        self.triple_fault_report = ""
        self._load(image)

    # -- set-up ----------------------------------------------------------------------

    def _load(self, image: GuestImage) -> None:
        """Copy the image into guest-physical memory and set the entry state (GUEST-ABI.md)."""
        if image.boot is not None:  # a Multiboot / ELF64 kernel (hvmodel.boot.loader) installs itself
            try:
                image.boot.install(self)
            except BootError as e:
                raise VMError(str(e)) from None
            except GuestMemoryError as e:
                raise VMError(f"cannot load the kernel: {e}") from None
            return
        try:
            self.ram.write_gpa(image.load_addr, image.code)
        except GuestMemoryError as e:
            raise VMError(f"cannot load the guest: {e}") from None
        v = self.vcpu
        v.set_reg(X.UC_X86_REG_RIP, image.entry)
        v.set_reg(X.UC_X86_REG_RSP, image.load_addr)
        v.set_reg(X.UC_X86_REG_RDI, self.config.memsize)
        v.set_reg(X.UC_X86_REG_RSI, self.config.guest_arg)
        v.set_reg(X.UC_X86_REG_RFLAGS, 0x2)

    def _map_apic(self, pool: MachinePool | None) -> LocalApic:
        """The local APIC's MMIO page at GPA 0xFEE00000 (through the p2m, or flat in native)."""
        apic = LocalApic(self.clock)
        vcpu = self.vcpu

        def read(_uc, offset: int, size: int, _ud) -> int:
            try:
                return apic.read(offset, size)
            except BaseException as exc:
                vcpu._hook_failed(exc)
                return 0

        def write(_uc, offset: int, size: int, value: int, _ud) -> None:
            # No slice end here: emu_stop() from an MMIO write leaves RIP on the store,
            # which would run again (measured on 2.1.4). A new timer deadline is seen at
            # the next exit (HLT, I/O to the PIT/PIC, an exception, the slice's end).
            try:
                apic.write(offset, size, value)
            except BaseException as exc:
                vcpu._hook_failed(exc)

        if self.native:
            machine = APIC_BASE
        else:
            machine = pool.device_frame << PAGE_SHIFT
            self.p2m.mmio[APIC_BASE >> PAGE_SHIFT] = pool.device_frame
        vcpu.uc.mmio_map(machine, APIC_SIZE, read, None, write, None)
        return apic

    def _drop_code(self) -> None:
        # Frames that held translated code are about to be reused: drop it all.
        self.vcpu.uc.ctl_flush_tb()
        if self.vcpu.invlpg is not None:
            self.vcpu.invlpg.forget()

    # -- time ------------------------------------------------------------------------

    def clock(self) -> int:
        """Guest time in instructions: executed (including the current slice) + idle."""
        return self.vcpu.now() + self.idle_insns

    # -- devices ---------------------------------------------------------------------

    def _on_shutdown_port(self) -> None:
        self.vcpu.request_exit(VmExit(ExitReason.POWER_OFF, status=0,
                                      message='guest wrote "Shutdown" to the Bochs shutdown port 0x8900'))

    def _on_debug_exit(self, status: int) -> None:
        self.vcpu.request_exit(VmExit(ExitReason.POWER_OFF, status=status,
                                      message=f"guest wrote {status:#x} to the debug-exit port 0xf4"))

    # -- the run loop ------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return not self.stop_reason

    @property
    def stopped(self) -> bool:
        return bool(self.stop_reason)

    def run(self, max_insns: int = DEFAULT_MAX_INSNS) -> VMResult:
        """Run until the guest powers off, dies, or ``max_insns`` instructions pass."""
        while self.running:
            self.step(max_insns)
        return self.result()

    def step(self, max_insns: int = DEFAULT_MAX_INSNS, limit: int | None = None) -> VmExit | None:
        """One turn of the run loop: pending interrupt, one slice, its exit dispatched.

        ``limit`` caps the slice (the checker uses it to stop modes at the same
        instruction counts). Returns the exit, or None if the VM stopped before running.
        """
        vcpu = self.vcpu
        # Faults due at this slice boundary fire first; ``cut`` ends the slice at the next one.
        cut = self.inject.at_slice(self) if self.inject is not None else None
        now = self.clock()
        if self.pit.fire(now):
            self.pic.raise_irq(0)
        if self.apic is not None:
            self.apic.fire(now)
        self._maybe_interrupt()
        if self.stop_reason:
            return None
        left = max_insns - vcpu.insns
        if left <= 0:
            self._stop("instruction_limit", f"instruction limit reached ({max_insns:,} instructions)",
                       status=None)
            return None
        budget = min(self.config.slice_insns, left)
        if limit is not None:
            budget = min(budget, limit)
        deadline = self._next_deadline(now)
        if deadline is not None and deadline > now:
            budget = min(budget, deadline - now)
        if cut is not None:
            budget = min(budget, cut)
        if self._irq_waiting():
            # An interrupt waits for RFLAGS.IF (an "interrupt window"): look again at the
            # next multiple of W instructions of guest time, W growing from 16 to 1024
            # the longer it waits. Boundaries in guest time, not in slices, so every
            # MMU mode (whatever its extra exits) delivers at the same instruction.
            if self._irq_since is None:
                self._irq_since = now
            w = 16
            while w < now - self._irq_since and w < 1024:
                w *= 2
            budget = min(budget, w - now % w)
        else:
            self._irq_since = None
        if self.pool is not None and not self.native:
            self.pool.launder()  # between slices: frames that held code become reusable
        if self.mmu.flush_pending:
            vcpu.flush_tlb()     # another VM's activity (sharing, swapping) changed our p2m
        try:
            ex = vcpu.run(budget)
            self._dispatch(ex)
        except GuestMemoryError as e:
            self._stop("host_failure" if e.host_failure else "guest_memory", str(e), status=None)
            return VmExit(ExitReason.ERROR, message=str(e))
        except UnsupportedPagingMode as e:
            self._stop("unsupported_mode", str(e), status=None)
            return VmExit(ExitReason.ERROR, message=str(e))
        return ex

    def _next_deadline(self, now: int) -> int | None:
        """The next timer event (PIT or APIC timer) in guest time, or None."""
        d = self.pit.next_irq(now)
        if self.apic is not None:
            a = self.apic.next_irq(now)
            if a is not None and (d is None or a < d):
                d = a
        return d

    def _irq_waiting(self) -> bool:
        return self.pic.pending() is not None or (self.apic is not None and self.apic.pending() is not None)

    def _maybe_interrupt(self) -> None:
        vcpu = self.vcpu
        if not self._irq_waiting() or not vcpu.reg(X.UC_X86_REG_RFLAGS) & 0x200:
            return
        # The APIC's own (fixed) interrupts first; the PIC's arrive as ExtINT through LINT0.
        if self.apic is not None and self.apic.pending() is not None:
            vector = self.apic.ack()
        else:
            vector = self.pic.ack()
        self._deliver(vector, external=True)

    def _dispatch(self, ex: VmExit) -> None:
        """The one place every exit is handled."""
        r = ex.reason
        if r is ExitReason.SLICE_END:
            return
        if r is ExitReason.EXCEPTION:
            if ex.vector == PF:
                self.guest_page_faults += 1
            self._deliver(ex.vector, ex.error_code, cr2=ex.cr2, soft=ex.soft)
        elif r is ExitReason.HLT:
            self._halt()
        elif r is ExitReason.POWER_OFF:
            self._stop("power_off", ex.message, status=ex.status)
        elif r is ExitReason.ERROR:
            self._stop("error", ex.message, status=None)
        elif r is ExitReason.BLOCKED:
            self.blocked_exits += 1  # the host runs it again once memory is freed

    def _deliver(self, vector: int, error_code: int | None = None, *, cr2: int | None = None,
                 soft: bool = False, external: bool = False) -> None:
        try:
            self.events.deliver(vector, error_code, cr2=cr2, soft=soft, external=external)
        except TripleFault as tf:
            self.triple_fault_report = self._crash_report(tf)
            self._stop("triple_fault", f"{tf}", status=None)
        if self.mmu.flush_pending:
            self.vcpu.flush_tlb()

    def _halt(self) -> None:
        if not self.vcpu.reg(X.UC_X86_REG_RFLAGS) & 0x200:
            self._stop("power_off", "guest halted with interrupts disabled (cli; hlt): powered off", status=0)
            return
        now = self.clock()
        if self._irq_waiting():
            return
        deadline = self._next_deadline(now)
        if deadline is None:
            self._stop("deadlock", "guest halted waiting for an interrupt, but no timer is programmed",
                       status=None)
            return
        if deadline > now:
            self.idle_insns += deadline - now

    def _stop(self, reason: str, message: str, status: int | None) -> None:
        if self.stop_reason:
            return   # the first cause stands (a host failure ends the slice with an error exit)
        self.stop_reason = reason
        self.message = message
        self.exit_status = status

    # -- reports -----------------------------------------------------------------------

    def _crash_report(self, tf: TripleFault) -> str:
        from .disasm import disassemble_at
        v = self.vcpu
        lines = [f"triple fault in {self.config.name} at RIP {v.rip:#x} (CPL {v.cpl()})",
                 "  events: " + " -> ".join(tf.chain),
                 "  instruction: " + disassemble_at(v, v.rip)]
        return "\n".join(lines)

    def counters(self) -> dict[str, object]:
        """Every counter of this VM, by the names the README documents."""
        v = self.vcpu
        c: dict[str, object] = {
            "instructions": v.insns,
            "idle_instructions": self.idle_insns,
            "exits": dict(sorted(v.exits.items())),
            "tlb_fills": v.tlb_fills,
            "tlb_flushes": v.tlb_flushes,
            "guest_page_faults": self.guest_page_faults,
            "blocked_exits": self.blocked_exits,
            "events_delivered": {vector_name(k): n for k, n in sorted(self.events.delivered.items())},
        }
        if self.p2m is not None:
            c["frames_allocated"] = self.p2m.first_touches
            c["guest_pages_backed"] = self.p2m.count(P2MState.PRIVATE)
        c["invlpg_exits"] = v.invlpg.exits if v.invlpg is not None else 0
        c.update(self.mmu.counters())
        if self.p2m is not None:
            c.update(self.memory_counters())
        if self.balloon is not None:
            c.update(self.balloon.counters())
        c["io_unknown_reads"] = sum(self.io.unknown_reads.values())
        c["io_unknown_writes"] = sum(self.io.unknown_writes.values())
        c["io_port80_writes"] = self.io.port80_writes
        if self.apic is not None:
            c.update(self.apic.counters())
        return c

    def memory_counters(self) -> dict[str, object]:
        """esxtop's per-VM memory view, in 4 KiB pages."""
        p2m = self.p2m
        pool = self.pool
        st, val = p2m.state, p2m.value
        private = p2m.count(P2MState.PRIVATE)
        shared_mask = st == P2MState.SHARED
        shared = int(np.count_nonzero(shared_mask))
        frames = val[shared_mask]
        nonzero = frames[frames != 0]
        refs = pool.refcount[nonzero].astype(np.float64)
        zero = shared - len(nonzero)
        saved = zero + float(np.sum(1.0 - 1.0 / refs)) if len(refs) else float(zero)
        return {
            "GRANT": private + shared,
            "SHRD": shared,
            "ZERO": zero,
            "SHRDSVD": round(saved, 1),
            "SWCUR": p2m.count(P2MState.SWAPPED),
            "SWR": p2m.swap_ins,
            "SWW": p2m.swap_outs,
            "CNSM": round(private + (float(np.sum(1.0 / refs)) if len(refs) else 0.0), 1),
            "OVHD": self.mmu.overhead_frames() + (len(p2m.zip.frames) if p2m.zip is not None else 0),
            "COW_breaks": p2m.cow_breaks,
            "large_pages": p2m.large_count(),
            "large_pages_backed": p2m.large_pages_backed,
            "large_breaks": p2m.large_breaks,
            "allocs_blocked": p2m.allocs_blocked,
            "ZIPPED": p2m.count(P2MState.COMPRESSED),
            **(p2m.zip.counters() if p2m.zip is not None else {}),
        }

    def result(self) -> VMResult:
        return VMResult(name=self.config.name, exit_status=self.exit_status,
                        stop_reason=self.stop_reason, message=self.message,
                        console=self.uart.output.decode("utf-8", "replace"),
                        counters=self.counters())

    def close(self) -> None:
        """Return every frame this VM holds to the pool, delete its swap file."""
        self.mmu.release()
        if self.p2m is None or self.pool is None:
            return
        self.p2m.release_all()
        if self.p2m.zip is not None:
            self.p2m.zip.release()
        if self.swap is not None:
            self.swap.close()
        if self.host is not None:
            self.host.sharing.forget_vm(self)
        if self._drop_code in self.pool.on_launder:
            self.pool.on_launder.remove(self._drop_code)


__all__ = ["VM", "VMConfig", "VMResult", "VMError", "OWNER_VMM"]
