"""The benchmark runs end to end at the tiny shape on the CPU (smoke test: no timing asserts)."""

import json

import torch

from flashdrive_ros.bench import cli, roofline
from flashdrive_ros.bench.ours import accept_schedule
from flashdrive_ros.bench.shapes import get_shape, make_workload


def test_accept_schedule_means():
    assert accept_schedule(22, 1) == [1] * 22
    assert accept_schedule(22, 5.6) == [6, 6, 5, 5]  # 4 verify passes, as the issue's floor assumes
    assert accept_schedule(22, 8) == [8, 7, 7]
    assert len(accept_schedule(22, 3)) == 8


def test_workload_layout():
    shape = get_shape("full")
    assert shape.prompt_len == 3035 and shape.tokens_per_image == 180
    w = make_workload(get_shape("tiny"), "cpu", torch.float32)
    cfg = get_shape("tiny").cfg
    assert int((w.input_ids == cfg.image_token_id).sum()) == 16 * 28


def test_roofline_full_shape_floor_is_near_the_issue_estimate():
    fl = roofline.floors(get_shape("full"))
    total = fl["all (streaming + τ=5.6 + adaptive)"]["total_floor_ms"]
    assert 40 < total < 55  # issue 7: "the physical floor is about 48 ms"


def test_bench_cli_tiny_cpu(tmp_path):
    rc = cli.main(["--shape", "tiny", "--steps", "1", "--warmup", "0", "--device", "cpu", "--out", str(tmp_path),
                   "--rows", "stock,ours: baseline,ours: all (τ=5.6)"])
    assert rc == 0
    res = json.loads((tmp_path / "bench.json").read_text())
    names = [r["name"] for r in res["rows"]]
    assert names[0].startswith("stock") and "ours: baseline" in names and "ours: all (τ=5.6)" in names
    assert res["workload"]["decoded_tokens"] == 22
    allrow = next(r for r in res["rows"] if r["name"] == "ours: all (τ=5.6)")
    assert allrow["decode_passes"] == 4
    assert res["checks"]["graph_vs_eager_action_rel_diff"] < 1e-3
    md = (tmp_path / "bench.md").read_text()
    assert "| ours: all (τ=5.6) |" in md and "22 decoded tokens" in md
