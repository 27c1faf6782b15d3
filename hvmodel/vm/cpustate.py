"""Hidden CPU state that Unicorn does not expose as registers, edited through context blobs.

Two things a VMM must do that Unicorn 2.1.4 has no API for (docs/ENGINE.md U11, U24):

* clear QEMU's remembered "last contributory exception" (``old_exception``)
  after each fault the VMM delivers, or the next fault turns into #DF and the
  one after stops the CPU silently;
* change the CPL and load CS/SS descriptor caches when an event moves the guest
  from ring 3 to ring 0 (``reg_write(CS)`` only sets the selector).

Both are done by saving the CPU context, editing bytes of QEMU's CPUX86State
inside the blob, and restoring it. The offsets below are for unicorn 2.1.4 on
x86-64 and are *verified at start-up* by :func:`verify_offsets`, which runs a
probe (a #GP with a known error code, an ``int``, a real ``iretq`` to ring 3)
and checks each field; a mismatch stops with a clear message instead of
corrupting guest state. The instruction counter Unicorn keeps for
``emu_start(count=N)`` lives in ``uc_struct``; its offset is found the same way.
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass

from unicorn import UC_ARCH_X86, UC_HOOK_INTR, UC_HOOK_TLB_FILL, UC_MODE_64, UC_TLB_VIRTUAL, Uc, UcError
from unicorn import x86_const as X

CONTEXT_HEADER = 32           # struct uc_context: sizes, mode, arch, uc pointer
OFF_HFLAGS = 216              # u32, CPL in bits 1:0
OFF_SEGS = 224                # 6 × {u32 selector, u32 pad, u64 base, u32 limit, u32 flags}
SEG_SIZE = 24
SEG_ES, SEG_CS, SEG_SS, SEG_DS, SEG_FS, SEG_GS = range(6)
OFF_ERROR_CODE = 5424         # i32: the error code QEMU computed for the last exception
OFF_EXC_IS_INT = 5428         # i32: 1 when the last event was a software `int N`
OFF_EXC_NEXT_EIP = 5432       # u64: the RIP after the instruction that raised it
OFF_OLD_EXCEPTION = 5536      # i32: last contributory exception, -1 = none

HF_CPL_MASK = 3
# How much of uc_struct the probes search (the fields found live at ~1.4 KiB on 2.1.4).
_WINDOW = 0x4000


class EngineMismatch(RuntimeError):
    """The Unicorn build differs from the one whose internals hvmodel relies on."""


@dataclass(frozen=True)
class SegmentCache:
    """A segment register's hidden part, as QEMU stores it."""

    selector: int
    base: int
    limit: int
    flags: int


def descriptor_cache(selector: int, desc: int) -> SegmentCache:
    """The cache QEMU loads for a code/data descriptor (flags = the high dword, A set)."""
    lo, hi = desc & 0xFFFFFFFF, desc >> 32
    base = ((lo >> 16) & 0xFFFF) | ((hi & 0xFF) << 16) | (hi & 0xFF000000)
    limit = (lo & 0xFFFF) | (hi & 0x000F0000)
    if hi & (1 << 23):  # G: 4 KiB granularity
        limit = (limit << 12) | 0xFFF
    return SegmentCache(selector, base, limit, hi | (1 << 8))


class CpuStateEditor:
    """Edits one vCPU's hidden state through a reusable context blob."""

    def __init__(self, uc: Uc) -> None:
        self.uc = uc
        self.ctx = uc.context_save()
        self.size = self.ctx.size
        self.addr = self.ctx.context.value

    def _load(self) -> ctypes.Array:
        self.uc.context_update(self.ctx)
        return (ctypes.c_char * self.size).from_address(self.addr)

    def read_i32(self, off: int) -> int:
        """A signed 32-bit field of the current state."""
        return struct.unpack_from("<i", self._load(), off)[0]

    def exception_info(self) -> tuple[int, bool]:
        """(error code, was a software int) of the exception QEMU just raised."""
        blob = self._load()
        err, is_int = struct.unpack_from("<ii", blob, OFF_ERROR_CODE)
        return err & 0xFFFFFFFF, bool(is_int)

    def exception_next_rip(self) -> int:
        """The RIP after the instruction that raised the last exception (QEMU's
        ``exception_next_eip``): Unicorn reports ``int 6`` as an invalid instruction with
        RIP still on the int, and this is where the int ends."""
        return struct.unpack_from("<Q", self._load(), OFF_EXC_NEXT_EIP)[0]

    def segments(self) -> tuple[SegmentCache, ...]:
        """The six segment caches (ES, CS, SS, DS, FS, GS) as QEMU holds them now."""
        blob = self._load()
        return tuple(SegmentCache(*(v for i, v in enumerate(struct.unpack_from("<IIQII", blob, OFF_SEGS + k * SEG_SIZE))
                                    if i != 1)) for k in range(6))

    def edit(self, *, cpl: int | None = None, cs: SegmentCache | None = None,
             ss: SegmentCache | None = None, clear_old_exception: bool = True) -> None:
        """Apply the changes to the live CPU (RIP/RSP/RFLAGS are set separately)."""
        blob = self._load()
        if clear_old_exception:
            struct.pack_into("<i", blob, OFF_OLD_EXCEPTION, -1)
        if cpl is not None:
            hflags = struct.unpack_from("<I", blob, OFF_HFLAGS)[0]
            struct.pack_into("<I", blob, OFF_HFLAGS, (hflags & ~HF_CPL_MASK) | cpl)
        for seg, cache in ((SEG_CS, cs), (SEG_SS, ss)):
            if cache is not None:
                struct.pack_into("<IIQII", blob, OFF_SEGS + seg * SEG_SIZE,
                                 cache.selector, 0, cache.base, cache.limit, cache.flags)
        self.uc.context_restore(self.ctx)


# -- start-up verification -------------------------------------------------------------

_verified: dict[str, int] | None = None


def _probe_program() -> tuple[bytes, dict[str, int]]:
    """Machine code for the probe (hand-encoded: no assembler needed at start-up)."""
    # 0x1000: mov ax, 0x13 ; mov ds, ax        -> #GP(0x10)
    # 0x1006: int 0x80                          -> software interrupt
    # 0x1008: iretq (frame prepared by the VMM) -> ring 3 at 0x1100
    # 0x1100: nop ; hlt ... (hlt at CPL3 is #GP, we only need the state before it)
    code = bytearray(0x200)
    code[0:6] = bytes.fromhex("66b813008ed8")
    code[6:8] = bytes.fromhex("cd80")
    code[8:10] = bytes.fromhex("48cf")
    code[0x100:0x102] = bytes.fromhex("90f4")
    return bytes(code), {"gp": 0x1000, "int": 0x1006, "iretq": 0x1008, "user": 0x1100}


def verify_offsets() -> dict[str, int]:
    """Check every blob offset and find the instruction counter; cached per process."""
    global _verified
    if _verified is not None:
        return _verified
    code, at = _probe_program()
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, 0x10000)
    uc.mem_write(0x1000, code)
    # GDT at 0x3000: null, kernel code 0x08, kernel data 0x10, user data 0x18, user code 0x20
    gdt = [0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF, 0x00CFF2000000FFFF, 0x00AFFA000000FFFF]
    uc.mem_write(0x3000, b"".join(struct.pack("<Q", d) for d in gdt))
    uc.reg_write(X.UC_X86_REG_GDTR, (0, 0x3000, len(gdt) * 8 - 1, 0))
    events: list[int] = []

    def on_intr(uc_: Uc, intno: int, _ud: object) -> None:
        events.append(intno)
        uc_.emu_stop()

    uc.hook_add(UC_HOOK_INTR, on_intr)
    ed = CpuStateEditor(uc)
    found: dict[str, int] = {}
    try:
        uc.reg_write(X.UC_X86_REG_RSP, 0x8000)
        uc.emu_start(at["gp"], 0, count=10)
        err, is_int = ed.exception_info()
        if events != [13] or err != 0x10 or is_int or ed.read_i32(OFF_OLD_EXCEPTION) != 13:
            raise EngineMismatch(f"#GP probe: events {events}, error code {err:#x}, is_int {is_int}")
        ed.edit()  # clears old_exception
        if ed.read_i32(OFF_OLD_EXCEPTION) != -1:
            raise EngineMismatch("old_exception did not clear")
        events.clear()
        uc.emu_start(at["int"], 0, count=10)
        err, is_int = ed.exception_info()
        if events != [0x80] or not is_int or uc.reg_read(X.UC_X86_REG_RIP) != at["int"] + 2 \
                or ed.exception_next_rip() != at["int"] + 2:
            raise EngineMismatch(f"int probe: events {events}, is_int {is_int}, "
                                 f"next RIP {ed.exception_next_rip():#x}")
        # iretq to ring 3: frame RIP, CS, RFLAGS, RSP, SS
        frame = struct.pack("<QQQQQ", at["user"], 0x23, 0x2, 0x7000, 0x1B)
        uc.mem_write(0x7F00, frame)
        uc.reg_write(X.UC_X86_REG_RSP, 0x7F00)
        events.clear()
        uc.emu_start(at["iretq"], 0, count=2)  # iretq, nop; the count stops before hlt
        blob = ed._load()
        hflags = struct.unpack_from("<I", blob, OFF_HFLAGS)[0]
        cs_sel = struct.unpack_from("<I", blob, OFF_SEGS + SEG_CS * SEG_SIZE)[0]
        ss_sel = struct.unpack_from("<I", blob, OFF_SEGS + SEG_SS * SEG_SIZE)[0]
        if hflags & 3 != 3 or cs_sel != 0x23 or ss_sel != 0x1B:
            raise EngineMismatch(f"ring-3 probe: hflags {hflags:#x}, CS {cs_sel:#x}, SS {ss_sel:#x}")
        # Back to ring 0 by editing the blob, as event delivery does.
        ed.edit(cpl=0, cs=descriptor_cache(0x08, gdt[1]), ss=SegmentCache(0, 0, 0, 0))
        if uc.reg_read(X.UC_X86_REG_CS) != 0x08:
            raise EngineMismatch("CS cache edit not visible")
        found["emu_counter"] = _find_counter(uc, at)
        found["invalid_addr"] = _find_invalid_addr()
    except UcError as e:
        raise EngineMismatch(f"probe failed: {e}") from None
    finally:
        del ed
    _verified = found
    return found


def _find_counter(uc: Uc, at: dict[str, int]) -> int:
    """Offset of uc_struct.emu_counter: the u64 that equals known instruction counts."""
    handle = uc._uch.value
    candidates: set[int] | None = None
    # mov ecx, n ; l: dec ecx ; jnz l ; hlt  executes 2n + 2 instructions. Counts this
    # large and distinct do not occur by chance in the scanned window (small ones did).
    for i, n in enumerate((601, 1103, 1709)):
        start = 0x2000 + 0x100 * i  # fresh addresses: mem_write does not drop translated code
        uc.mem_write(start, b"\xb9" + n.to_bytes(4, "little") + b"\xff\xc9\x75\xfc\xf4")
        uc.emu_start(start, 0, count=100_000)
        window = ctypes.string_at(handle, _WINDOW)
        hits = {off for off in range(0, len(window) - 8, 8)
                if struct.unpack_from("<Q", window, off)[0] == 2 * n + 2}
        candidates = hits if candidates is None else candidates & hits
    if not candidates or len(candidates) != 1:
        raise EngineMismatch(f"cannot locate the instruction counter (candidates {sorted(candidates or [])[:8]})")
    return candidates.pop()


def _find_invalid_addr() -> int:
    """Offset of uc_struct.invalid_addr: the exact address of a refused TLB fill.

    The fill hook only sees the page; CR2 needs the byte address of the access,
    which Unicorn records here when the hook refuses (unicorn_vtlb.c).
    """
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)
    uc.mem_map(0, 0x10000)

    def fill(uc_: Uc, va: int, _acc: int, entry: object, _ud: object) -> bool:
        if va >= 0x10000:
            return False  # the probe addresses: refused
        entry.paddr = va
        entry.perms = 7
        return True

    uc.hook_add(UC_HOOK_TLB_FILL, fill)
    handle = uc._uch.value
    candidates: set[int] | None = None
    # Unusual canonical addresses (one straddles a page): such values do not occur by
    # chance in the scanned window; small ones did.
    for i, addr in enumerate((0x5A5A_1234_5123, 0x6B6B_2345_6FF9, 0x7C7C_3456_7ABC)):
        start = 0x1000 + 0x100 * i
        uc.mem_write(start, bytes.fromhex("488b03f4"))  # mov rax, [rbx] ; hlt
        uc.reg_write(X.UC_X86_REG_RBX, addr)
        try:
            uc.emu_start(start, 0, count=100)
        except UcError:
            pass
        window = ctypes.string_at(handle, _WINDOW)
        hits = {off for off in range(0, len(window) - 8, 8)
                if struct.unpack_from("<Q", window, off)[0] == addr}
        candidates = hits if candidates is None else candidates & hits
    if not candidates or len(candidates) != 1:
        raise EngineMismatch("cannot locate the refused-fill address in uc_struct")
    return candidates.pop()
