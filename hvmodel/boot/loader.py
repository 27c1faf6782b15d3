"""Load a kernel image as ``qemu-system-x86_64 -kernel`` would, and install it in a VM.

Which contract applies (checked in this order):

1. a valid Multiboot v1 header in the first 8 KiB: Multiboot. With flag 16 the
   header's address fields place the file (any format, ELF64 included); without
   it the file must be ELF32 and is loaded by its program headers. Entry in
   32-bit protected mode (:func:`hvmodel.boot.entry.enter_protected32`).
2. an ELF64 x86-64 executable without a Multiboot header: loaded by its program
   headers (physical addresses), entered in long mode with the loader's identity
   tables (:func:`hvmodel.boot.entry.enter_long64`), RDI = the info structure.
3. anything else with the ELF magic is refused with the reason.

The Multiboot information structure and memory map are given in both cases
(``multiboot.build_info``). Every byte the loader places must fit in guest
memory and stay clear of the loader's own areas; otherwise the image is refused
with a message naming the segment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..guest.image import BootError, BootTarget, GuestImage
from . import entry as entry_mod
from .elf import ElfError, ElfImage, is_elf, read_elf
from .multiboot import (INFO_ADDR, INFO_SIZE, MMAP_ADDR, MultibootError, Module, build_info, find_header,
                        load_by_header)

KERNEL_SUFFIXES = {".elf", ".kernel", ".mb"}


@dataclass
class KernelBoot:
    """A parsed kernel and what to hand it; ``install(vm)`` loads it and sets the entry state."""

    name: str
    kind: str                                   # "multiboot" or "elf64"
    entry: int
    pieces: list[tuple[int, bytes, int]]        # (gpa, bytes, memsz): each zero-filled to memsz
    kernel_low: int
    kernel_size: int
    cmdline: str
    modules: list[Module] = field(default_factory=list)
    symbols: dict[str, int] = field(default_factory=dict)

    def layout(self, memsize: int) -> list[tuple[str, int, bytes, int]]:
        """Everything the loader writes: (what, gpa, bytes, size) — checked, not yet written."""
        info = build_info(self.kernel_low, self.kernel_size, memsize, self.cmdline, self.modules)
        out = [(f"segment {i} at {gpa:#x}", gpa, data, memsz) for i, (gpa, data, memsz) in enumerate(self.pieces)]
        for gpa, data in info.blobs:
            what = ("the memory map" if gpa == MMAP_ADDR else "the Multiboot info" if gpa == INFO_ADDR
                    else "a module" if any(gpa == m[0] for m in info.modules) else "the module list and strings")
            out.append((what, gpa, data, len(data)))
        for gpa, data in entry_mod.loader_blobs(self.kind == "elf64"):
            out.append(("the loader", gpa, data, len(data)))
        return out

    def install(self, vm: BootTarget) -> None:
        """Write the kernel, modules, info and loader into ``vm``'s memory; set the entry state.

        A piece outside guest memory or over the loader's areas is a :class:`BootError`."""
        memsize = vm.config.memsize
        pieces = self.layout(memsize)
        reserved = [("the loader's area", entry_mod.LOADER_BASE, entry_mod.LOADER_END),
                    ("the Multiboot info area", MMAP_ADDR, INFO_ADDR + INFO_SIZE)]
        for what, gpa, _data, size in pieces:
            if gpa + size > memsize:
                raise BootError(f"{self.name}: {what} ({gpa:#x}-{gpa + size:#x}) lies outside guest memory "
                              f"({memsize >> 20} MiB); give the VM more memory (--mem)")
            if what.startswith("segment"):
                for rname, lo, hi in reserved:
                    if gpa < hi and lo < gpa + size:
                        raise BootError(f"{self.name}: {what} ({gpa:#x}-{gpa + size:#x}) overlaps {rname} "
                                      f"({lo:#x}-{hi:#x})")
        for _what, gpa, data, size in pieces:
            vm.ram.write_gpa(gpa, data + bytes(size - len(data)))
        if self.kind == "multiboot":
            entry_mod.enter_protected32(vm, self.entry, INFO_ADDR)
        else:
            entry_mod.enter_long64(vm, self.entry, INFO_ADDR)


def is_kernel(path: Path, data: bytes) -> bool:
    """Should ``path`` be booted as a kernel (rather than run as a flat binary)?"""
    return path.suffix in KERNEL_SUFFIXES or is_elf(data) or _has_multiboot_magic(data)


def _has_multiboot_magic(data: bytes) -> bool:
    try:
        return find_header(data) is not None
    except MultibootError:
        return True  # a header with a bad checksum: refuse it as a kernel, with the reason


def load_kernel(path: str | Path, *, append: str = "", modules: list[str] | None = None,
                data: bytes | None = None) -> GuestImage:
    """Parse a Multiboot or ELF64 kernel; the returned image's ``boot`` installs it in a VM.

    ``append`` is the kernel command line after the file name (QEMU ``-append``);
    ``modules`` are "FILE [ARGS]" strings (QEMU ``-initrd``). Raises BootError.
    """
    p = Path(path)
    name = p.name
    if data is None:
        data = _read(p, "kernel")
    mods = []
    for spec in modules or []:
        fname = spec.split(" ", 1)[0]
        mods.append(Module(spec, _read(Path(fname), "module")))
    cmdline = f"{path} {append}"
    try:
        hdr = find_header(data, name)
        if hdr is not None:
            if hdr.has_addr:
                low, blob, size, entry = load_by_header(data, hdr, name)
                pieces = [(low, blob, size)]
                symbols = read_elf(data, name).symbols if is_elf(data) else {}
            else:
                elf = read_elf(data, name)
                if elf.bits == 64:
                    raise BootError(f"{name}: ELF64 kernel with a Multiboot header but without the address "
                                    f"fields (flag 16): QEMU refuses these; set flag 16, or drop the header "
                                    f"to boot it as an ELF64 kernel")
                pieces, low, size, entry, symbols = _elf_pieces(elf)
            kind = "multiboot"
        else:
            elf = read_elf(data, name)
            if elf.bits != 64:
                raise BootError(f"{name}: ELF32 kernel without a Multiboot header: nothing says how to "
                                f"enter it (add a Multiboot header)")
            pieces, low, size, entry, symbols = _elf_pieces(elf)
            kind = "elf64"
    except (ElfError, MultibootError) as e:
        raise BootError(str(e)) from None
    boot = KernelBoot(name=name, kind=kind, entry=entry, pieces=pieces, kernel_low=low, kernel_size=size,
                      cmdline=cmdline, modules=mods, symbols=symbols)
    # `code` is empty: the boot object places everything itself (and checks that it fits).
    return GuestImage(code=b"", load_addr=0, entry=entry, symbols=symbols, source_name=name, boot=boot)


def _elf_pieces(elf: ElfImage) -> tuple[list[tuple[int, bytes, int]], int, int, int, dict[str, int]]:
    pieces = [(s.paddr, s.data, s.memsz) for s in elf.segments]
    return pieces, elf.low, elf.high - elf.low, elf.entry, elf.symbols


def _read(p: Path, what: str) -> bytes:
    if not p.exists():
        raise BootError(f"{what} {p}: no such file")
    if not p.is_file():
        raise BootError(f"{what} {p}: not a regular file")
    try:
        return p.read_bytes()
    except OSError as e:
        raise BootError(f"{what} {p}: cannot read: {e.strerror or e}") from None
