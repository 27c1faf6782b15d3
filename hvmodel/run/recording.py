"""The recording format of ``hvmodel run ... --record FILE`` (``hvmodel-recording/1``, JSON).

A recording holds the run's arguments and the folder they were given in; the guest
images the run used (the assembled bytes, compressed, with a SHA-256 each, so an edited
source does not change the replay) and a SHA-256 of its scenario file; and the run's
digest (hvmodel/run/digest.py): every fault firing, a checkpoint per host round, the
final state per VM. :mod:`hvmodel.run.replay` runs it again.
"""

from __future__ import annotations

import base64
import hashlib
import json
import zlib
from pathlib import Path

from .digest import RunDigest
from .spec import RunSpec

FORMAT = "hvmodel-recording/1"


class ReplayError(ValueError):
    """A recording that cannot be replayed (missing, malformed, inputs changed)."""


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file's bytes, in hex."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write(path: str | Path, digest: RunDigest, images: dict) -> None:
    """Write a recording of the run ``digest`` describes, with the ``images`` it used."""
    scenario = None
    target = Path(RunSpec.from_argv(digest.argv).target)
    if target.suffix == ".toml":
        scenario = {"path": str(target.resolve()), "sha256": sha256_file(target)}
    data = {
        "format": FORMAT,
        "argv": digest.argv,
        "cwd": str(Path.cwd()),
        "scenario": scenario,
        "images": {str(k): {"code": base64.b64encode(zlib.compress(im.code)).decode(),
                            "load_addr": im.load_addr, "entry": im.entry, "source_name": im.source_name,
                            "sha256": hashlib.sha256(im.code).hexdigest()}
                   for k, im in images.items()},
        "run": digest.as_dict(),
    }
    Path(path).write_text(json.dumps(data, indent=1))


def load(path: str | Path) -> dict:
    """Read a recording; ReplayError if it is not one."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except OSError as e:
        raise ReplayError(f"recording {p}: cannot read: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ReplayError(f"recording {p}: not JSON: {e}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ReplayError(f"recording {p}: not an hvmodel recording (format {FORMAT})")
    return data


__all__ = ["FORMAT", "ReplayError", "load", "sha256_file", "write"]
