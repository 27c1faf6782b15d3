"""The VMware balloon back-door: I/O port 0x5670, modelled on Linux ``vmw_balloon.c``.

A balloon driver talks to the hypervisor with one instruction, ``in eax, dx``:

=========== ============================================================================
register    in                                   out
=========== ============================================================================
EAX         magic 0x456c6d6f                     status (0 = success, see below)
ECX         command                              START: the capabilities granted
EDX         port 0x5670                          unchanged
EBX         argument (a page number, ...)        GET_TARGET/LOCK/UNLOCK: the target
ESI         second argument (ignored here)       unchanged
=========== ============================================================================

Commands implemented (numbers and status codes are the Linux driver's):

* ``START`` (0), EBX = capabilities the driver supports. The balloon is reset (pages
  the host still holds go back to the guest: a driver starts after popping its
  balloon), and the answer is ``SUCCESS_WITH_CAPABILITIES`` (0x03000000) with ECX =
  the granted capabilities: only ``BASIC_CMDS`` (bit 1). A START asking for nothing
  (a driver unloading) succeeds and leaves the balloon inactive (``MCTL?`` = 0).
* ``GET_TARGET`` (1), EBX = the guest's total pages (recorded): EBX = the target in
  4 KiB pages, ``min(target, MCTLMAX)``.
* ``LOCK`` (2), EBX = one guest page number (the driver's "PPN", a gfn): the host frees the frame behind it.
  EBX = the target on success. Errors: ``PPN_INVALID`` (2, outside guest memory),
  ``PPN_LOCKED`` (3, already in the balloon), ``PPN_NOTNEEDED`` (6, the balloon is at
  ``MCTLMAX``: the page would exceed the limit).
* ``UNLOCK`` (3), EBX = one guest page number: the page is the guest's again (reads as zero until
  touched). EBX = the target on success. Errors: ``PPN_INVALID``, ``PPN_UNLOCKED``
  (4, not in the balloon).
* ``GUEST_ID`` (4), EBX = the guest's type (Linux sends 1): recorded, ``SUCCESS``.

Errors common to every command: a wrong magic in EAX and an unknown or unoffered
command (BATCHED_LOCK/UNLOCK 6/7, BATCHED_2M_LOCK/UNLOCK 8/9, VMCI_DOORBELL_SET 10,
anything else) answer ``CMD_INVALID`` (1); any command but START before a START (or
after a START that granted nothing) answers ``RESET`` (7), which tells the driver to
START again. Registers other than EAX are left alone on an error.

Left out: batched LOCK/UNLOCK (a page of page-number/status entries), 2 MiB pages, the VMCI
doorbell (the host wakes the driver instead of waiting for its next poll), and a 64-bit
target. A guest that asks for those capabilities simply is not granted them.

Without a host balloon (the ``native`` reference mode, which has no p2m) the device
still answers: START and GUEST_ID succeed, GET_TARGET is always 0, LOCK answers
``PPN_NOTNEEDED`` and UNLOCK ``PPN_UNLOCKED`` -- so a guest polling for its target
behaves exactly as on a VMM whose balloon target is 0.

Registers: the device reads and writes the vCPU's registers through two callables
(``get(reg_id)``, ``set(reg_id, value)``, Unicorn x86 ids). It is called from Unicorn's
IN hook, in the middle of the instruction: EAX is the hook's return value; EBX and
ECX written there are what the guest sees after the instruction (tested in
``tests/devices/test_backdoor.py``). ``on_change``, if given, is called after a LOCK or
UNLOCK changed the p2m (the VM flushes the vCPU's TLB there, so no stale translation
of a freed frame survives the instruction).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from enum import IntEnum
from typing import Protocol

from unicorn import x86_const as X

class BalloonStatus(IntEnum):
    """Status codes of the VMware balloon protocol (Linux ``vmw_balloon.c`` values)."""

    SUCCESS = 0
    CMD_INVALID = 1         # unknown command, wrong magic, or a capability not granted
    PPN_INVALID = 2         # the page number is outside guest memory
    PPN_LOCKED = 3          # LOCK of a page already in the balloon
    PPN_UNLOCKED = 4        # UNLOCK of a page not in the balloon
    PPN_PINNED = 5          # the host cannot take this page (not used here)
    PPN_NOTNEEDED = 6       # the host does not want it: LOCK would exceed MCTLMAX
    RESET = 7               # the driver must START again (it has not started yet)
    BUSY = 8                # not used here
    SUCCESS_WITH_CAPABILITIES = 0x0300_0000  # START's answer; capabilities in ECX


# Capabilities (START's argument and answer).
CAP_BASIC_CMDS = 1 << 1         # LOCK and UNLOCK of one 4 KiB page
CAP_BATCHED_CMDS = 1 << 2       # not offered
CAP_BATCHED_2M_CMDS = 1 << 3    # not offered
CAP_SIGNALLED_WAKEUP = 1 << 4   # not offered
HOST_CAPABILITIES = CAP_BASIC_CMDS


class BalloonBooks(Protocol):
    """What the back-door needs of the host's balloon for the VM (:class:`hvmodel.vm.balloon.Balloon`)."""

    active: bool
    guest_id: int | None
    guest_limit: int | None

    @property
    def effective_target(self) -> int: ...

    @property
    def generation(self) -> int: ...

    def start(self, requested_caps: int) -> int: ...

    def lock(self, gfn: int) -> BalloonStatus: ...

    def unlock(self, gfn: int) -> BalloonStatus: ...


PORT = 0x5670
MAGIC = 0x456C6D6F

CMD_START = 0
CMD_GET_TARGET = 1
CMD_LOCK = 2
CMD_UNLOCK = 3
CMD_GUEST_ID = 4
CMD_BATCHED_LOCK = 6
CMD_BATCHED_UNLOCK = 7
CMD_BATCHED_2M_LOCK = 8
CMD_BATCHED_2M_UNLOCK = 9
CMD_VMCI_DOORBELL_SET = 10

COMMAND_NAMES = {
    CMD_START: "start", CMD_GET_TARGET: "target", CMD_LOCK: "lock", CMD_UNLOCK: "unlock",
    CMD_GUEST_ID: "guestType", CMD_BATCHED_LOCK: "batchLock", CMD_BATCHED_UNLOCK: "batchUnlock",
    CMD_BATCHED_2M_LOCK: "2m-lock", CMD_BATCHED_2M_UNLOCK: "2m-unlock",
    CMD_VMCI_DOORBELL_SET: "doorbellSet",
}

Status = BalloonStatus


class BackdoorBalloon:
    """The balloon back-door port, answering for one VM's balloon (or none)."""

    def __init__(self, balloon: BalloonBooks | None, get: Callable[[int], int],
                 set_: Callable[[int, int], None], *, on_change: Callable[[], None] | None = None,
                 port: int = PORT) -> None:
        self.balloon = balloon
        self.get = get
        self.set = set_
        self.on_change = on_change
        self.ports = (port,)
        # Without a host balloon (native mode): the driver's session state lives here.
        self._null_active = False
        self.guest_id: int | None = None
        self.ops: Counter[str] = Counter()       # commands by name (as vmw_balloon's stats)
        self.ops_fail: Counter[str] = Counter()  # of which failed
        self.bad_magic = 0
        self.other_accesses = 0                  # OUTs and non-32-bit INs (ignored)

    # -- the port --------------------------------------------------------------------

    def read(self, port: int, size: int) -> int:
        if size != 4:
            self.other_accesses += 1
            return (1 << (8 * size)) - 1  # open bus: the protocol is 32-bit INs only
        get = self.get
        if get(X.UC_X86_REG_EAX) & 0xFFFF_FFFF != MAGIC:
            self.bad_magic += 1
            return Status.CMD_INVALID
        cmd = get(X.UC_X86_REG_ECX) & 0xFFFF_FFFF
        arg = get(X.UC_X86_REG_EBX) & 0xFFFF_FFFF
        name = COMMAND_NAMES.get(cmd, f"cmd{cmd}")
        self.ops[name] += 1
        status = self._command(cmd, arg)
        if status not in (Status.SUCCESS, Status.SUCCESS_WITH_CAPABILITIES):
            self.ops_fail[name] += 1
        return int(status)

    def write(self, port: int, size: int, value: int) -> None:
        self.other_accesses += 1

    # -- commands ----------------------------------------------------------------------

    @property
    def active(self) -> bool:
        b = self.balloon
        return b.active if b is not None else self._null_active

    def _command(self, cmd: int, arg: int) -> Status:
        b = self.balloon
        if cmd == CMD_START:
            if b is not None:
                caps = b.start(arg)
            else:
                caps = arg & HOST_CAPABILITIES
                self._null_active = bool(caps)
            self.set(X.UC_X86_REG_ECX, caps)
            return Status.SUCCESS_WITH_CAPABILITIES
        if cmd not in (CMD_GET_TARGET, CMD_LOCK, CMD_UNLOCK, CMD_GUEST_ID):
            return Status.CMD_INVALID
        if not self.active:
            return Status.RESET
        if cmd == CMD_GUEST_ID:
            self.guest_id = arg
            if b is not None:
                b.guest_id = arg
            return Status.SUCCESS
        if cmd == CMD_GET_TARGET:
            if b is not None:
                b.guest_limit = arg
            self.set(X.UC_X86_REG_EBX, b.effective_target if b is not None else 0)
            return Status.SUCCESS
        if b is None:
            return Status.PPN_NOTNEEDED if cmd == CMD_LOCK else Status.PPN_UNLOCKED
        before = b.generation
        status = b.lock(arg) if cmd == CMD_LOCK else b.unlock(arg)
        if status == Status.SUCCESS:
            self.set(X.UC_X86_REG_EBX, b.effective_target)
        if self.on_change is not None and b.generation != before:
            self.on_change()
        return status


__all__ = ["BackdoorBalloon", "BalloonBooks", "BalloonStatus", "CAP_BASIC_CMDS", "CAP_BATCHED_CMDS",
           "CAP_BATCHED_2M_CMDS", "CAP_SIGNALLED_WAKEUP", "HOST_CAPABILITIES", "PORT", "MAGIC", "Status", "CMD_START", "CMD_GET_TARGET", "CMD_LOCK",
           "CMD_UNLOCK", "CMD_GUEST_ID", "CMD_BATCHED_LOCK", "CMD_BATCHED_UNLOCK",
           "CMD_BATCHED_2M_LOCK", "CMD_BATCHED_2M_UNLOCK", "CMD_VMCI_DOORBELL_SET", "COMMAND_NAMES"]
