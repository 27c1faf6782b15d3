"""Build step for guests: preprocess, assemble with keystone, verify with capstone.

keystone-engine 0.9.2 silently miscompiles several x86-64 forms (ENGINE-NOTES 8):
absolute memory operands turned RIP-relative, ``push 0x80000000`` turned into
``push word 0``, over-wide immediates truncated, ``.word 0x12345`` emitting nothing...
So every build is round-tripped through capstone, statement by statement, and any
difference between what the source says and what came out is a :class:`GuestBuildError`.

Source language
---------------
keystone's Intel syntax, with these additions handled here before keystone sees it:

* ``;`` separates statements (as in keystone); comments are ``#``, ``//`` and ``/* */``.
* ``%include "path"`` (or ``.include "path"``) is replaced by the file's text. The path
  is looked up relative to the including file's directory, then in ``include_dirs``.
  Default ``include_dirs``: the directories in the environment variable
  ``HVMODEL_GUEST_INCLUDE`` (``os.pathsep``-separated), then the repository's
  ``guests/`` folder (``Path(__file__).resolve().parents[2] / "guests"``). The runtime
  ``.inc`` files are NOT shipped inside the wheel (pyproject's package-data only ships
  ``py.typed``); an installed copy must be given ``include_dirs`` or the environment
  variable. Include cycles are errors; a file already included once is skipped on a
  later (non-cyclic) include, like ``#pragma once``.
* ``%define NAME text`` textual constants (whole-word substitution, recursive).
* ``%rep N`` ... ``%endrep`` repeats its lines N times; ``%i`` in the body is replaced by
  the 0-based iteration number (used for the 256 IDT stubs). Not nestable.
* ``.equ NAME, expr`` / ``NAME = expr`` are passed to keystone and also evaluated here.

Numeric local labels (``1:``/``1b``) are rejected: keystone 0.9.2 cannot assemble them.
Absolute numeric memory operands (``[0x10000]``) are rejected: keystone encodes them
RIP-relative (right only at the assembly address) or miscompiles them; load the address
into a register instead.

Verification rules (after label addresses are known):

* Instruction count: each instruction statement must decode as exactly one instruction,
  with the same mnemonic (modulo aliases such as ``jz``/``je``), and the walk must end
  exactly at the end of the output.
* Memory operands: base, index, scale and segment as written; the displacement as
  written; ``[rip + expr]`` where ``expr`` names a label means effective address == expr
  (keystone's meaning), ``[rip + number]`` means displacement == number; ``[label]``
  means effective address == label whatever the encoding; ``X ptr`` sizes must match.
* Immediates: the source value must fit in the encoded immediate's operand width
  (signed or unsigned) and be equal modulo 2**width. Branch targets must equal the
  absolute address written.
* Data directives: the emitted bytes must equal the bytes the source describes.
"""

from __future__ import annotations

import ast
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .image import DEFAULT_LOAD_ADDR, GuestBuildError, GuestImage

__all__ = ["GuestBuildError", "GuestImage", "build", "build_file", "DEFAULT_LOAD_ADDR"]


# Words that may stand in an operand without being symbols.
_ASM_WORDS = {"byte", "word", "dword", "qword", "tbyte", "xword", "xmmword", "ymmword", "zmmword", "oword",
              "ptr", "offset", "short", "near", "far", "rip"}


def _register_names() -> set[str]:
    from capstone import CS_ARCH_X86, CS_MODE_64, Cs
    from capstone import x86_const as cx
    md = Cs(CS_ARCH_X86, CS_MODE_64)
    names = set()
    for n in dir(cx):
        if n.startswith("X86_REG_") and n != "X86_REG_ENDING":
            name = md.reg_name(getattr(cx, n))
            if name:
                names.add(name.lower())
    return names


_REGISTERS = _register_names()

_DECIMAL = re.compile(r"(?<![\w.$])(\d+)(?![\w.$])")


def _hex_literals(text: str) -> str:
    """Write decimal literals as hex before keystone sees them (outside quotes).

    keystone 0.9.2 can end up reading decimal numbers as hex (seen with a
    sym_resolver installed, and once in a CI run with none): ``0x`` literals are
    read the same in every mode. The capstone check still compares the result with
    what the source meant.
    """
    parts = re.split(r"(\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*')", text)
    for i in range(0, len(parts), 2):
        parts[i] = _DECIMAL.sub(lambda m: hex(int(m.group(1))), parts[i])
    return "".join(parts)
_MASK64 = (1 << 64) - 1


# --------------------------------------------------------------------------------------
# preprocessing


@dataclass
class _Stmt:
    file: str
    line: int
    text: str  # one statement, comment-free, defines substituted, labels removed
    labels: list[str] = field(default_factory=list)
    kind: str = "none"  # insn | data | equ | none
    mnem: str = ""
    ops: list | None = field(default_factory=list)
    parse_error: str = ""

    def where(self) -> str:
        return f"{self.file}:{self.line}"


def _repo_guests_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "guests"


def default_include_dirs() -> list[Path]:
    dirs: list[Path] = []
    env = os.environ.get("HVMODEL_GUEST_INCLUDE")
    if env:
        dirs += [Path(p) for p in env.split(os.pathsep) if p]
    g = _repo_guests_dir()
    if g.is_dir():
        dirs.append(g)
    return dirs


_IDENT = r"[A-Za-z_.$][\w.$]*"
_LABEL_RE = re.compile(rf"^\s*({_IDENT}|\d+)\s*:(?!:)")
_INCLUDE_RE = re.compile(r'^\s*[%.]include\s+(?:"([^"]+)"|<([^>]+)>|(\S+))\s*$')
_DEFINE_RE = re.compile(rf"^\s*%define\s+({_IDENT})(?:\s+(.*))?$")
_WORD_RE = re.compile(_IDENT)
_SEGMENT_PREFIXES = {"cs", "ds", "es", "fs", "gs", "ss"}


_COMMENT_RE = re.compile(r'"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\])\'|#[^\n]*|//[^\n]*|/\*.*?(?:\*/|\Z)',
                         re.S)


def _strip_comments(text: str) -> str:
    """Remove #, // and /* */ comments, respecting string/char literals. Keeps newlines."""

    def repl(m: re.Match) -> str:
        t = m.group(0)
        if t[0] in "\"'":
            return t
        return "\n" * t.count("\n")

    return _COMMENT_RE.sub(repl, text)


def _split_outside_strings(s: str, sep: str) -> list[str]:
    if '"' not in s and "'" not in s and (sep == ";" or ("[" not in s and "(" not in s)):
        return s.split(sep)
    parts, cur, quote, depth = [], [], None, 0
    i = 0
    while i < len(s):
        c = s[i]
        if quote:
            cur.append(c)
            if c == "\\" and i + 1 < len(s):
                cur.append(s[i + 1])
                i += 1
            elif c == quote:
                quote = None
        elif c == '"':
            quote = c
            cur.append(c)
        elif c == "'" and i + 2 < len(s) and s[i + 2] == "'":
            cur.append(s[i : i + 3])
            i += 2
        elif c in "[(":
            depth += 1
            cur.append(c)
        elif c in "])":
            depth -= 1
            cur.append(c)
        elif c == sep and (sep == ";" or depth == 0):
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    return parts


class _Preprocessor:
    def __init__(self, include_dirs: list[Path]):
        self.include_dirs = include_dirs
        self.defines: dict[str, str] = {}
        self.stmts: list[_Stmt] = []
        self.stack: list[Path] = []
        self.seen: set[Path] = set()

    def _subst(self, text: str, where: str) -> str:
        if not self.defines:
            return text
        for _ in range(32):
            changed = False

            def repl(m: re.Match) -> str:
                nonlocal changed
                w = m.group(0)
                if w in self.defines:
                    changed = True
                    return self.defines[w]
                return w

            # do not substitute inside string literals
            pieces = re.split(r'("(?:\\.|[^"\\])*")', text)
            text = "".join(p if p.startswith('"') else _WORD_RE.sub(repl, p) for p in pieces)
            if not changed:
                return text
        raise GuestBuildError(f"{where}: %define expansion does not terminate")

    def _resolve_include(self, name: str, cur_dir: Path | None, where: str) -> Path:
        cands = []
        if cur_dir is not None:
            cands.append(cur_dir / name)
        cands += [d / name for d in self.include_dirs]
        for c in cands:
            if c.is_file():
                return c.resolve()
        looked = ", ".join(str(c.parent) for c in cands) or "(no include directories)"
        raise GuestBuildError(f"{where}: cannot find include file {name!r} (looked in: {looked})")

    def process(self, text: str, name: str, path: Path | None) -> None:
        if path is not None:
            self.stack.append(path)
            self.seen.add(path)
        try:
            self._process_text(text, name, path.parent if path is not None else None)
        finally:
            if path is not None:
                self.stack.pop()

    def _process_text(self, text: str, name: str, cur_dir: Path | None) -> None:
        lines = _strip_comments(text).split("\n")
        rep: tuple[int, int, list[tuple[int, str]]] | None = None  # (count, line, body)
        for lineno, raw in enumerate(lines, start=1):
            where = f"{name}:{lineno}"
            line = raw.strip()
            if not line:
                continue
            low = line.lower()
            if rep is not None:
                if low == "%endrep":
                    count, _, body = rep
                    rep = None
                    for it in range(count):
                        for bl, btext in body:
                            self._statements(btext.replace("%i", str(it)), name, bl)
                    continue
                if low.startswith("%rep"):
                    raise GuestBuildError(f"{where}: nested %rep is not supported")
                body_line = line
                if low.startswith("%") and not low.startswith("%i"):
                    raise GuestBuildError(f"{where}: directive not allowed inside %rep: {line}")
                rep[2].append((lineno, body_line))
                continue
            m = _INCLUDE_RE.match(line)
            if m:
                inc = m.group(1) or m.group(2) or m.group(3)
                p = self._resolve_include(inc, cur_dir, where)
                if p in self.stack:
                    chain = " -> ".join(str(s) for s in self.stack + [p])
                    raise GuestBuildError(f"{where}: include cycle: {chain}")
                if p in self.seen:
                    continue
                try:
                    content = p.read_text()
                except OSError as e:
                    raise GuestBuildError(f"{where}: cannot read include file {p}: {e}") from e
                self.process(content, str(p.name if p.parent.name != "runtime" else f"runtime/{p.name}"), p)
                continue
            m = _DEFINE_RE.match(line)
            if m:
                self.defines[m.group(1)] = self._subst((m.group(2) or "").strip(), where)
                continue
            if low.startswith("%undef"):
                self.defines.pop(line.split()[1], None)
                continue
            if low.startswith("%rep"):
                parts = line.split(None, 1)
                if len(parts) != 2:
                    raise GuestBuildError(f"{where}: %rep needs a count")
                try:
                    count = _Expr(self._subst(parts[1], where)).eval({}, where)
                except GuestBuildError as e:
                    raise GuestBuildError(f"{where}: bad %rep count: {e}") from None
                rep = (count, lineno, [])
                continue
            if low.startswith("%endrep"):
                raise GuestBuildError(f"{where}: %endrep without %rep")
            if low.startswith("%"):
                raise GuestBuildError(f"{where}: unknown preprocessor directive: {line}")
            self._statements(line, name, lineno)
        if rep is not None:
            raise GuestBuildError(f"{name}:{rep[1]}: %rep without %endrep")

    def _statements(self, line: str, name: str, lineno: int) -> None:
        where = f"{name}:{lineno}"
        for piece in _split_outside_strings(line, ";"):
            piece = piece.strip()
            if not piece:
                continue
            labels = []
            while True:
                m = _LABEL_RE.match(piece)
                if not m:
                    break
                lab = m.group(1)
                if lab.lower() in _SEGMENT_PREFIXES:
                    break
                if lab[0].isdigit():
                    raise GuestBuildError(
                        f"{where}: numeric local label {lab!r}: keystone 0.9.2 cannot assemble "
                        "them, use a named label"
                    )
                labels.append(lab)
                piece = piece[m.end() :].strip()
            piece = self._subst(piece, where) if piece else piece
            self.stmts.append(_Stmt(name, lineno, piece, labels))


# --------------------------------------------------------------------------------------
# expressions

_NUM_RE = re.compile(
    r"0[xX][0-9a-fA-F]+|0[bB][01]+|[0-9][0-9a-fA-F]*[hH](?![\w])|[0-9]+|'(?:\\.|[^'\\])'"
)
_TOKEN_RE = re.compile(rf"\s*(?:({_NUM_RE.pattern})|({_IDENT})|(<<|>>|[-+*/%|&^~()!]))")


def _parse_number(tok: str) -> int:
    t = tok.lower()
    if t.startswith("'"):
        body = tok[1:-1]
        if body.startswith("\\"):
            return {"n": 10, "t": 9, "r": 13, "0": 0, "\\": 92, "'": 39}.get(body[1], ord(body[1]))
        return ord(body)
    if t.startswith("0x"):
        return int(t, 16)
    if t.startswith("0b"):
        return int(t[2:], 2)
    if t.endswith("h"):
        return int(t[:-1], 16)
    if len(t) > 1 and t.startswith("0"):
        return int(t, 8)  # GAS/keystone: leading zero means octal
    return int(t)


def _expr(text: str) -> "_Expr":
    e = _EXPR_CACHE.get(text)
    if e is None:
        if len(_EXPR_CACHE) > 200_000:
            _EXPR_CACHE.clear()
        e = _EXPR_CACHE[text] = _Expr(text)
    return e


_EXPR_CACHE: dict[str, "_Expr"] = {}


class _Expr:
    """A constant expression with C-like precedence; names are resolved at eval time."""

    def __init__(self, text: str):
        self.text = text
        py: list[str] = []
        self.names: list[str] = []
        pos = 0
        text = text.strip()
        while pos < len(text):
            m = _TOKEN_RE.match(text, pos)
            if not m or m.end() == pos:
                raise GuestBuildError(f"cannot parse expression {self.text!r}")
            num, name, op = m.groups()
            if num is not None:
                py.append(str(_parse_number(num)))
            elif name is not None:
                self.names.append(name)
                py.append(f"N_{len(self.names) - 1}")
            else:
                py.append({"/": "//", "!": "not "}.get(op, op))
            pos = m.end()
        try:
            self.tree = ast.parse(" ".join(py) or "0", mode="eval").body
        except SyntaxError:
            raise GuestBuildError(f"cannot parse expression {self.text!r}") from None

    def eval(self, env: dict[str, int] | callable, where: str = "") -> int:
        def name_val(i: int) -> int:
            n = self.names[i]
            v = env(n) if callable(env) else env.get(n)
            if v is None:
                raise GuestBuildError(f"{where}: undefined symbol {n!r} in {self.text!r}")
            return v

        def ev(node) -> int:
            if isinstance(node, ast.Constant) and isinstance(node.value, int):
                return node.value
            if isinstance(node, ast.Name):
                return name_val(int(node.id[2:]))
            if isinstance(node, ast.UnaryOp):
                v = ev(node.operand)
                if isinstance(node.op, ast.USub):
                    return -v
                if isinstance(node.op, ast.UAdd):
                    return v
                if isinstance(node.op, ast.Invert):
                    return ~v
                if isinstance(node.op, ast.Not):
                    return int(not v)
            if isinstance(node, ast.BinOp):
                a, b = ev(node.left), ev(node.right)
                op = node.op
                if isinstance(op, ast.Add):
                    return a + b
                if isinstance(op, ast.Sub):
                    return a - b
                if isinstance(op, ast.Mult):
                    return a * b
                if isinstance(op, (ast.FloorDiv, ast.Mod)):
                    if b == 0:
                        raise GuestBuildError(f"{where}: division by zero in {self.text!r}")
                    q = abs(a) // abs(b) * (1 if (a >= 0) == (b >= 0) else -1)  # truncate
                    return q if isinstance(op, ast.FloorDiv) else a - q * b
                if isinstance(op, ast.LShift):
                    return a << b
                if isinstance(op, ast.RShift):
                    return a >> b
                if isinstance(op, ast.BitOr):
                    return a | b
                if isinstance(op, ast.BitAnd):
                    return a & b
                if isinstance(op, ast.BitXor):
                    return a ^ b
            raise GuestBuildError(f"{where}: unsupported expression {self.text!r}")

        return ev(self.tree)


# --------------------------------------------------------------------------------------
# operands

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
_BRANCHES = {"jmp", "call", "loop", "loope", "loopne", "loopz", "loopnz", "jrcxz", "jecxz",
             "jcxz", "xbegin"}

_CC_CANON = {"z": "e", "nz": "ne", "c": "b", "nae": "b", "nb": "ae", "nc": "ae", "na": "be",
             "nbe": "a", "nge": "l", "nl": "ge", "ng": "le", "nle": "g", "pe": "p", "po": "np"}
_ALIASES = {"movabs": "mov", "sal": "shl", "sysret": "sysretq", "retq": "ret", "int 3": "int3",
            "pushf": "pushfq", "popf": "popfq", "iret": "iretd", "wait": "fwait",
            "xlat": "xlatb", "retf": "retf", "lret": "retf", "cmpxchg16b": "cmpxchg16b",
            "repe": "repe", "repz": "repe", "repnz": "repne", "jmpq": "jmp", "callq": "call"}


def _canon_mnemonic(m: str) -> str:
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
class _Mem:
    seg: str | None
    size: int | None
    base: str | None
    index: str | None
    scale: int
    disp: _Expr | None


@dataclass
class _Op:
    kind: str  # reg | mem | imm
    text: str
    reg: str | None = None
    mem: _Mem | None = None
    expr: _Expr | None = None


def _parse_mem(text: str, where: str) -> _Mem:
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
    disp = _expr(" ".join(disp_parts)) if disp_parts else None
    return _Mem(seg, size, base, index, scale, disp)


def _parse_operand(text: str, where: str) -> _Op:
    t = text.strip()
    tl = t.lower()
    if "[" in t:
        return _Op("mem", t, mem=_parse_mem(t, where))
    if tl in _REGS:
        return _Op("reg", t, reg=tl)
    t2 = re.sub(r"^(short|near|far)\s+", "", t, flags=re.I)
    return _Op("imm", t, expr=_expr(t2))


# --------------------------------------------------------------------------------------
# data directives


def _decode_string(lit: str, where: str) -> bytes:
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


_DATA_SIZES = {".byte": 1, ".word": 2, ".short": 2, ".value": 2, ".2byte": 2, ".long": 4,
               ".int": 4, ".4byte": 4, ".quad": 8, ".8byte": 8}
_NOBYTE_DIRECTIVES = {".globl", ".global", ".text", ".code64", ".intel_syntax", ".type",
                      ".size", ".local", ".weak", ".hidden"}


# --------------------------------------------------------------------------------------
# build


def build(source: str | Path, *, load_addr: int = DEFAULT_LOAD_ADDR,
          include_dirs: list[Path] | None = None, source_name: str | None = None) -> GuestImage:
    """Assemble guest source (text, or a Path to a file) into a verified GuestImage."""
    if isinstance(source, Path):
        path = source.resolve()
        try:
            text = path.read_text()
        except OSError as e:
            raise GuestBuildError(f"cannot read guest source {source}: {e}") from e
        name = source_name or path.name
    else:
        path = None
        text = source
        name = source_name or "<guest>"
    dirs = default_include_dirs() if include_dirs is None else [Path(d) for d in include_dirs]
    pp = _Preprocessor(dirs)
    pp.process(text, name, path)
    return _Builder(pp.stmts, load_addr, name).run()


def build_file(path: str | Path, **kw) -> GuestImage:
    return build(Path(path), **kw)


class _Builder:
    def __init__(self, stmts: list[_Stmt], load_addr: int, name: str):
        self.stmts = stmts
        self.load_addr = load_addr
        self.name = name
        self.labels: dict[str, int] = {}
        self.equs: dict[str, _Expr] = {}
        self.label_names: set[str] = set()

    # -- keystone -----------------------------------------------------------------
    def _ks(self):
        from keystone import KS_ARCH_X86, KS_MODE_64, Ks

        return Ks(KS_ARCH_X86, KS_MODE_64)

    def _assemble(self, stmts: list[_Stmt]) -> bytes:
        # NB: never install a sym_resolver for the real assembly: with one installed,
        # keystone 0.9.2 reads every decimal number as hex ('.space 64' emits 100 bytes,
        # 'mov eax, 10' loads 16) and rejects '.align'.
        from keystone import KsError

        ks = self._ks()
        text = "\n".join(self._ks_line(s) for s in stmts)
        try:
            enc, _ = ks.asm(text, self.load_addr, as_bytes=True)
        except KsError as e:
            raise _KsFail(str(e), e.errno) from None
        return enc or b""

    def _missing_symbols(self) -> list[str]:
        """Names used in operands that no label or constant defines.

        Found by parsing, not by asking keystone: installing a ``sym_resolver`` leaves
        keystone 0.9.2 reading decimal numbers as hex in later assemblies of the same
        process (measured: ``mov rcx, 512`` then encoded 0x512), so it is never done.
        """
        defined = {lab for st in self.stmts for lab in st.labels}
        defined |= set(self.equs) | set(self.label_names)
        for st in self.stmts:
            if st.kind == "equ":
                m = re.match(r"\s*(?:\.equ\s+)?([A-Za-z_.$][\w.$]*)", st.text)
                if m:
                    defined.add(m.group(1))
        missing: list[str] = []
        for st in self.stmts:
            parts = st.text.split(None, 1)
            if len(parts) < 2 or parts[0].startswith("."):
                continue
            for word in re.findall(r"(?<![\w.$])([A-Za-z_.$][\w.$]*)", parts[1]):
                w = word.lower()
                if word in defined or w in _ASM_WORDS or w in _REGISTERS or word in missing:
                    continue
                missing.append(word)
        return missing

    @staticmethod
    def _ks_line(s: _Stmt) -> str:
        return "".join(f"{lab}: " for lab in s.labels) + _hex_literals(s.text)

    def _locate_ks_error(self, fail: "_KsFail") -> GuestBuildError:
        from keystone import KS_ERR_ASM_SYMBOL_MISSING

        msg = fail.msg
        if fail.errno == KS_ERR_ASM_SYMBOL_MISSING:
            for sym in self._missing_symbols():
                pat = re.compile(rf"(?<![\w.$]){re.escape(sym)}(?![\w.$])")
                for s in self.stmts:
                    if pat.search(s.text):
                        return GuestBuildError(f"{s.where()}: undefined symbol {sym!r}\n    {s.text}")
                return GuestBuildError(f"{self.name}: undefined symbol {sym!r}")
        # binary search for the shortest failing prefix; labels and constants defined
        # later are appended as stubs so that forward references resolve
        def prefix_fails(k: int) -> bool:
            head = self.stmts[:k]
            later_labels = [lab for s in self.stmts[k:] for lab in s.labels]
            tail = [_Stmt("<stub>", 0, "", later_labels)] if later_labels else []
            tail += [s for s in self.stmts[k:] if s.kind == "equ"]
            try:
                self._assemble(head + tail)
                return False
            except _KsFail:
                return True

        lo, hi = 1, len(self.stmts)
        if not prefix_fails(hi):
            return GuestBuildError(f"{self.name}: keystone error: {msg}")
        while lo < hi:
            mid = (lo + hi) // 2
            if prefix_fails(mid):
                hi = mid
            else:
                lo = mid + 1
        s = self.stmts[lo - 1]
        return GuestBuildError(f"{s.where()}: keystone cannot assemble this: {msg}\n    {s.text}")

    # -- main -------------------------------------------------------------------------
    def run(self) -> GuestImage:
        for s in self.stmts:
            for lab in s.labels:
                if lab in self.label_names:
                    raise GuestBuildError(f"{s.where()}: label {lab!r} defined twice")
                self.label_names.add(lab)
            self._lint(s)
        try:
            code = self._assemble(self.stmts)
        except _KsFail as f:
            raise self._locate_ks_error(f) from None
        self.code = code
        self._walk()
        self._verify()
        return GuestImage(code=code, load_addr=self.load_addr, entry=self.load_addr,
                          symbols=dict(self.labels), source_name=self.name)

    def _lint(self, s: _Stmt) -> None:
        t = s.text
        if not t:
            return
        head = t.split(None, 1)[0].lower()
        m = re.match(rf"^\s*({_IDENT})\s*=\s*(.+)$", t)
        if head in (".equ", ".set") or m:
            if m and head not in (".equ", ".set"):
                name, expr = m.group(1), m.group(2)
            else:
                parts = t.split(None, 1)[1].split(",", 1) if len(t.split(None, 1)) > 1 else []
                if len(parts) != 2:
                    raise GuestBuildError(f"{s.where()}: expected '.equ NAME, value'\n    {t}")
                name, expr = parts[0].strip(), parts[1].strip()
            self.equs[name] = _expr(expr)
            s.kind = "equ"
            return
        if head.startswith("."):
            if head in _DATA_SIZES or head in (".ascii", ".asciz", ".string", ".align",
                                               ".balign", ".p2align", ".space", ".skip",
                                               ".zero", ".fill", ".org"):
                s.kind = "data"
            elif head in _NOBYTE_DIRECTIVES:
                s.kind = "none"
            else:
                raise GuestBuildError(f"{s.where()}: unsupported directive {head}\n    {t}")
            return
        s.kind = "insn"
        s.mnem, ops_text = self._split_insn(t)
        try:
            s.ops = [_parse_operand(o, s.where()) for o in ops_text]
        except GuestBuildError as e:
            # report it after keystone had its say (it usually rejects the statement too)
            s.ops = None
            s.parse_error = str(e).split(": ", 1)[-1] if s.where() in str(e) else str(e)
            return
        for o in s.ops:
            mem = o.mem
            if mem is not None and mem.base is None and mem.index is None and mem.disp is not None:
                if not mem.disp.names and mem.seg not in ("fs", "gs"):
                    raise GuestBuildError(
                        f"{s.where()}: absolute memory operand {o.text!r}: keystone "
                        "0.9.2 encodes it RIP-relative or miscompiles it (ENGINE-NOTES 8); "
                        f"load the address into a register and use [reg]\n    {t}")

    @staticmethod
    def _split_insn(t: str) -> tuple[str, list[str]]:
        words = t.split(None, 1)
        mnem = words[0].lower()
        rest = words[1] if len(words) > 1 else ""
        prefixes = {"rep", "repe", "repz", "repne", "repnz", "lock", "data16"}
        while mnem in prefixes and rest:
            w2 = rest.split(None, 1)
            mnem = mnem + " " + w2[0].lower()
            rest = w2[1] if len(w2) > 1 else ""
        ops = [o.strip() for o in _split_outside_strings(rest, ",")] if rest.strip() else []
        return mnem, ops

    # -- layout walk -------------------------------------------------------------------
    def _sym(self, name: str, _depth: int = 0) -> int | None:
        if name in self.labels:
            return self.labels[name]
        if name in self.equs and _depth < 32:
            return self.equs[name].eval(lambda n: self._sym(n, _depth + 1))
        return None

    def _eval(self, e: _Expr, s: _Stmt) -> int:
        return e.eval(self._sym, s.where())

    def _has_label(self, e: _Expr, _depth: int = 0) -> bool:
        for n in e.names:
            if n in self.label_names:
                return True
            if n in self.equs and _depth < 32 and self._has_label(self.equs[n], _depth + 1):
                return True
        return False

    def _walk(self) -> None:
        from capstone import CS_ARCH_X86, CS_MODE_64, Cs

        md = Cs(CS_ARCH_X86, CS_MODE_64)
        md.detail = True
        self.md = md
        code = self.code
        off = 0
        self.placed: list[tuple[_Stmt, int, object]] = []  # (stmt, offset, insn or size)
        pending_data: list[tuple[_Stmt, int]] = []
        for s in self.stmts:
            addr = self.load_addr + off
            for lab in s.labels:
                self.labels[lab] = addr
            kind = getattr(s, "kind", "none")
            if kind == "insn":
                insn = next(md.disasm(code[off: off + 15], addr, 1), None)
                if insn is None:
                    raise self._err(s, addr, "keystone output does not decode as an instruction "
                                    f"(bytes {code[off:off + 8].hex()})")
                self.placed.append((s, off, insn))
                off += insn.size
            elif kind == "data":
                size = self._data_size(s, addr)
                if size is None:  # needs labels defined later: computed from the next insn
                    raise self._err(s, addr, "data directive size depends on a forward label")
                self.placed.append((s, off, size))
                pending_data.append((s, off))
                off += size
            if off > len(code):
                self._verify_placed_quietly()
                raise self._err(s, addr, f"the keystone output ends early ({len(code)} bytes): "
                                "some statement was dropped or shortened")
        if off != len(code):
            self._verify_placed_quietly()
            raise GuestBuildError(
                f"{self.name}: keystone emitted {len(code)} bytes but the statements account "
                f"for {off}: an instruction or directive was mis-assembled")

    def _data_size(self, s: _Stmt, addr: int) -> int | None:
        head, _, rest = s.text.partition(" ")
        head = head.lower()
        args = [a.strip() for a in _split_outside_strings(rest, ",")] if rest.strip() else []
        ev = lambda a: _expr(a).eval(self._sym_or_zero, s.where())  # noqa: E731
        if head in _DATA_SIZES:
            return _DATA_SIZES[head] * len(args)
        if head in (".ascii", ".asciz", ".string"):
            z = 0 if head == ".ascii" else 1
            return sum(len(_decode_string(a, s.where())) + z for a in args)
        if head in (".align", ".balign", ".p2align"):
            n = ev(args[0])
            if head == ".p2align":
                n = 1 << n
            if n <= 0 or n & (n - 1):
                raise GuestBuildError(f"{s.where()}: alignment must be a power of two\n    {s.text}")
            return (-addr) % n
        if head in (".space", ".skip", ".zero"):
            return ev(args[0])
        if head == ".fill":
            return ev(args[0]) * (ev(args[1]) if len(args) > 1 else 1)
        if head == ".org":
            target = ev(args[0])
            if target < addr:
                raise GuestBuildError(f"{s.where()}: .org moves backwards\n    {s.text}")
            return target - addr
        return 0

    def _sym_or_zero(self, name: str) -> int | None:
        v = self._sym(name)
        if v is None and name in self.label_names:
            raise GuestBuildError(f"directive depends on forward label {name!r}")
        return v

    # -- verification ------------------------------------------------------------------
    def _err(self, s: _Stmt, addr: int, msg: str, insn=None) -> GuestBuildError:
        dis = ""
        if insn is not None:
            dis = (f"\n    capstone: {insn.address:#x}: {insn.mnemonic} {insn.op_str}"
                   f"   [{bytes(insn.bytes).hex()}]")
        return GuestBuildError(f"{s.where()}: {msg}\n    source:   {s.text}{dis}")

    def _verify_placed_quietly(self) -> None:
        """After a layout inconsistency: raise the first specific mismatch, if any."""
        for s, off, what in self.placed:
            try:
                if isinstance(what, int):
                    self._verify_data(s, self.load_addr + off, off, what)
                else:
                    self._verify_insn(s, what)
            except GuestBuildError as e:
                if "undefined symbol" not in str(e):
                    raise

    def _verify(self) -> None:
        for s, off, what in self.placed:
            addr = self.load_addr + off
            if isinstance(what, int):
                self._verify_data(s, addr, off, what)
            else:
                self._verify_insn(s, what)

    def _verify_data(self, s: _Stmt, addr: int, off: int, size: int) -> None:
        head, _, rest = s.text.partition(" ")
        head = head.lower()
        args = [a.strip() for a in _split_outside_strings(rest, ",")] if rest.strip() else []
        got = self.code[off: off + size]
        expect: bytes | None = None
        if head in _DATA_SIZES:
            w = _DATA_SIZES[head]
            out = bytearray()
            for a in args:
                v = self._eval(_expr(a), s)
                if not (-(1 << (8 * w - 1)) <= v < (1 << (8 * w))):
                    raise self._err(s, addr, f"value {a} = {v:#x} does not fit in {w} bytes")
                out += (v & ((1 << (8 * w)) - 1)).to_bytes(w, "little")
            expect = bytes(out)
        elif head in (".ascii", ".asciz", ".string"):
            z = b"" if head == ".ascii" else b"\0"
            expect = b"".join(_decode_string(a, s.where()) + z for a in args)
        elif head in (".space", ".skip", ".zero"):
            fill = self._eval(_expr(args[1]), s) & 0xFF if len(args) > 1 else 0
            expect = bytes([fill]) * size
        elif head == ".fill":
            n = self._eval(_expr(args[0]), s)
            w = self._eval(_expr(args[1]), s) if len(args) > 1 else 1
            v = self._eval(_expr(args[2]), s) if len(args) > 2 else 0
            expect = (v & ((1 << (8 * w)) - 1)).to_bytes(w, "little") * n if w <= 8 else None
        if expect is not None and expect != got:
            raise self._err(s, addr, f"keystone emitted {got.hex() or 'nothing'}, the source "
                            f"means {expect.hex()}")

    def _verify_insn(self, s: _Stmt, insn) -> None:
        from capstone import x86

        addr = insn.address
        mnem, sops = s.mnem, s.ops
        if sops is None:
            raise self._err(s, addr, f"cannot check this statement: {s.parse_error}", insn)
        if _canon_mnemonic(mnem) != _canon_mnemonic(insn.mnemonic):
            raise self._err(s, addr, f"instruction mismatch: source says {mnem!r}, keystone "
                            f"emitted {insn.mnemonic!r}", insn)
        cops = list(insn.operands)
        base_mnem = mnem.split()[-1]
        pairs: list[tuple[_Op, object]]
        if len(sops) == len(cops):
            pairs = list(zip(sops, cops))
            if base_mnem in ("xchg", "test") and all(o.kind == "reg" for o in sops):
                names = sorted(o.reg for o in sops)
                if names != sorted(insn.reg_name(c.reg) for c in cops):
                    raise self._err(s, addr, "register operands differ", insn)
                return
        elif not sops:
            return  # implicit operands only (movsq, stosq, ...)
        elif len(sops) == 1 and len(cops) == 2 and cops[1].type == x86.X86_OP_IMM \
                and cops[1].imm == 1:
            pairs = [(sops[0], cops[0])]  # shl rax -> shl rax, 1
        elif base_mnem == "imul" and len(sops) == 2 and len(cops) == 3:
            pairs = [(sops[0], cops[0]), (sops[1], cops[2])]
        else:
            raise self._err(s, addr, f"operand count mismatch: source has {len(sops)}, "
                            f"keystone emitted {len(cops)}", insn)
        for so, co in pairs:
            self._verify_operand(s, insn, base_mnem, so, co)

    def _verify_operand(self, s: _Stmt, insn, mnem: str, so: _Op, co) -> None:
        from capstone import x86

        addr = insn.address
        ctype = {x86.X86_OP_REG: "reg", x86.X86_OP_MEM: "mem", x86.X86_OP_IMM: "imm"}[co.type]
        if so.kind != ctype:
            raise self._err(s, addr, f"operand {so.text!r} is a {so.kind} in the source but a "
                            f"{ctype} in the output", insn)
        if ctype == "reg":
            if insn.reg_name(co.reg) != so.reg:
                raise self._err(s, addr, f"register {so.reg} became {insn.reg_name(co.reg)}",
                                insn)
            return
        if ctype == "imm":
            v = self._eval(so.expr, s)
            if mnem in _BRANCHES or (mnem.startswith("j") and mnem != "jmp"):
                if (v & _MASK64) != (co.imm & _MASK64):
                    raise self._err(s, addr, f"branch target {so.text} = {v:#x}, but the "
                                    f"output goes to {co.imm & _MASK64:#x}", insn)
                return
            bits = 8 * co.size
            mask = (1 << bits) - 1
            if not (-(1 << (bits - 1)) <= v < (1 << bits)):
                raise self._err(s, addr, f"immediate {so.text} = {v:#x} does not fit the "
                                f"{co.size}-byte operand: keystone truncated it", insn)
            if (v & mask) != (co.imm & mask):
                raise self._err(s, addr, f"immediate {so.text} = {v:#x} was encoded as "
                                f"{co.imm & mask:#x} ({co.size} bytes)", insn)
            return
        # memory
        sm = so.mem
        mem = co.mem
        cbase = insn.reg_name(mem.base) if mem.base else None
        cindex = insn.reg_name(mem.index) if mem.index else None
        cseg = insn.reg_name(mem.segment) if mem.segment else None
        if sm.size is not None and sm.size != co.size:
            raise self._err(s, addr, f"operand size {sm.size} bytes in the source, "
                            f"{co.size} in the output", insn)
        if sm.seg is not None and cseg != sm.seg and not (cseg is None and sm.seg in ("ds", "ss")):
            raise self._err(s, addr, f"segment {sm.seg} became {cseg}", insn)
        if sm.seg is None and cseg not in (None, "ds", "ss"):
            raise self._err(s, addr, f"the output gained a {cseg} segment override", insn)
        dv = self._eval(sm.disp, s) if sm.disp is not None else 0
        next_ip = insn.address + insn.size
        if sm.base == "rip" and sm.index is None:
            if cbase != "rip":
                raise self._err(s, addr, "RIP-relative operand lost its RIP base", insn)
            if sm.disp is not None and self._has_label(sm.disp):
                got = (next_ip + mem.disp) & _MASK64
                if got != dv & _MASK64:
                    raise self._err(s, addr, f"effective address should be {dv:#x} "
                                    f"({sm.disp.text.strip()}), the output uses {got:#x}", insn)
            elif mem.disp != dv:
                raise self._err(s, addr, f"RIP displacement should be {dv:#x}, the output "
                                f"uses {mem.disp:#x}", insn)
            return
        if sm.base is None and sm.index is None:
            # absolute: [label] or [fs:number]
            if cbase == "rip" and cindex is None:
                got = (next_ip + mem.disp) & _MASK64
            elif cbase is None and cindex is None:
                got = mem.disp & _MASK64
            else:
                raise self._err(s, addr, "absolute operand gained a base/index register", insn)
            if got != dv & _MASK64:
                raise self._err(s, addr, f"effective address should be {dv & _MASK64:#x}, "
                                f"the output uses {got:#x}", insn)
            if cbase == "rip" and sm.seg in ("fs", "gs"):
                raise self._err(s, addr, "fs/gs absolute operand became RIP-relative", insn)
            return
        sregs = (sm.base, sm.index, sm.scale)
        cregs = (cbase, cindex, mem.scale)
        ok = sregs == cregs
        if not ok and sm.scale == 1 and mem.scale == 1:
            ok = {sm.base, sm.index} == {cbase, cindex}
        if not ok:
            raise self._err(s, addr, f"address registers {sregs} became {cregs}", insn)
        if (mem.disp & _MASK64) != (dv & _MASK64):
            raise self._err(s, addr, f"displacement should be {dv:#x}, the output uses "
                            f"{mem.disp:#x}", insn)


class _KsFail(Exception):
    def __init__(self, msg: str, errno: int):
        super().__init__(msg)
        self.msg = msg
        self.errno = errno
