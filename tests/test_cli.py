"""The command line: results, JSON, and one clear message (no traceback) for every failure."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hvmodel.cli import main, parse_size

GUESTS = Path(__file__).resolve().parent.parent / "guests"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hvmodel", *args], capture_output=True, text=True,
                          timeout=300)


def assert_one_clear_line(proc: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines and lines[0].startswith("hvmodel: ")


@pytest.mark.parametrize("text,value", [("64M", 64 << 20), ("64MiB", 64 << 20), ("1g", 1 << 30),
                                        ("4096", 4096), ("2k", 2048)])
def test_parse_size(text, value):
    assert parse_size(text) == value


def test_json_output_has_the_documented_shape(tmp_path):
    src = tmp_path / "t.asm"
    src.write_text("mov dx, 0x3f8; mov al, 0x68; out dx, al; mov al, 5; out 0xf4, al\n")
    proc = run_cli("run", str(src), "--json")
    assert proc.returncode == 5
    d = json.loads(proc.stdout)
    vm = d["vms"][0]
    assert vm["exit_status"] == 5 and vm["console"] == "h"
    for key in ("instructions", "exits", "tlb_fills", "guest_page_faults", "ept_violations",
                "walk_refs", "frames_allocated"):
        assert key in vm["counters"]
    assert d["host"]["frames"] == (256 << 20) >> 12


def test_pagefault_guest_reports_1000_faults_and_walk_refs():
    proc = run_cli("run", str(GUESTS / "pagefault.asm"), "--json")
    assert proc.returncode == 0, proc.stderr
    c = json.loads(proc.stdout)["vms"][0]["counters"]
    assert c["guest_page_faults"] >= 1000
    assert c["walk_refs"] > 0


def test_bad_source_is_one_clear_error(tmp_path):
    src = tmp_path / "bad.asm"
    src.write_text("mov rax, 1\nthis is not an instruction\n")
    proc = run_cli("run", str(src))
    assert proc.returncode == 2
    assert_one_clear_line(proc)
    assert "bad.asm" in proc.stderr


def test_garbage_bytes_end_in_a_clear_guest_crash(tmp_path):
    img = tmp_path / "garbage.bin"
    img.write_bytes(bytes([0x0F, 0xFF] * 64))  # ud0: #UD with no IDT -> triple fault
    proc = run_cli("run", str(img))
    assert proc.returncode == 3
    assert_one_clear_line(proc)
    assert "triple fault" in proc.stderr


def test_triple_fault_report_names_rip_and_instruction(tmp_path):
    src = tmp_path / "tf.asm"
    src.write_text("mov rax, 1\nud2\n")
    proc = run_cli("run", str(src))
    assert proc.returncode == 3
    assert_one_clear_line(proc)
    assert "RIP 0x100007" in proc.stderr and "ud2" in proc.stderr


def test_mem_larger_than_host_without_swap_is_refused(tmp_path):
    proc = run_cli("run", str(GUESTS / "hello.asm"), "--mem", "512M", "--host-mem", "64M", "--no-swap")
    assert proc.returncode == 2
    assert_one_clear_line(proc)
    assert "512 MiB" in proc.stderr and "no swap" in proc.stderr


def test_mem_larger_than_host_overcommits_with_a_swap_file(tmp_path):
    proc = run_cli("run", str(GUESTS / "hello.asm"), "--mem", "512M", "--host-mem", "64M",
                   "--swap-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr


def test_swap_file_that_does_not_fit_on_disk_is_refused(tmp_path):
    proc = run_cli("run", str(GUESTS / "hello.asm"), "--mem", "64T", "--host-mem", "64M",
                   "--swap-dir", str(tmp_path))
    assert proc.returncode == 2
    assert_one_clear_line(proc)
    assert "swap file" in proc.stderr


@pytest.mark.parametrize("args", [["run", "x.asm", "--mem", "lots"], ["run", "x.asm", "--mmu", "magic"],
                                  ["run", "x.asm", "--max-insns", "-4"]])
def test_bad_options_exit_2_without_traceback(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_missing_and_empty_images(tmp_path):
    assert run_cli("run", str(tmp_path / "nope.bin")).returncode == 2
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    proc = run_cli("run", str(empty))
    assert proc.returncode == 2
    assert_one_clear_line(proc)


def test_demo_runs_and_explains():
    proc = run_cli("demo")
    assert proc.returncode == 0, proc.stderr
    assert "hello from the guest" in proc.stdout
    assert "2D walk" in proc.stdout


def test_several_vms_with_a_common_salt_in_json(tmp_path):
    src = tmp_path / "t.asm"
    src.write_text("mov rdi, 0x300000; mov rcx, 2048; mov rax, 5; l: mov qword ptr [rdi], rax; add rdi, 8; "
                   "dec rcx; jnz l; mov rcx, 300000; s: dec rcx; jnz s; mov al, 0; out 0xf4, al\n")
    proc = run_cli("run", str(src), "--vms", "3", "--salt", "x", "--mem", "4M", "--no-large-pages",
                   "--share-scan-time", "0.0001",
                   "--share-rate-max", "1000000", "--json")
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert [v["name"] for v in d["vms"]] == ["t-1", "t-2", "t-3"]
    assert d["host"]["pages_sharing"] >= 2 * 4     # the 4 identical data pages, across 3 VMs
    assert {r["NAME"] for r in d["esxtop"]} == {"t-1", "t-2", "t-3"}
    assert all("SHRD" in v["counters"] and "SWCUR" in v["counters"] for v in d["vms"])


def test_scenario_run_with_stats_prints_the_esxtop_view(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text(f'[host]\nmemsize = "32M"\n[[vm]]\nguest = "{GUESTS / "hello.asm"}"\nmemsize = "8M"\ncount = 2\n')
    proc = run_cli("run", str(f), "--stats")
    assert proc.returncode == 0, proc.stderr
    assert "PSHARE/MB" in proc.stdout and "SWCUR" in proc.stdout and "vm1-2" in proc.stdout


def test_top_shows_a_live_table(tmp_path):
    proc = run_cli("run", str(GUESTS / "hello.asm"), "--top", "--mem", "8M")
    assert proc.returncode == 0, proc.stderr
    assert "SHRDSVD" in proc.stdout


def test_bad_scenario_is_one_clear_error(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text("[host\nmemsize=")
    proc = run_cli("run", str(f))
    assert proc.returncode == 2
    assert_one_clear_line(proc)


@pytest.mark.parametrize("suffix", ["png", "html"])
def test_plot_draws_the_timeline(tmp_path, suffix):
    out = tmp_path / f"t.{suffix}"
    proc = run_cli("run", str(GUESTS / "hog.asm"), "--mem", "16M", "--host-mem", "8M", "--quiet",
                   "--plot", str(out), "--swap-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG") if suffix == "png" else b"<svg" in data and b"swapped" in data


def test_map_draws_the_three_address_spaces(tmp_path):
    import xml.etree.ElementTree as ET
    out = tmp_path / "m.svg"
    proc = run_cli("map", str(GUESTS / "hog.asm"), "--mem", "16M", "--host-mem", "8M", "--svg", str(out),
                   "--swap-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    ET.fromstring(text)                               # well-formed SVG
    assert "guest virtual" in text and "guest physical" in text and "machine" in text
    assert "(swapped)" in text and "vswp slot" in text  # a page that left RAM, in the swap-file lane
    assert "VA 0x" in text and "GPA 0x" in text


def test_map_shows_a_frame_shared_across_vms(tmp_path):
    out = tmp_path / "m.svg"
    proc = run_cli("map", str(GUESTS / "dedup.asm"), "--vms", "2", "--salt", "s", "--mem", "8M", "--no-large-pages",
                   "--share-scan-time", "0.001", "--share-rate-max", "10000000", "--svg", str(out))
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert "(shared)" in text
    # the two VMs' shared pages point at one machine box
    frames = re.findall(r"frame (0x[0-9a-f]+)</text>", text)
    assert len(frames) == len(set(frames))            # each machine frame drawn once
    assert text.count("dedup-1 GPA") >= 1 and text.count("dedup-2 GPA") >= 1


def test_info_mem_tlb_p2m_on_a_finished_and_a_running_vm():
    done = run_cli("info", "mem", str(GUESTS / "hello.asm"))
    assert done.returncode == 0, done.stderr
    assert "power_off, exit status 0" in done.stdout
    assert re.search(r"^[0-9a-f]{16}-[0-9a-f]{16} [0-9a-f]{16} [-u]r[-w][-x]$", done.stdout, re.M)
    tlb = run_cli("info", "tlb", str(GUESTS / "hello.asm"), "--mmu", "shadow")
    assert re.search(r"^[0-9a-f]{16}: [0-9a-f]{16} 4K [-u]r[-w][-x] machine 0x[0-9a-f]+$", tlb.stdout, re.M)
    running = run_cli("info", "p2m", str(GUESTS / "hello.asm"), "--at", "100")
    assert "after 100 instructions: running" in running.stdout
    assert re.search(r"pages PRIVATE$", running.stdout, re.M) and "MMIO (local APIC" in running.stdout
