"""The capstone verifier: keystone's output, decoded statement by statement, must be what the
source says (the rules are in :mod:`hvmodel.guest.asm`'s docstring).

:class:`Verifier` walks the output once to place every statement (which also gives every
label its address), then compares each instruction — mnemonic, operand kinds, registers,
immediates, memory operands, branch targets — and each data directive's bytes with the
source. Any difference is a :class:`~hvmodel.guest.image.GuestBuildError` naming the
statement, its source text and what capstone decoded.
"""

from __future__ import annotations

from .expr import Expr, parse_expr
from .image import GuestBuildError
from .operands import BRANCHES, DATA_SIZES, Operand, canon_mnemonic, decode_string
from .preproc import Stmt, split_outside_strings

MASK64 = (1 << 64) - 1


class Verifier:
    """Places and checks the statements ``stmts`` against ``code`` assembled at ``load_addr``."""

    def __init__(self, stmts: list[Stmt], code: bytes, load_addr: int, name: str, equs: dict[str, Expr],
                 label_names: set[str]) -> None:
        self.stmts = stmts
        self.code = code
        self.load_addr = load_addr
        self.name = name
        self.equs = equs
        self.label_names = label_names
        self.labels: dict[str, int] = {}

    def run(self) -> dict[str, int]:
        """Place every statement, check each; return the label addresses."""
        self._walk()
        self._verify()
        return self.labels

    # -- layout walk -------------------------------------------------------------------
    def _sym(self, name: str, _depth: int = 0) -> int | None:
        if name in self.labels:
            return self.labels[name]
        if name in self.equs and _depth < 32:
            return self.equs[name].eval(lambda n: self._sym(n, _depth + 1))
        return None

    def _eval(self, e: Expr, s: Stmt) -> int:
        return e.eval(self._sym, s.where())

    def _has_label(self, e: Expr, _depth: int = 0) -> bool:
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
        self.placed: list[tuple[Stmt, int, object]] = []  # (stmt, offset, insn or size)
        pending_data: list[tuple[Stmt, int]] = []
        for s in self.stmts:
            addr = self.load_addr + off
            for lab in s.labels:
                self.labels[lab] = addr
            kind = s.kind
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

    def _data_size(self, s: Stmt, addr: int) -> int | None:
        head, _, rest = s.text.partition(" ")
        head = head.lower()
        args = [a.strip() for a in split_outside_strings(rest, ",")] if rest.strip() else []
        ev = lambda a: parse_expr(a).eval(self._sym_or_zero, s.where())  # noqa: E731
        if head in DATA_SIZES:
            return DATA_SIZES[head] * len(args)
        if head in (".ascii", ".asciz", ".string"):
            z = 0 if head == ".ascii" else 1
            return sum(len(decode_string(a, s.where())) + z for a in args)
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
    def _err(self, s: Stmt, addr: int, msg: str, insn=None) -> GuestBuildError:
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

    def _verify_data(self, s: Stmt, addr: int, off: int, size: int) -> None:
        head, _, rest = s.text.partition(" ")
        head = head.lower()
        args = [a.strip() for a in split_outside_strings(rest, ",")] if rest.strip() else []
        got = self.code[off: off + size]
        expect: bytes | None = None
        if head in DATA_SIZES:
            w = DATA_SIZES[head]
            out = bytearray()
            for a in args:
                v = self._eval(parse_expr(a), s)
                if not (-(1 << (8 * w - 1)) <= v < (1 << (8 * w))):
                    raise self._err(s, addr, f"value {a} = {v:#x} does not fit in {w} bytes")
                out += (v & ((1 << (8 * w)) - 1)).to_bytes(w, "little")
            expect = bytes(out)
        elif head in (".ascii", ".asciz", ".string"):
            z = b"" if head == ".ascii" else b"\0"
            expect = b"".join(decode_string(a, s.where()) + z for a in args)
        elif head in (".space", ".skip", ".zero"):
            fill = self._eval(parse_expr(args[1]), s) & 0xFF if len(args) > 1 else 0
            expect = bytes([fill]) * size
        elif head == ".fill":
            n = self._eval(parse_expr(args[0]), s)
            w = self._eval(parse_expr(args[1]), s) if len(args) > 1 else 1
            v = self._eval(parse_expr(args[2]), s) if len(args) > 2 else 0
            expect = (v & ((1 << (8 * w)) - 1)).to_bytes(w, "little") * n if w <= 8 else None
        if expect is not None and expect != got:
            raise self._err(s, addr, f"keystone emitted {got.hex() or 'nothing'}, the source "
                            f"means {expect.hex()}")

    def _verify_insn(self, s: Stmt, insn) -> None:
        from capstone import x86

        addr = insn.address
        mnem, sops = s.mnem, s.ops
        if sops is None:
            raise self._err(s, addr, f"cannot check this statement: {s.parse_error}", insn)
        if canon_mnemonic(mnem) != canon_mnemonic(insn.mnemonic):
            raise self._err(s, addr, f"instruction mismatch: source says {mnem!r}, keystone "
                            f"emitted {insn.mnemonic!r}", insn)
        cops = list(insn.operands)
        base_mnem = mnem.split()[-1]
        pairs: list[tuple[Operand, object]]
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

    def _verify_operand(self, s: Stmt, insn, mnem: str, so: Operand, co) -> None:
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
            if mnem in BRANCHES or (mnem.startswith("j") and mnem != "jmp"):
                if (v & MASK64) != (co.imm & MASK64):
                    raise self._err(s, addr, f"branch target {so.text} = {v:#x}, but the "
                                    f"output goes to {co.imm & MASK64:#x}", insn)
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
                got = (next_ip + mem.disp) & MASK64
                if got != dv & MASK64:
                    raise self._err(s, addr, f"effective address should be {dv:#x} "
                                    f"({sm.disp.text.strip()}), the output uses {got:#x}", insn)
            elif mem.disp != dv:
                raise self._err(s, addr, f"RIP displacement should be {dv:#x}, the output "
                                f"uses {mem.disp:#x}", insn)
            return
        if sm.base is None and sm.index is None:
            # absolute: [label] or [fs:number]
            if cbase == "rip" and cindex is None:
                got = (next_ip + mem.disp) & MASK64
            elif cbase is None and cindex is None:
                got = mem.disp & MASK64
            else:
                raise self._err(s, addr, "absolute operand gained a base/index register", insn)
            if got != dv & MASK64:
                raise self._err(s, addr, f"effective address should be {dv & MASK64:#x}, "
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
        if (mem.disp & MASK64) != (dv & MASK64):
            raise self._err(s, addr, f"displacement should be {dv:#x}, the output uses "
                            f"{mem.disp:#x}", insn)
