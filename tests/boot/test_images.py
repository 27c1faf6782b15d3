"""Kernel images: Multiboot headers and ELF files parsed as QEMU does; malformed ones refused clearly."""

from __future__ import annotations

import struct
import subprocess
import sys

import pytest

from hvmodel.boot.elf import ElfError, read_elf
from hvmodel.boot.multiboot import (MB_HEADER_MAGIC, MultibootError, MultibootHeader, build_info, e820_map,
                                    find_header, load_by_header, mem_upper_kib, Module)


def header(flags: int = 0x10003, *fields: int, checksum: int | None = None) -> bytes:
    cs = (-(MB_HEADER_MAGIC + flags)) & 0xFFFFFFFF if checksum is None else checksum
    return struct.pack("<III", MB_HEADER_MAGIC, flags, cs) + struct.pack(f"<{len(fields)}I", *fields)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hvmodel", *args], capture_output=True, text=True, timeout=120)


def refused(proc: subprocess.CompletedProcess, text: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("hvmodel: "), proc.stderr
    assert text in lines[0], lines[0]


def test_header_found_on_a_4_byte_boundary_in_the_first_8k():
    data = bytes(4096) + header(0x10003, 0x101000, 0x100000, 0, 0, 0x101020) + bytes(100)
    h = find_header(data)
    assert h == MultibootHeader(4096, 0x10003, 0x101000, 0x100000, 0, 0, 0x101020)
    assert find_header(bytes(8192) + header()) is None          # past 8 KiB: not looked at
    assert find_header(bytes(2) + header() + bytes(64)) is None  # not 4-byte aligned


def test_bad_checksum_is_skipped_then_refused():
    with pytest.raises(MultibootError, match="bad checksum 0x00000001"):
        find_header(header(0x3, checksum=1) + bytes(64))
    # a good header after a bad one wins, as in QEMU
    assert find_header(header(0x3, checksum=1) + header(0x3) + bytes(64)).offset == 12


def test_flag16_loads_from_the_header_fields():
    body = bytearray(0x3000)
    body[0x1000:0x1000 + 32] = header(0x10003, 0x100000, 0x100000, 0x101800, 0x104000, 0x100020)
    body[0x1800:0x1804] = b"TAIL"
    h = find_header(bytes(body))
    load, blob, size, entry = load_by_header(bytes(body), h)
    assert (load, len(blob), size, entry) == (0x100000, 0x1800, 0x4000, 0x100020)
    assert blob[:4] == struct.pack("<I", MB_HEADER_MAGIC)


@pytest.mark.parametrize("fields,message", [
    ((0x0FF000, 0x100000, 0, 0, 0), "header_addr 0xff000 is below load_addr"),
    ((0x100000, 0x100000, 0x0F0000, 0, 0), "load_end_addr 0xf0000 is below"),
    ((0x100000, 0x100000, 0x200000, 0, 0), "truncated"),
    ((0x100000, 0x100000, 0x100100, 0x100080, 0), "bss_end_addr 0x100080 is below"),
])
def test_flag16_inconsistent_fields_are_refused(fields, message):
    data = header(0x10000, *fields) + bytes(0x200)
    with pytest.raises(MultibootError, match=message):
        load_by_header(data, find_header(data))


def test_e820_map_and_mem_upper():
    m = e820_map(64 << 20)
    assert m[0] == (0, 0x9FC00, 1) and m[3] == (0x100000, (64 << 20) - 0x100000, 1)
    assert mem_upper_kib(m) == 63 * 1024


def test_info_layout_follows_qemu():
    info = build_info(0x100000, 0x2345, 16 << 20, "k.elf quiet", [Module("m.bin x", b"abc")])
    blobs = dict(info.blobs)
    # kernel buffer rounded up to a page, then module list + strings, then the module page-aligned
    assert info.modules == [(0x104000, 0x104003, "m.bin x")]
    lst = blobs[0x103000]
    start, end, cmd, _ = struct.unpack_from("<IIII", lst)
    assert (start, end) == (0x104000, 0x104003)
    assert lst[cmd - 0x103000:].startswith(b"m.bin x\0k.elf quiet\0qemu\0")
    flags, lower, upper, bootdev, cmdline, count, addr = struct.unpack_from("<7I", blobs[0x9500])
    assert (flags, lower, upper, count, addr) == (0x24F, 639, 15 * 1024, 1, 0x103000)
    assert blobs[0x9000][:4] == struct.pack("<I", 20)


def test_elf_errors_name_the_defect(tmp_path):
    with pytest.raises(ElfError, match="bad magic"):
        read_elf(b"\x7fELG" + bytes(60))


def _elf64(entry=0x100000, paddr=0x100000, filesz=0x10, memsz=0x10, truncate=None, machine=62) -> bytes:
    eh = struct.pack("<4sBBBBB7sHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 0, bytes(7), 2, machine, 1, entry,
                     64, 0, 0, 64, 56, 1, 64, 0, 0)
    ph = struct.pack("<IIQQQQQQ", 1, 7, 0x78, paddr, paddr, filesz, memsz, 0x1000)
    data = eh + ph + b"\x90" * 0x10
    return data[:truncate] if truncate else data


def test_malformed_images_are_refused_with_one_clear_message(tmp_path, kernels):
    mb, _ = kernels
    cases = []
    p = tmp_path / "badmagic.elf"
    p.write_bytes(b"\x7fELX" + bytes(200))
    cases.append((p, "not an ELF file (bad magic"))
    p = tmp_path / "badsum.bin"
    p.write_bytes(header(0x10003, checksum=0x1234) + bytes(64))
    cases.append((p, "bad checksum 0x00001234"))
    p = tmp_path / "trunc.elf"
    p.write_bytes(mb.read_bytes()[:0x2000])
    cases.append((p, "truncated"))
    p = tmp_path / "trunc-phdr.elf"
    p.write_bytes(_elf64(truncate=100))
    cases.append((p, "truncated: program headers end"))
    p = tmp_path / "big.elf"
    p.write_bytes(_elf64(paddr=0x10000000, memsz=0x1000))
    cases.append((p, "segment 0 at 0x10000000 (0x10000000-0x10001000) lies outside guest memory (64 MiB)"))
    p = tmp_path / "loader.elf"
    p.write_bytes(_elf64(paddr=0xF0000))
    cases.append((p, "overlaps the loader's area"))
    p = tmp_path / "arm.elf"
    p.write_bytes(_elf64(machine=40))
    cases.append((p, "ELF64 for EM_ARM"))
    for path, text in cases:
        refused(run_cli("run", str(path)), text)
    refused(run_cli("run", str(mb), "--initrd", str(tmp_path / "missing.bin")), "missing.bin: no such file")
    refused(run_cli("run", str(mb), "--gdb", "tcp:10.0.0.1:1234"), "loopback interface only")


def test_elf64_kernel_enters_in_long_mode_with_identity_tables(tmp_path):
    """A hand-made ELF64 whose code checks its entry state and reports through the debug-exit port."""
    from unicorn import x86_const as X
    from hvmodel.boot.loader import load_kernel
    from hvmodel.host.host import Host, HostConfig
    from hvmodel.vm.vm import VMConfig
    # mov eax, [0xfffffffF80100000] via the -2 GiB map would need 64-bit addressing: read rdi's info flags
    code = bytes.fromhex("8b07" "e6f4")  # mov eax, [rdi] ; out 0xf4, al
    data = _elf64(filesz=len(code), memsz=len(code))[:0x78] + code
    p = tmp_path / "tiny.elf"
    p.write_bytes(data)
    host = Host(HostConfig(memsize=64 << 20))
    vm = host.power_on(VMConfig(memsize=8 << 20, mmu="shadow"), load_kernel(p))
    v = vm.vcpu
    assert v.reg(X.UC_X86_REG_CS) == 0x28 and v.reg(X.UC_X86_REG_RDI) == 0x9500
    assert v.reg(X.UC_X86_REG_CR3) == 0xF1000 and v.reg(X.UC_X86_REG_CR0) & (1 << 31)
    res = vm.run(1000)
    assert res.exit_status == 0x4F  # low byte of the info flags 0x24f
    host.close()
