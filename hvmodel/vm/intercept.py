"""Instruction intercepts: the VMM sees the guest's INVLPG, as with "INVLPG exiting".

Why it is needed: the fill hook can only give Unicorn 4 KiB TLB entries
(``uc_tlb_entry`` has no page size), so a guest 2 MiB or 1 GiB page is cached as
4 KiB pieces. QEMU's own MMU records large pages and makes ``invlpg`` of any
address inside one flush them all (SDM §4.10.4.1); with our 4 KiB entries it
flushes one piece and the others would survive a change of the large mapping.
Found by ``hvmodel fuzz`` (seed 1, program 56).

How: when the vCPU first fetches from a guest-virtual code page, the page's
bytes are scanned for ``0F 01 /7`` (INVLPG m); each candidate gets a Unicorn
code hook on its address (up to 4 prefix bytes before it). The hook decodes the
instruction (capstone, cached per address and bytes); for a real INVLPG it
counts an exit, computes the address it names, and flushes the whole TLB before
the instruction runs if that address lies in a 2 MiB / 1 GiB region from which a
4 KiB piece was handed to Unicorn since the last flush. Candidates that are not INVLPG (the
pattern inside other instructions' bytes) only cost a hook call.

Cost: with ``emu_start(count=...)`` every instruction runs Unicorn's code-hook helper,
which checks the range of every UC_HOOK_CODE hook, so each site hook slows *every*
instruction, not only the INVLPG (measured: a tight loop of 12 M instructions, 0.155 s
with the count hook alone, 0.22 s with one more hook anywhere, 0.26 s with five; W1 of
``hvmodel bench`` pays this). Hooks cannot be armed only while a large-page piece is
cached: Unicorn decides at translation time whether an instruction calls the hooks, so a
hook added later misses code already translated (tried: the fuzz regression below
fails), and dropping translated code from inside a fill hook is unsafe.

Limits (documented, not silently wrong): an INVLPG that straddles two code pages
is not scanned. Code rewritten in place is rescanned when the VMM drops stale
translated code, not on a plain guest store.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

from capstone import CS_ARCH_X86, CS_MODE_64, CS_OP_MEM, Cs
from capstone import x86_const as CX
from unicorn import UC_HOOK_CODE, UcError
from unicorn import x86_const as X
from unicorn.unicorn_py3.unicorn import HOOK_CODE_CFUNC, uclib

if TYPE_CHECKING:
    from .vcpu import VCpu

_cs = Cs(CS_ARCH_X86, CS_MODE_64)
_cs.detail = True

# capstone register id -> unicorn register id, for the registers an address can use
_REGS = {getattr(CX, n): getattr(X, "UC_" + n) for n in dir(CX)
         if n.startswith("X86_REG_") and hasattr(X, "UC_" + n)}
_SEG_BASE = {CX.X86_REG_FS: X.UC_X86_REG_FS_BASE, CX.X86_REG_GS: X.UC_X86_REG_GS_BASE}


class InvlpgIntercept:
    """Finds INVLPG sites in fetched code pages and hooks them."""

    def __init__(self, vcpu: "VCpu") -> None:
        self.vcpu = vcpu
        self.scanned: set[tuple[int, int]] = set()   # (guest-virtual page, machine page)
        self.sites: set[int] = set()
        # Raw ctypes callback and register reads: the binding's wrappers cost a few
        # microseconds per call, and a site hook runs at every INVLPG the guest does.
        self._cb = HOOK_CODE_CFUNC(self._on_site_raw)
        self._cb_ptr = ctypes.cast(self._cb, ctypes.c_void_p)
        self._reg = ctypes.c_uint64()
        self._reg_ref = ctypes.byref(self._reg)
        # (address, bytes) -> the memory operand (base, index, scale, disp, segment), or
        # None when the bytes are not an INVLPG after all
        self.decoded: dict[tuple[int, bytes], tuple | None] = {}
        self.exits = 0

    def scan(self, va_page: int, mpa_page: int) -> None:
        """Look for INVLPG encodings in a code page the vCPU is about to execute."""
        key = (va_page, mpa_page)
        if key in self.scanned:
            return
        self.scanned.add(key)
        data = bytes(self.vcpu.mv[mpa_page:mpa_page + 0x1000])
        i = data.find(b"\x0f\x01")
        while i >= 0 and i + 2 < len(data):
            modrm = data[i + 2]
            if (modrm >> 3) & 7 == 7 and modrm >> 6 != 3:
                site = va_page + i
                if site not in self.sites:
                    self.sites.add(site)
                    self._hook(site, max(va_page, site - 4))  # up to 4 prefix bytes
            i = data.find(b"\x0f\x01", i + 1)

    def _hook(self, site: int, lo: int) -> None:
        hh = ctypes.c_size_t()
        err = uclib.uc_hook_add(self.vcpu.h, ctypes.byref(hh), UC_HOOK_CODE, self._cb_ptr, None,
                                ctypes.c_uint64(lo), ctypes.c_uint64(site))
        if err:
            raise UcError(err)

    def forget(self) -> None:
        """Code frames were rewritten: scan pages again when they are next fetched."""
        self.scanned.clear()

    def _on_site_raw(self, _h: int, address: int, size: int, _ud: int) -> None:
        try:
            self._on_site(address, size)
        except BaseException as exc:  # never let an exception unwind through C
            self.vcpu._hook_failed(exc)

    def _read(self, rid: int) -> int:
        uclib.uc_reg_read(self.vcpu.h, rid, self._reg_ref)
        return self._reg.value

    def _on_site(self, address: int, size: int) -> None:
        try:
            code = self.vcpu.vmem_read(address, size, peek=True)
        except Exception:  # not readable: not ours to judge, the CPU will fault
            return
        key = (address, code)
        if key in self.decoded:
            operand = self.decoded[key]
        else:
            operand = self.decoded[key] = self._decode(code, address)
        if operand is None:
            return
        self.exits += 1
        v = self.vcpu
        if not (v.large_2m or v.large_1g):
            return
        base, index, scale, disp, seg = operand
        target = disp + (self._read(base) if base else 0) + (self._read(index) * scale if index else 0)
        if seg:
            target += self._read(seg)
        target &= (1 << 64) - 1
        # Unicorn drops only the 4 KiB entry of the target; the other pieces of a large
        # page around it must go too, and there is no per-page flush (docs/ENGINE.md U5, U6).
        if target >> 21 in v.large_2m or target >> 30 in v.large_1g:
            v.flush_tlb()

    @staticmethod
    def _decode(code: bytes, address: int) -> tuple | None:
        insn = next(_cs.disasm(code, address), None)
        if insn is None or insn.id != CX.X86_INS_INVLPG:
            return None
        for op in insn.operands:
            if op.type == CS_OP_MEM:
                m = op.mem
                if m.base == CX.X86_REG_RIP:
                    return (0, _REGS.get(m.index) if m.index else 0, m.scale, insn.address + insn.size + m.disp,
                            _SEG_BASE.get(m.segment, 0))
                return (_REGS.get(m.base, 0) if m.base else 0, _REGS.get(m.index, 0) if m.index else 0,
                        m.scale, m.disp, _SEG_BASE.get(m.segment, 0))
        return None
