"""The GDB stub: driven by the real gdb, and packet by packet over a socket."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import threading

import pytest

from hvmodel.boot.loader import load_kernel
from hvmodel.debug.gdbstub import REGISTERS, GdbStub, target_xml
from hvmodel.guest.asm import build
from hvmodel.host.host import Host, HostConfig
from hvmodel.vm.vm import VMConfig


def gdb_or_skip() -> str:
    """The gdb binary; installed from the Debian archive if missing (skipped only if that fails)."""
    gdb = shutil.which("gdb")
    if gdb is None and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "gdb"], capture_output=True, timeout=600)
        gdb = shutil.which("gdb")
    if gdb is None:
        pytest.skip("gdb is not installed and 'apt-get install -y gdb' did not provide it")
    return gdb


def test_real_gdb_session(kernels):
    gdb = gdb_or_skip()
    mb, _ = kernels
    hv = subprocess.Popen([sys.executable, "-m", "hvmodel", "run", str(mb), "--gdb", "tcp::0", "-S", "--quiet",
                           "--append", "exit=3"], stderr=subprocess.PIPE, text=True)
    try:
        line = hv.stderr.readline()
        assert "gdb stub listening on 127.0.0.1:" in line, line
        port = line.rsplit(":", 1)[1].strip()
        cmds = [f"target remote 127.0.0.1:{port}", "info registers rip cs eax", "break kmain", "continue",
                "stepi", "info registers rip", "break power_off", "continue", "print ud_count",
                "print pf_count", "print/x last_cr2", "print/x last_error", "info registers cr3",
                "monitor walk 0x100000000", "monitor p2m 0x1000000", "monitor stats", "continue"]
        args = [gdb, "-q", "-nx", "-batch", str(mb)]
        for c in cmds:
            args += ["-ex", c]
        proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
        out = proc.stdout + proc.stderr  # gdb prints monitor output on stderr in batch mode
        rc = hv.wait(timeout=60)
    finally:
        if hv.poll() is None:
            hv.kill()
    assert "rip            0x100020            0x100020 <_start>" in out, out
    assert "eax            0x2badb002" in out
    assert "Breakpoint 1, kmain (magic=732803074, info_addr=38144)" in out
    assert "Breakpoint 2, power_off (status=3)" in out
    assert "$1 = 1" in out and "$2 = 1" in out and "$3 = 0x100000000" in out and "$4 = 0x2" in out
    assert "walk of 0x100000000 in kernel (nested)" in out
    assert "guest PDPTE at gpa" in out and "EPT PTE at machine" in out
    assert "guest physical 0x1000000 (rights RWX)" in out
    assert "p2m gfn 0x1000: PRIVATE, machine frame" in out
    assert "instructions" in out and "tlb_fills" in out
    assert "exited with code 03" in out
    assert rc == 3


class Client:
    """A minimal GDB remote-protocol client for the packet-level tests."""

    def __init__(self, port: int) -> None:
        self.s = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.buf = b""

    def _read_reply(self) -> str:
        while True:
            while b"#" not in self.buf or len(self.buf) < self.buf.index(b"#") + 3:
                self.buf += self.s.recv(65536)
            start = self.buf.index(b"$")
            end = self.buf.index(b"#")
            body = self.buf[start + 1:end].decode()
            self.buf = self.buf[end + 3:]
            self.s.sendall(b"+")
            if not body.startswith("O") or body == "OK":
                return body

    def cmd(self, body: str) -> str:
        raw = body.encode()
        self.s.sendall(b"$" + raw + b"#%02x" % (sum(raw) & 0xFF))
        while not self.buf.startswith(b"+"):
            self.buf += self.s.recv(65536)
            if self.buf and not self.buf.startswith(b"+"):
                raise AssertionError(f"no ack: {self.buf!r}")
        self.buf = self.buf[1:]
        return self._read_reply()


def serve(vm, host):
    stub = GdbStub(vm, host, port=0, wait=True, log=open("/dev/null", "w"))
    t = threading.Thread(target=stub.serve, daemon=True)
    t.start()
    return stub, t, Client(stub.port)


def reg(c: Client, name: str) -> int:
    i = [r[0] for r in REGISTERS].index(name)
    return int.from_bytes(bytes.fromhex(c.cmd(f"p{i:x}")), "little")


def test_breakpoints_do_not_change_guest_time(kernels):
    mb, _ = kernels
    image = load_kernel(mb)
    plain_host = Host(HostConfig(memsize=64 << 20))
    plain = plain_host.power_on(VMConfig(memsize=32 << 20), image).run()
    assert plain.exit_status == 0
    host = Host(HostConfig(memsize=64 << 20))
    vm = host.power_on(VMConfig(memsize=32 << 20), image)
    stub, t, c = serve(vm, host)
    assert "qXfer:features:read+" in c.cmd("qSupported:xmlRegisters=i386")
    kmain, isr = image.symbols["kmain"], image.symbols["isr_handler"]
    assert c.cmd(f"Z0,{kmain:x},1") == "OK" and c.cmd(f"Z1,{isr:x},1") == "OK"
    assert c.cmd("c") == "S05" and reg(c, "rip") == kmain
    at_kmain = vm.vcpu.insns
    assert c.cmd("s") == "S05" and vm.vcpu.insns == at_kmain + 1
    assert c.cmd("c") == "S05" and reg(c, "rip") == isr          # the #UD handler
    assert c.cmd("c") == "S05" and reg(c, "rip") == isr          # the #PF handler
    assert c.cmd(f"z0,{kmain:x},1") == "OK" and c.cmd(f"z1,{isr:x},1") == "OK"
    # memory by guest-virtual address: the multiboot magic at the start of the image
    assert c.cmd("m100000,4") == "02b0ad1b"
    assert c.cmd("m100000000,8") == "E14"                      # not mapped yet: the #PF maps it
    assert c.cmd("c") == "W00"
    c.s.close()                                                # gdb goes away: the stub returns
    t.join(timeout=30)
    assert not t.is_alive()
    assert vm.result().counters["instructions"] == plain.counters["instructions"]
    host.close()
    plain_host.close()


def test_detaching_at_a_breakpoint_lets_the_guest_run_to_its_end(kernels):
    # gdb -batch detaches when its commands end; the run used to spin forever there.
    mb, _ = kernels
    image = load_kernel(mb)
    host = Host(HostConfig(memsize=64 << 20))
    vm = host.power_on(VMConfig(memsize=32 << 20), image)
    stub, t, c = serve(vm, host)
    assert c.cmd(f"Z0,{image.symbols['kmain']:x},1") == "OK"
    assert c.cmd("c") == "S05"
    assert c.cmd("D") == "OK"
    t.join(timeout=60)
    assert not t.is_alive() and vm.stopped and vm.exit_status == 0
    host.close()


def test_registers_memory_writes_and_ctrl_c(run_guest_asm):
    src = "mov rax, 0x1234; mov rbx, 0x100800; mov qword ptr [rbx], rax; spin: jmp spin"
    image = build(src, source_name="spin")
    host = Host(HostConfig(memsize=64 << 20))
    vm = host.power_on(VMConfig(memsize=8 << 20, mmu="shadow"), image)
    stub, t, c = serve(vm, host)
    for _ in range(3):
        assert c.cmd("s") == "S05"
    assert reg(c, "rax") == 0x1234
    assert c.cmd("m100800,8") == "3412000000000000"
    assert c.cmd("M100800,2:cdab") == "OK" and c.cmd("m100800,2") == "cdab"
    i = [r[0] for r in REGISTERS].index("rcx")
    assert c.cmd(f"P{i:x}=efbeadde00000000") == "OK" and reg(c, "rcx") == 0xDEADBEEF
    cs = [r[0] for r in REGISTERS].index("cs")
    assert c.cmd(f"P{cs:x}=10000000") == "E01"                  # segment registers are read-only
    g = c.cmd("g")
    assert len(g) == 2 * sum(bits // 8 for _, bits, _, _ in REGISTERS)
    assert "Monitor" not in c.cmd("qRcmd," + b"info p2m".hex())
    # continue into the endless loop, then interrupt it
    c.s.sendall(b"$c#63")
    assert c.s.recv(1) == b"+"
    c.s.sendall(b"\x03")
    assert c._read_reply() == "S02"
    assert vm.running and reg(c, "rip") == image.symbols["spin"]
    c.s.sendall(b"$k#6b")                                       # kill: no reply
    t.join(timeout=30)
    assert not t.is_alive()
    assert vm.stopped
    host.close()


def test_target_description_is_amd64():
    xml = target_xml()
    assert "<architecture>i386:x86-64</architecture>" in xml
    assert 'feature name="org.gnu.gdb.i386.core"' in xml and 'feature name="org.gnu.gdb.i386.sse"' in xml
    names = [r[0] for r in REGISTERS]
    assert names[:17] == ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11",
                          "r12", "r13", "r14", "r15", "rip"]
    assert names.index("st0") == 24 and names.index("xmm0") == 40 and names.index("mxcsr") == 56
