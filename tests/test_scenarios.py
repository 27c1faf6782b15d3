"""The shipped scenarios tell the story they promise (scenarios/*.toml)."""

from __future__ import annotations

import json
from pathlib import Path

from hvmodel.cli import main

SCENARIOS = Path(__file__).resolve().parents[1] / "scenarios"


def test_idle_busy_2to1_reclaims_from_idle_vms_first_and_compresses_before_swapping(capsys):
    # 4 x 32 MiB on 64 MiB: two idle VMs (a page cache they dropped) and two busy ones
    # whose memory grows from t = 2 s. About a minute: the must-show, checked.
    status = main(["run", str(SCENARIOS / "idle-busy-2to1.toml"), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert status == 0
    for vm in out["vms"]:
        assert vm["exit_status"] == 0, vm["message"]
        assert "working set intact" in vm["console"] and "PASS" in vm["console"]
    ms = out["milestones"]
    st = ms["states"]
    assert st["soft"] < st["hard"]
    idle = [ms["vms"][n] for n in ("idle-1", "idle-2")]
    busy = [ms["vms"][n] for n in ("busy-1", "busy-2")]
    # Ballooning starts in the soft state, in the idle VMs, before any busy VM is asked.
    for m in idle:
        assert m["first"]["balloon_target"]["state"] == "soft"
        assert m["first"]["ballooned"]["time_s"] > 0
        assert all(m["first"]["balloon_target"]["time_s"] < b["first"].get("balloon_target", {"time_s": 1e9})["time_s"]
                   for b in busy)
    # The idle tax moves memory: idle targets fall, busy ones rise above them.
    for m in idle:
        assert m["target_end_mb"] < m["target_start_mb"] and m["active_end"] < 0.1
    for m in busy:
        assert m["target_end_mb"] > m["target_start_mb"] and m["active_end"] > 0.4
    # Compression comes before swapping, in the hard state (or lower), in every VM that swapped.
    swapped = [m for m in idle + busy if "swapped" in m["first"]]
    assert swapped
    for m in swapped:
        assert m["first"]["compressed"]["time_s"] <= m["first"]["swapped"]["time_s"]
        assert m["first"]["compressed"]["state"] in ("hard", "low")
    # Memory comes back: the host ends above soft.
    assert out["host"]["state"] in ("high", "clear")
