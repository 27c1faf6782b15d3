"""Every command README.md shows runs as written.

Each `hvmodel ...`, `make ...` and `tools/...` line of the README's shell blocks runs in a fresh working
directory that links the repository's guests/, scenarios/ and campaigns/ (so outputs such as
out.png or r.json land there, never in the checkout), with `/tmp/k` (the example kernel's
directory) moved into it. A line ends with status 0 unless its comment says
`exit status N`. The quick start's install steps are what CI itself runs; the gdb session
block runs with gdb in batch mode. Lines that take a minute or more are marked slow
(`python -m pytest -m slow`); none is skipped: a README line this file does not place fails.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# Lines that take a minute or more on a 2-core machine (run with -m slow).
SLOW = {
    "hvmodel run scenarios/dedup-8vm.toml --stats",
    "hvmodel run scenarios/idle-busy-2to1.toml --stats --plot out.png",
    "hvmodel check --matrix",
    "hvmodel check --delivery",
    "hvmodel check --mutants",
    "hvmodel fuzz --seed 1 --count 200",
    "hvmodel bench",
    "hvmodel campaign campaigns/all-faults.toml --json out.json",
}
# The quick start's second line runs this suite itself; CI runs it (.ci/run).
NOT_RUN_HERE = {"python -m pytest"}
TIMEOUT = 1800          # a fast line; a slow one may take hours on a loaded 2-core machine
SLOW_TIMEOUT = 4 * 3600


@dataclass
class Line:
    text: str              # the command as the README writes it, comment stripped
    expect: int            # the exit status its comment documents (0 if none)
    background: bool       # ends with '&' (the gdb session)
    block: int             # which code block


def readme_lines() -> list[Line]:
    out = []
    blocks, lang, cur = [], None, None
    for raw in README.read_text().splitlines():
        if raw.startswith("```"):
            if cur is None:
                lang, cur = raw[3:].strip(), []
            else:
                if lang in ("", "sh", "bash", "console"):   # shell blocks; python ones are tested elsewhere
                    blocks.append(cur)
                cur = None
        elif cur is not None:
            cur.append(raw)
    for b, block in enumerate(blocks):
        for raw in block:
            cmd, _, comment = raw.partition(" #")
            cmd = cmd.strip()
            m = re.search(r"exit status (\d+)", comment)
            expect = int(m.group(1)) if m else 0
            background = cmd.endswith("&")
            cmd = cmd.rstrip("&").strip()
            for part in cmd.split("&&"):   # "pip install -e . && hvmodel demo"
                part = part.strip()
                if part:
                    out.append(Line(part, expect, background, b))
    return out


LINES = readme_lines()
COMMANDS = [ln for ln in LINES if ln.text.split()[0] in ("hvmodel", "make") or ln.text.startswith("tools/")]


def test_every_readme_line_is_placed():
    placed = {ln.text for ln in COMMANDS} | NOT_RUN_HERE
    other = [ln.text for ln in LINES
             if ln.text not in placed and not ln.text.startswith(("pip install", "gdb ", "(gdb)"))]
    assert not other, f"README lines the README test does not run: {other}"
    assert SLOW <= {ln.text for ln in COMMANDS}, f"stale SLOW entries: {SLOW - {ln.text for ln in COMMANDS}}"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("readme")
    for name in ("guests", "scenarios", "campaigns"):
        (d / name).symlink_to(ROOT / name)
    return d


def argv(text: str, workdir: Path) -> list[str]:
    args = shlex.split(text.replace("/tmp/k", str(workdir / "k")))
    if args[0] == "hvmodel":   # the installed command, run by this interpreter
        args = [sys.executable, "-m", "hvmodel", *args[1:]]
    elif args[0].startswith("tools/"):   # a script of the checkout's tools/, by this interpreter
        args = [sys.executable, str(ROOT / args[0]), *args[1:]]
    return args


def run(line: Line, workdir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(argv(line.text, workdir), cwd=workdir, capture_output=True, text=True,
                          timeout=SLOW_TIMEOUT if line.text in SLOW else TIMEOUT,
                          env={**os.environ, "COLUMNS": "120"})


def prerequisites(line: Line, workdir: Path) -> None:
    """Run the earlier README lines whose outputs this one reads (the kernel, a record)."""
    if "/tmp/k/" in line.text and not (workdir / "k" / "kernel.elf").exists():
        make = next(ln for ln in COMMANDS if ln.text.startswith("make "))
        assert run(make, workdir).returncode == 0
    for tok in shlex.split(line.text)[1:]:
        if tok.endswith(".json") and line.text.split()[1] == "replay" and not (workdir / tok).exists():
            producer = next(ln for ln in COMMANDS if f"--record {tok}" in ln.text)
            run(producer, workdir)


def check_line(line: Line, workdir: Path) -> None:
    prerequisites(line, workdir)
    proc = run(line, workdir)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == line.expect, (
        f"{line.text}: exit status {proc.returncode}, README says {line.expect}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


FAST = [ln for ln in COMMANDS if ln.text not in SLOW and not ln.background]
GDB = [ln for ln in COMMANDS if ln.background]


@pytest.mark.parametrize("line", FAST, ids=[ln.text for ln in FAST])
def test_readme_command(line: Line, workdir: Path):
    check_line(line, workdir)


@pytest.mark.slow
@pytest.mark.parametrize("line", [ln for ln in COMMANDS if ln.text in SLOW],
                         ids=[ln.text for ln in COMMANDS if ln.text in SLOW])
def test_readme_slow_command(line: Line, workdir: Path):
    check_line(line, workdir)


@pytest.mark.parametrize("line", GDB, ids=[ln.text for ln in GDB])
def test_readme_gdb_session(line: Line, workdir: Path):
    from tests.debug.test_gdbstub import gdb_or_skip

    gdb = gdb_or_skip()
    prerequisites(line, workdir)
    block = [ln for ln in LINES if ln.block == line.block]
    gdb_line = next(ln.text for ln in block if ln.text.startswith("gdb "))
    monitor = [ln.text.removeprefix("(gdb)").strip() for ln in block if ln.text.startswith("(gdb)")]
    assert monitor, "the README's gdb block shows no (gdb) commands"
    hv = subprocess.Popen(argv(line.text, workdir), cwd=workdir, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    try:
        assert "gdb stub listening" in hv.stderr.readline()
        args = argv(gdb_line, workdir)
        args = [gdb, "-q", "-nx", "-batch", *args[1:]]
        for c in monitor:
            args += ["-ex", c]
        proc = subprocess.run(args, cwd=workdir, capture_output=True, text=True, timeout=300)
        hv.wait(timeout=120)
    finally:
        if hv.poll() is None:
            hv.kill()
    out = proc.stdout + proc.stderr
    assert "Breakpoint 1, kmain" in out, out
    assert "walk of 0x100000000" in out and "p2m gfn 0x1000" in out and "tlb_fills" in out, out
    assert hv.returncode == 0 and "Traceback" not in hv.stderr.read()   # detached: the guest ran to its end
