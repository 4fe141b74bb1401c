"""Parsing Nsight Compute's per-kernel CSV into per-stage tables (scripts/gpu_ncu_stages.py).

Specification:
- `read_rows` takes ncu's `--csv --page raw` log: ncu's own "==PROF==" lines are left out, the header names the
  columns, the units row (first cell empty) is not a kernel; thousands separators are read as numbers.
- `split_stages` gives the kernels between the i-th and (i+1)-th marker kernel (torch.cuda._sleep's
  `spin_kernel`) to the i-th stage; kernels before the first marker or after the last stage are dropped.
- `summarize` groups a stage's kernels by name and grid size (one kernel at two shapes stays two rows), sums
  duration and bytes, and derives µs per launch and DRAM TB/s; a metric the run did not collect is absent
  from the row (the table shows '-'), never 0.
- The committed H100 log of session 12 parses into 400 verify-pass kernels and 298 action kernels, and the
  verify pass's lm_head reads its 1.27 GB of weights once.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ncu():
    spec = importlib.util.spec_from_file_location("gpu_ncu_stages", ROOT / "scripts" / "gpu_ncu_stages.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


CSV = """==PROF== Connected to process 1
"ID","Kernel Name","launch__grid_size","gpu__time_duration.sum","dram__bytes_read.sum","dram__bytes_write.sum"
"","","","nsecond","byte","byte"
"0","warmup_kernel","4","9,000","100","0"
"1","spin_kernel(long)","1","1,000","0","0"
"2","gemm(float*)","132","10,000","30,000,000","0"
"3","gemm(float*)","132","20,000","30,000,000","0"
"4","gemm(float*)","64","5,000","1,000,000","0"
"5","spin_kernel(long)","1","1,000","0","0"
"6","norm","8","2,000","0","1,000"
"7","spin_kernel(long)","1","1,000","0","0"
"8","after_the_last_stage","8","2,000","0","0"
==PROF== Disconnected from process 1
"""


def test_rows_leave_out_ncu_lines_and_the_units_row(ncu, tmp_path):
    p = tmp_path / "ncu.csv"
    p.write_text(CSV)
    rows = ncu.read_rows(p)
    assert [r["ID"] for r in rows] == [str(i) for i in range(9)]


def test_marker_kernels_separate_the_stages(ncu, tmp_path):
    p = tmp_path / "ncu.csv"
    p.write_text(CSV)
    stages = ncu.split_stages(ncu.read_rows(p), ["verify", "action"])
    assert [r["ID"] for r in stages["verify"]] == ["2", "3", "4"]
    assert [r["ID"] for r in stages["action"]] == ["6"]


def test_summary_groups_by_kernel_and_grid_and_leaves_uncollected_metrics_out(ncu, tmp_path):
    p = tmp_path / "ncu.csv"
    p.write_text(CSV)
    s = ncu.summarize(ncu.split_stages(ncu.read_rows(p), ["verify", "action"]))
    big, small = s["verify"]["kernels"]
    assert (big["launches"], big["grid"], big["us"], big["us_per_launch"]) == (2, 132, 30.0, 15.0)
    assert big["dram_read_MB"] == pytest.approx(60.0) and big["dram_TBps"] == pytest.approx(2.0)
    assert (small["launches"], small["grid"]) == (1, 64)
    assert "dram_pct" not in big and "occupancy_pct" not in big
    assert "-" in ncu.table(s).splitlines()[3]
    assert s["verify"]["launches"] == 3 and s["action"]["launches"] == 1


def test_the_committed_h100_log_parses(ncu):
    log = ROOT / "docs" / "bench" / "ncu_verify_action_h100_session12.csv.gz"
    s = ncu.summarize(ncu.split_stages(ncu.read_rows(log), ["verify", "action"]))
    assert s["verify"]["launches"] == 400 and s["action"]["launches"] == 298
    lm_head = max(s["verify"]["kernels"], key=lambda k: k.get("dram_read_MB", 0) / k["launches"])
    assert lm_head["launches"] == 1 and 1250 < lm_head["dram_read_MB"] < 1300
