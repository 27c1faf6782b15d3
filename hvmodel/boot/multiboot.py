"""Multiboot v1 as QEMU's ``-kernel`` implements it (hw/i386/multiboot.c, optionrom/multiboot.S).

The kernel side: a 12-dword header, 4-byte aligned in the first 8 KiB of the file,
``magic + flags + checksum == 0 (mod 2**32)``. With flag 16 ("address fields
valid") the header says where the file's bytes go — this also boots ELF64 files,
whose program headers a Multiboot v1 loader does not read; without it the file
must be an ELF32 executable loaded by its program headers.

The loader side, laid out like QEMU's:

* the kernel from its load address, BSS zeroed, the buffer rounded up to a page;
* right after it: the module list (16 bytes per module), the module command
  lines, the kernel command line ``"<kernel> <append>"``, the loader name
  ``"qemu"`` — rounded up to a page; then each module, page-aligned;
* the information structure at 0x9500 with flags 0x24f (memory, boot device,
  command line, modules, memory map, loader name): mem_lower 639 KiB, mem_upper
  the KiB of contiguous RAM above 1 MiB, boot device 0x8000ffff;
* an E820-style memory map at 0x9000 (what SeaBIOS reports for a PC without
  ACPI tables): 0-0x9fc00 RAM, the EBDA and the BIOS area reserved, RAM from
  1 MiB to the end of guest memory, the BIOS ROM below 4 GiB reserved.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MB_HEADER_MAGIC = 0x1BADB002
MB_BOOT_MAGIC = 0x2BADB002     # EAX at entry
MB_SEARCH = 8192               # the header must lie in the first 8 KiB
MB_HEADER_SIZE = 48            # 12 dwords (the video fields included)
MB_FLAG_VIDEO = 1 << 2
MB_FLAG_ADDR = 1 << 16

MMAP_ADDR = 0x9000             # QEMU: MULTIBOOT_STRUCT_ADDR
INFO_ADDR = MMAP_ADDR + 0x500  # 0x9500
INFO_SIZE = 88
INFO_FLAGS = 0x24F             # MEMORY | BOOT_DEVICE | CMDLINE | MODULES | MMAP | LOADER_NAME
MEM_LOWER_KIB = 639
BOOT_DEVICE = 0x8000FFFF
LOADER_NAME = "qemu"           # what QEMU reports; kernels that print it expect this
MOD_ENTRY_SIZE = 16
PAGE = 0x1000

E820_RAM = 1
E820_RESERVED = 2
EBDA_START = 0x9FC00
BIOS_AREA = (0xF0000, 0x10000)
BIOS_ROM = (0xFFFC0000, 0x40000)


class MultibootError(ValueError):
    """A Multiboot image QEMU would refuse, or one this loader cannot place (the message says why)."""


@dataclass(frozen=True)
class MultibootHeader:
    """The header fields (the address fields mean something only with flag 16)."""

    offset: int        # file offset of the magic
    flags: int
    header_addr: int
    load_addr: int
    load_end_addr: int
    bss_end_addr: int
    entry_addr: int

    @property
    def has_addr(self) -> bool:
        return bool(self.flags & MB_FLAG_ADDR)


def find_header(data: bytes, name: str = "kernel") -> MultibootHeader | None:
    """The first valid header in the first 8 KiB, or None if there is no magic at all.

    A magic whose checksum does not add up is skipped, as QEMU does; if no valid
    header follows, that is an error (the file was meant to be Multiboot).
    """
    bad_checksum = None
    limit = min(len(data), MB_SEARCH) - 12
    for off in range(0, limit + 1, 4):
        magic, flags, checksum = struct.unpack_from("<III", data, off)
        if magic != MB_HEADER_MAGIC:
            continue
        if (magic + flags + checksum) & 0xFFFFFFFF:
            bad_checksum = bad_checksum if bad_checksum is not None else (off, flags, checksum)
            continue
        fields = list(struct.unpack_from("<5I", data, off + 12)) if off + 32 <= len(data) else None
        if flags & MB_FLAG_ADDR and fields is None:
            raise MultibootError(f"{name}: truncated: the Multiboot header at {off:#x} has flag 16 but "
                                 f"its address fields run past the end of the file")
        return MultibootHeader(off, flags, *(fields or [0] * 5))
    if bad_checksum is not None:
        off, flags, checksum = bad_checksum
        want = (-(MB_HEADER_MAGIC + flags)) & 0xFFFFFFFF
        raise MultibootError(f"{name}: Multiboot header at offset {off:#x} has a bad checksum "
                             f"{checksum:#010x} (flags {flags:#x} need {want:#010x})")
    return None


def load_by_header(data: bytes, hdr: MultibootHeader, name: str = "kernel") -> tuple[int, bytes, int, int]:
    """Flag 16: ``(load_addr, file bytes to load, kernel size with BSS, entry)`` from the header.

    Checks what QEMU checks, with its meaning: the header must lie inside the
    loaded range, the end addresses must not precede the start, and the file
    must hold the bytes the header promises.
    """
    if hdr.header_addr < hdr.load_addr:
        raise MultibootError(f"{name}: Multiboot header_addr {hdr.header_addr:#x} is below "
                             f"load_addr {hdr.load_addr:#x}")
    text_offset = hdr.offset - (hdr.header_addr - hdr.load_addr)
    if text_offset < 0:
        raise MultibootError(f"{name}: Multiboot header_addr {hdr.header_addr:#x} puts the load start "
                             f"before the beginning of the file")
    if hdr.load_end_addr:
        if hdr.load_end_addr < hdr.load_addr:
            raise MultibootError(f"{name}: Multiboot load_end_addr {hdr.load_end_addr:#x} is below "
                                 f"load_addr {hdr.load_addr:#x}")
        load_size = hdr.load_end_addr - hdr.load_addr
    else:
        load_size = len(data) - text_offset
    if text_offset + load_size > len(data):
        raise MultibootError(f"{name}: truncated: the Multiboot header asks for {load_size:#x} bytes from "
                             f"file offset {text_offset:#x}, the file has {len(data):#x}")
    if hdr.bss_end_addr:
        if hdr.bss_end_addr < hdr.load_addr + load_size:
            raise MultibootError(f"{name}: Multiboot bss_end_addr {hdr.bss_end_addr:#x} is below the "
                                 f"end of the loaded image {hdr.load_addr + load_size:#x}")
        kernel_size = hdr.bss_end_addr - hdr.load_addr
    else:
        kernel_size = load_size
    return hdr.load_addr, data[text_offset:text_offset + load_size], kernel_size, hdr.entry_addr


@dataclass(frozen=True)
class Module:
    """A boot module: its command line (file name and arguments, as given) and its bytes."""

    cmdline: str
    data: bytes


def e820_map(memsize: int) -> list[tuple[int, int, int]]:
    """(base, length, type) entries for a PC with ``memsize`` bytes of RAM from 0."""
    return [(0, EBDA_START, E820_RAM),
            (EBDA_START, 0xA0000 - EBDA_START, E820_RESERVED),
            (BIOS_AREA[0], BIOS_AREA[1], E820_RESERVED),
            (0x100000, memsize - 0x100000, E820_RAM),
            (BIOS_ROM[0], BIOS_ROM[1], E820_RESERVED)]


def mem_upper_kib(entries: list[tuple[int, int, int]]) -> int:
    """KiB of RAM contiguous from 1 MiB (what multiboot.S computes from the E820 map)."""
    end = 0x100000
    grown = True
    while grown:
        grown = False
        for base, length, kind in entries:
            if kind == E820_RAM and base <= end < base + length and base + length < 1 << 32:
                end = base + length
                grown = True
    return (end - 0x100000) >> 10


def _page_up(n: int) -> int:
    return (n + PAGE - 1) & ~(PAGE - 1)


@dataclass
class BootInfo:
    """Guest-physical blobs the loader writes besides the kernel, and where the info is."""

    blobs: list[tuple[int, bytes]]
    info_addr: int
    end: int                            # first byte after everything the loader placed
    modules: list[tuple[int, int, str]]  # (start, end, cmdline) per module


def build_info(kernel_addr: int, kernel_size: int, memsize: int, cmdline: str,
               modules: list[Module]) -> BootInfo:
    """Lay out the module list, strings, modules, memory map and the info structure (QEMU's layout)."""
    buf_end = kernel_addr + _page_up(kernel_size)
    mods_addr = buf_end
    strings_at = mods_addr + MOD_ENTRY_SIZE * len(modules)
    strings = bytearray()

    def add_string(s: str) -> int:
        at = strings_at + len(strings)
        strings.extend(s.encode() + b"\0")
        return at

    mod_cmdlines = [add_string(m.cmdline) for m in modules]
    cmdline_at = add_string(cmdline)
    loader_at = add_string(LOADER_NAME)
    pos = _page_up(strings_at + len(strings))
    blobs: list[tuple[int, bytes]] = []
    table = bytearray()
    placed: list[tuple[int, int, str]] = []
    for m, cl in zip(modules, mod_cmdlines):
        blobs.append((pos, m.data))
        table += struct.pack("<IIII", pos, pos + len(m.data), cl, 0)
        placed.append((pos, pos + len(m.data), m.cmdline))
        pos = _page_up(pos + len(m.data))
    blobs.append((mods_addr, bytes(table) + bytes(strings)))

    entries = e820_map(memsize)
    mmap = b"".join(struct.pack("<IQQI", 20, base, length, kind) for base, length, kind in entries)
    blobs.append((MMAP_ADDR, mmap))
    info = struct.pack("<IIIIIII", INFO_FLAGS, MEM_LOWER_KIB, mem_upper_kib(entries), BOOT_DEVICE,
                       cmdline_at, len(modules), mods_addr)
    info += bytes(16)                                      # syms (a.out / ELF section table): not given
    info += struct.pack("<II", len(mmap), MMAP_ADDR)       # mmap_length, mmap_addr
    info += bytes(8)                                       # drives
    info += bytes(4)                                       # config table
    info += struct.pack("<I", loader_at)                   # boot_loader_name
    info += bytes(INFO_SIZE - len(info))                   # apm table, vbe
    blobs.append((INFO_ADDR, info))
    return BootInfo(blobs=blobs, info_addr=INFO_ADDR, end=pos, modules=placed)
