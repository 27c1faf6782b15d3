"""Build step for guests: preprocess, assemble with keystone, verify with capstone.

keystone-engine 0.9.2 silently miscompiles several x86-64 forms (docs/ENGINE.md K1-K4):
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

The build's pieces: :mod:`~hvmodel.guest.preproc` (includes, defines, repeats, statements),
:mod:`~hvmodel.guest.expr` (constant expressions), :mod:`~hvmodel.guest.operands` (what an
operand or data directive says), this module (keystone: classify, lint, assemble, locate
errors) and :mod:`~hvmodel.guest.verify` (capstone: place and check every statement).
"""

from __future__ import annotations

import re
from pathlib import Path

from .expr import IDENT, Expr, parse_expr
from .image import DEFAULT_LOAD_ADDR, GuestBuildError, GuestImage
from .operands import DATA_SIZES, NOBYTE_DIRECTIVES, parse_operand
from .preproc import Preprocessor, Stmt, default_include_dirs, split_outside_strings
from .verify import Verifier

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


# --------------------------------------------------------------------------------------
# build (keystone)

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
    pp = Preprocessor(dirs)
    pp.process(text, name, path)
    return Assembler(pp.stmts, load_addr, name).run()


def build_file(path: str | Path, **kw) -> GuestImage:
    return build(Path(path), **kw)


class Assembler:
    """keystone's side of a build: statements classified and linted, assembled, errors located."""

    def __init__(self, stmts: list[Stmt], load_addr: int, name: str):
        self.stmts = stmts
        self.load_addr = load_addr
        self.name = name
        self.labels: dict[str, int] = {}
        self.equs: dict[str, Expr] = {}
        self.label_names: set[str] = set()

    # -- keystone -----------------------------------------------------------------
    def _ks(self):
        from keystone import KS_ARCH_X86, KS_MODE_64, Ks

        return Ks(KS_ARCH_X86, KS_MODE_64)

    def _assemble(self, stmts: list[Stmt]) -> bytes:
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
    def _ks_line(s: Stmt) -> str:
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
            tail = [Stmt("<stub>", 0, "", later_labels)] if later_labels else []
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
        labels = Verifier(self.stmts, code, self.load_addr, self.name, self.equs, self.label_names).run()
        return GuestImage(code=code, load_addr=self.load_addr, entry=self.load_addr,
                          symbols=dict(labels), source_name=self.name)

    def _lint(self, s: Stmt) -> None:
        t = s.text
        if not t:
            return
        head = t.split(None, 1)[0].lower()
        m = re.match(rf"^\s*({IDENT})\s*=\s*(.+)$", t)
        if head in (".equ", ".set") or m:
            if m and head not in (".equ", ".set"):
                name, expr = m.group(1), m.group(2)
            else:
                parts = t.split(None, 1)[1].split(",", 1) if len(t.split(None, 1)) > 1 else []
                if len(parts) != 2:
                    raise GuestBuildError(f"{s.where()}: expected '.equ NAME, value'\n    {t}")
                name, expr = parts[0].strip(), parts[1].strip()
            self.equs[name] = parse_expr(expr)
            s.kind = "equ"
            return
        if head.startswith("."):
            if head in DATA_SIZES or head in (".ascii", ".asciz", ".string", ".align",
                                               ".balign", ".p2align", ".space", ".skip",
                                               ".zero", ".fill", ".org"):
                s.kind = "data"
            elif head in NOBYTE_DIRECTIVES:
                s.kind = "none"
            else:
                raise GuestBuildError(f"{s.where()}: unsupported directive {head}\n    {t}")
            return
        s.kind = "insn"
        s.mnem, ops_text = self._split_insn(t)
        try:
            s.ops = [parse_operand(o, s.where()) for o in ops_text]
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
                        "0.9.2 encodes it RIP-relative or miscompiles it (docs/ENGINE.md K1); "
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
        ops = [o.strip() for o in split_outside_strings(rest, ",")] if rest.strip() else []
        return mnem, ops

class _KsFail(Exception):
    def __init__(self, msg: str, errno: int):
        super().__init__(msg)
        self.msg = msg
        self.errno = errno
