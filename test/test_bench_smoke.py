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


def test_bench_cli_tiny_cpu_with_a_draft_vocabulary(tmp_path):
    """--draft-vocab K: the scripted drafter's head reads K gathered lm_head rows (1000: padded to 1024);
    the script still decides acceptance, so the passes are unchanged, and the report states K."""
    from flashdrive_ros.bench.ours import OursPipeline
    from flashdrive_ros.bench.shapes import DRAFT_VOCAB, default_draft_vocab

    assert default_draft_vocab(get_shape("full")) == DRAFT_VOCAB == 32768
    assert default_draft_vocab(get_shape("tiny")) is None  # 5 052 ids: the whole head
    rc = cli.main(["--shape", "tiny", "--steps", "1", "--warmup", "0", "--device", "cpu", "--out", str(tmp_path),
                   "--rows", "ours: spec τ=5.6,ours: all (τ=5.6)", "--draft-vocab", "1000"])
    assert rc == 0
    res = json.loads((tmp_path / "bench.json").read_text())
    assert res["workload"]["draft_vocab"] == 1000 and not res.get("errors")
    # the substring also selects the temporal-draft rows: the prefill emits 1 / 9 / 23 ids (scripted), so
    # ceil(22 / 5.6) = 4, ceil(14 / 5.6) = 3 and no verify passes decode the rest
    # (and the action-draft rows: their decode is the all (τ=5.6) row's)
    assert [r["decode_passes"] for r in res["rows"]] == [4, 4, 4, 3, 0, 4, 4]
    assert [r["name"].split("prefill emits ")[-1] for r in res["rows"][2:5]] == ["1 (scripted)", "9 (scripted)",
                                                                                 "23 (scripted)"]
    assert "draft vocabulary of 1000 of the 5052 target ids" in (tmp_path / "bench.md").read_text()
    # the stand-in's greedy drafts over the vocabulary == the full head's argmax restricted to it
    pipe = OursPipeline(get_shape("tiny"), "cpu", torch.float32, draft_vocab=1000)
    h = torch.randn(7, pipe.cfg.text.hidden_size, generator=torch.Generator().manual_seed(0))
    full = pipe.model.vlm.lm_head(h)
    keep = torch.full_like(full, float("-inf"))
    keep[:, pipe.draft_ids] = full[:, pipe.draft_ids]
    from flashdrive_ros.engine import graphs as G

    assert torch.equal(pipe._draft_greedy(h), G.greedy_token(keep, pipe.banned))
    assert pipe._draft_head().padded_weight.shape[0] == 1024


def test_bench_action_draft_rows_run_the_check_and_on_a_miss_the_flow(tmp_path):
    """The action-draft rows time the engine's check (one expert evaluation, read back, both plans rolled out):
    a scripted hit stops there, a miss runs the 4 evaluations of the adaptive flow after it."""
    rc = cli.main(["--shape", "tiny", "--steps", "1", "--warmup", "0", "--device", "cpu", "--out", str(tmp_path),
                   "--rows", "ours: all (τ=5.6)"])
    assert rc == 0
    res = json.loads((tmp_path / "bench.json").read_text())
    rows = {r["name"]: r for r in res["rows"]}
    assert rows["ours: all (τ=5.6)"]["flow_evaluations"] == 4
    hit = rows["ours: all (τ=5.6) + action draft hit (scripted)"]
    miss = rows["ours: all (τ=5.6) + action draft miss (scripted)"]
    assert hit["flow_evaluations"] == 1 and miss["flow_evaluations"] == 5
    assert hit["action_draft_gap_m"] >= 0 and miss["action_draft_gap_m"] == hit["action_draft_gap_m"]
    assert "| ours: all (τ=5.6) + action draft hit (scripted) |" in (tmp_path / "bench.md").read_text()


def test_host_path_benchmark_runs_and_checks_both_paths_agree(tmp_path, capsys):
    """`python -m flashdrive_ros.bench.host` at a small size: every piece timed, the pooled decode equal to the
    serial one and the list + uploader preprocess equal to the array path (it asserts both itself)."""
    import json

    from flashdrive_ros.bench import host

    out = tmp_path / "host.json"
    assert host.main(["--device", "cpu", "--height", "108", "--width", "192", "--repeats", "2", "--threads", "2",
                      "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["image"] == "192x108" and len(res["rows"]) == 6
    assert all(v["median_ms"] >= 0 for v in res["rows"].values())
    assert "| decode 4 new frames: 2 threads |" in capsys.readouterr().out
