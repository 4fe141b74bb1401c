"""flashdrive-eval end to end: a generated clip, the tiny random-weight engine, baseline vs streaming."""
import json
import math

import pytest

from flashdrive_ros.evaluation.cli import main

pytestmark = pytest.mark.slow


def _finite_numbers(obj):
    """All numbers in a JSON tree (null = undefined, e.g. a standard error of one window, is skipped)."""
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _finite_numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _finite_numbers(v)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield obj


@pytest.fixture
def restore_torch_threads():
    import torch
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_cli_baseline_vs_streaming_on_a_generated_clip(tmp_path, capsys, restore_torch_threads):
    out = tmp_path / "eval"
    # 8.6 s clip: t0 1.7 s .. 2.2 s are valid (1.5 s history before, 6.4 s future after); take 5 windows.
    rc = main(["--synthetic", "1", "--synthetic-seconds", "8.6", "--synthetic-size", "160x96",
               "--max-windows", "5", "--num-samples", "2", "--max-new-tokens", "4", "--warmup", "1",
               "--plot-windows", "2", "--no-progress", "--threads", "1", "--out", str(out),
               "--config", "name=baseline,streaming=0", "--config", "name=streaming,streaming=1",
               "--config", "constant_velocity"])
    assert rc == 0

    data = json.loads((out / "results.json").read_text())
    assert [c["name"] for c in data["configs"]] == ["baseline", "streaming", "constant_velocity"]
    (clip, t0s), = data["windows"].items()
    assert t0s == [1_700_000, 1_800_000, 1_900_000, 2_000_000, 2_100_000]

    records = {name: [r for r in data["records"] if r["config"] == name] for name in ("baseline", "streaming")}
    # Streaming carries state across windows: only the first window of the clip is a full prefill.
    assert [r["full_prefill"] for r in records["streaming"]] == [True, False, False, False, False]
    assert all(r["full_prefill"] for r in records["baseline"])
    assert [r["warmup"] for r in records["streaming"]] == [True, False, False, False, False]

    for name in ("baseline", "streaming"):
        s = data["summary"][name]
        assert s["windows"] == 4 and s["warmup_windows_excluded"] == 1
        assert s["trajectory"]["num_samples"] == 2
        for key in ("ade", "min_ade", "ade@1s", "ade@3s", "ade@5s", "min_ade@1s", "min_ade@5s"):
            assert math.isfinite(s["trajectory"][key]["mean"]) and s["trajectory"][key]["n"] == 4
        assert s["trajectory"]["min_ade"]["mean"] <= s["trajectory"]["ade"]["mean"] + 1e-9
        for stage in ("encode", "prefill", "decode", "action", "total"):
            lat = s["latency_ms"][stage]
            assert 0 < lat["mean"] and lat["p50"] <= lat["p99"]
        assert s["reasoning"]["token_f1"]["n"] == 4  # the generated clip carries CoC labels
    assert data["summary"]["streaming"]["full_prefill_windows"] == 0  # the full prefill was the warm-up
    assert all(math.isfinite(x) for x in _finite_numbers(data))

    printed = capsys.readouterr().out
    report = (out / "report.md").read_text()
    assert printed.strip() == report.strip()
    assert "| baseline | 4 |" in report and "| streaming | 4 |" in report and "minADE2@6.4s" in report
    plots = {p.name for p in (out / "plots").glob("*.png")}
    assert plots == {"latency.png", "ade_over_time.png", f"bev_{clip}.png"}
