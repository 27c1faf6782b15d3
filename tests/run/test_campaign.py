"""Campaigns: spec checks, the local process pool, and a Dask cluster started by the test."""

from __future__ import annotations

from pathlib import Path

import pytest

from hvmodel.run.campaign import CampaignError, CampaignReport, RunOutcome, load_spec, run_campaign
from hvmodel.cli import main
from hvmodel.run.outcome import Outcome

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "campaigns" / "smoke.toml"


def outcomes(report: CampaignReport) -> list[tuple]:
    return [(r.target, r.fault, r.seed, r.outcome.kind, r.outcome.detail) for r in report.runs]


def test_the_smoke_campaign_has_no_unexpected_outcome(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert main(["campaign", "campaigns/smoke.toml", "--quiet", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "16 runs, 16 reference runs, 0 unexpected outcomes" in out
    assert out.splitlines()[0].split() == ["fault", "runs", "recovered", "detected", "visible", "not-fired",
                                          "unexpected"]


def test_the_campaign_on_a_dask_cluster_matches_the_local_pool():
    distributed = pytest.importorskip("distributed")
    spec = load_spec(SMOKE)
    spec.seeds = [3]
    local = run_campaign(spec, workers=2, progress=False)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        remote = run_campaign(spec, cluster=cluster.scheduler_address, progress=False)
    assert outcomes(remote) == outcomes(local)
    assert remote.ok and len(remote.runs) == 8


def test_an_unreachable_cluster_is_a_clear_error():
    pytest.importorskip("distributed")
    spec = load_spec(SMOKE)
    spec.seeds = [1]
    with pytest.raises(CampaignError, match="cannot reach the Dask scheduler"):
        run_campaign(spec, cluster="tcp://127.0.0.1:9", progress=False, connect_timeout=1)


@pytest.mark.parametrize("text, needle", [
    ("seeds = 1\n[[fault]]\nfault = 'alloc-fail'\n", "no [[target]]"),
    ("[[target]]\nguest = 'nope.asm'\n[[fault]]\nfault = 'alloc-fail'\n", "does not exist"),
    ("[[target]]\nguest = 'G'\n[[fault]]\nfault = 'shadow-drop'\n", "needs shadow paging"),
    ("[[target]]\nguest = 'G'\n[[fault]]\nfault = 'frame-bitflip:at=1%..2%'\n", "needs the target's `insns`"),
    ("[[target]]\nguest = 'G'\n[[fault]]\nfault = 'alloc-fail'\ntargets = ['x']\n", "unknown target"),
    ("[[target]]\nguest = 'G'\nargs = ['--bogus']\n[[fault]]\nfault = 'alloc-fail'\n", "bad run arguments"),
    ("colour = 1\n", "unknown key"),
])
def test_bad_campaign_files_say_what_is_wrong(tmp_path, text, needle):
    p = tmp_path / "c.toml"
    p.write_text(text.replace("'G'", repr(str(ROOT / "guests" / "hello.asm"))))
    with pytest.raises(CampaignError, match=needle.replace("[", r"\[").replace("]", r"\]").replace("`", ".")):
        load_spec(p)


def test_the_report_gives_each_unexpected_run_its_command():
    bad = RunOutcome("hog", "ept-corrupt", 7, "hvmodel run guests/hog.asm --seed 7 --fault ept-corrupt",
                     Outcome("visible", "hog: the guest saw it: exit_status 2 vs 0", frozenset({"recovered"})))
    good = RunOutcome("hog", "ept-corrupt", 8, "...", Outcome("recovered", "", frozenset({"recovered"})))
    r = CampaignReport([bad, good], references=2)
    assert not r.ok and r.table()["ept-corrupt"] == {"visible": 1, "recovered": 1, "unexpected": 1}
    text = r.text()
    assert "UNEXPECTED visible (hog, ept-corrupt, seed 7)" in text
    assert "  reproduce: hvmodel run guests/hog.asm --seed 7 --fault ept-corrupt" in text
