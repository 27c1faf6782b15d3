"""A small native test harness for the guests (test helper, NOT part of the package).

Runs a GuestImage on plain Unicorn (UC_MODE_64, default UC_TLB_CPU MMU, one flat
mem_map) with the entry state of docs/GUEST-ABI.md, a UART that collects output,
isa-debug-exit on 0xf4, an approximate PIC/PIT (IRQ 0 every divisor * 84 instructions,
counted with emu_start(count=...)), and delivery of exceptions and interrupts through
the guest's IDT in Python (64-bit gates, IST, TSS.RSP0 on CPL 3 -> 0 via the
context-blob recipe of docs/ENGINE.md U24, old_exception cleared as U11 says).
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass, field

from unicorn import UC_ARCH_X86, UC_HOOK_INSN, UC_HOOK_INSN_INVALID, UC_HOOK_INTR, UC_MODE_64, Uc
from unicorn.x86_const import (
    UC_X86_INS_IN, UC_X86_INS_OUT, UC_X86_REG_CR0, UC_X86_REG_CR3, UC_X86_REG_CS,
    UC_X86_REG_IDTR, UC_X86_REG_GDTR, UC_X86_REG_RDI, UC_X86_REG_RFLAGS, UC_X86_REG_RIP,
    UC_X86_REG_RSP, UC_X86_REG_SS, UC_X86_REG_TR,
)

INSNS_PER_PIT_TICK = 84
# context_save() blob offsets on unicorn 2.1.4 (docs/ENGINE.md U10, U11, U24)
OFF_HFLAGS = 216
OFF_CS = 248
OFF_SS = 272
OFF_ERROR_CODE = 5424
OFF_OLD_EXCEPTION = 5536
ERRCODE_VECTORS = {8, 10, 11, 12, 13, 14, 17, 21, 29, 30}


class HarnessError(RuntimeError):
    pass


@dataclass
class RunResult:
    status: int | None
    output: str
    reason: str
    insns: int = 0
    delivered: dict = field(default_factory=dict)


class NativeVM:
    def __init__(self, image, mem_size: int = 64 << 20):
        self.image = image
        self.mem_size = mem_size
        uc = self.uc = Uc(UC_ARCH_X86, UC_MODE_64)
        uc.mem_map(0, mem_size)
        uc.mem_write(image.load_addr, image.code)
        uc.reg_write(UC_X86_REG_RIP, image.entry)
        uc.reg_write(UC_X86_REG_RSP, 0x100000)
        uc.reg_write(UC_X86_REG_RDI, mem_size)
        uc.reg_write(UC_X86_REG_RFLAGS, 2)
        self.out = bytearray()
        self.status: int | None = None
        self.pit_divisor = 0
        self.pit_lo: int | None = None
        self.pic_base = 0x08
        self.pic_mask = 0xFF
        self.pic_icw = 0
        self.irq_pending = False
        self.in_service = False
        self.delivered: dict[int, int] = {}
        self.error: str | None = None
        uc.hook_add(UC_HOOK_INSN, self._in, None, 1, 0, UC_X86_INS_IN)
        uc.hook_add(UC_HOOK_INSN, self._out, None, 1, 0, UC_X86_INS_OUT)
        uc.hook_add(UC_HOOK_INTR, self._intr)
        uc.hook_add(UC_HOOK_INSN_INVALID, self._invalid)

    # ---- memory through the guest's page tables
    def lin2phys(self, va: int) -> int:
        uc = self.uc
        if not uc.reg_read(UC_X86_REG_CR0) & 0x80000000:
            return va
        table = uc.reg_read(UC_X86_REG_CR3) & 0x000FFFFFFFFFF000
        for shift in (39, 30, 21, 12):
            e = struct.unpack("<Q", uc.mem_read(table + ((va >> shift) & 511) * 8, 8))[0]
            if not e & 1:
                raise HarnessError(f"harness: {va:#x} not mapped")
            if shift in (30, 21) and e & 0x80:
                size = 1 << shift
                return (e & 0x000FFFFFFFFFF000 & ~(size - 1)) | (va & (size - 1))
            table = e & 0x000FFFFFFFFFF000
        return table | (va & 0xFFF)

    def read(self, va: int, n: int) -> bytes:
        out = b""
        while n:
            chunk = min(n, 0x1000 - (va & 0xFFF))
            out += bytes(self.uc.mem_read(self.lin2phys(va), chunk))
            va += chunk
            n -= chunk
        return out

    def write(self, va: int, data: bytes) -> None:
        while data:
            chunk = min(len(data), 0x1000 - (va & 0xFFF))
            self.uc.mem_write(self.lin2phys(va), data[:chunk])
            va += chunk
            data = data[chunk:]

    # ---- devices
    def _in(self, uc, port, size, ud):
        if port == 0x3FD:
            return 0x60
        if port == 0x21:
            return self.pic_mask
        return 0

    def _out(self, uc, port, size, value, ud):
        value &= 0xFF
        if port == 0x3F8:
            self.out.append(value)
        elif port == 0xF4:
            self.status = value
            uc.emu_stop()
        elif port == 0x43:
            self.pit_lo = None
        elif port == 0x40:
            if self.pit_lo is None:
                self.pit_lo = value
            else:
                self.pit_divisor = self.pit_lo | (value << 8) or 0x10000
                self.pit_lo = None
                uc.emu_stop()  # switch to counted slices
        elif port == 0x20:
            if value & 0x10:
                self.pic_icw = 1
            elif value == 0x20:
                self.in_service = False
        elif port == 0x21:
            if self.pic_icw == 1:
                self.pic_base = value & 0xF8
                self.pic_icw = 2
            elif self.pic_icw in (2, 3):
                self.pic_icw = self.pic_icw + 1 if self.pic_icw == 2 else 0
            else:
                self.pic_mask = value

    def _invalid(self, uc):
        self.error = f"invalid instruction at {uc.reg_read(UC_X86_REG_RIP):#x}"
        uc.emu_stop()
        return True

    # ---- interrupt delivery
    def _intr(self, uc, intno, ud):
        try:
            rip = uc.reg_read(UC_X86_REG_RIP)
            software = False
            if intno == 3 and self._peek(rip - 1, 1) == b"\xcc":
                software = True
            elif intno >= 3 and self._peek(rip - 2, 2) == bytes([0xCD, intno]):
                software = True
            err = None
            if not software and intno in ERRCODE_VECTORS:
                blob = bytes(uc.context_save())
                err = struct.unpack_from("<i", blob, OFF_ERROR_CODE)[0] & 0xFFFFFFFF
            self.deliver(intno, err, software)
        except HarnessError as e:
            self.error = str(e)
            uc.emu_stop()

    def _peek(self, va: int, n: int) -> bytes | None:
        # The bytes before RIP, if mapped: a fault on a fetch at the start of a page (edges'
        # NX test) has nothing mapped just before it, and is not a software interrupt.
        try:
            return self.read(va, n)
        except HarnessError:
            return None

    def deliver(self, vec: int, err: int | None = None, software: bool = False) -> None:
        uc = self.uc
        self.delivered[vec] = self.delivered.get(vec, 0) + 1
        _, idt_base, idt_limit, _ = uc.reg_read(UC_X86_REG_IDTR)
        if vec * 16 + 15 > idt_limit:
            raise HarnessError(f"vector {vec:#x} beyond the IDT limit")
        lo, hi = struct.unpack("<QQ", self.read(idt_base + vec * 16, 16))
        target = (lo & 0xFFFF) | ((lo >> 32) & 0xFFFF0000) | ((hi & 0xFFFFFFFF) << 32)
        sel = (lo >> 16) & 0xFFFF
        ist = (lo >> 32) & 7
        attr = (lo >> 40) & 0xFF
        gtype, dpl = attr & 0xF, (attr >> 5) & 3
        if not attr & 0x80 or gtype not in (0xE, 0xF):
            raise HarnessError(f"vector {vec:#x}: gate not present or not a 64-bit gate")
        cs = uc.reg_read(UC_X86_REG_CS)
        cpl = cs & 3
        if software and dpl < cpl:
            return self.deliver(13, vec * 8 + 2)
        rsp = uc.reg_read(UC_X86_REG_RSP)
        ss = uc.reg_read(UC_X86_REG_SS)
        rflags = uc.reg_read(UC_X86_REG_RFLAGS)
        rip = uc.reg_read(UC_X86_REG_RIP)
        new_cpl = sel & 3  # the kernel code selector's RPL (DPL 0 in our GDT)
        _, tr_base, _, _ = uc.reg_read(UC_X86_REG_TR)
        if ist:
            new_rsp = struct.unpack("<Q", self.read(tr_base + 0x24 + (ist - 1) * 8, 8))[0]
        elif cpl != new_cpl:
            new_rsp = struct.unpack("<Q", self.read(tr_base + 4, 8))[0]
        else:
            new_rsp = rsp
        new_rsp &= ~0xF
        frame = [rip, cs, rflags, rsp, ss]
        if err is not None:
            frame = [err] + frame
        new_rsp -= 8 * len(frame)
        self.write(new_rsp, struct.pack(f"<{len(frame)}Q", *frame))
        ctx = uc.context_save()
        blob = bytearray(bytes(ctx))
        struct.pack_into("<i", blob, OFF_OLD_EXCEPTION, -1)
        if cpl != new_cpl:
            _, gdt_base, _, _ = uc.reg_read(UC_X86_REG_GDTR)
            e1, e2 = struct.unpack("<II", self.read(gdt_base + (sel & ~7), 8))
            hfl = struct.unpack_from("<I", blob, OFF_HFLAGS)[0]
            struct.pack_into("<I", blob, OFF_HFLAGS, (hfl & ~3) | new_cpl)
            struct.pack_into("<IIQII", blob, OFF_CS, sel, 0, 0, 0xFFFFFFFF, e2)
            struct.pack_into("<IIQII", blob, OFF_SS, new_cpl, 0, 0, 0, new_cpl << 13)
        ctypes.memmove(ctx.context, bytes(blob), ctx.size)
        uc.context_restore(ctx)
        uc.reg_write(UC_X86_REG_RSP, new_rsp)
        uc.reg_write(UC_X86_REG_RIP, target)
        clear = 0x100 | 0x4000 | 0x10000 | 0x20000
        if gtype == 0xE:
            clear |= 0x200
        uc.reg_write(UC_X86_REG_RFLAGS, rflags & ~clear)

    # ---- main loop
    def run(self, max_insns: int = 2_000_000_000) -> RunResult:
        uc = self.uc
        used = 0
        reason = "?"
        while True:
            rip = uc.reg_read(UC_X86_REG_RIP)
            if self.pit_divisor:
                count = self.pit_divisor * INSNS_PER_PIT_TICK
                uc.emu_start(rip, 0, count=count)
                used += count
                self.irq_pending = True
            else:
                uc.emu_start(rip, 0)
            if self.error:
                reason = self.error
                break
            if self.status is not None:
                reason = "exit"
                break
            rip = uc.reg_read(UC_X86_REG_RIP)
            halted = self.read(rip - 1, 1) == b"\xf4"
            rflags = uc.reg_read(UC_X86_REG_RFLAGS)
            if halted and not rflags & 0x200:
                reason = "cli; hlt"
                self.status = 0
                break
            if halted and not self.pit_divisor:
                reason = "hlt with no timer"
                break
            if self.irq_pending and rflags & 0x200 and not self.pic_mask & 1 \
                    and not self.in_service:
                self.irq_pending = False
                self.in_service = True
                self.deliver(self.pic_base)
            if used > max_insns:
                reason = "instruction budget exhausted"
                break
        return RunResult(self.status, self.out.decode("latin-1"), reason, used,
                         dict(self.delivered))


def run_image(image, mem_size: int = 64 << 20, max_insns: int = 2_000_000_000) -> RunResult:
    return NativeVM(image, mem_size).run(max_insns)


if __name__ == "__main__":
    import sys
    import time

    from hvmodel.guest.asm import build_file

    for path in sys.argv[1:]:
        t = time.time()
        r = run_image(build_file(path))
        print(r.output, end="")
        print(f"[{path}: status {r.status} ({r.reason}), {time.time() - t:.2f} s, "
              f"vectors {r.delivered}]")
