"""A GDB remote-protocol stub for one VM: ``hvmodel run … --gdb tcp::1234 [-S]``.

It speaks what gdb needs for an x86-64 bare-metal target (the GDB manual's
"Remote Protocol" appendix): packets ``$data#checksum`` acknowledged with ``+``,
``?``, ``g``/``G`` and ``p``/``P`` with an amd64 target description
(``qXfer:features:read``: the core and SSE features gdb's amd64 target expects,
plus fs_base/gs_base and the control registers), ``m``/``M`` on guest-virtual
addresses translated through the guest's own tables (the one walker, read-only),
``Z0``/``Z1`` breakpoints (both are Unicorn code hooks on the address — the
guest's code is never patched), ``s``, ``c``, Ctrl-C (0x03) while running,
``qRcmd`` (``monitor …``, see ``hvmodel/debug/monitor.py``), ``k`` and ``D``.

Execution goes through the VM's own run loop (``VM.step``), slice by slice, so
timers, interrupts and exits behave as in a plain run; after each quantum of
guest time the host's memory policy runs as in ``Host.run``. Breakpoints stop
before the instruction executes and cost nothing elsewhere: they are code hooks
on their address only, off the TLB-fill path.

Stop replies: ``S05`` after a step or a breakpoint, ``S02`` after Ctrl-C,
``W<status>`` when the guest powers off, ``X06`` when it dies (triple fault,
instruction limit, …). Only one connection is served; the socket listens on
127.0.0.1.
"""

from __future__ import annotations

import select
import socket
import sys
from typing import TYPE_CHECKING

from unicorn import UC_HOOK_CODE
from unicorn import x86_const as X

from ..mmu.walk import ACC_READ, ADDR_MASK, paging_ctl, walk
from ..vm.exits import ExitReason, VmExit
from ..vm.vcpu import GuestAccessFault, PeekMemory
from ..vm.vm import DEFAULT_MAX_INSNS
from . import monitor

if TYPE_CHECKING:
    from ..host.host import Host
    from ..vm.vm import VM


class GdbStubError(Exception):
    """The stub cannot serve (bad address, port in use)."""


# (name, bits, unicorn id, gdb type) in the order of the 'g' packet.
_GPR = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp"] + [f"r{i}" for i in range(8, 16)]
REGISTERS: list[tuple[str, int, int | None, str]] = (
    [(n, 64, getattr(X, f"UC_X86_REG_{n.upper()}"), "int64") for n in _GPR]
    + [("rip", 64, X.UC_X86_REG_RIP, "code_ptr"), ("eflags", 32, X.UC_X86_REG_EFLAGS, "i386_eflags")]
    + [(s, 32, getattr(X, f"UC_X86_REG_{s.upper()}"), "int32") for s in ("cs", "ss", "ds", "es", "fs", "gs")]
    + [(f"st{i}", 80, X.UC_X86_REG_FP0 + i, "i387_ext") for i in range(8)]
    + [("fctrl", 32, X.UC_X86_REG_FPCW, "int"), ("fstat", 32, X.UC_X86_REG_FPSW, "int"),
       ("ftag", 32, X.UC_X86_REG_FPTAG, "int"), ("fiseg", 32, X.UC_X86_REG_FCS, "int"),
       ("fioff", 32, X.UC_X86_REG_FIP, "int"), ("foseg", 32, X.UC_X86_REG_FDS, "int"),
       ("fooff", 32, X.UC_X86_REG_FDP, "int"), ("fop", 32, X.UC_X86_REG_FOP, "int")]
    + [(f"xmm{i}", 128, X.UC_X86_REG_XMM0 + i, "vec128") for i in range(16)]
    + [("mxcsr", 32, X.UC_X86_REG_MXCSR, "i386_mxcsr")]
    + [("fs_base", 64, X.UC_X86_REG_FS_BASE, "int64"), ("gs_base", 64, X.UC_X86_REG_GS_BASE, "int64")]
    + [(c, 64, getattr(X, f"UC_X86_REG_{c.upper()}"), "int64") for c in ("cr0", "cr2", "cr3", "cr4")]
    + [("efer", 64, None, "int64")]
)
# Registers a debugger may change: the general registers, RIP, RFLAGS, SSE state.
_WRITABLE = set(_GPR) | {"rip", "eflags", "mxcsr"} | {f"xmm{i}" for i in range(16)}
_FEATURES = {  # first register of each feature
    "rax": "org.gnu.gdb.i386.core", "xmm0": "org.gnu.gdb.i386.sse", "fs_base": "org.gnu.gdb.i386.segments",
    "cr0": "org.hvmodel.x86.sys"}


def target_xml() -> str:
    """The amd64 target description, built from REGISTERS."""
    parts = ['<?xml version="1.0"?>', '<!DOCTYPE target SYSTEM "gdb-target.dtd">', "<target>",
             "<architecture>i386:x86-64</architecture>"]
    open_feature = False
    for i, (name, bits, _rid, typ) in enumerate(REGISTERS):
        if name in _FEATURES:
            if open_feature:
                parts.append("</feature>")
            parts.append(f'<feature name="{_FEATURES[name]}">')
            if name == "rax":
                parts.append('<flags id="i386_eflags" size="4">' + "".join(
                    f'<field name="{f}" start="{b}" end="{b}"/>' for f, b in
                    (("CF", 0), ("PF", 2), ("AF", 4), ("ZF", 6), ("SF", 7), ("TF", 8), ("IF", 9), ("DF", 10),
                     ("OF", 11), ("NT", 14), ("RF", 16), ("VM", 17), ("AC", 18))) + "</flags>")
            if name == "xmm0":
                parts.append('<vector id="v4f" type="ieee_single" count="4"/><vector id="v2d" type="ieee_double" '
                             'count="2"/><vector id="v16i8" type="int8" count="16"/><vector id="v8i16" '
                             'type="int16" count="8"/><vector id="v4i32" type="int32" count="4"/><vector '
                             'id="v2i64" type="int64" count="2"/><union id="vec128"><field name="v4_float" '
                             'type="v4f"/><field name="v2_double" type="v2d"/><field name="v16_int8" '
                             'type="v16i8"/><field name="v8_int16" type="v8i16"/><field name="v4_int32" '
                             'type="v4i32"/><field name="v2_int64" type="v2i64"/><field name="uint128" '
                             'type="uint128"/></union><flags id="i386_mxcsr" size="4">' + "".join(
                                 f'<field name="{f}" start="{b}" end="{b}"/>' for f, b in
                                 (("IE", 0), ("DE", 1), ("ZE", 2), ("OE", 3), ("UE", 4), ("PE", 5), ("DAZ", 6),
                                  ("IM", 7), ("DM", 8), ("ZM", 9), ("OM", 10), ("UM", 11), ("PM", 12),
                                  ("FZ", 15))) + "</flags>")
            open_feature = True
        group = ' group="float"' if name.startswith("st") or name.startswith("f") and name not in (
            "fs", "fs_base") else ""
        parts.append(f'<reg name="{name}" bitsize="{bits}" type="{typ}" regnum="{i}"{group}/>')
    parts += ["</feature>", "</target>"]
    return "".join(parts)


def _checksum(data: bytes) -> int:
    return sum(data) & 0xFF


class GdbStub:
    """Serves one gdb connection for ``vm`` (on ``host``, whose memory policy keeps running)."""

    def __init__(self, vm: "VM", host: "Host | None" = None, *, port: int = 1234, wait: bool = True,
                 max_insns: int = DEFAULT_MAX_INSNS, log=None) -> None:
        self.vm = vm
        self.host = host
        self.wait = wait
        self.max_insns = max_insns
        self.log = log if log is not None else sys.stderr
        self.breakpoints: dict[int, int] = {}   # address -> hook handle
        self.bp_hit: int | None = None
        self.skip_bp: int | None = None
        self.conn: socket.socket | None = None
        self._buf = b""
        self.xml = target_xml().encode()
        self.server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.server.bind(("127.0.0.1", port))
        except OSError as e:
            self.server.close()
            raise GdbStubError(f"--gdb: cannot listen on 127.0.0.1:{port}: {e.strerror}") from None
        self.server.listen(1)
        self.port = self.server.getsockname()[1]

    # -- the session ------------------------------------------------------------------

    def serve(self) -> None:
        """Wait for gdb, then serve until the VM stops or gdb detaches/kills it.

        Without ``wait`` (no ``-S``) the VM runs until a debugger connects.
        """
        print(f"hvmodel: gdb stub listening on 127.0.0.1:{self.port}", file=self.log, flush=True)
        if not self.wait:
            self.server.setblocking(False)
            while self.vm.running:
                try:
                    self.conn, _ = self.server.accept()
                    break
                except BlockingIOError:
                    self._run_quantum()
            self.server.setblocking(True)
            if self.conn is None:
                return
        else:
            self.conn, _ = self.server.accept()
        self.conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                pkt = self._read_packet()
                if pkt is None:
                    break
                reply = self._handle(pkt)
                if reply is None:  # kill / detach
                    break
                self._send(reply)
        finally:
            self.close()
        # A detached debugger leaves the guest running to its end (from a breakpoint stop
        # too: with bp_hit still set no quantum would run, and the run never ended).
        self.bp_hit = None
        while self.vm.running:
            self._run_quantum()

    def close(self) -> None:
        for h in self.breakpoints.values():
            self.vm.vcpu.uc.hook_del(h)
        self.breakpoints.clear()
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        self.server.close()

    # -- packet layer -------------------------------------------------------------------

    def _recv(self) -> bytes:
        data = self.conn.recv(4096)
        if not data:
            raise ConnectionError("gdb closed the connection")
        return data

    def _read_packet(self) -> str | None:
        try:
            while True:
                while b"$" not in self._buf:
                    self._buf = self._recv()  # acks ('+'/'-') and a stray Ctrl-C are dropped
                start = self._buf.index(b"$")
                while b"#" not in self._buf[start:] or len(self._buf) < self._buf.index(b"#", start) + 3:
                    self._buf += self._recv()
                end = self._buf.index(b"#", start)
                body = self._buf[start + 1:end]
                cs = self._buf[end + 1:end + 3]
                self._buf = self._buf[end + 3:]
                if int(cs, 16) == _checksum(body):
                    self.conn.sendall(b"+")
                    return body.decode("latin-1")
                self.conn.sendall(b"-")
        except (ConnectionError, OSError, ValueError):
            return None

    def _send(self, data: str) -> None:
        raw = data.encode("latin-1")
        self.conn.sendall(b"$" + raw + b"#%02x" % _checksum(raw))
        # Wait for the ack (a Ctrl-C may arrive first while nothing runs: ignore it).
        while True:
            while not self._buf:
                self._buf = self._recv()
            c, self._buf = self._buf[:1], self._buf[1:]
            if c == b"+":
                return
            if c == b"-":
                self.conn.sendall(b"$" + raw + b"#%02x" % _checksum(raw))

    def _output(self, lines: list[str]) -> None:
        """Console output to gdb ('O' packets), for monitor commands."""
        text = "".join(line + "\n" for line in lines)
        for i in range(0, len(text), 400):
            self._send("O" + text[i:i + 400].encode().hex())

    # -- commands -------------------------------------------------------------------

    def _handle(self, pkt: str) -> str | None:
        c = pkt[:1]
        if c == "?":
            return "S05"
        if c == "g":
            return "".join(self._reg_hex(i) for i in range(len(REGISTERS)))
        if c == "G":
            return self._write_all(pkt[1:])
        if c == "p":
            i = int(pkt[1:], 16)
            return self._reg_hex(i) if i < len(REGISTERS) else "E00"
        if c == "P":
            num, _, val = pkt[1:].partition("=")
            return self._write_reg(int(num, 16), bytes.fromhex(val))
        if c == "m":
            addr, _, length = pkt[1:].partition(",")
            return self._read_mem(int(addr, 16), int(length, 16))
        if c == "M":
            head, _, data = pkt[1:].partition(":")
            addr, _, _length = head.partition(",")
            return self._write_mem(int(addr, 16), bytes.fromhex(data))
        if c in "Zz" and pkt[1:2] in ("0", "1"):
            _, addr, _kind = pkt[1:].split(",")
            return self._breakpoint(int(addr, 16), insert=c == "Z")
        if c == "s":
            if len(pkt) > 1:
                self.vm.vcpu.set_reg(X.UC_X86_REG_RIP, int(pkt[1:], 16))
            return self._step()
        if c == "c":
            if len(pkt) > 1:
                self.vm.vcpu.set_reg(X.UC_X86_REG_RIP, int(pkt[1:], 16))
            return self._continue()
        if c == "k":
            self.vm._stop("killed", "killed by the debugger", status=None)
            return None
        if c == "D":
            self._send("OK")
            return None
        if c == "H":
            return "OK"
        if c == "T":
            return "OK"
        if pkt.startswith("qSupported"):
            return "PacketSize=4000;qXfer:features:read+"
        if pkt.startswith("qXfer:features:read:target.xml:"):
            off, _, length = pkt.rsplit(":", 1)[1].partition(",")
            off, length = int(off, 16), int(length, 16)
            chunk = self.xml[off:off + length]
            return ("m" if off + length < len(self.xml) else "l") + chunk.decode()
        if pkt == "qC":
            return "QC1"
        if pkt == "qfThreadInfo":
            return "m1"
        if pkt == "qsThreadInfo":
            return "l"
        if pkt == "qAttached":
            return "1"
        if pkt.startswith("qRcmd,"):
            line = bytes.fromhex(pkt[6:]).decode(errors="replace")
            self._output(monitor.command(self.vm, line))
            return "OK"
        return ""  # not supported: gdb falls back (vCont, X, qTStatus, ...)

    # -- registers --------------------------------------------------------------------

    def _reg_value(self, i: int) -> int:
        name, bits, rid, _ = REGISTERS[i]
        v = self.vm.vcpu
        if name == "efer":
            return v.efer()
        val = v.reg(rid)
        if bits == 80:
            mantissa, exponent = val
            return mantissa | (exponent << 64)
        return val & ((1 << bits) - 1)

    def _reg_hex(self, i: int) -> str:
        bits = REGISTERS[i][1]
        return self._reg_value(i).to_bytes(bits // 8, "little").hex()

    def _write_reg(self, i: int, raw: bytes) -> str:
        if i >= len(REGISTERS):
            return "E00"
        name, bits, rid, _ = REGISTERS[i]
        if name not in _WRITABLE:
            return "E01"  # segment, x87 and control registers are read-only through the stub
        self.vm.vcpu.set_reg(rid, int.from_bytes(raw[:bits // 8], "little"))
        return "OK"

    def _write_all(self, hexdata: str) -> str:
        raw = bytes.fromhex(hexdata)
        pos = 0
        for i, (name, bits, _rid, _) in enumerate(REGISTERS):
            n = bits // 8
            if pos + n > len(raw):
                break
            if name in _WRITABLE:
                self._write_reg(i, raw[pos:pos + n])
            pos += n
        return "OK"

    # -- memory -----------------------------------------------------------------------

    def _read_mem(self, addr: int, length: int) -> str:
        out = bytearray()
        v = self.vm.vcpu
        while length:
            n = min(length, 0x1000 - (addr & 0xFFF))
            try:
                out += v.vmem_read(addr, n, peek=True)
            except GuestAccessFault:
                break
            addr = (addr + n) & ((1 << 64) - 1)
            length -= n
        return out.hex() if out else "E14"

    def _gpa(self, va: int) -> int:
        """Guest-virtual -> guest-physical through the guest's tables (read-only walk)."""
        v = self.vm.vcpu
        ctl = paging_ctl(v.reg(X.UC_X86_REG_CR0), v.reg(X.UC_X86_REG_CR4), v.efer(), 0, False)
        r = walk(PeekMemory(v), v.reg(X.UC_X86_REG_CR3), va, ACC_READ, False, ctl)
        if r < 0:
            raise GuestAccessFault(~r, va, ACC_READ)
        return (r & ADDR_MASK) | (va & 0xFFF)

    def _write_mem(self, addr: int, data: bytes) -> str:
        """A debugger write (e.g. ``set var``): like ptrace, it ignores the guest's write protection."""
        vm = self.vm
        pos = 0
        try:
            while pos < len(data):
                n = min(len(data) - pos, 0x1000 - ((addr + pos) & 0xFFF))
                gpa = self._gpa(addr + pos)
                if gpa + n > vm.config.memsize:
                    return "E14"
                vm.ram.write_gpa(gpa, data[pos:pos + n])   # the p2m backs / un-shares the page
                if vm.p2m is not None:
                    vm.p2m.changed(gpa >> 12)                # derived translations (shadow) drop it
                pos += n
        except GuestAccessFault:
            return "E14"
        if vm.mmu.flush_pending:
            vm.vcpu.flush_tlb()
        # Translated code is keyed by machine address and not told about this write.
        vm.vcpu.uc.ctl_flush_tb()
        vm.vcpu.invlpg.forget()
        return "OK"

    # -- breakpoints and execution ---------------------------------------------------------

    def _breakpoint(self, addr: int, insert: bool) -> str:
        uc = self.vm.vcpu.uc
        if insert and addr not in self.breakpoints:
            self.breakpoints[addr] = uc.hook_add(UC_HOOK_CODE, self._on_bp, None, addr, addr)
        elif not insert and addr in self.breakpoints:
            uc.hook_del(self.breakpoints.pop(addr))
        # Hooks are compiled into translated code: translate again.
        uc.ctl_flush_tb()
        return "OK"

    def _on_bp(self, uc, address: int, _size: int, _ud: object) -> None:
        if address == self.skip_bp:
            return  # resuming from this breakpoint: execute it once
        self.bp_hit = address
        self.vm.vcpu.request_exit(VmExit(ExitReason.SLICE_END, message="breakpoint"), before=True)

    def _stop_reply(self) -> str:
        vm = self.vm
        if vm.stopped:
            if vm.exit_status is not None:
                return f"W{vm.exit_status & 0xFF:02x}"
            return "X06"
        return "S05"

    def _step(self) -> str:
        vm = self.vm
        if vm.running:
            self.skip_bp = vm.vcpu.rip
            try:
                vm.step(self.max_insns, 1)
            finally:
                self.skip_bp = None
            self.bp_hit = None
        return self._stop_reply()

    def _run_quantum(self) -> None:
        """About one host quantum of guest time, then the host's memory policy."""
        vm = self.vm
        quantum = self.host.config.quantum if self.host is not None else 1_000_000
        start = vm.clock()
        end = start + quantum
        while vm.running and vm.clock() < end and self.bp_hit is None:
            vm.step(self.max_insns, max(1, end - vm.clock()))
        if self.host is not None and vm.running:
            self.host.policy(vm, vm.clock() - start)

    def _interrupted(self) -> bool:
        if self._buf.startswith(b"\x03"):
            self._buf = self._buf[1:]
            return True
        r, _, _ = select.select([self.conn], [], [], 0)
        if r:
            data = self.conn.recv(4096)
            if not data:
                raise ConnectionError("gdb closed the connection")
            self._buf += data
            if self._buf.startswith(b"\x03"):
                self._buf = self._buf[1:]
                return True
        return False

    def _continue(self) -> str:
        vm = self.vm
        self.bp_hit = None
        if vm.running and vm.vcpu.rip in self.breakpoints:
            self._step()  # leave the breakpoint we are stopped at
            if self.bp_hit is not None or vm.stopped:
                return self._stop_reply()
        while vm.running and self.bp_hit is None:
            if self._interrupted():
                return "S02"
            self._run_quantum()
        return self._stop_reply()
