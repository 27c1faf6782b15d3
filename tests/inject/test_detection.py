"""Detection the faults rely on: shared-frame checksums, and reclaim failures charged to the right VM."""

from __future__ import annotations

import pytest

from hvmodel import Host, HostConfig, VMConfig
from hvmodel.guest.asm import build
from hvmodel.machine.pool import PAGE_SHIFT, PAGE_SIZE
from hvmodel.machine.swap import SwapError
from hvmodel.memory.sharing import SharingConfig
from hvmodel.mmu.p2m import GuestMemoryError, P2MState
from hvmodel.run.digest import memory_digest

IDLE = build("cli; hlt")


def two_vms_sharing_a_page(tmp_path):
    h = Host(HostConfig(memsize=16 << 20, swap_dir=tmp_path, sharing=SharingConfig(force_salting=1),
                        large_pages=False))   # 4 KiB pages: sharing keeps 2 MiB pages whole in high
    a, b = (h.power_on(VMConfig(name=n, memsize=2 << 20, pshare_salt="s"), IDLE) for n in "ab")
    a.p2m.write_gpa(100 << PAGE_SHIFT, bytes([7]) * PAGE_SIZE)
    b.p2m.write_gpa(200 << PAGE_SHIFT, bytes([7]) * PAGE_SIZE)
    h.sharing.scan(a, a.p2m.npages)
    h.sharing.scan(b, b.p2m.npages)
    frame = int(a.p2m.value[100])
    assert a.p2m.state[100] == P2MState.SHARED and int(b.p2m.value[200]) == frame
    return h, a, b, frame


def test_a_copy_on_write_break_will_not_copy_a_damaged_shared_frame(tmp_path):
    h, a, b, frame = two_vms_sharing_a_page(tmp_path)
    h.pool.mv[(frame << PAGE_SHIFT) + 5] ^= 0x10
    with pytest.raises(GuestMemoryError, match=r"guest page 0x64 .*shared frame .* fails its content checksum"):
        a.p2m.resolve(100, True)                 # a write: the copy-on-write break verifies first
    assert b.stopped and "guest page 0xc8" in b.message   # the other user is stopped too, its page named
    assert h.counters()["shared_checksum_failures"] >= 1
    h.close()


def test_the_scrub_finds_a_damaged_shared_frame_and_stops_its_users(tmp_path):
    h, a, b, frame = two_vms_sharing_a_page(tmp_path)
    assert h.sharing.scrub(16) == []
    h.pool.mv[(frame << PAGE_SHIFT) + 4095] ^= 1
    bad = h.sharing.scrub(16)
    assert [f for f, _ in bad] == [frame]
    assert a.stopped and b.stopped
    assert "guest page 0x64" in a.message and "guest page 0xc8" in b.message
    assert a.stop_reason == b.stop_reason == "host_failure"
    h.close()


def test_the_final_read_back_reports_a_damaged_shared_page(tmp_path):
    h, a, b, frame = two_vms_sharing_a_page(tmp_path)
    clean, bad = memory_digest(a)
    assert bad == []
    h.pool.mv[(frame << PAGE_SHIFT)] ^= 1
    damaged, bad = memory_digest(a)
    assert damaged != clean and len(bad) == 1 and bad[0].startswith("guest page 0x64")
    h.close()


def test_a_failed_swap_write_during_reclaim_stops_the_vm_that_owns_the_page(tmp_path):
    h = Host(HostConfig(memsize=16 << 20, swap_dir=tmp_path, large_pages=False))
    a, b = (h.power_on(VMConfig(name=n, memsize=2 << 20), IDLE) for n in "ab")
    for g in range(300, 400):
        b.p2m.write_gpa(g << PAGE_SHIFT, bytes([g & 0xFF]) * PAGE_SIZE)   # b holds the most memory
    h.config.zip_enable = False
    b.p2m.zip = None

    def broken(data):
        raise SwapError("write of a swap slot failed: disk full")
    b.swap.write = broken
    h._swap(8)
    assert b.stopped and "guest page 0x" in b.message and "cannot swap out" in b.message
    assert not a.stopped
    assert b.p2m.count(P2MState.SWAPPED) == 0 and b.p2m.count(P2MState.PRIVATE) >= 100   # nothing lost
    h.close()


def test_the_lockstep_checker_flags_lost_tlb_flushes(capsys):
    from pathlib import Path

    from hvmodel.cli import main
    hog = Path(__file__).resolve().parents[2] / "guests" / "hog.asm"
    assert main(["check", str(hog), "--mem", "4M", "--pressure", "8", "--mmu", "nested",
                 "--fault", "lost-tlb-flush:count=0,at=300000"]) == 1
    out = capsys.readouterr().out
    assert "divergence at checkpoint" in out and "nested vs native" in out
    assert "fault lost-tlb-flush fired in nested at instruction 300,000" in out


def test_faults_lists_the_registry(capsys):
    from hvmodel.cli import main
    from hvmodel.inject import FAULTS
    assert main(["faults"]) == 0
    out = capsys.readouterr().out
    assert all(f"{name} — " in out for name in FAULTS)
    assert main(["faults", "nope"]) == 2
    assert "unknown fault 'nope'" in capsys.readouterr().err


def test_faults_md_documents_every_fault_and_parameter():
    from pathlib import Path

    from hvmodel.inject import FAULTS
    from hvmodel.inject.registry import TRIGGER_PARAMS
    doc = (Path(__file__).resolve().parents[2] / "docs" / "FAULTS.md").read_text()
    for f in FAULTS.values():
        row = next((line for line in doc.splitlines() if line.startswith(f"| `{f.name}")), None)
        assert row is not None, f.name
        assert all(f"`{p.name}`" in row for p in f.params), (f.name, row)
    assert all(f"| `{p.name}` |" in doc for p in TRIGGER_PARAMS)


@pytest.mark.parametrize("fetch", [False, True], ids=["data", "fetch"])
@pytest.mark.parametrize("mmu", ["nested", "shadow"])
def test_a_blocked_allocation_adds_no_guest_instruction(mmu, fetch):
    # Found by the fault checker: reference runs with fewer stalls counted fewer instructions.
    guest = build("""
      mov rdi, 0x300000
      add qword ptr [rdi], 5
      jmp second_page
      .balign 4096
    second_page:
      mov qword ptr [rdi + 0x1000], 7
      mov al, 0
      out 0xf4, al
    """)
    counts = []
    for stalls in (0, 3):
        h = Host(HostConfig(memsize=32 << 20))
        vm = h.power_on(VMConfig(memsize=8 << 20, mmu=mmu, large_pages=False), guest)
        if fetch:
            vm.p2m.swap_out(0x101)   # the second code page: fetching it needs a frame (a swap-in)
        left = {"n": stalls}

        def blocked(p2m):
            if fetch and p2m.state[0x300] == P2MState.UNBACKED:
                return False   # block only the second code page's swap-in, mid-slice
            left["n"] -= 1
            return left["n"] >= 0
        vm.p2m.blocked = blocked
        r = vm.run()
        assert r.exit_status == 0 and r.counters["blocked_exits"] == stalls
        counts.append(r.counters["instructions"])
        h.close()
    assert counts[0] == counts[1] == 6
