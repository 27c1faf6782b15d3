"""Load a guest for `hvmodel run`: an assembly source, a kernel (Multiboot / ELF64) or a flat binary."""

from __future__ import annotations

from pathlib import Path

from ..boot.loader import is_kernel, load_kernel
from .asm import build
from .image import DEFAULT_LOAD_ADDR, GuestBuildError, GuestImage

__all__ = ["load_guest", "GuestImage", "GuestBuildError"]

ASM_SUFFIXES = {".asm", ".s", ".S"}


def load_guest(path: str | Path, *, load_addr: int = DEFAULT_LOAD_ADDR,
               include_dirs: list[Path] | None = None, append: str | None = None,
               modules: list[str] | None = None) -> GuestImage:
    """`.asm` (or `.s`) files are assembled and verified (see hvmodel.guest.asm); an ELF file
    or a file with a Multiboot header is booted as QEMU's ``-kernel`` would
    (hvmodel.boot.loader, with the command line ``append`` and boot ``modules``); any
    other file is a flat binary loaded at `load_addr` and entered at its first byte."""
    p = Path(path)
    if not p.exists():
        raise GuestBuildError(f"guest {p}: no such file")
    if p.is_dir():
        raise GuestBuildError(f"guest {p}: is a directory, expected a .asm source or a flat binary")
    if not p.is_file():
        raise GuestBuildError(f"guest {p}: not a regular file")
    if p.suffix in ASM_SUFFIXES:
        return build(p, load_addr=load_addr, include_dirs=include_dirs)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise GuestBuildError(f"guest {p}: cannot read: {e.strerror or e}") from e
    if is_kernel(p, data):
        return load_kernel(path, append=append or "", modules=modules, data=data)
    if append is not None or modules:
        raise GuestBuildError(f"guest {p}: a command line or modules need a kernel (ELF or Multiboot), "
                              f"not a flat binary")
    if not data:
        raise GuestBuildError(f"guest {p}: empty file (a flat binary must contain code)")
    return GuestImage(code=data, load_addr=load_addr, entry=load_addr, symbols={},
                      source_name=p.name)
