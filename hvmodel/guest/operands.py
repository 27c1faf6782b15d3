"""What a source statement says, in terms the verifier compares with the encoding: operands
(registers, immediates, memory with base/index/scale/displacement/segment/size),
mnemonic aliases, and the bytes data directives stand for.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .expr import Expr, parse_expr
from .image import GuestBuildError

_GPR64 = "rax rbx rcx rdx rsi rdi rbp rsp r8 r9 r10 r11 r12 r13 r14 r15".split()
_REGS = set(_GPR64)
_REGS |= set("eax ebx ecx edx esi edi ebp esp ax bx cx dx si di bp sp al bl cl dl ah bh ch dh "
             "sil dil bpl spl rip eip ip cs ds es fs gs ss".split())
for _i in range(8, 16):
    _REGS |= {f"r{_i}d", f"r{_i}w", f"r{_i}b"}
for _i in range(16):
    _REGS |= {f"cr{_i}", f"dr{_i}", f"xmm{_i}", f"ymm{_i}"}
_REGS |= {f"st({_i})" for _i in range(8)} | {f"mm{_i}" for _i in range(8)}

_SIZE_WORDS = {"byte": 1, "word": 2, "dword": 4, "fword": 6, "qword": 8, "tbyte": 10,
               "xword": 10, "xmmword": 16, "oword": 16, "ymmword": 32}
_SIZE_RE = re.compile(r"^(byte|word|dword|fword|qword|tbyte|xword|xmmword|oword|ymmword)\s+ptr\s+",
                      re.I)
BRANCHES = {"jmp", "call", "loop", "loope", "loopne", "loopz", "loopnz", "jrcxz", "jecxz",
             "jcxz", "xbegin"}

_CC_CANON = {"z": "e", "nz": "ne", "c": "b", "nae": "b", "nb": "ae", "nc": "ae", "na": "be",
             "nbe": "a", "nge": "l", "nl": "ge", "ng": "le", "nle": "g", "pe": "p", "po": "np"}
_ALIASES = {"movabs": "mov", "sal": "shl", "sysret": "sysretq", "retq": "ret", "int 3": "int3",
            "pushf": "pushfq", "popf": "popfq", "iret": "iretd", "wait": "fwait",
            "xlat": "xlatb", "retf": "retf", "lret": "retf", "cmpxchg16b": "cmpxchg16b",
            "repe": "repe", "repz": "repe", "repnz": "repne", "jmpq": "jmp", "callq": "call"}


def canon_mnemonic(m: str) -> str:
    parts = m.lower().split()
    out = []
    for p in parts:
        p = _ALIASES.get(p, p)
        for pre in ("j", "set", "cmov"):
            if p.startswith(pre) and p[len(pre):] in _CC_CANON and p not in ("jmp",):
                p = pre + _CC_CANON[p[len(pre):]]
                break
        if p == "movsxd":
            p = "movsx"
        out.append(p)
    return " ".join(out)


@dataclass
class MemOperand:
    seg: str | None
    size: int | None
    base: str | None
    index: str | None
    scale: int
    disp: Expr | None


@dataclass
class Operand:
    kind: str  # reg | mem | imm
    text: str
    reg: str | None = None
    mem: MemOperand | None = None
    expr: Expr | None = None


def parse_mem(text: str, where: str) -> MemOperand:
    t = text.strip()
    size = None
    m = _SIZE_RE.match(t)
    if m:
        size = _SIZE_WORDS[m.group(1).lower()]
        t = t[m.end():].strip()
    seg = None
    m = re.match(r"^(cs|ds|es|fs|gs|ss)\s*:\s*", t, re.I)
    if m:
        seg = m.group(1).lower()
        t = t[m.end():]
    if not (t.startswith("[") and t.endswith("]")):
        raise GuestBuildError(f"{where}: cannot parse memory operand {text!r}")
    inner = t[1:-1].strip()
    m = re.match(r"^(cs|ds|es|fs|gs|ss)\s*:\s*", inner, re.I)
    if m:
        seg = m.group(1).lower()
        inner = inner[m.end():]
    # split into signed terms at top level
    terms: list[tuple[str, str]] = []
    cur, sign, depth = "", "+", 0
    for c in inner:
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        if c in "+-" and depth == 0:
            if cur.strip():
                terms.append((sign, cur.strip()))
                sign = c
            else:
                sign = "-" if (sign == "-") != (c == "-") else "+"
            cur = ""
            continue
        cur += c
    if cur.strip():
        terms.append((sign, cur.strip()))
    base = index = None
    scale = 1
    disp_parts = []
    for sgn, term in terms:
        tl = term.lower().replace(" ", "")
        if tl in _REGS:
            if sgn == "-":
                raise GuestBuildError(f"{where}: negative register in {text!r}")
            if base is None:
                base = tl
            elif index is None:
                index = tl
            else:
                raise GuestBuildError(f"{where}: too many registers in {text!r}")
            continue
        m = re.match(r"^([a-z0-9]+)\*(\d+)$|^(\d+)\*([a-z0-9]+)$", tl)
        if m and ((m.group(1) or m.group(4)) in _REGS):
            if index is not None:
                raise GuestBuildError(f"{where}: two index registers in {text!r}")
            index = m.group(1) or m.group(4)
            scale = int(m.group(2) or m.group(3))
            continue
        disp_parts.append(f"{sgn} ({term})")
    disp = parse_expr(" ".join(disp_parts)) if disp_parts else None
    return MemOperand(seg, size, base, index, scale, disp)


def parse_operand(text: str, where: str) -> Operand:
    t = text.strip()
    tl = t.lower()
    if "[" in t:
        return Operand("mem", t, mem=parse_mem(t, where))
    if tl in _REGS:
        return Operand("reg", t, reg=tl)
    t2 = re.sub(r"^(short|near|far)\s+", "", t, flags=re.I)
    return Operand("imm", t, expr=parse_expr(t2))


# -- data directives ---------------------------------------------------------------------

def decode_string(lit: str, where: str) -> bytes:
    lit = lit.strip()
    if not (len(lit) >= 2 and lit[0] == '"' and lit[-1] == '"'):
        raise GuestBuildError(f"{where}: expected a string literal, got {lit!r}")
    s = lit[1:-1]
    out = bytearray()
    i = 0
    simple = {"n": 10, "t": 9, "r": 13, "b": 8, "f": 12, "v": 11, "\\": 92, '"': 34, "'": 39}
    while i < len(s):
        c = s[i]
        if c != "\\":
            out += c.encode("latin-1")
            i += 1
            continue
        i += 1
        if i >= len(s):
            raise GuestBuildError(f"{where}: bad escape in {lit!r}")
        c = s[i]
        if c in simple:
            out.append(simple[c])
            i += 1
        elif c in "01234567":
            j = i
            while j < len(s) and j < i + 3 and s[j] in "01234567":
                j += 1
            out.append(int(s[i:j], 8) & 0xFF)
            i = j
        else:
            raise GuestBuildError(
                f"{where}: escape \\{c} in {lit!r} is not supported by keystone 0.9.2 "
                "(use octal \\NNN)"
            )
    return bytes(out)


DATA_SIZES = {".byte": 1, ".word": 2, ".short": 2, ".value": 2, ".2byte": 2, ".long": 4,
               ".int": 4, ".4byte": 4, ".quad": 8, ".8byte": 8}
NOBYTE_DIRECTIVES = {".globl", ".global", ".text", ".code64", ".intel_syntax", ".type",
                      ".size", ".local", ".weak", ".hidden"}
