"""Constant expressions in guest sources (``.equ``, data directives, displacements, immediates).

Parsed once into an :class:`Expr` (cached by text) and evaluated against a symbol table
once label addresses are known; numbers as the assembler reads them (``0x``, ``0b``,
``0o``, decimal, character literals).
"""

from __future__ import annotations

import ast
import re

from .image import GuestBuildError

IDENT = r"[A-Za-z_.$][\w.$]*"   # a symbol: label, constant or register name

_NUM_RE = re.compile(
    r"0[xX][0-9a-fA-F]+|0[bB][01]+|[0-9][0-9a-fA-F]*[hH](?![\w])|[0-9]+|'(?:\\.|[^'\\])'"
)
_TOKEN_RE = re.compile(rf"\s*(?:({_NUM_RE.pattern})|({IDENT})|(<<|>>|[-+*/%|&^~()!]))")


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


def parse_expr(text: str) -> "Expr":
    e = _EXPR_CACHE.get(text)
    if e is None:
        if len(_EXPR_CACHE) > 200_000:
            _EXPR_CACHE.clear()
        e = _EXPR_CACHE[text] = Expr(text)
    return e


_EXPR_CACHE: dict[str, "Expr"] = {}


class Expr:
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
