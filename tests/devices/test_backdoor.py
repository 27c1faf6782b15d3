"""The VMware balloon back-door (port 0x5670) driven through a fake register file."""

from __future__ import annotations

import pytest
from unicorn import x86_const as X

from hvmodel.devices.backdoor import (CMD_BATCHED_2M_LOCK, CMD_BATCHED_LOCK, CMD_BATCHED_UNLOCK,
                                      CMD_GET_TARGET, CMD_GUEST_ID, CMD_LOCK, CMD_START, CMD_UNLOCK,
                                      CMD_VMCI_DOORBELL_SET, MAGIC, PORT, BackdoorBalloon, Status)
from hvmodel.devices.bus import IOBus
from hvmodel.machine.pool import MachinePool
from hvmodel.devices.backdoor import CAP_BASIC_CMDS, CAP_BATCHED_CMDS
from hvmodel.vm.balloon import Balloon
from hvmodel.mmu.p2m import P2M, P2MState

NPAGES = 1000


class Regs(dict):
    """A fake vCPU register file keyed by Unicorn register ids."""

    def get_reg(self, rid: int) -> int:
        return self.get(rid, 0)

    def set_reg(self, rid: int, value: int) -> None:
        self[rid] = value


class Rig:
    def __init__(self, with_balloon: bool = True) -> None:
        self.pool = MachinePool(8 << 20)
        self.p2m = P2M(self.pool, NPAGES, owner=1)
        self.balloon = Balloon(self.p2m) if with_balloon else None
        self.regs = Regs()
        self.changes = 0
        self.dev = BackdoorBalloon(self.balloon, self.regs.get_reg, self.regs.set_reg,
                                   on_change=self._changed)
        self.bus = IOBus()
        self.bus.attach(self.dev)

    def _changed(self) -> None:
        self.changes += 1

    def cmd(self, cmd: int, arg: int = 0, *, magic: int = MAGIC) -> int:
        """``in eax, dx`` as a guest does it; returns EAX (registers stay in self.regs)."""
        self.regs.update({X.UC_X86_REG_EAX: magic, X.UC_X86_REG_ECX: cmd,
                          X.UC_X86_REG_EBX: arg, X.UC_X86_REG_EDX: PORT})
        eax = self.bus.read(PORT, 4)
        self.regs[X.UC_X86_REG_EAX] = eax
        return eax

    @property
    def ebx(self) -> int:
        return self.regs[X.UC_X86_REG_EBX]

    @property
    def ecx(self) -> int:
        return self.regs[X.UC_X86_REG_ECX]

    def started(self) -> "Rig":
        assert self.cmd(CMD_START, CAP_BASIC_CMDS) == Status.SUCCESS_WITH_CAPABILITIES
        return self


def test_port_and_protocol_constants():
    rig = Rig()
    assert list(rig.dev.ports) == [0x5670]
    assert MAGIC == 0x456C6D6F
    assert (CMD_START, CMD_GET_TARGET, CMD_LOCK, CMD_UNLOCK, CMD_GUEST_ID) == (0, 1, 2, 3, 4)
    assert Status.SUCCESS_WITH_CAPABILITIES == 0x03000000


def test_wrong_magic_is_rejected_and_changes_nothing():
    rig = Rig()
    assert rig.cmd(CMD_START, CAP_BASIC_CMDS, magic=0x12345678) == Status.CMD_INVALID
    assert rig.dev.bad_magic == 1
    assert not rig.balloon.active
    assert rig.ecx == CMD_START  # registers other than EAX untouched


def test_start_grants_basic_commands_only():
    rig = Rig()
    caps = CAP_BASIC_CMDS | CAP_BATCHED_CMDS | (1 << 3) | (1 << 4)
    assert rig.cmd(CMD_START, caps) == Status.SUCCESS_WITH_CAPABILITIES
    assert rig.ecx == CAP_BASIC_CMDS
    assert rig.balloon.active and rig.balloon.counters()["MCTL?"] == 1


def test_start_with_no_capability_leaves_driver_inactive():
    rig = Rig().started()
    assert rig.cmd(CMD_START, 0) == Status.SUCCESS_WITH_CAPABILITIES
    assert rig.ecx == 0
    assert rig.balloon.counters()["MCTL?"] == 0
    assert rig.cmd(CMD_GET_TARGET, NPAGES) == Status.RESET


@pytest.mark.parametrize("cmd", [CMD_GET_TARGET, CMD_LOCK, CMD_UNLOCK, CMD_GUEST_ID])
def test_commands_before_start_ask_for_a_reset(cmd):
    rig = Rig()
    assert rig.cmd(cmd, 5) == Status.RESET
    assert rig.balloon.size == 0 and rig.p2m.state[5] == P2MState.UNBACKED


def test_guest_id_is_recorded():
    rig = Rig().started()
    assert rig.cmd(CMD_GUEST_ID, 1) == Status.SUCCESS
    assert rig.balloon.guest_id == 1 == rig.dev.guest_id


def test_get_target_answers_the_effective_target_in_ebx():
    rig = Rig().started()
    assert rig.cmd(CMD_GET_TARGET, NPAGES) == Status.SUCCESS and rig.ebx == 0
    rig.balloon.target = 123
    assert rig.cmd(CMD_GET_TARGET, NPAGES) == Status.SUCCESS and rig.ebx == 123
    assert rig.balloon.guest_limit == NPAGES
    rig.balloon.target = 10 * NPAGES  # more than MCTLMAX (65 %): the guest sees the limit
    assert rig.cmd(CMD_GET_TARGET, NPAGES) == Status.SUCCESS and rig.ebx == 650


def test_lock_frees_the_frame_and_unlock_returns_the_page():
    rig = Rig().started()
    rig.balloon.target = 2
    frame, _ = rig.p2m.resolve(7, True)
    free = rig.pool.free_frames
    assert rig.cmd(CMD_LOCK, 7) == Status.SUCCESS
    assert rig.ebx == 2  # the target comes back with every LOCK
    assert rig.p2m.state[7] == P2MState.BALLOONED
    assert rig.pool.free_frames == free + 1
    assert rig.changes == 1  # the p2m changed: the VM flushes the TLB
    assert rig.cmd(CMD_LOCK, 8) == Status.SUCCESS  # an untouched page: nothing to free
    assert rig.changes == 1
    assert rig.balloon.size == 2
    assert rig.cmd(CMD_UNLOCK, 7) == Status.SUCCESS and rig.ebx == 2
    assert rig.p2m.state[7] == P2MState.UNBACKED
    assert rig.balloon.counters()["MCTLSZ"] == 1


def test_lock_errors():
    rig = Rig().started()
    assert rig.cmd(CMD_LOCK, NPAGES) == Status.PPN_INVALID
    assert rig.cmd(CMD_LOCK, 0xFFFF_FFFF) == Status.PPN_INVALID
    assert rig.cmd(CMD_LOCK, 3) == Status.SUCCESS
    rig.regs[X.UC_X86_REG_EBX] = 3
    assert rig.cmd(CMD_LOCK, 3) == Status.PPN_LOCKED
    assert rig.ebx == 3  # no result on an error
    assert rig.dev.ops_fail["lock"] == 3 and rig.dev.ops["lock"] == 4


def test_lock_beyond_the_limit_is_not_needed():
    rig = Rig().started()
    rig.balloon.target = NPAGES
    for gfn in range(650):
        assert rig.cmd(CMD_LOCK, gfn) == Status.SUCCESS
    assert rig.cmd(CMD_LOCK, 650) == Status.PPN_NOTNEEDED  # would exceed MCTLMAX
    assert rig.balloon.size == 650 and rig.p2m.state[650] == P2MState.UNBACKED


def test_unlock_errors():
    rig = Rig().started()
    assert rig.cmd(CMD_UNLOCK, NPAGES + 5) == Status.PPN_INVALID
    assert rig.cmd(CMD_UNLOCK, 9) == Status.PPN_UNLOCKED


@pytest.mark.parametrize("cmd", [5, CMD_BATCHED_LOCK, CMD_BATCHED_UNLOCK, CMD_BATCHED_2M_LOCK, 9,
                                 CMD_VMCI_DOORBELL_SET, 11, 0xFFFF_FFFF])
def test_unknown_and_unoffered_commands(cmd):
    rig = Rig().started()
    assert rig.cmd(cmd, 1) == Status.CMD_INVALID


def test_restart_pops_the_balloon():
    # A driver STARTs again after freeing its pages without unlocking them (a reset):
    # the host gives every page back.
    rig = Rig().started()
    for gfn in (1, 2, 3):
        rig.cmd(CMD_LOCK, gfn)
    rig.started()
    assert rig.balloon.size == 0
    assert all(rig.p2m.state[p] == P2MState.UNBACKED for p in (1, 2, 3))


def test_other_accesses_float():
    rig = Rig()
    assert rig.bus.read(PORT, 1) == 0xFF
    assert rig.bus.read(PORT, 2) == 0xFFFF
    rig.bus.write(PORT, 4, 1)
    assert rig.dev.other_accesses == 3


def test_without_a_host_balloon_the_target_is_always_zero():
    # The native reference mode has no p2m and no balloon; a guest must behave as on a
    # VMM whose target is 0.
    rig = Rig(with_balloon=False)
    assert rig.cmd(CMD_GET_TARGET) == Status.RESET
    rig.started()
    assert rig.ecx == CAP_BASIC_CMDS
    assert rig.cmd(CMD_GUEST_ID, 1) == Status.SUCCESS
    assert rig.cmd(CMD_GET_TARGET, NPAGES) == Status.SUCCESS and rig.ebx == 0
    assert rig.cmd(CMD_LOCK, 4) == Status.PPN_NOTNEEDED
    assert rig.cmd(CMD_UNLOCK, 4) == Status.PPN_UNLOCKED
