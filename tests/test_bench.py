"""`hvmodel bench`: the smoke run CI does, and the checks that make a run fail.

No timing is asserted anywhere: the machine is shared and noisy. What is asserted is
the shape of the results and the parts that are deterministic (instruction counts that
agree across modes, the sharing scan's result, bit-exact swapping)."""

from __future__ import annotations

import json

import pytest

from hvmodel.bench import runner
from hvmodel.bench.runner import BenchError, Sample, run_workload
from hvmodel.bench.workloads import WORKLOADS, override_defines
from hvmodel.cli import main
from hvmodel.guest.asm import GuestBuildError


def test_quick_bench_json(capsys):
    assert main(["bench", "--quick", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    for w in ("W1", "W2", "W3", "W4"):
        assert res[w]["native"]["ips"] > 0
        insns = res[w]["native"]["instructions"]
        for mode in ("nested", "shadow"):
            d = res[w][mode]
            assert d["ips"] > 0 and d["ratio"] > 0
            assert d["ratio_min"] <= d["ratio"] <= d["ratio_max"]
            assert d["instructions"] == insns      # the modes agree on the region
            assert d["counters"]["tlb_fills"] > 0  # the VMM translated something
    # W2's region writes every one of its 4,096 pages in every pass: at least that many fills
    assert res["W2"]["nested"]["counters"]["tlb_fills"] >= 4096
    # W3 switches address spaces: the shadow MMU sees root switches
    assert res["W3"]["shadow"]["counters"]["root_switches"] >= 8
    # W5: 8 VMs with identical content share all but one copy of every page
    w5 = res["W5"]
    assert w5["pages_hashed"] == w5["pages"] == 8 * 1024
    assert w5["shared_fraction"] == w5["ideal_fraction"] == 0.875
    assert w5["pages_per_s"] > 0
    assert res["W6"]["out_mb_per_s"] > 0 and res["W6"]["in_mb_per_s"] > 0
    assert res["meta"]["quick"] is True


def test_bench_table_and_only(capsys):
    assert main(["bench", "--quick", "--only", "w1"]) == 0
    out = capsys.readouterr().out
    assert "W1 compute" in out and "W2" not in out
    assert "native" in out and "nested" in out and "shadow" in out


def test_unknown_workload_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--only", "W9"])
    assert e.value.code == 2
    assert "unknown workload" in capsys.readouterr().err


def test_a_mode_that_disagrees_fails_the_bench(monkeypatch):
    real = runner.run_once

    def lying(w, image, mode):
        s = real(w, image, mode)
        if mode == "shadow":
            return Sample(s.seconds, s.insns + 1, s.counters, s.console)
        return s

    monkeypatch.setattr(runner, "run_once", lying)
    with pytest.raises(BenchError, match="shadow ran"):
        run_workload(WORKLOADS[0], 1, quick=True)


def test_quick_overrides_must_name_existing_defines():
    assert "%define N 7" in override_defines("%define N 100\nnop\n", {"N": "7"}, "g")
    with pytest.raises(GuestBuildError, match="expected one %define M"):
        override_defines("%define N 100\n", {"M": "1"}, "g")
