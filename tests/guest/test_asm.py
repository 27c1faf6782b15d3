"""The guest build step: keystone + capstone verification (hvmodel.guest.asm)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from capstone import CS_ARCH_X86, CS_MODE_64, Cs
from hypothesis import given, settings
from hypothesis import strategies as st

from hvmodel.guest.asm import GuestBuildError, GuestImage, build, build_file
from hvmodel.guest.load import load_guest

GOOD = r"""
start:
    lea rsp, [rip + stack_top]
    movabs rbx, 0xffff800000000000
    mov rcx, qword ptr [rip + data]
    mov rdx, [rip + data + 8]
    mov rsi, [rax + rbx*8 + 0x10]
    push -0x80000000
    jmp next            # comment
    .align 16
next: call func; out 0xf4, al   // another comment
func: ret
/* block
   comment */
data: .quad 0x1122334455667788, start
msg: .asciz "hi;#\n"
%define FOO 0x42
    mov eax, FOO
.equ BAR, next - start
    mov eax, BAR
    rep stosq
    .space 64
stack_top:
"""


def test_good_program_symbols():
    img = build(GOOD)
    assert isinstance(img, GuestImage)
    assert img.load_addr == img.entry == 0x100000
    s = img.symbols
    assert s["start"] == 0x100000
    assert s["next"] % 16 == 0
    assert s["stack_top"] == 0x100000 + len(img.code)
    off = s["data"] - 0x100000
    assert struct.unpack_from("<QQ", img.code, off) == (0x1122334455667788, 0x100000)
    assert img.code[s["msg"] - 0x100000:][:6] == b"hi;#\n\0"
    # the call really goes to func
    md = Cs(CS_ARCH_X86, CS_MODE_64)
    call = next(md.disasm(img.code[s["next"] - 0x100000:], s["next"], 1))
    assert call.mnemonic == "call" and int(call.op_str, 16) == s["func"]


def test_load_addr_is_honoured():
    img = build("here: lea rax, [rip + here]", load_addr=0x200000)
    assert img.symbols["here"] == 0x200000
    md = Cs(CS_ARCH_X86, CS_MODE_64)
    insn = next(md.disasm(img.code, 0x200000, 1))
    assert insn.op_str == "rax, [rip - 7]"


@pytest.mark.parametrize("src, needle", [
    ("mov rbx, qword ptr [0x10000]", "absolute memory operand"),
    ("%define ADDR 0x10000\nmov rbx, qword ptr [ADDR]", "absolute memory operand"),
    ("mov rax, qword ptr [0xffff800000200000]", "absolute memory operand"),
    ("push 0x80000000", "does not fit"),
    ("push 0x123456789", "does not fit"),
    ("add eax, 0x123456789", "does not fit"),
    ("add rax, 0x123456789", "keystone cannot assemble"),
    (".word 0x12345", "does not fit"),
])
def test_known_miscompiles_are_caught(src, needle):
    with pytest.raises(GuestBuildError, match=needle) as ei:
        build(src)
    assert "<guest>:" in str(ei.value)


def test_rip_relative_absolute_via_equ_is_caught_by_capstone():
    # the lint cannot see through .equ: the capstone check must catch the miscompile
    with pytest.raises(GuestBuildError, match="effective address") as ei:
        build(".equ ABS, 0x10000\nnop\nmov rbx, qword ptr [ABS]")
    msg = str(ei.value)
    assert "<guest>:3" in msg and "capstone:" in msg and "rip + 0x10000" in msg


def test_mismatch_message_names_statement_and_disassembly():
    with pytest.raises(GuestBuildError) as ei:
        build("nop\nnop\npush 0x80000000\n")
    msg = str(ei.value)
    assert "<guest>:3" in msg
    assert "source:   push 0x80000000" in msg
    assert "capstone: 0x100002: push 0" in msg


def test_garbage_statement():
    with pytest.raises(GuestBuildError, match=r"<guest>:3: keystone cannot assemble.*\n    frob rax"):
        build("nop\nnop\nfrob rax\nnop")


def test_undefined_symbol():
    with pytest.raises(GuestBuildError, match=r"<guest>:2: undefined symbol 'nowhere'"):
        build("nop\njmp nowhere\n")


def test_numeric_local_label_rejected():
    with pytest.raises(GuestBuildError, match="numeric local label"):
        build("1: jmp 1b")


def test_duplicate_label():
    with pytest.raises(GuestBuildError, match="defined twice"):
        build("a: nop\na: nop")


def test_hex_escape_rejected():
    with pytest.raises(GuestBuildError):
        build('.ascii "\\x41"')


def test_decimal_numbers_stay_decimal():
    # keystone with a symbol resolver installed reads decimals as hex; we never install one
    img = build("mov eax, 10\n.space 64\nend:")
    assert img.code[:5] == bytes.fromhex("b80a000000")
    assert img.symbols["end"] == 0x100000 + 5 + 64


def test_includes(tmp_path: Path):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "a.inc").write_text("%define VAL 7\nfa: mov eax, VAL\n ret\n")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "b.inc").write_text("fb: ret\n")
    main = tmp_path / "main.asm"
    main.write_text('call fa\ncall fb\n%include "lib/a.inc"\n.include "b.inc"\n'
                    '%include "lib/a.inc"\n')  # second include of a.inc is skipped
    img = build_file(main, include_dirs=[tmp_path / "other"])
    assert set(img.symbols) == {"fa", "fb"}
    assert img.source_name == "main.asm"


def test_missing_include(tmp_path: Path):
    main = tmp_path / "main.asm"
    main.write_text('nop\n%include "runtime/nope.inc"\n')
    with pytest.raises(GuestBuildError, match=r"main.asm:2: cannot find include file 'runtime/nope.inc'"):
        build_file(main, include_dirs=[])


def test_include_cycle(tmp_path: Path):
    (tmp_path / "a.inc").write_text('%include "b.inc"\n')
    (tmp_path / "b.inc").write_text('%include "a.inc"\n')
    main = tmp_path / "main.asm"
    main.write_text('%include "a.inc"\n')
    with pytest.raises(GuestBuildError, match="include cycle"):
        build_file(main)


def test_rep_block():
    img = build("%rep 4\nlab%i: push %i\n%endrep\n")
    assert [img.symbols[f"lab{i}"] for i in range(4)] == [0x100000 + 2 * i for i in range(4)]


def test_runtime_includes_from_repository():
    img = build('%include "runtime/boot.inc"\nmain: jmp pass\n')
    assert img.symbols["boot_start"] == 0x100000
    assert "isr_stubs" in img.symbols and "puts" in img.symbols


def test_load_guest_variants(tmp_path: Path):
    flat = tmp_path / "g.bin"
    flat.write_bytes(b"\xf4")
    img = load_guest(flat)
    assert img.code == b"\xf4" and img.entry == 0x100000
    empty = tmp_path / "e.bin"
    empty.write_bytes(b"")
    with pytest.raises(GuestBuildError, match="empty"):
        load_guest(empty)
    with pytest.raises(GuestBuildError, match="directory"):
        load_guest(tmp_path)
    with pytest.raises(GuestBuildError, match="no such file"):
        load_guest(tmp_path / "missing.bin")
    src = tmp_path / "g.asm"
    src.write_text("hlt\n")
    assert load_guest(src).code == b"\xf4"


def test_speed_1000_lines():
    import time

    src = "\n".join(f"l{i}: mov rax, {i}\n lea rbx, [rip + l{(i * 7) % 500}]" for i in range(500))
    t = time.perf_counter()
    build(src)
    assert time.perf_counter() - t < 1.0  # ~0.1 s; generous for loaded CI machines


REGS = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12",
        "r13", "r14", "r15"]
stmt = st.one_of(
    st.tuples(st.just("imm"), st.sampled_from(REGS), st.integers(0, (1 << 64) - 1)),
    st.tuples(st.just("lea"), st.sampled_from(REGS), st.integers(0, 50)),
    st.tuples(st.just("mem"), st.sampled_from(REGS), st.integers(-(1 << 31), (1 << 31) - 1)),
)


@settings(max_examples=40, deadline=None)
@given(st.lists(stmt, min_size=1, max_size=40))
def test_property_roundtrip(prog):
    lines, expect = [], []
    n = len(prog)
    for i, (kind, reg, val) in enumerate(prog):
        if kind == "imm":
            lines.append(f"L{i}: movabs {reg}, {val:#x}")
        elif kind == "lea":
            lines.append(f"L{i}: lea {reg}, [rip + L{val % n}]")
        else:
            lines.append(f"L{i}: mov {reg}, qword ptr [rbx + {val}]")
    img = build("\n".join(lines))
    md = Cs(CS_ARCH_X86, CS_MODE_64)
    md.detail = True
    insns = list(md.disasm(img.code, img.load_addr))
    assert len(insns) == n
    for i, ((kind, reg, val), insn) in enumerate(zip(prog, insns)):
        assert img.symbols[f"L{i}"] == insn.address
        ops = insn.operands
        assert insn.reg_name(ops[0].reg) == reg
        if kind == "imm":
            assert ops[1].imm & ((1 << 64) - 1) == val
        elif kind == "lea":
            assert insn.address + insn.size + ops[1].mem.disp == img.symbols[f"L{val % n}"]
        else:
            assert ops[1].mem.disp == val


def test_garbage_with_several_words_names_the_line():
    with pytest.raises(GuestBuildError, match=r"^<guest>:2: "):
        build("mov rax, 1\nthis is not an instruction\n")
