"""The engine facts hvmodel relies on (docs/ENGINE.md), each checked on the pinned engines.

One test per fact that can be checked in a few milliseconds, numbered as in docs/ENGINE.md.
They use Unicorn, keystone and capstone directly (no hvmodel code except the offsets probe),
so a different engine build fails here, by name, before it corrupts a guest elsewhere.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import unicorn
from capstone import CS_ARCH_X86, CS_MODE_64, Cs
from keystone import KS_ARCH_X86, KS_MODE_64, Ks, KsError
from unicorn import (UC_ARCH_X86, UC_ERR_EXCEPTION, UC_HOOK_CODE, UC_HOOK_INSN, UC_HOOK_INSN_INVALID,
                     UC_HOOK_INTR, UC_HOOK_TLB_FILL, UC_MEM_FETCH, UC_MEM_READ, UC_MEM_WRITE, UC_MODE_64,
                     UC_PROT_ALL, UC_PROT_EXEC, UC_PROT_READ, UC_PROT_WRITE, UC_TLB_VIRTUAL, Uc, UcError)
from unicorn import x86_const as X
from unicorn.unicorn_py3.unicorn import uclib

CODE = 0x1000
MEM = 0x800000
ks = Ks(KS_ARCH_X86, KS_MODE_64)
cs = Cs(CS_ARCH_X86, CS_MODE_64)


def asm(text: str, addr: int = CODE) -> bytes:
    enc, _ = ks.asm(text, addr, as_bytes=True)
    return enc


def machine(code: bytes, *, virtual: bool = False, fills: list | None = None, perms=UC_PROT_ALL,
            on_fill=None, model: int | None = None) -> Uc:
    """An 8 MiB flat machine with ``code`` at 0x1000; in virtual-TLB mode an identity fill hook."""
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    if model is not None:
        uc.ctl_set_cpu_model(model)      # before anything is mapped
    uc.mem_map(0, MEM)
    uc.mem_write(CODE, code)
    uc.reg_write(X.UC_X86_REG_RSP, 0x7F0000)
    if virtual:
        uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)

        def fill(uc_, vaddr, access, entry, _ud):
            if fills is not None:
                fills.append((vaddr, access))
            if on_fill is not None:
                r = on_fill(uc_, vaddr, access, entry)
                if r is not None:
                    return r
            entry.paddr = vaddr
            entry.perms = perms(vaddr, access) if callable(perms) else perms
            return True

        uc.hook_add(UC_HOOK_TLB_FILL, fill)
    return uc


def rip(uc: Uc) -> int:
    return uc.reg_read(X.UC_X86_REG_RIP)


def test_u0_the_pinned_version():
    assert unicorn.__version__ == "2.1.4"


# -- U1: the virtual TLB --------------------------------------------------------------------------

def test_u1_every_tlb_miss_calls_the_fill_hook_with_a_page_and_an_access_type():
    fills: list = []
    uc = machine(asm("mov rax, [rip + 0x3000]; mov [rip + 0x5000], rax; hlt"), virtual=True, fills=fills)
    uc.emu_start(CODE, 0)
    assert (0x1000, UC_MEM_FETCH) in fills
    assert any(access == UC_MEM_READ and va == 0x4000 for va, access in fills)
    assert any(access == UC_MEM_WRITE and va == 0x6000 for va, access in fills)
    assert all(va & 0xFFF == 0 for va, _ in fills)
    assert (UC_MEM_READ, UC_MEM_WRITE, UC_MEM_FETCH) == (16, 17, 18)


def test_u2_a_refused_fill_stops_at_the_instruction_and_delivers_nothing():
    intr: list = []
    target = 0x200000
    uc = machine(asm(f"nop; mov rax, [{target:#x}]; hlt".replace(f"[{target:#x}]", "[rbx]")), virtual=True,
                 on_fill=lambda uc_, va, acc, e: False if va == target else None)
    uc.reg_write(X.UC_X86_REG_RBX, target)
    uc.hook_add(UC_HOOK_INTR, lambda uc_, n, ud: intr.append(n))
    with pytest.raises(UcError) as e:
        uc.emu_start(CODE, 0)
    assert e.value.errno == UC_ERR_EXCEPTION
    assert rip(uc) == CODE + 1                     # the faulting load, not after it
    assert uc.reg_read(X.UC_X86_REG_CR2) == 0 and intr == []


def test_u3_a_write_to_a_page_filled_read_only_calls_the_hook_again():
    fills: list = []
    uc = machine(asm("mov rax, [rbx]; mov [rbx], rax; hlt"), virtual=True, fills=fills,
                 perms=lambda va, acc: UC_PROT_ALL if acc != UC_MEM_READ else UC_PROT_READ | UC_PROT_EXEC)
    uc.reg_write(X.UC_X86_REG_RBX, 0x200000)
    uc.emu_start(CODE, 0)
    data = [acc for va, acc in fills if va == 0x200000]
    assert data == [UC_MEM_READ, UC_MEM_WRITE]


def test_u4_cr0_pg_and_cr3_do_not_matter_in_virtual_tlb_mode():
    far = 0x7FFF_0000_0000

    def on_fill(uc_, va, acc, entry):
        if va == far:                              # the hook alone decides where a page lives
            entry.paddr, entry.perms = 0x200000, UC_PROT_ALL
            return True
        return None

    fills: list = []
    uc = machine(asm("mov rax, [rbx]; hlt"), virtual=True, fills=fills, on_fill=on_fill)
    uc.mem_write(0x200000, (0x1234).to_bytes(8, "little"))
    uc.reg_write(X.UC_X86_REG_CR4, uc.reg_read(X.UC_X86_REG_CR4) | 0x20)
    uc.reg_write(X.UC_X86_REG_CR3, 0x7FF000)       # all zeros: QEMU's walker would fault
    uc.reg_write(X.UC_X86_REG_CR0, uc.reg_read(X.UC_X86_REG_CR0) | 0x80000000)
    uc.reg_write(X.UC_X86_REG_RBX, far)
    uc.emu_start(CODE, 0)
    assert (far, UC_MEM_READ) in fills and uc.reg_read(X.UC_X86_REG_RAX) == 0x1234


# -- U2: flushes --------------------------------------------------------------------------------------

CTL_TLB_FLUSH = (1 << 30) | 11     # uc_ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE); no binding wrapper


def test_u5_the_tlb_flush_control_works_inside_the_fill_hook():
    fills: list = []

    def on_fill(uc_, va, acc, entry):
        if va == 0x200000 and acc == UC_MEM_READ:
            assert uclib.uc_ctl(uc_._uch, CTL_TLB_FLUSH) == 0
        return None

    uc = machine(asm("mov rax, [rcx]; mov rax, [rbx]; mov rax, [rcx]; hlt"), virtual=True, fills=fills,
                 on_fill=on_fill)
    uc.reg_write(X.UC_X86_REG_RBX, 0x200000)
    uc.reg_write(X.UC_X86_REG_RCX, 0x300000)
    uc.emu_start(CODE, 0)
    assert [va for va, acc in fills if va == 0x300000] == [0x300000, 0x300000]   # flushed: filled again


def test_u6_a_guest_invlpg_drops_one_4k_entry_only():
    fills: list = []
    uc = machine(asm("mov rax, [rbx]; mov rax, [rcx]; invlpg [rbx]; mov rax, [rbx]; mov rax, [rcx]; hlt"),
                 virtual=True, fills=fills)
    uc.reg_write(X.UC_X86_REG_RBX, 0x200000)
    uc.reg_write(X.UC_X86_REG_RCX, 0x201000)    # the next 4 KiB page (of the same 2 MiB)
    uc.emu_start(CODE, 0)
    assert [va for va, _ in fills].count(0x200000) == 2
    assert [va for va, _ in fills].count(0x201000) == 1


def test_u7_the_tlb_holds_256_entries_until_a_flush_lets_it_grow():
    pages = 1024
    fills: list = []
    loop = asm("xor ecx, ecx; l: mov rax, [rbx + rcx]; add rcx, 0x1000; cmp rcx, rdx; jne l; hlt")
    uc = machine(loop, virtual=True, fills=fills)
    uc.reg_write(X.UC_X86_REG_RBX, 0x100000)
    uc.reg_write(X.UC_X86_REG_RDX, pages * 0x1000)

    def one_pass() -> int:
        fills.clear()
        uc.emu_start(CODE, 0)
        return sum(1 for va, acc in fills if acc == UC_MEM_READ)

    one_pass()
    assert one_pass() >= pages - 8             # 1,024 pages do not fit: every one misses again
    for _ in range(4):                         # flushes after full passes: the TLB doubles each time
        uclib.uc_ctl(uc._uch, CTL_TLB_FLUSH)
        one_pass()
    assert one_pass() == 0


# -- U3: memory and translated code -------------------------------------------------------------------

def test_u8_one_buffer_in_two_instances_is_coherent_for_data():
    import ctypes
    import mmap
    buf = mmap.mmap(-1, MEM)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    a, b = Uc(UC_ARCH_X86, UC_MODE_64), Uc(UC_ARCH_X86, UC_MODE_64)
    for uc in (a, b):
        uc.mem_map_ptr(0, MEM, UC_PROT_ALL, addr)
    buf[CODE:CODE + 16] = asm("mov qword ptr [rbx], 42; hlt").ljust(16, b"\x90")
    a.reg_write(X.UC_X86_REG_RBX, 0x200000)
    a.emu_start(CODE, 0)
    assert int.from_bytes(b.mem_read(0x200000, 8), "little") == 42
    assert int.from_bytes(buf[0x200000:0x200008], "little") == 42
    del a, b


def test_u9_translated_code_survives_a_rewrite_from_outside_until_it_is_flushed():
    uc = machine(asm("mov eax, 1; hlt"))
    uc.emu_start(CODE, 0)
    uc.mem_write(CODE, asm("mov eax, 2; hlt"))   # not a guest store: the old translation stays
    uc.emu_start(CODE, 0)
    assert uc.reg_read(X.UC_X86_REG_RAX) == 1
    uc.ctl_flush_tb()
    uc.emu_start(CODE, 0)
    assert uc.reg_read(X.UC_X86_REG_RAX) == 2


# -- U4: events and instructions ---------------------------------------------------------------------

def test_u10_int_n_reaches_the_intr_hook_never_the_guest_idt():
    seen = []
    uc = machine(asm("int 0x80; hlt"))
    uc.hook_add(UC_HOOK_INTR, lambda uc_, n, ud: seen.append((n, rip(uc_))))
    uc.emu_start(CODE, 0)
    assert seen == [(0x80, CODE + 2)]             # RIP after the int: a trap


def test_u11_qemu_remembers_the_last_contributory_exception():
    # Two #DE handled by skipping the div (no delivery through an IDT): the second arrives as #DF.
    seen = []
    code = asm("div rcx; div rcx; hlt")

    def on_intr(uc_, n, ud):
        seen.append(n)
        uc_.reg_write(X.UC_X86_REG_RIP, rip(uc_) + 3)

    uc = machine(code)
    uc.hook_add(UC_HOOK_INTR, on_intr)
    uc.emu_start(CODE, 0, count=10)
    assert seen[:2] == [0, 8]


def test_u12_ud2_is_an_invalid_instruction_hook_not_vector_6():
    seen = []
    uc = machine(asm("ud2; hlt"))
    uc.hook_add(UC_HOOK_INTR, lambda uc_, n, ud: seen.append(("intr", n)))

    def invalid(uc_, ud):
        seen.append(("invalid", rip(uc_)))
        uc_.reg_write(X.UC_X86_REG_RIP, rip(uc_) + 2)
        return True

    uc.hook_add(UC_HOOK_INSN_INVALID, invalid)
    uc.emu_start(CODE, 0)
    assert seen == [("invalid", CODE)]


def test_u26_int_6_is_an_invalid_instruction_hook_with_rip_on_the_int():
    import struct

    from hvmodel.vm.cpustate import OFF_EXC_IS_INT, OFF_EXC_NEXT_EIP
    seen = []
    uc = machine(asm("nop; int 6; hlt"))
    uc.hook_add(UC_HOOK_INTR, lambda uc_, n, ud: seen.append(("intr", n)))

    def invalid(uc_, ud):
        blob = bytes(uc_.context_save())
        is_int, = struct.unpack_from("<i", blob, OFF_EXC_IS_INT)
        nxt, = struct.unpack_from("<Q", blob, OFF_EXC_NEXT_EIP)
        seen.append(("invalid", rip(uc_), is_int, nxt))
        uc_.reg_write(X.UC_X86_REG_RIP, nxt)
        return True

    uc.hook_add(UC_HOOK_INSN_INVALID, invalid)
    uc.emu_start(CODE, 0)
    assert seen == [("invalid", CODE + 1, 1, CODE + 3)]


def test_u13_hlt_returns_from_emu_start_after_the_hlt_without_a_hook():
    uc = machine(asm("nop; hlt; nop"))
    uc.emu_start(CODE, 0)
    assert rip(uc) == CODE + 2 and uc.mem_read(rip(uc) - 1, 1) == b"\xf4"


def test_u14_count_n_runs_exactly_n_instructions_and_resumes():
    uc = machine(asm("xor eax, eax; l: inc eax; jmp l"))
    uc.emu_start(CODE, 0, count=1001)              # xor, then 500 x (inc, jmp)
    assert uc.reg_read(X.UC_X86_REG_RAX) == 500
    uc.emu_start(rip(uc), 0, count=1)
    assert uc.reg_read(X.UC_X86_REG_RAX) == 501


def test_u15_emu_stop_from_the_fill_hook_of_a_store_leaves_rip_on_the_store():
    def on_fill(uc_, va, acc, entry):
        if acc == UC_MEM_WRITE:
            uc_.emu_stop()
        return None

    uc = machine(asm("mov qword ptr [rbx], 7; nop; hlt"), virtual=True, on_fill=on_fill)
    uc.reg_write(X.UC_X86_REG_RBX, 0x200000)
    uc.emu_start(CODE, 0)
    assert int.from_bytes(uc.mem_read(0x200000, 8), "little") == 7   # the store landed
    assert rip(uc) == CODE                                            # and would run again


def test_u16_emu_stop_from_an_mmio_write_leaves_rip_on_the_store():
    writes = []
    uc = machine(asm("mov dword ptr [rbx], 5; nop; hlt"))
    uc.mmio_map(MEM, 0x1000, lambda *a: 0, None,
                lambda uc_, off, size, value, ud: (writes.append(value), uc_.emu_stop()), None)
    uc.reg_write(X.UC_X86_REG_RBX, MEM)
    uc.emu_start(CODE, 0, count=10)
    assert writes == [5] and rip(uc) == CODE


def test_u17_emu_stop_from_an_out_hook_stops_after_the_instruction():
    uc = machine(asm("out 0x80, al; nop; hlt"))
    uc.hook_add(UC_HOOK_INSN, lambda uc_, port, size, value, ud: uc_.emu_stop(), None, 1, 0, X.UC_X86_INS_OUT)
    uc.emu_start(CODE, 0, count=10)            # hvmodel always runs counted slices
    assert rip(uc) == CODE + 2


def test_u18_a_code_hook_added_in_a_fetch_fill_sees_the_code_it_fills():
    hits = []
    target = CODE + 2

    def on_fill(uc_, va, acc, entry):
        if acc == UC_MEM_FETCH and va == CODE and not hits:
            uc_.hook_add(UC_HOOK_CODE, lambda u, a, s, d: hits.append(a), None, target, target)
            hits.append("added")
        return None

    uc = machine(asm("nop; nop; nop; nop; hlt"), virtual=True, on_fill=on_fill)
    uc.emu_start(CODE, 0)
    assert hits == ["added", target]


def test_u19_a_code_hook_added_later_misses_code_already_translated():
    hits = []
    uc = machine(asm("nop; nop; hlt"))
    uc.emu_start(CODE, 0, count=3)
    uc.hook_add(UC_HOOK_CODE, lambda u, a, s, d: hits.append(a), None, CODE + 1, CODE + 1)
    uc.emu_start(CODE, 0, count=3)
    assert hits == []
    uc.ctl_flush_tb()
    uc.emu_start(CODE, 0, count=3)
    assert hits == [CODE + 1]


def test_u20_mov_cr4_drops_pke_and_never_faults():
    seen = []
    uc = machine(asm("mov rax, cr4; or rax, rbx; mov cr4, rax; mov rcx, cr4; hlt"))
    uc.hook_add(UC_HOOK_INTR, lambda uc_, n, ud: seen.append(n))
    uc.reg_write(X.UC_X86_REG_RBX, (1 << 22) | (1 << 16))   # PKE, and FSGSBASE
    uc.emu_start(CODE, 0)
    cr4 = uc.reg_read(X.UC_X86_REG_RCX)
    assert seen == [] and not cr4 & (1 << 22) and cr4 & (1 << 16)


# -- U5: start state, 32-bit entry ---------------------------------------------------------------------

def test_u21_the_64_bit_reset_state():
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    assert uc.reg_read(X.UC_X86_REG_CR0) == 0x11
    assert uc.reg_read(X.UC_X86_REG_MSR, 0xC0000080) == 0x500
    assert uc.reg_read(X.UC_X86_REG_RFLAGS) == 0x2


def test_u22_clearing_efer_then_pg_leaves_long_mode_for_32_bit_code():
    uc = machine(bytes.fromhex("48") + b"\xf4")     # 32-bit: dec eax; hlt (64-bit: a REX prefix)
    uc.reg_write(X.UC_X86_REG_MSR, (0xC0000080, 0))
    uc.reg_write(X.UC_X86_REG_CR0, 0x80000011)
    uc.reg_write(X.UC_X86_REG_CR0, 0x11)
    assert uc.reg_read(X.UC_X86_REG_MSR, 0xC0000080) == 0
    uc.reg_write(X.UC_X86_REG_RAX, 5)
    uc.emu_start(CODE, 0, count=1)
    assert uc.reg_read(X.UC_X86_REG_RAX) == 4 and rip(uc) == CODE + 1


def test_u23_the_cpu_model_has_nx_smep_smap_1g_pages_maxphyaddr_40_and_no_pku():
    out = {}
    uc = machine(asm("mov eax, 7; xor ecx, ecx; cpuid; mov r8, rbx; mov r9, rcx;"
                     "mov eax, 0x80000001; cpuid; mov r10, rdx; mov eax, 0x80000008; cpuid; hlt"),
                 model=X.UC_CPU_X86_DENVERTON)
    uc.emu_start(CODE, 0)
    ebx7, ecx7, edx81 = (uc.reg_read(r) for r in (X.UC_X86_REG_R8, X.UC_X86_REG_R9, X.UC_X86_REG_R10))
    out = dict(smep=bool(ebx7 & 1 << 7), smap=bool(ebx7 & 1 << 20), pku=bool(ecx7 & 1 << 3),
               nx=bool(edx81 & 1 << 20), pdpe1gb=bool(edx81 & 1 << 26),
               maxphyaddr=uc.reg_read(X.UC_X86_REG_RAX) & 0xFF)
    assert out == dict(smep=True, smap=True, pku=False, nx=True, pdpe1gb=True, maxphyaddr=40)


def test_u24_the_context_blob_offsets_hvmodel_edits_are_the_engines():
    # The start-up probe (hvmodel/vm/cpustate.py) raises EngineMismatch on a different build.
    from hvmodel.vm.cpustate import verify_offsets
    found = verify_offsets()
    assert set(found) == {"emu_counter", "invalid_addr"} and all(v > 0 for v in found.values())


# -- K: keystone 0.9.2 -------------------------------------------------------------------------------------

def decode(code: bytes, addr: int = CODE) -> list[str]:
    return [f"{i.mnemonic} {i.op_str}".strip() for i in cs.disasm(code, addr)]


def test_k1_an_absolute_memory_operand_becomes_rip_relative():
    assert decode(asm("mov rbx, qword ptr [0x10000]", 0x100000), 0x100000)[0].startswith(
        "mov rbx, qword ptr [rip")


def test_k2_wide_immediates_are_truncated_silently():
    assert decode(asm("push 0x123456789")) == ["push 0x6789"]


def test_k3_a_word_too_wide_emits_nothing_and_lretq_is_rejected():
    assert asm(".word 0x12345") in (b"", None)
    with pytest.raises(KsError):
        asm("lretq")


def test_k4_a_sym_resolver_makes_keystone_read_decimals_as_hex():
    # In a child process: the effect outlives the resolver (later assemblies are read as hex).
    prog = ("from keystone import *\nks = Ks(KS_ARCH_X86, KS_MODE_64)\n"
            "ks.sym_resolver = lambda name, value: False\n"
            "print(ks.asm('mov eax, 10', 0, as_bytes=True)[0].hex())\n")
    out = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=60).stdout.strip()
    assert out == "b810000000"                      # mov eax, 0x10


def test_u25_a_code_hook_that_stops_runs_after_the_engine_counted_its_instruction():
    import ctypes

    from hvmodel.vm.cpustate import verify_offsets
    off = verify_offsets()["emu_counter"]
    uc = machine(asm("nop; nop; nop; nop; hlt"))
    counter = ctypes.c_uint64.from_address(uc._uch.value + off)
    seen = []

    def stop(uc_, addr, size, ud):
        seen.append(counter.value)
        uc_.emu_stop()

    uc.hook_add(UC_HOOK_CODE, stop, None, CODE + 2, CODE + 2)
    uc.emu_start(CODE, 0, count=100)
    assert rip(uc) == CODE + 2          # stopped before the third nop ...
    assert seen == [3]                  # ... which the counter already counts


def test_u26_memory_hooks_get_physical_address_size_and_value_and_fetches_none():
    import ctypes
    import struct

    from unicorn import UC_HOOK_MEM_FETCH, UC_HOOK_MEM_READ, UC_HOOK_MEM_READ_AFTER, UC_HOOK_MEM_WRITE, UC_TLB_CPU
    from unicorn.unicorn_py3.unicorn import HOOK_MEM_ACCESS_CFUNC
    code = asm("mov rbx, 0x200008; mov qword ptr [rbx], 0x1234; mov rax, qword ptr [rbx]; hlt")
    for virtual in (True, False):
        if virtual:   # VA 0x200000 -> physical 0x300000 through the fill hook
            uc = machine(code, virtual=True, on_fill=lambda u, va, acc, e: (
                setattr(e, "paddr", 0x300000), setattr(e, "perms", UC_PROT_ALL), True)[-1] if va == 0x200000 else None)
        else:         # the same mapping through 4-level tables the CPU walks itself
            uc = machine(code)
            uc.ctl_set_tlb_mode(UC_TLB_CPU)
            for a, v in ((0x10000, 0x11003), (0x11000, 0x12003), (0x12000, 0x13003), (0x12008, 0x14003),
                         (0x14000, 0x300003)):
                uc.mem_write(a, struct.pack("<Q", v))
            for i in range(512):
                uc.mem_write(0x13000 + 8 * i, struct.pack("<Q", (i << 12) | 3))
            uc.reg_write(X.UC_X86_REG_CR3, 0x10000)
            uc.reg_write(X.UC_X86_REG_CR4, uc.reg_read(X.UC_X86_REG_CR4) | 0x20)
            uc.reg_write(X.UC_X86_REG_CR0, 0x80000011)
        seen, keep = [], []
        for kind, tag in ((UC_HOOK_MEM_WRITE, "W"), (UC_HOOK_MEM_READ, "R"), (UC_HOOK_MEM_READ_AFTER, "RA"),
                          (UC_HOOK_MEM_FETCH, "F")):
            def cb(_h, _k, addr, size, value, _ud, tag=tag, uc=uc):
                seen.append((tag, addr, size, value, uc.reg_read(X.UC_X86_REG_RIP)))
            keep.append(HOOK_MEM_ACCESS_CFUNC(cb))
            hh = ctypes.c_size_t()
            assert not uclib.uc_hook_add(uc._uch, ctypes.byref(hh), kind, ctypes.cast(keep[-1], ctypes.c_void_p),
                                         None, ctypes.c_uint64(1), ctypes.c_uint64(0))
        uc.emu_start(CODE, 0, count=4)
        store, load = CODE + 7, CODE + 14
        assert seen == [("W", 0x300008, 8, 0x1234, store), ("R", 0x300008, 8, 0, load),
                        ("RA", 0x300008, 8, 0x1234, load)], (virtual, seen)
