"""The evaluation loop and report, driven by a scripted source and predictors (no model, no video)."""
import json
import math

import numpy as np
import pytest

from flashdrive_ros.evaluation.report import write_report
from flashdrive_ros.evaluation.runner import (ConstantVelocityPredictor, EvalConfig, EvalWindow, Prediction,
                                              run_evaluation, summarize, window_t0s)

STEP = 100_000


class ScriptedSource:
    """Two clips driving straight at 10 m/s; the label is 'keep lane'."""

    def __init__(self, n_windows=(5, 3)):
        self.ranges = {f"clip{i}": (1_700_000, 1_700_000 + (n - 1) * STEP) for i, n in enumerate(n_windows)}
        self.reads = []

    def clip_ids(self):
        return list(self.ranges)

    def t0_range_us(self, clip_id):
        if self.ranges[clip_id] is None:
            raise ValueError("clip too short")
        return self.ranges[clip_id]

    def read(self, clip_id, t0_us, with_frames=True):
        self.reads.append((clip_id, t0_us, with_frames))
        hist = np.arange(-15, 1)[:, None] * np.array([[1.0, 0.0, 0.0]])
        fut = np.arange(1, 65)[:, None] * np.array([[1.0, 0.0, 0.0]])
        frames = np.zeros((4, 4, 8, 8, 3), np.uint8) if with_frames else None
        return EvalWindow(clip_id, t0_us, frames, hist, np.tile(np.eye(3), (16, 1, 1)), fut, "keep lane")


class OffsetPredictor:
    """Predicts the truth shifted 1 m left (sample 0) and exactly (sample 1); streams like the engine."""
    needs_frames = True

    def __init__(self, log):
        self.log, self.fresh = log, True

    def reset(self):
        self.log.append("reset")
        self.fresh = True

    def step(self, window):
        self.log.append(window.t0_us)
        full, self.fresh = self.fresh, False
        fut = np.asarray(window.future_xyz, np.float32)
        xyz = np.stack([fut + [0, 1, 0], fut])
        timings = {"encode": 4.0 if full else 1.0, "prefill": 8.0 if full else 2.0, "decode": 10.0,
                   "action": 3.0, "preprocess": 0.5}
        timings["total"] = sum(timings.values())
        return Prediction(xyz=xyz, reasoning="Keep lane." if full else "turn left", num_tokens=5,
                          timings_ms=timings, full_prefill=full)


def factory(log):
    return lambda cfg: ConstantVelocityPredictor() if cfg.predictor == "constant_velocity" else OffsetPredictor(log)


def test_config_strings():
    c = EvalConfig.parse("name=ft,checkpoint=/ckpt/a,streaming=1,flow=adaptive,samples=6,temperature=0.6",
                         defaults={"device": "cpu", "num_samples": 1})
    assert c.name == "ft" and c.predictor == "engine"
    assert c.engine_kwargs == {"device": "cpu", "model": "/ckpt/a", "streaming": True, "flow_schedule": "adaptive",
                               "num_samples": 6, "temperature": 0.6}
    assert EvalConfig.parse("streaming=0").name == "baseline"
    assert EvalConfig.parse("constant_velocity", defaults={"device": "cpu"}).engine_kwargs == {}
    assert EvalConfig.parse("name=cv,predictor=constant_velocity").predictor == "constant_velocity"
    with pytest.raises(ValueError):
        EvalConfig.parse("name=x,predictor=oracle")


def test_window_grid_is_10hz_from_first_valid_t0():
    assert window_t0s((1_700_000, 2_100_000)) == [1_700_000, 1_800_000, 1_900_000, 2_000_000, 2_100_000]
    assert window_t0s((1_700_000, 2_100_000), max_windows=2) == [1_700_000, 1_800_000]
    # A start between grid points moves to the next grid point of the clip.
    assert window_t0s((1_700_000, 2_100_000), start_us=1_850_000, end_us=2_000_000) == [1_900_000, 2_000_000]


def test_loop_runs_windows_in_order_resets_per_clip_and_excludes_warmup():
    log, source = [], ScriptedSource()
    configs = [EvalConfig.parse("name=model"), EvalConfig.parse("constant_velocity")]
    run = run_evaluation(source, configs, warmup=1, progress=False, predictor_factory=factory(log))
    t0s = [1_700_000 + i * STEP for i in range(5)]
    assert log == ["reset", *t0s, "reset", *t0s[:3]]
    # The model-free predictor is not handed video frames.
    assert all(w for _, _, w in source.reads[:8]) and not any(w for _, _, w in source.reads[8:])
    assert len(run.records) == 16 and sum(r.warmup for r in run.records) == 4

    s = summarize(run)
    model, cv = s["model"], s["constant_velocity"]
    assert model["windows"] == 6 and model["warmup_windows_excluded"] == 2 and model["clips"] == 2
    assert model["trajectory"]["ade"]["mean"] == pytest.approx(1.0)       # first sample is 1 m off
    assert model["trajectory"]["min_ade"]["mean"] == pytest.approx(0.0)   # second sample is exact
    assert cv["trajectory"]["ade"]["mean"] == pytest.approx(0.0, abs=1e-5)
    # Warm-up removed the full-prefill windows, whose reasoning matched the label.
    assert model["full_prefill_windows"] == 0
    assert model["reasoning"]["exact_match"]["mean"] == 0.0
    assert model["latency_ms"]["encode"]["mean"] == pytest.approx(1.0)
    assert model["tokens"]["decode_tok_per_s"] == pytest.approx(500.0)
    assert cv["paired_vs_model"]["ade"]["mean"] == pytest.approx(-1.0, abs=1e-5)
    # The model-free baseline produces no reasoning, so it is not scored against the label.
    assert cv["reasoning"]["token_f1"]["n"] == 0 and model["reasoning"]["token_f1"]["n"] == 6
    assert math.isnan(cv["tokens"]["mean_tokens"])


def test_report_files(tmp_path):
    log = []
    configs = [EvalConfig.parse("name=model"), EvalConfig.parse("constant_velocity")]
    run = run_evaluation(ScriptedSource(), configs, warmup=0, progress=False, predictor_factory=factory(log))
    out = write_report(run, tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["summary"]["model"]["full_prefill_windows"] == 2  # one per clip
    assert data["summary"]["model"]["reasoning"]["exact_match"]["mean"] == pytest.approx(2 / 8)
    assert len(data["records"]) == 16
    md = (tmp_path / "report.md").read_text()
    assert "| model | 8 |" in md and "constant_velocity" in md and "minADE2@6.4s" in md
    pngs = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert pngs == ["ade_over_time.png", "bev_clip0.png", "bev_clip1.png", "latency.png"]
    assert all(p.stat().st_size > 5000 for p in (tmp_path / "plots").glob("*.png"))
    assert math.isfinite(out["summary"]["model"]["latency_ms"]["total"]["p99"])


def test_short_clips_are_skipped_and_trajectories_can_be_saved(tmp_path):
    source = ScriptedSource(n_windows=(2,))
    source.ranges["short"] = None
    run = run_evaluation(source, [EvalConfig.parse("name=model")], progress=False, keep_trajectories=True,
                         predictor_factory=factory([]))
    assert list(run.windows) == ["clip0"] and run.skipped_clips == {"short": "clip too short"}
    write_report(run, tmp_path, plots=False)
    assert "`short`: clip too short" in (tmp_path / "report.md").read_text()
    saved = np.load(tmp_path / "trajectories.npz")
    assert saved["model/xyz"].shape == (2, 2, 64, 3) and saved["model/gt_xyz"].shape == (2, 64, 3)
    assert saved["model/t0_us"].tolist() == [1_700_000, 1_800_000]
    np.testing.assert_allclose(saved["model/xyz"][:, 1], saved["model/gt_xyz"])


def test_a_configuration_that_cannot_be_built_is_reported_and_the_others_still_run(tmp_path):
    def factory_with_failure(cfg):
        if cfg.name == "broken":
            raise FileNotFoundError("no checkpoint at /nope")
        return OffsetPredictor([])

    configs = [EvalConfig.parse("name=broken,checkpoint=/nope"), EvalConfig.parse("name=model")]
    run = run_evaluation(ScriptedSource(), configs, progress=False, predictor_factory=factory_with_failure)
    assert run.failed_configs == {"broken": "FileNotFoundError: no checkpoint at /nope"}
    out = write_report(run, tmp_path)
    assert list(out["summary"]) == ["model"] and out["summary"]["model"]["windows"] == 8
    assert "`broken`: FileNotFoundError" in out["markdown"]


def test_module_entry_point_help():
    import subprocess
    import sys
    res = subprocess.run([sys.executable, "-m", "flashdrive_ros.evaluation", "--help"], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0 and "--config" in res.stdout and "--warmup" in res.stdout
