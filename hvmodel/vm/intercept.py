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
counts an exit and, if a piece of a large page may be in Unicorn's TLB (a fill
since the last flush came from a large guest page), flushes the whole TLB before
the instruction runs. Candidates that are not INVLPG (the
pattern inside other instructions' bytes) only cost a hook call.

Limits (documented, not silently wrong): an INVLPG that straddles two code pages
is not scanned. Code rewritten in place is rescanned when the VMM drops stale
translated code, not on a plain guest store.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from capstone import CS_ARCH_X86, CS_MODE_64, Cs
from capstone import x86_const as CX
from unicorn import UC_HOOK_CODE

if TYPE_CHECKING:
    from .vcpu import VCpu

_cs = Cs(CS_ARCH_X86, CS_MODE_64)


class InvlpgIntercept:
    """Finds INVLPG sites in fetched code pages and hooks them."""

    def __init__(self, vcpu: "VCpu") -> None:
        self.vcpu = vcpu
        self.scanned: set[tuple[int, int]] = set()   # (guest-virtual page, machine page)
        self.sites: set[int] = set()
        self.decoded: dict[tuple[int, bytes], bool] = {}
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
                    self.vcpu.uc.hook_add(UC_HOOK_CODE, self._on_site, None, max(va_page, site - 4), site)
            i = data.find(b"\x0f\x01", i + 1)

    def forget(self) -> None:
        """Code frames were rewritten: scan pages again when they are next fetched."""
        self.scanned.clear()

    def _on_site(self, uc, address: int, size: int, _ud: object) -> None:
        try:
            code = self.vcpu.vmem_read(address, size, peek=True)
        except Exception:  # not readable: not ours to judge, the CPU will fault
            return
        key = (address, code)
        is_invlpg = self.decoded.get(key)
        if is_invlpg is None:
            insn = next(_cs.disasm(code, address), None)
            is_invlpg = insn is not None and insn.id == CX.X86_INS_INVLPG
            self.decoded[key] = is_invlpg
        if not is_invlpg:
            return
        self.exits += 1
        # Which page it names does not matter: any piece of a large page may be
        # the one that changed, and there is no per-page flush (ENGINE-NOTES 2.3).
        if self.vcpu.large_in_tlb:
            self.vcpu.flush_tlb()
