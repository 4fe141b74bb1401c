"""The evaluation loop: N named configurations × clips × sliding windows at 10 Hz.

Every configuration sees exactly the same windows. Windows of a clip are fed in time order, as on a
vehicle, so streaming state carries across windows; the predictor is reset at every clip start.
Configurations run one after the other (one model in memory at a time, and latencies are not
disturbed by a second model).
"""
from __future__ import annotations

import ast
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol

import numpy as np

from . import metrics as M
from .reasoning import reasoning_agreement

STAGES = ("preprocess", "encode", "prefill", "decode", "action", "total")
WINDOW_STRIDE_US = 100_000  # 10 Hz


# ---- configurations ----------------------------------------------------------------------------

# Short names accepted in --config strings -> DriveEngine.from_pretrained keyword.
_ALIASES = {"checkpoint": "model", "flow": "flow_schedule", "samples": "num_samples", "k": "num_samples",
            "spec": "speculative"}
PREDICTORS = ("engine", "constant_velocity")


def _parse_value(text: str):
    """'1'/'true' -> True-ish ints/bools, numbers -> numbers, anything else stays a string."""
    low = text.strip().lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        return text.strip()


@dataclass
class EvalConfig:
    """One named configuration: which predictor and which DriveEngine.from_pretrained options."""
    name: str
    predictor: str = "engine"
    engine_kwargs: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str, defaults: dict | None = None) -> "EvalConfig":
        """Parse 'name=streaming,streaming=1,flow=adaptive,checkpoint=PATH'.

        A bare word is a name; the bare word 'constant_velocity' selects that model-free predictor.
        Keys other than name/predictor are engine options (aliases: checkpoint->model,
        flow->flow_schedule, samples/k->num_samples, spec->speculative); they override `defaults`.
        """
        kwargs = dict(defaults or {})
        name, predictor = None, "engine"
        for part in filter(None, (p.strip() for p in text.split(","))):
            if "=" not in part:
                if name is not None:
                    raise ValueError(f"config {text!r}: only one bare name allowed, got {part!r}")
                name = part
                if part == "constant_velocity":
                    predictor = part
                continue
            key, value = (s.strip() for s in part.split("=", 1))
            if key == "name":
                name = value
            elif key == "predictor":
                predictor = value
            else:
                key = _ALIASES.get(key, key)
                kwargs[key] = value if key == "model" else _parse_value(value)
        if predictor not in PREDICTORS:
            raise ValueError(f"config {text!r}: predictor must be one of {PREDICTORS}")
        if "streaming" in kwargs:
            kwargs["streaming"] = bool(kwargs["streaming"])
        if "speculative" in kwargs:
            kwargs["speculative"] = bool(kwargs["speculative"])
        if name is None:
            name = predictor if predictor != "engine" else (
                "streaming" if kwargs.get("streaming", True) else "baseline")
        if predictor != "engine":
            kwargs = {}
        return cls(name=name, predictor=predictor, engine_kwargs=kwargs)

    def describe(self) -> dict:
        return {"name": self.name, "predictor": self.predictor,
                "engine_kwargs": {k: (str(v) if not isinstance(v, (int, float, bool, str, type(None))) else v)
                                  for k, v in self.engine_kwargs.items()}}


# ---- windows and predictors --------------------------------------------------------------------

@dataclass
class EvalWindow:
    """What the loop needs from one dataset window (ego frame at t0)."""
    clip_id: str
    t0_us: int
    frames: np.ndarray | None          # [4 cams, 4, H, W, 3] uint8, None when not requested
    history_xyz: np.ndarray            # [16, 3]
    history_rot: np.ndarray            # [16, 3, 3]
    future_xyz: np.ndarray             # [64, 3] ground truth
    label: str | None = None           # reasoning label (CoC text), None when the clip has none


class WindowSource(Protocol):
    def clip_ids(self) -> list[str]: ...
    def t0_range_us(self, clip_id: str) -> tuple[int, int]: ...
    def read(self, clip_id: str, t0_us: int, with_frames: bool = True) -> EvalWindow: ...


@dataclass
class Prediction:
    xyz: np.ndarray                    # [K, 64, 3]
    reasoning: str | None = None       # None: this predictor does not reason (no agreement scored)
    num_tokens: int | None = None
    timings_ms: dict = field(default_factory=dict)
    full_prefill: bool | None = None
    verify_passes: int | None = None
    tokens_per_pass: float | None = None
    flow_evaluations: int | None = None  # expert evaluations of the action stage
    action_draft: str | None = None     # the engine's action drafter outcome ("off", "accepted", ...)


class Predictor(Protocol):
    needs_frames: bool
    def reset(self) -> None: ...
    def step(self, window: EvalWindow) -> Prediction: ...


class ConstantVelocityPredictor:
    """Model-free baseline: extrapolates the last history velocity (see metrics.constant_velocity_prediction)."""
    needs_frames = False

    def reset(self) -> None:
        pass

    def step(self, window: EvalWindow) -> Prediction:
        start = time.perf_counter()
        xyz = M.constant_velocity_prediction(window.history_xyz, num_waypoints=len(window.future_xyz))
        elapsed = (time.perf_counter() - start) * 1e3
        return Prediction(xyz=xyz, timings_ms={"action": elapsed, "total": elapsed})


class EnginePredictor:
    """Adapter from DriveEngine.step (DESIGN.md Engine API) to a Prediction."""
    needs_frames = True

    def __init__(self, engine):
        self.engine = engine

    @classmethod
    def from_config(cls, config: EvalConfig) -> "EnginePredictor":
        from flashdrive_ros.engine import DriveEngine  # imported lazily: CV-only runs need no model
        kwargs = dict(config.engine_kwargs)
        model = kwargs.pop("model", "tiny")
        if isinstance(kwargs.get("dtype"), str):
            import torch
            kwargs["dtype"] = getattr(torch, kwargs["dtype"])
        return cls(DriveEngine.from_pretrained(model, **kwargs))

    def reset(self) -> None:
        self.engine.reset()

    def step(self, window: EvalWindow) -> Prediction:
        r = self.engine.step(window.frames, window.t0_us, window.history_xyz, window.history_rot)
        xyz = None if r.xyz is None else np.asarray(r.xyz, dtype=np.float32)
        if xyz is not None and xyz.ndim == 2:
            xyz = xyz[None]
        return Prediction(xyz=xyz, reasoning=r.reasoning, num_tokens=int(r.num_tokens or 0),
                          timings_ms={k: float(v) for k, v in (r.timings_ms or {}).items()},
                          full_prefill=getattr(r, "full_prefill", None),
                          verify_passes=getattr(r, "verify_passes", None),
                          tokens_per_pass=getattr(r, "tokens_per_pass", None),
                          flow_evaluations=getattr(r, "flow_evaluations", None),
                          action_draft=getattr(r, "action_draft", None))


def make_predictor(config: EvalConfig) -> Predictor:
    if config.predictor == "constant_velocity":
        return ConstantVelocityPredictor()
    return EnginePredictor.from_config(config)


# ---- the loop ----------------------------------------------------------------------------------

@dataclass
class WindowRecord:
    """Everything recorded for one (configuration, clip, window)."""
    config: str
    clip_id: str
    t0_us: int
    index: int                         # window index within the clip (0 = first after reset)
    warmup: bool                       # excluded from aggregation
    metrics: dict | None               # TrajectoryMetrics.as_dict(), None when no trajectory came back
    reasoning: dict | None             # exact_match / token_f1, None without a label
    reasoning_text: str | None
    num_tokens: int | None
    timings_ms: dict
    wall_ms: float                     # measured around predictor.step by the loop
    full_prefill: bool | None
    verify_passes: int | None
    tokens_per_pass: float | None
    flow_evaluations: int | None = None
    action_draft: str | None = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class PlotSample:
    """Trajectories kept in memory for the bird's-eye plots (a few windows per clip)."""
    clip_id: str
    t0_us: int
    history_xyz: np.ndarray
    future_xyz: np.ndarray
    predictions: dict = field(default_factory=dict)  # config name -> [K, 64, 3]


@dataclass
class EvalRun:
    configs: list[EvalConfig]
    windows: dict[str, list[int]]      # clip -> t0s evaluated
    warmup: int
    records: list[WindowRecord] = field(default_factory=list)
    plot_samples: list[PlotSample] = field(default_factory=list)
    skipped_clips: dict[str, str] = field(default_factory=dict)  # clip -> why it has no window
    failed_configs: dict[str, str] = field(default_factory=dict)  # config -> why it could not be built
    # config -> list of (clip, t0_us, xyz [K,64,3], ground truth [64,3]); only with keep_trajectories
    trajectories: dict[str, list] = field(default_factory=dict)


def window_t0s(t0_range_us: tuple[int, int], stride_us: int = WINDOW_STRIDE_US, start_us: int | None = None,
               end_us: int | None = None, max_windows: int | None = None) -> list[int]:
    """t0s from the first valid one at `stride_us`, clamped to [start_us, end_us], at most max_windows."""
    first, last = t0_range_us
    if start_us is not None:
        # Keep the clip's stride grid anchored at its first valid t0.
        first = first + max(0, -(-(start_us - first) // stride_us)) * stride_us
    if end_us is not None:
        last = min(last, end_us)
    t0s = list(range(int(first), int(last) + 1, int(stride_us)))
    return t0s[:max_windows] if max_windows is not None else t0s


def pick_plot_windows(t0s: list[int], warmup: int, count: int) -> list[int]:
    """`count` t0s spread evenly over the non-warm-up windows of a clip."""
    usable = t0s[warmup:] or t0s
    if count <= 0 or not usable:
        return []
    idx = np.unique(np.linspace(0, len(usable) - 1, num=min(count, len(usable))).round().astype(int))
    return [usable[i] for i in idx]


def run_evaluation(source: WindowSource, configs: list[EvalConfig], *, clip_ids: list[str] | None = None,
                   stride_us: int = WINDOW_STRIDE_US, start_us: int | None = None, end_us: int | None = None,
                   max_windows: int | None = None, warmup: int = 0, plot_clips: int = 2,
                   plot_windows_per_clip: int = 3, progress: bool = True, keep_trajectories: bool = False,
                   predictor_factory: Callable[[EvalConfig], Predictor] = make_predictor) -> EvalRun:
    """Run every configuration over every (clip, t0) window in order and record per-window results."""
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"configuration names must be unique, got {names}")
    windows, skipped = {}, {}
    for clip in (list(clip_ids) if clip_ids else source.clip_ids()):
        try:
            t0s = window_t0s(source.t0_range_us(clip), stride_us, start_us, end_us, max_windows)
        except ValueError as err:  # clip too short for a single window: report it, evaluate the rest
            t0s, skipped[clip] = [], str(err)
        if t0s:
            windows[clip] = t0s
        else:
            skipped.setdefault(clip, "no t0 inside the requested range")
    for clip, why in skipped.items():
        print(f"warning: skipping clip {clip}: {why}", file=sys.stderr)
    if not windows:
        raise ValueError("no clip has a window to evaluate")
    clips = list(windows)
    run = EvalRun(configs=list(configs), windows=windows, warmup=warmup, skipped_clips=skipped)
    plot_index: dict[tuple[str, int], PlotSample] = {}
    for clip in clips[:plot_clips]:
        for t0 in pick_plot_windows(windows[clip], warmup, plot_windows_per_clip):
            plot_index[(clip, t0)] = None  # filled on first read
    total = sum(len(v) for v in windows.values())

    for config in configs:
        try:
            predictor = predictor_factory(config)
        except Exception as err:  # e.g. a missing checkpoint or an unfinished feature: run the others
            run.failed_configs[config.name] = f"{type(err).__name__}: {err}"
            print(f"error: configuration {config.name!r} could not be built: {run.failed_configs[config.name]}",
                  file=sys.stderr)
            continue
        bar = _progress(total, f"{config.name}", progress)
        try:
            for clip in clips:
                predictor.reset()
                for i, t0 in enumerate(windows[clip]):
                    window = source.read(clip, t0, with_frames=predictor.needs_frames)
                    start = time.perf_counter()
                    pred = predictor.step(window)
                    wall_ms = (time.perf_counter() - start) * 1e3
                    run.records.append(_record(config.name, window, i, i < warmup, pred, wall_ms))
                    if keep_trajectories and pred.xyz is not None:
                        run.trajectories.setdefault(config.name, []).append(
                            (clip, t0, np.asarray(pred.xyz, np.float32), np.asarray(window.future_xyz, np.float32)))
                    if (clip, t0) in plot_index and pred.xyz is not None:
                        sample = plot_index[(clip, t0)]
                        if sample is None:
                            sample = plot_index[(clip, t0)] = PlotSample(
                                clip, t0, np.asarray(window.history_xyz), np.asarray(window.future_xyz))
                        sample.predictions[config.name] = np.asarray(pred.xyz)
                    bar.update(1)
        finally:
            bar.close()
            del predictor
            _release_memory()  # free the model before the next configuration is loaded
    run.plot_samples = [s for s in plot_index.values() if s is not None]
    return run


def _release_memory() -> None:
    import gc
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _record(config: str, window: EvalWindow, index: int, warmup: bool, pred: Prediction,
            wall_ms: float) -> WindowRecord:
    traj = None
    if pred.xyz is not None:
        traj = M.trajectory_metrics(pred.xyz, window.future_xyz).as_dict()
    return WindowRecord(config=config, clip_id=window.clip_id, t0_us=int(window.t0_us), index=index,
                        warmup=warmup, metrics=traj,
                        reasoning=(None if pred.reasoning is None
                                   else reasoning_agreement(pred.reasoning, window.label)),
                        reasoning_text=pred.reasoning, num_tokens=pred.num_tokens,
                        timings_ms=dict(pred.timings_ms), wall_ms=wall_ms, full_prefill=pred.full_prefill,
                        verify_passes=pred.verify_passes, tokens_per_pass=pred.tokens_per_pass,
                        flow_evaluations=pred.flow_evaluations, action_draft=pred.action_draft)


class _NoBar:
    def update(self, n=1):
        pass

    def close(self):
        pass


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="win", dynamic_ncols=True)


# ---- aggregation -------------------------------------------------------------------------------

TRAJECTORY_KEYS = ("ade", "min_ade", "ade@1s", "ade@3s", "ade@5s", "min_ade@1s", "min_ade@3s",
                   "min_ade@5s", "fde")


def summarize(run: EvalRun) -> dict:
    """Per-configuration aggregates over the non-warm-up windows: overall, per clip, latency."""
    out = {}
    evaluated = [c for c in run.configs if c.name not in run.failed_configs]
    first = evaluated[0].name if evaluated else None
    for config in evaluated:
        recs = [r for r in run.records if r.config == config.name and not r.warmup]
        out[config.name] = {
            "config": config.describe(),
            "windows": len(recs),
            "warmup_windows_excluded": sum(1 for r in run.records if r.config == config.name and r.warmup),
            "clips": len({r.clip_id for r in recs}),
            "trajectory": _trajectory_summary(recs),
            "reasoning": _reasoning_summary(recs),
            "latency_ms": _latency_summary(recs),
            "tokens": _token_summary(recs),
            "action": _action_summary(recs),
            "full_prefill_windows": sum(1 for r in recs if r.full_prefill),
            "per_clip": {clip: {"windows": len(cr), "trajectory": _trajectory_summary(cr, clip_sem=False),
                                "reasoning": _reasoning_summary(cr)}
                         for clip, cr in _by_clip(recs).items()},
        }
        if first is not None and config.name != first:
            out[config.name]["paired_vs_" + first] = _paired(run, first, config.name)
    return out


def _by_clip(recs: list[WindowRecord]) -> dict[str, list[WindowRecord]]:
    groups: dict[str, list[WindowRecord]] = {}
    for r in recs:
        groups.setdefault(r.clip_id, []).append(r)
    return groups


def _trajectory_summary(recs: list[WindowRecord], clip_sem: bool = True) -> dict:
    with_traj = [r for r in recs if r.metrics is not None]
    out = {}
    for key in TRAJECTORY_KEYS:
        stats = M.mean_sem(r.metrics.get(key) for r in with_traj)
        if clip_sem:
            # Windows of one clip are correlated; the spread of clip means is the more honest error bar.
            clip_means = [np.mean([r.metrics[key] for r in cr if key in r.metrics] or [np.nan])
                          for cr in _by_clip(with_traj).values()]
            stats["clip_sem"] = M.mean_sem(clip_means)["sem"]
        out[key] = stats
    out["num_samples"] = max((r.metrics["num_samples"] for r in with_traj), default=0)
    return out


def _reasoning_summary(recs: list[WindowRecord]) -> dict:
    labelled = [r.reasoning for r in recs if r.reasoning is not None]
    return {"exact_match": M.mean_sem(x["exact_match"] for x in labelled),
            "token_f1": M.mean_sem(x["token_f1"] for x in labelled)}


def _latency_summary(recs: list[WindowRecord]) -> dict:
    out = {stage: M.percentiles(r.timings_ms.get(stage) for r in recs) for stage in STAGES}
    out["wall"] = M.percentiles(r.wall_ms for r in recs)
    return out


def _token_summary(recs: list[WindowRecord]) -> dict:
    decoding = [r for r in recs if r.num_tokens is not None]
    tokens = sum(r.num_tokens for r in decoding)
    decode_s = sum(r.timings_ms.get("decode", 0.0) for r in decoding) / 1e3
    tpp = [r.tokens_per_pass for r in decoding if r.tokens_per_pass]
    return {"mean_tokens": float(tokens / len(decoding)) if decoding else float("nan"),
            # Ratio of sums, not mean of ratios: one very short decode cannot dominate the figure.
            "decode_tok_per_s": float(tokens / decode_s) if decode_s > 0 else float("nan"),
            "tokens_per_pass": float(np.mean(tpp)) if tpp else float("nan")}


def _action_summary(recs: list[WindowRecord]) -> dict:
    """Expert evaluations per window and, with the action drafter on, how often a draft was checked / used."""
    evals = [r.flow_evaluations for r in recs if r.flow_evaluations is not None]
    drafted = [r.action_draft for r in recs if r.action_draft not in (None, "off")]
    checked = [d for d in drafted if d == "accepted" or d.startswith("rejected")]
    return {"flow_evaluations": float(np.mean(evals)) if evals else float("nan"),
            "draft_windows": len(drafted), "draft_checked": len(checked),
            "draft_accepted": sum(1 for d in checked if d == "accepted")}


def _paired(run: EvalRun, a: str, b: str) -> dict:
    """Per-window differences b − a on the windows both evaluated (same clip, same t0)."""
    index = {(r.clip_id, r.t0_us): r for r in run.records if r.config == a and not r.warmup and r.metrics}
    out = {}
    for key in ("ade", "min_ade"):
        diffs = [r.metrics[key] - index[(r.clip_id, r.t0_us)].metrics[key]
                 for r in run.records if r.config == b and not r.warmup and r.metrics
                 and (r.clip_id, r.t0_us) in index]
        out[key] = M.mean_sem(diffs)
    return out
