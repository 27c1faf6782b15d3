"""tools/: every script starts and explains itself (--help), and the docs show each one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOLS = sorted(p for p in (ROOT / "tools").iterdir() if p.is_file() and p.name != "README.md")
DOCS = [ROOT / "README.md", ROOT / "tools" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_there_are_tools():
    assert any(p.name == "profile-fill" for p in TOOLS)


@pytest.mark.parametrize("tool", TOOLS, ids=lambda p: p.name)
def test_each_tool_has_help_and_is_executable(tool):
    assert os.access(tool, os.X_OK), f"{tool.name} is not executable"
    proc = subprocess.run([sys.executable, str(tool), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage:" in proc.stdout and proc.stderr == ""


@pytest.mark.parametrize("tool", TOOLS, ids=lambda p: p.name)
def test_each_tool_is_used_in_the_docs(tool):
    text = "\n".join(p.read_text() for p in DOCS)
    assert f"tools/{tool.name} " in text


def test_profile_fill_profiles_a_guest_and_refuses_a_bad_one(tmp_path):
    tool = ROOT / "tools" / "profile-fill"
    src = tmp_path / "t.asm"
    src.write_text("mov ecx, 64\nmov rbx, 0x200000\nl: mov [rbx], rcx\nadd rbx, 0x1000\ndec ecx\njnz l\nhlt\n")
    proc = subprocess.run([sys.executable, str(tool), str(src), "--mem", "4M", "--top", "100"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert "fills" in out[0] and out[1].startswith("fill path: ") and "us a fill" in out[1]
    listed = out[3:]
    assert any("vcpu.py" in ln and "(_fill)" in ln for ln in listed)        # the hook itself ...
    assert any("walk.py" in ln and "(walk)" in ln for ln in listed)         # ... and what it called
    bad = subprocess.run([sys.executable, str(tool), str(tmp_path / "missing.asm")], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "no such file" in bad.stderr and "Traceback" not in bad.stderr
