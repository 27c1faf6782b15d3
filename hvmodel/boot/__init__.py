"""Booting kernels the way QEMU's ``-kernel`` does: Multiboot v1 and ELF64 images.

``loader.load_kernel`` recognises the format, ``multiboot`` knows the Multiboot v1
header and the information structure, ``elf`` reads ELF program headers (with
pyelftools), and ``entry`` puts the vCPU into the documented entry state.
"""
