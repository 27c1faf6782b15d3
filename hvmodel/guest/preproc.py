"""The guest source preprocessor: comments, ``%include``, ``%define``, ``%rep``, labels, statements.

Its output is a list of :class:`Stmt` — one statement each, comment-free, defines
substituted, labels split off — with the file and line it came from (the language is
described in :mod:`hvmodel.guest.asm`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .expr import IDENT, Expr
from .image import GuestBuildError

@dataclass
class Stmt:
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


_LABEL_RE = re.compile(rf"^\s*({IDENT}|\d+)\s*:(?!:)")
_INCLUDE_RE = re.compile(r'^\s*[%.]include\s+(?:"([^"]+)"|<([^>]+)>|(\S+))\s*$')
_DEFINE_RE = re.compile(rf"^\s*%define\s+({IDENT})(?:\s+(.*))?$")
_WORD_RE = re.compile(IDENT)
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


def split_outside_strings(s: str, sep: str) -> list[str]:
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


class Preprocessor:
    def __init__(self, include_dirs: list[Path]):
        self.include_dirs = include_dirs
        self.defines: dict[str, str] = {}
        self.stmts: list[Stmt] = []
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
                    count = Expr(self._subst(parts[1], where)).eval({}, where)
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
        for piece in split_outside_strings(line, ";"):
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
            self.stmts.append(Stmt(name, lineno, piece, labels))
