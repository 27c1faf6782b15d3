"""Deterministic replay: a recorded run is reproduced exactly; a failing run prints its command."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from hvmodel.cli import main
from hvmodel.run.replay import ReplayError, replay

GUESTS = Path(__file__).resolve().parents[2] / "guests"
HOG = [str(GUESTS / "hog.asm"), "--mem", "4M", "--host-mem", "2M", "--quiet"]


def test_a_replay_reaches_the_same_instruction_count_and_memory(tmp_path, capsys):
    rec = tmp_path / "run.json"
    assert main(["run", *HOG, "--seed", "4", "--fault", "frame-bitflip:at=200000..900000",
                 "--fault", "alloc-fail:p=0.02,count=0", "--record", str(rec)]) in (0, 2, 3, 4)
    data = json.loads(rec.read_text())
    want = data["run"]["vms"][0]
    assert data["run"]["fired"] and want["instructions"] > 0 and len(data["run"]["checkpoints"]) > 3
    res = replay(rec)
    assert res.ok, res.lines
    got = res.digest.vms[0]
    assert (got.instructions, got.memory_hash, got.exit_status) == \
        (want["instructions"], want["memory_hash"], want["exit_status"])
    assert res.digest.fired == data["run"]["fired"]
    capsys.readouterr()
    assert main(["replay", str(rec)]) == 0
    assert capsys.readouterr().out.startswith(f"replay of {rec}: identical")


def test_a_replay_that_parts_from_the_recording_says_where(tmp_path):
    rec = tmp_path / "run.json"
    main(["run", *HOG, "--fault", "inject-exception:6,at=300000", "--record", str(rec)])
    data = json.loads(rec.read_text())
    data["run"]["checkpoints"][1][1][0][1] += 1          # round 2: one instruction more
    data["run"]["vms"][0]["memory_hash"] = "0" * 16
    rec.write_text(json.dumps(data))
    res = replay(rec)
    assert not res.ok
    text = "\n".join(res.lines)
    assert "checkpoint of round 2" in text and "memory (recorded vs replayed)" in text


def test_bad_recordings_are_one_clear_error(tmp_path, capsys):
    with pytest.raises(ReplayError, match="cannot read"):
        replay(tmp_path / "missing.json")
    (tmp_path / "x.json").write_text("{}")
    assert main(["replay", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert "not an hvmodel recording" in err and err.count("\n") == 1


def test_a_failing_run_prints_the_command_that_reproduces_it(capsys, monkeypatch):
    monkeypatch.chdir(GUESTS.parent)
    argv = ["run", "guests/memtest.asm", "--mem", "8M", "--host-mem", "4M", "--quiet", "--seed", "2",
            "--fault", "swap-read-error:at=1000000"]
    assert main(argv) == 4
    err = capsys.readouterr().err.splitlines()
    cmd = next(line.split("reproduce: ", 1)[1] for line in err if "reproduce: " in line)
    stop = next(line for line in err if "cannot swap in" in line)
    assert cmd == "hvmodel run " + shlex.join(argv[1:])
    assert main(shlex.split(cmd)[1:]) == 4
    assert stop in capsys.readouterr().err.splitlines()
