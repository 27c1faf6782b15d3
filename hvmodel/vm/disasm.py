"""Human-readable pieces of reports: disassembly, page walks, summaries."""

from __future__ import annotations

from typing import TYPE_CHECKING

from capstone import CS_ARCH_X86, CS_MODE_64, Cs

if TYPE_CHECKING:
    from .vcpu import VCpu

_cs = Cs(CS_ARCH_X86, CS_MODE_64)


def disassemble_at(vcpu: "VCpu", va: int, count: int = 1) -> str:
    """Disassemble guest code at a virtual address without side effects."""
    from .vcpu import GuestAccessFault
    try:
        code = vcpu.vmem_read(va, 16 * count, peek=True)
    except GuestAccessFault as f:
        return f"<{va:#x} not readable: fault {f.fault:#x}>"
    out = []
    for insn in _cs.disasm(code, va):
        out.append(f"{insn.address:#x}: {insn.mnemonic} {insn.op_str}".rstrip())
        if len(out) == count:
            break
    return "; ".join(out) if out else f"<undecodable bytes {code[:16].hex()}>"
