"""ELF executables: the loadable segments, the entry point and the symbols of a kernel.

Parsing is pyelftools'; this module adds what a boot loader must check before it
trusts a file: the class and machine, that every ``PT_LOAD`` segment lies inside
the file, and that ``p_memsz >= p_filesz``. Any defect is an :class:`ElfError` with
one sentence that names it, so ``hvmodel run`` can refuse the image cleanly.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

from elftools.common.exceptions import ELFError as _PyElfError
from elftools.elf.constants import P_FLAGS
from elftools.elf.elffile import ELFFile

ELF_MAGIC = b"\x7fELF"
EM_386 = "EM_386"
EM_X86_64 = "EM_X86_64"


class ElfError(ValueError):
    """The file is not an ELF executable this loader can use (the message says why)."""


@dataclass(frozen=True)
class Segment:
    """One ``PT_LOAD`` segment: ``data`` goes to ``paddr``; ``memsz - len(data)`` bytes of zeros follow."""

    paddr: int
    vaddr: int
    data: bytes
    memsz: int
    flags: str  # "rwx" letters, "-" for a missing right

    @property
    def end(self) -> int:
        return self.paddr + self.memsz


@dataclass
class ElfImage:
    """What a loader needs from an ELF executable."""

    bits: int                       # 32 or 64
    machine: str                    # "EM_386" or "EM_X86_64"
    entry: int
    segments: list[Segment]
    symbols: dict[str, int] = field(default_factory=dict)

    @property
    def low(self) -> int:
        return min(s.paddr for s in self.segments)

    @property
    def high(self) -> int:
        return max(s.end for s in self.segments)


def is_elf(data: bytes) -> bool:
    """Does ``data`` start with the ELF magic?"""
    return data[:4] == ELF_MAGIC


def read_elf(data: bytes, name: str = "kernel") -> ElfImage:
    """Parse an x86 ELF executable (ELF32 i386 or ELF64 x86-64) and check its segments."""
    if not is_elf(data):
        raise ElfError(f"{name}: not an ELF file (bad magic {data[:4]!r}, expected {ELF_MAGIC!r})")
    try:
        elf = ELFFile(io.BytesIO(data))
        bits = elf.elfclass
        machine = elf["e_machine"]
        etype = elf["e_type"]
        entry = elf["e_entry"]
        phnum = elf["e_phnum"]
        phoff = elf["e_phoff"]
        phentsize = elf["e_phentsize"]
    except (_PyElfError, ValueError, KeyError) as e:
        raise ElfError(f"{name}: malformed ELF header ({e})") from None
    if (bits, machine) not in ((32, EM_386), (64, EM_X86_64)):
        raise ElfError(f"{name}: ELF{bits} for {machine}, expected ELF32 i386 or ELF64 x86-64")
    if etype != "ET_EXEC":
        raise ElfError(f"{name}: ELF type {etype}, expected an executable (ET_EXEC)")
    if phnum == 0:
        raise ElfError(f"{name}: no program headers")
    if phoff + phnum * phentsize > len(data):
        raise ElfError(f"{name}: truncated: program headers end at byte {phoff + phnum * phentsize:#x} "
                       f"of a {len(data):#x}-byte file")
    segments: list[Segment] = []
    try:
        for i, ph in enumerate(elf.iter_segments()):
            if ph["p_type"] != "PT_LOAD" or ph["p_memsz"] == 0:
                continue
            off, filesz, memsz = ph["p_offset"], ph["p_filesz"], ph["p_memsz"]
            if off + filesz > len(data):
                raise ElfError(f"{name}: truncated: segment {i} needs file bytes {off:#x}-{off + filesz:#x}, "
                               f"the file has {len(data):#x}")
            if filesz > memsz:
                raise ElfError(f"{name}: segment {i} has p_filesz {filesz:#x} > p_memsz {memsz:#x}")
            fl = ph["p_flags"]
            flags = ("r" if fl & P_FLAGS.PF_R else "-") + ("w" if fl & P_FLAGS.PF_W else "-") + \
                    ("x" if fl & P_FLAGS.PF_X else "-")
            segments.append(Segment(ph["p_paddr"], ph["p_vaddr"], data[off:off + filesz], memsz, flags))
        symbols = _symbols(elf)
    except (_PyElfError, ValueError, KeyError, OSError) as e:
        raise ElfError(f"{name}: malformed ELF ({e})") from None
    if not segments:
        raise ElfError(f"{name}: no loadable (PT_LOAD) segment")
    return ElfImage(bits=bits, machine=machine, entry=entry, segments=segments, symbols=symbols)


def _symbols(elf: ELFFile) -> dict[str, int]:
    """Function and object symbols with addresses (for reports; gdb reads its own)."""
    out: dict[str, int] = {}
    tab = elf.get_section_by_name(".symtab")
    if tab is None:
        return out
    for sym in tab.iter_symbols():
        if sym.name and sym["st_info"]["type"] in ("STT_FUNC", "STT_OBJECT", "STT_NOTYPE") \
                and sym["st_shndx"] != "SHN_UNDEF":
            out.setdefault(sym.name, sym["st_value"])
    return out
