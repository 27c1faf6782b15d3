"""The CPU model the VMM presents through CPUID (every leaf answered by the VMM).

A Denverton-class Atom core (family 6, model 0x5F, stepping 1 — Unicorn's
``UC_CPU_X86_DENVERTON``, whose instructions the engine executes), advertising
only what hvmodel really implements:

* paging: PSE (2 MiB pages; legacy 4 MiB paging is not modelled), PAE, PGE,
  PAT (memory types are ignored, the bits are accepted), NX, 1 GiB pages,
  SMEP, SMAP, long mode; MAXPHYADDR 40, 48-bit linear addresses — exactly what
  ``mmu/walk.py`` checks. No PCID, no PKU, no LA57.
* the local APIC (xAPIC at 0xFEE00000; no x2APIC, no TSC-deadline timer);
* the instruction-set features of the model that the engine executes: FPU,
  TSC, MSR, CX8, SEP, CMOV, CLFLUSH, MMX, FXSR, SSE-SSE4.2, SSSE3, PCLMULQDQ,
  CX16, MOVBE, POPCNT, AES, SYSCALL, LAHF, FSGSBASE, ERMS; DE, VME and MCE (their
  CR4 bits exist in the engine). Not XSAVE (no leaf 0xD), RDRAND, MONITOR.
* the hypervisor bit (leaf 1 ECX bit 31) and the hypervisor leaf 0x40000000
  with ESXi's vendor string ``"VMwareVMware"``.

Leaves above the maximum return the highest basic leaf, as Intel CPUs do.
"""

from __future__ import annotations

import struct


def _regs(text: str) -> tuple[int, int, int]:
    """A 12-byte vendor string as EBX, EDX, ECX (CPUID's order for leaf 0)."""
    b, d, c = struct.unpack("<III", text.encode())
    return b, d, c


def _brand(text: str) -> list[tuple[int, int, int, int]]:
    raw = text.encode().ljust(48, b"\0")
    return [struct.unpack_from("<IIII", raw, 16 * i) for i in range(3)]


FAMILY_MODEL_STEPPING = 0x000506F1     # family 6, model 0x5F, stepping 1
MAX_BASIC = 0x7
MAX_EXTENDED = 0x80000008
HYPERVISOR_LEAF = 0x40000000

# Leaf 1 EDX
FPU, VME, DE, PSE, TSC, MSR, PAE, MCE, CX8, APIC, SEP, PGE, CMOV, PAT, CLFSH, MMX, FXSR, SSE, SSE2 = (
    1 << 0, 1 << 1, 1 << 2, 1 << 3, 1 << 4, 1 << 5, 1 << 6, 1 << 7, 1 << 8, 1 << 9, 1 << 11, 1 << 13,
    1 << 15, 1 << 16, 1 << 19, 1 << 23, 1 << 24, 1 << 25, 1 << 26)
LEAF1_EDX = FPU | VME | DE | PSE | TSC | MSR | PAE | MCE | CX8 | APIC | SEP | PGE | CMOV | PAT | CLFSH | MMX | \
    FXSR | SSE | SSE2
# Leaf 1 ECX: SSE3, PCLMULQDQ, SSSE3, CX16, SSE4.1, SSE4.2, MOVBE, POPCNT, AES, hypervisor
LEAF1_ECX = (1 << 0) | (1 << 1) | (1 << 9) | (1 << 13) | (1 << 19) | (1 << 20) | (1 << 22) | (1 << 23) | \
    (1 << 25) | (1 << 31)
# Leaf 7.0 EBX: FSGSBASE, SMEP, ERMS, SMAP
SMEP = 1 << 7
SMAP = 1 << 20
LEAF7_EBX = (1 << 0) | SMEP | (1 << 9) | SMAP
# 0x80000001: ECX LAHF/SAHF; EDX SYSCALL, NX, 1 GiB pages, LM
NX = 1 << 20
PDPE1GB = 1 << 26
LM = 1 << 29
EXT1_ECX = 1 << 0
EXT1_EDX = (1 << 11) | NX | PDPE1GB | LM

VENDOR = "GenuineIntel"
HYPERVISOR_VENDOR = "VMwareVMware"
BRAND = "hvmodel virtual CPU (Denverton model)"


def cpuid(leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
    """(EAX, EBX, ECX, EDX) of the modelled CPU for one leaf."""
    leaf &= 0xFFFFFFFF
    if HYPERVISOR_LEAF <= leaf < 0x80000000:
        if leaf == HYPERVISOR_LEAF:
            b, d, c = _regs(HYPERVISOR_VENDOR)
            return HYPERVISOR_LEAF, b, d, c   # this leaf's order is EBX, ECX, EDX
        return 0, 0, 0, 0
    if leaf >= 0x80000000:
        if leaf == 0x80000000:
            return MAX_EXTENDED, 0, 0, 0
        if leaf == 0x80000001:
            return 0, 0, EXT1_ECX, EXT1_EDX
        if 0x80000002 <= leaf <= 0x80000004:
            return _brand(BRAND)[leaf - 0x80000002]
        if leaf == 0x80000008:
            return 40 | (48 << 8), 0, 0, 0
        if leaf <= MAX_EXTENDED:
            return 0, 0, 0, 0
        leaf = MAX_BASIC  # out of range: the highest basic leaf (Intel)
    if leaf > MAX_BASIC:
        leaf = MAX_BASIC
    if leaf == 0:
        b, d, c = _regs(VENDOR)
        return MAX_BASIC, b, c, d
    if leaf == 1:
        # EBX: CLFLUSH line 8 qwords, 1 logical processor, APIC ID 0
        return FAMILY_MODEL_STEPPING, (8 << 8) | (1 << 16), LEAF1_ECX, LEAF1_EDX
    if leaf == 7:
        return (0, LEAF7_EBX, 0, 0) if subleaf == 0 else (0, 0, 0, 0)
    return 0, 0, 0, 0
