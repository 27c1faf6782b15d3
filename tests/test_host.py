"""The host: several VMs on one pool, overcommitted, sharing and swapping, guests verifying memory."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest

from hvmodel import Host, HostConfig, VMConfig, load_guest
from hvmodel.check.lockstep import check
from hvmodel.machine.pool import PAGE_SIZE, ZERO_FRAME
from hvmodel.memory.sharing import SharingConfig
from hvmodel.mmu.p2m import P2MState
from hvmodel.host import scenario

GUESTS = Path(__file__).resolve().parents[1] / "guests"
FAST_SCAN = SharingConfig(force_salting=1, scan_time_min=0.002, rate_max=10**7)


def dedup_counts(console: str) -> tuple[int, int, int]:
    m = re.search(r"(\d+) zero, (\d+) identical .*?, (\d+) unique", console)
    return tuple(int(x) for x in m.groups())


def test_overcommitted_vms_with_a_common_salt_share_identical_pages():
    n, mem = 4, 16 << 20
    h = Host(HostConfig(memsize=40 << 20, sharing=FAST_SCAN))   # 64 MiB of guests on 40 MiB
    vms = [h.power_on(VMConfig(name=f"d{i}", memsize=mem, pshare_salt="common", guest_arg=i + 1),
                      load_guest(GUESTS / "dedup.asm")) for i in range(n)]
    results = h.run()
    assert [r.exit_status for r in results] == [0] * n, [r.message for r in results]
    zero, ident, unique = dedup_counts(results[0].console)
    # Machine frames: the identical pages once for all VMs, the unique pages of every VM,
    # and a small overhead per VM (runtime pages, nested tables).
    overhead = n * 128   # runtime pages, tables, the last rounds' rewrites not yet re-shared
    assert h.pool.used_frames <= ident + n * unique + overhead, (h.pool.used_frames, ident, unique)
    c = h.counters()
    assert c["pages_sharing"] >= (n - 1) * ident * 0.9
    h.close()


def test_default_salting_shares_only_inside_each_vm():
    n = 2
    # 4 KiB backing: on this roomy host (high state) large pages would keep every page unshared.
    h = Host(HostConfig(memsize=64 << 20, sharing=SharingConfig(scan_time_min=0.002, rate_max=10**7),
                        large_pages=False))
    vms = [h.power_on(VMConfig(name=f"d{i}", memsize=16 << 20, guest_arg=i + 1), load_guest(GUESTS / "dedup.asm"))
           for i in range(n)]
    results = h.run()
    assert [r.exit_status for r in results] == [0] * n
    frames = [set(np.unique(vm.p2m.value[(vm.p2m.state == P2MState.SHARED) & (vm.p2m.value != ZERO_FRAME)]))
              for vm in vms]
    assert not (frames[0] & frames[1])                 # no frame mapped by both VMs
    assert all(vm.p2m.zero_pages() > 0 for vm in vms)  # but each VM shares its zero pages
    assert h.counters()["pages_zero"] > 0
    h.close()


def test_hog_on_a_host_smaller_than_its_working_set_swaps_and_exits_0(tmp_path):
    h = Host(HostConfig(memsize=8 << 20, swap_dir=tmp_path))
    vm = h.power_on(VMConfig(name="hog", memsize=16 << 20), load_guest(GUESTS / "hog.asm"))
    assert (tmp_path / "hog.vswp").exists()
    r = h.run()[0]
    assert r.exit_status == 0, r.message
    assert r.counters["SWW"] > 0 and r.counters["SWR"] > 0
    h.close()
    assert not (tmp_path / "hog.vswp").exists()


def test_a_corrupted_swap_slot_stops_the_vm_naming_the_page(tmp_path):
    h = Host(HostConfig(memsize=8 << 20, swap_dir=tmp_path))
    vm = h.power_on(VMConfig(name="hog", memsize=16 << 20), load_guest(GUESTS / "hog.asm"))
    corrupted = []
    swap = vm.p2m.swap
    orig = swap.write

    def write_then_corrupt(data):
        slot = orig(data)
        if len(corrupted) < 50:   # damage the data on disk behind the VMM's back
            os.pwrite(swap.fd, b"\xff\xff", slot * PAGE_SIZE + 64)
            corrupted.append(slot)
        return slot
    swap.write = write_then_corrupt
    r = h.run()[0]
    assert r.exit_status is None and r.stop_reason == "host_failure"
    m = re.search(r"guest page (0x[0-9a-f]+) .*swap slot (\d+) fails its checksum", r.message)
    assert m and int(m.group(2)) in corrupted, r.message
    h.close()


def test_admission_fails_without_room_for_the_swap_file(tmp_path):
    from hvmodel.host.host import AdmissionError
    h = Host(HostConfig(memsize=8 << 20, swap_dir=tmp_path))
    with pytest.raises(AdmissionError, match="swap file"):
        h.power_on(VMConfig(name="big", memsize=1 << 50), load_guest(GUESTS / "hello.asm"))


@pytest.mark.parametrize("guest", ["usermode", "faults", "dedup"])
def test_check_agrees_with_the_reference_while_sharing_and_swapping(guest):
    res = check(load_guest(GUESTS / f"{guest}.asm"), ["nested", "shadow"], memsize=8 << 20,
                every=100_000, pressure=32)
    assert res.ok, res.report
    # Pages left RAM and came back: swapped, or compressed (check --pressure does both).
    assert all(m["SWW"] + m["ZIP"] > 0 and m["SWR"] + m["UNZIP"] > 0 for m in res.memory.values()), res.memory
    assert all(m["SHRD"] > 0 for m in res.memory.values())


def test_scenario_file_describes_host_and_vms(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text(f'''
[host]
memsize = "48M"
"Mem.ShareForceSalting" = 1
"Mem.ShareScanTime" = 0.5

[[vm]]
name = "web"
guest = "{GUESTS / 'hello.asm'}"
memsize = "16M"
mmu = "shadow"
count = 2
"sched.mem.pshare.salt" = "x"
''')
    host_cfg, specs = scenario.load(f)
    assert host_cfg.memsize == 48 << 20 and host_cfg.sharing.force_salting == 1
    assert [s.config.name for s in specs] == ["web-1", "web-2"]
    assert all(s.config.mmu == "shadow" and s.config.pshare_salt == "x" for s in specs)


def test_scenario_typos_are_errors(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text('[host]\nmemsize = "48M"\n"Mem.ShareForceSalt" = 1\n[[vm]]\nguest = "x.asm"\n')
    with pytest.raises(scenario.ScenarioError, match="unknown"):
        scenario.load(f)


def test_scenario_allocation_settings(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text(f'''
[host]
memsize = "64M"
"Mem.IdleTax" = 50
"Mem.SamplePeriod" = 0.01
"Mem.MemZipMaxPct" = 5

[[vm]]
guest = "{GUESTS / 'hello.asm'}"
memsize = "16M"
"sched.mem.shares" = "high"
"sched.mem.min" = "4M"
"sched.mem.max" = "12M"
"sched.mem.maxmemctl" = "2M"
''')
    h, (spec,) = scenario.load(f)
    assert (h.idle_tax_pct, h.sample_period_s, h.zip_max_pct) == (50.0, 0.01, 5.0)
    c = spec.config
    assert (c.shares, c.reservation, c.limit, c.maxmemctl) == ("high", 4 << 20, 12 << 20, 2 << 20)
    f.write_text(f'[[vm]]\nguest = "{GUESTS / "hello.asm"}"\n"sched.mem.shares" = "lots"\n')
    with pytest.raises(scenario.ScenarioError, match="sched.mem.shares"):
        scenario.load(f)
