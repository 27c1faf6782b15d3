"""Record a run and replay it to the same instruction count and state.

A run is a function of (image, scenario, seed, armed faults), all named by its
``hvmodel run`` arguments (hvmodel/run/spec.py). ``hvmodel run ... --record FILE`` writes
(hvmodel/run/recording.py):

* the arguments and the folder they were given in;
* the guest images the run used (the assembled bytes, so an edited source does not
  change the replay) and a SHA-256 of each scenario file (which must not change);
* the event log: every fault that fired — which, in which VM, at which guest
  instruction, what it did — and a checkpoint per host round (each VM's instruction
  count and RIP);
* the final state per VM: exit, instruction count, console and memory hashes.

``hvmodel replay FILE`` runs the same arguments with the recorded images and compares
everything: the first difference is reported (the first checkpoint that differs says
in which round the runs parted); no difference means the replay reached the same
instruction count and the same memory, byte for byte.
"""

from __future__ import annotations

import base64
import hashlib
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from ..guest.image import GuestImage
from .digest import RunDigest
from .recording import ReplayError, sha256_file, load
from .session import execute
from .spec import RunSpec


@dataclass
class ReplayResult:
    """What a replay found: ``ok`` and the lines to print."""

    ok: bool
    lines: list[str] = field(default_factory=list)
    digest: RunDigest | None = None


def replay(path: str | Path) -> ReplayResult:
    """Run a recording again; compare its events, checkpoints and final state."""
    data = load(path)
    cwd = Path(data["cwd"])
    argv = list(data["argv"])
    try:
        want = RunDigest.from_dict(data["run"])
        images = {}
        for key, im in data["images"].items():
            code = zlib.decompress(base64.b64decode(im["code"]))
            if hashlib.sha256(code).hexdigest() != im["sha256"]:
                raise ReplayError(f"recording {path}: image {key} is damaged (its SHA-256 does not match)")
            images[_abs(cwd, key)] = GuestImage(code=code, load_addr=im["load_addr"], entry=im["entry"],
                                                source_name=im["source_name"])
    except (KeyError, TypeError, ValueError, zlib.error) as e:
        if isinstance(e, ReplayError):
            raise
        raise ReplayError(f"recording {path}: malformed: {e}") from None
    # The arguments were given relative to the recording's folder: make the target absolute.
    given = RunSpec.from_argv(argv).target
    target = _abs(cwd, given)
    argv = [str(target) if a == given else a for a in argv]
    sc = data.get("scenario")
    if sc is not None:
        sp = Path(sc["path"])
        if not sp.exists():
            raise ReplayError(f"recording {path}: scenario {sp} is missing")
        if sha256_file(sp) != sc["sha256"]:
            raise ReplayError(f"recording {path}: scenario {sp} changed since the recording")
    got = execute(argv, images=images)
    got.argv = want.argv
    lines = compare(want, got)
    if not lines:
        vms = ", ".join(f"{v.name}: {v.instructions:,} instructions, memory {v.memory_hash}, "
                        f"exit {v.exit_status if v.exit_status is not None else v.stop_reason}" for v in got.vms)
        return ReplayResult(True, [f"replay of {path}: identical ({len(got.fired)} fault firings, "
                                   f"{len(got.checkpoints)} checkpoints): {vms}"], got)
    return ReplayResult(False, [f"replay of {path} diverged:"] + [f"  {x}" for x in lines], got)


def _abs(cwd: Path, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else cwd / p


def compare(want: RunDigest, got: RunDigest) -> list[str]:
    """Differences between a recorded run and its replay (empty: identical)."""
    out: list[str] = []
    if got.error:
        out.append("the replay crashed: " + got.error.strip().splitlines()[-1])
    for i, (a, b) in enumerate(zip(want.fired, got.fired)):
        if (a["fault"], a["vm"], a["insns"], a["detail"]) != (b["fault"], b["vm"], b["insns"], b["detail"]):
            out.append(f"fault firing #{i + 1}: recorded {a['fault']} in {a['vm']} at {a['insns']:,}: "
                       f"{a['detail']}; replayed {b['fault']} in {b['vm']} at {b['insns']:,}: {b['detail']}")
            break
    if len(want.fired) != len(got.fired):
        out.append(f"{len(want.fired)} fault firings recorded, {len(got.fired)} replayed")
    for a, b in zip(want.checkpoints, got.checkpoints):
        if a != b:
            out.append(f"checkpoint of round {a[0]}: recorded {a[1]}, replayed {b[1]}")
            break
    if len(want.checkpoints) != len(got.checkpoints):
        out.append(f"{len(want.checkpoints)} rounds recorded, {len(got.checkpoints)} replayed")
    for a, b in zip(want.vms, got.vms):
        d = a.same_as(b)
        if d:
            out.append(f"{a.name}: {', '.join(d)} (recorded vs replayed)")
    return out


__all__ = ["ReplayError", "ReplayResult", "compare", "replay"]
