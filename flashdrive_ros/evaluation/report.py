"""Outputs of an evaluation run: results.json, report.md (Markdown tables) and plots/*.png."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from .runner import STAGES, EvalRun, summarize

# Stages drawn as stacked bars; "total" is drawn as a marker (it may include untimed overhead).
_BAR_STAGES = tuple(s for s in STAGES if s != "total")
_LINESTYLES = ("-", "--", "-.", ":")


# ---- formatting helpers ------------------------------------------------------------------------

def _num(x, digits=3) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def _pm(stats: dict, digits=3, sem_key="sem") -> str:
    """'mean ± sem' (sem omitted when undefined, e.g. a single window)."""
    mean, sem = stats.get("mean"), stats.get(sem_key)
    if mean is None or not math.isfinite(mean):
        return "–"
    if sem is None or not math.isfinite(sem):
        return _num(mean, digits)
    return f"{mean:.{digits}f} ± {sem:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:80]


# ---- Markdown ----------------------------------------------------------------------------------

def headline_table(summary: dict) -> str:
    """FlashDrive Table 1 layout: mean stage latency (ms), decode throughput, ADE and minADE_K."""
    rows = []
    for name, s in summary.items():
        lat, traj = s["latency_ms"], s["trajectory"]
        decode = _num(lat["decode"]["mean"], 1)
        tps = s["tokens"]["decode_tok_per_s"]
        if math.isfinite(tps):
            decode += f" ({tps:.1f})"
        rows.append([name, str(s["windows"]), _num(lat["encode"]["mean"], 1), _num(lat["prefill"]["mean"], 1),
                     decode, _num(lat["action"]["mean"], 1), _num(lat["total"]["mean"], 1),
                     _pm(traj["ade"]), _pm(traj["min_ade"])])
    k = max((s["trajectory"]["num_samples"] for s in summary.values()), default=0)
    header = ["configuration", "windows", "encode", "prefill", "decode (tok/s)", "action", "total",
              "ADE@6.4s ↓", f"minADE{k}@6.4s ↓"]
    return _table(header, rows)


def accuracy_table(summary: dict) -> str:
    """First sample at every horizon, then the full-horizon argmin sample k* at every horizon."""
    rows = []
    for name, s in summary.items():
        t = s["trajectory"]
        rows.append([name, str(t["num_samples"]),
                     *(_pm(t[k]) for k in ("ade@1s", "ade@3s", "ade@5s", "ade", "fde")),
                     *(_pm(t[k]) for k in ("min_ade@1s", "min_ade@3s", "min_ade@5s", "min_ade"))])
    header = ["configuration", "K", "ADE@1s", "ADE@3s", "ADE@5s", "ADE@6.4s", "FDE@6.4s",
              "minADE@1s (k*)", "minADE@3s (k*)", "minADE@5s (k*)", "minADE@6.4s"]
    return _table(header, rows)


def latency_table(summary: dict) -> str:
    rows = []
    for name, s in summary.items():
        lat, act = s["latency_ms"], s.get("action", {})
        drafts = (f"{act['draft_accepted']} / {act['draft_checked']} / {act['draft_windows']}"
                  if act.get("draft_windows") else "off")
        rows.append([name, *(f"{_num(lat[st]['mean'], 1)} / {_num(lat[st]['p50'], 1)} / {_num(lat[st]['p99'], 1)}"
                             for st in (*STAGES, "wall")), _num(act.get("flow_evaluations", float("nan")), 2), drafts])
    return _table(["configuration", *STAGES, "wall (loop)", "expert evals / window",
                   "action drafts accepted / checked / windows"], rows)


def decode_table(summary: dict) -> str:
    rows = []
    for name, s in summary.items():
        r, tok = s["reasoning"], s["tokens"]
        rows.append([name, _num(tok["mean_tokens"], 1), _num(tok["decode_tok_per_s"], 1),
                     _num(tok["tokens_per_pass"], 2), str(s["full_prefill_windows"]),
                     _pm(r["exact_match"]), _pm(r["token_f1"]), str(r["token_f1"]["n"])])
    return _table(["configuration", "tokens/window", "decode tok/s", "tokens/pass", "full-prefill windows",
                   "CoC exact match", "CoC token F1", "labelled windows"], rows)


def paired_table(summary: dict) -> str | None:
    rows = []
    for name, s in summary.items():
        for key, stats in s.items():
            if key.startswith("paired_vs_"):
                rows.append([f"{name} − {key[len('paired_vs_'):]}", _pm(stats["ade"]), _pm(stats["min_ade"]),
                             str(stats["ade"]["n"])])
    return _table(["difference (same windows)", "Δ ADE@6.4s", "Δ minADE@6.4s", "windows"], rows) if rows else None


def per_clip_table(summary: dict) -> str:
    rows = []
    clips = sorted({c for s in summary.values() for c in s["per_clip"]})
    for clip in clips:
        cells = []
        for s in summary.values():
            pc = s["per_clip"].get(clip)
            cells.append("–" if pc is None else
                         f"{_num(pc['trajectory']['ade']['mean'])} / {_num(pc['trajectory']['min_ade']['mean'])}")
        rows.append([clip, *cells])
    return _table(["clip", *(f"{n}: ADE / minADE" for n in summary)], rows)


def markdown_report(summary: dict, meta: dict) -> str:
    warm = meta.get("warmup", 0)
    parts = [
        "# Offline evaluation",
        f"{meta.get('clips', '?')} clip(s), {meta.get('windows_per_config', '?')} window(s) per configuration at "
        f"{meta.get('stride_ms', 100)} ms stride; first {warm} window(s) of every clip excluded as warm-up. "
        "Latencies in ms; ± is the standard error over windows (windows of a clip are correlated; "
        "results.json also has `clip_sem`, the standard error over clip means).",
        "## Summary (FlashDrive Table 1 layout)", headline_table(summary),
        "## Trajectory accuracy (m, XY)",
        "ADE@H: first sample over the first H seconds. minADE@H (k*): the sample with the lowest full-horizon "
        "ADE (k*), evaluated over the first H seconds.",
        accuracy_table(summary),
        "## Stage latency (ms): mean / p50 / p99", latency_table(summary),
        "## Decode and reasoning agreement", decode_table(summary),
    ]
    paired = paired_table(summary)
    if paired:
        parts += ["## Paired differences vs the first configuration (m; negative = better)", paired]
    parts += ["## Per clip (mean ADE@6.4s / minADE@6.4s)", per_clip_table(summary)]
    if meta.get("failed_configs"):
        parts += ["**Failed configurations (not evaluated):** " + "; ".join(
            f"`{c}`: {why}" for c, why in meta["failed_configs"].items())]
    if meta.get("skipped_clips"):
        parts += ["Skipped clips (no window): " + "; ".join(f"`{c}`: {why}" for c, why in meta["skipped_clips"].items())]
    return "\n\n".join(parts) + "\n"


# ---- plots -------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt
    return plt


def _colors(names):
    plt = _pyplot()
    cmap = plt.get_cmap("tab10")
    return {n: cmap(i % 10) for i, n in enumerate(names)}


def plot_bev(run: EvalRun, out_dir: Path) -> list[Path]:
    """One figure per clip: history, ground truth and every configuration's samples, bird's-eye view.

    Axes: x (forward) points up, y (left) points left, as seen from above the car.
    """
    plt = _pyplot()
    colors = _colors([c.name for c in run.configs])
    by_clip: dict[str, list] = {}
    for s in run.plot_samples:
        by_clip.setdefault(s.clip_id, []).append(s)
    paths = []
    for clip, samples in by_clip.items():
        samples.sort(key=lambda s: s.t0_us)
        fig, axes = plt.subplots(1, len(samples), figsize=(4.2 * len(samples), 6), squeeze=False)
        for ax, s in zip(axes[0], samples):
            ax.plot(-s.history_xyz[:, 1], s.history_xyz[:, 0], color="0.6", lw=2, label="history")
            for i, (name, xyz) in enumerate(s.predictions.items()):
                style = _LINESTYLES[i % len(_LINESTYLES)]  # identical predictions stay distinguishable
                for k in range(1, len(xyz)):  # other samples faint, first sample bold
                    ax.plot(-xyz[k, :, 1], xyz[k, :, 0], color=colors[name], lw=0.8, alpha=0.3)
                ax.plot(-xyz[0, :, 1], xyz[0, :, 0], color=colors[name], lw=1.8, ls=style, label=name)
            # Ground truth last, on top, so it is never hidden by a prediction.
            ax.plot(-s.future_xyz[:, 1], s.future_xyz[:, 0], color="k", lw=1.4, ls=(0, (4, 2)),
                    label="ground truth", zorder=5)
            ax.plot(0, 0, marker="^", color="k")
            ax.set_title(f"t0 = {s.t0_us / 1e6:.1f} s")
            ax.set_xlabel("−y (m, right →)")
            ax.set_aspect("equal", adjustable="datalim")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("x forward (m)")
        axes[0][0].legend(fontsize=8, loc="best")
        fig.suptitle(f"clip {clip}")
        fig.tight_layout()
        path = out_dir / f"bev_{_safe(clip)}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_latency(summary: dict, out_dir: Path) -> Path:
    """Stacked mean stage latency per configuration, with the mean total and p99 total as markers."""
    plt = _pyplot()
    names = list(summary)
    fig, ax = plt.subplots(figsize=(9, 0.6 * len(names) + 1.8))
    left = np.zeros(len(names))
    cmap = plt.get_cmap("Set2")
    for i, stage in enumerate(_BAR_STAGES):
        vals = np.nan_to_num([summary[n]["latency_ms"][stage]["mean"] for n in names])
        ax.barh(names, vals, left=left, color=cmap(i), label=stage)
        left += vals
    totals = [summary[n]["latency_ms"]["total"]["mean"] for n in names]
    p99 = [summary[n]["latency_ms"]["total"]["p99"] for n in names]
    ax.scatter(totals, names, marker="|", s=300, color="k", label="total (mean)", zorder=3)
    ax.scatter(p99, names, marker="x", color="crimson", label="total (p99)", zorder=3)
    ax.invert_yaxis()
    ax.set_xlabel("ms per window")
    ax.set_title("Latency breakdown (mean per stage)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path = out_dir / "latency.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_ade_over_time(run: EvalRun, out_dir: Path, max_clips: int = 4) -> Path:
    """ADE@6.4s of every window against t0, one panel per clip (warm-up windows hollow)."""
    plt = _pyplot()
    colors = _colors([c.name for c in run.configs])
    clips = list(run.windows)[:max_clips]
    fig, axes = plt.subplots(len(clips), 1, figsize=(8, 2.6 * len(clips)), squeeze=False)
    for ax, clip in zip(axes[:, 0], clips):
        for config in run.configs:
            recs = [r for r in run.records if r.config == config.name and r.clip_id == clip and r.metrics]
            t = np.array([r.t0_us / 1e6 for r in recs])
            ade = np.array([r.metrics["ade"] for r in recs])
            warm = np.array([r.warmup for r in recs], dtype=bool)
            if len(recs):
                ax.plot(t, ade, color=colors[config.name], lw=1.2, label=config.name)
                ax.scatter(t[~warm], ade[~warm], color=colors[config.name], s=10)
                ax.scatter(t[warm], ade[warm], facecolors="none", edgecolors=colors[config.name], s=14)
        if 0 < run.warmup:  # shade the excluded warm-up windows
            t0s = run.windows[clip]
            half = (t0s[1] - t0s[0]) / 2e6 if len(t0s) > 1 else 0.05
            ax.axvspan(t0s[0] / 1e6 - half, t0s[min(run.warmup, len(t0s)) - 1] / 1e6 + half, color="0.9",
                       zorder=0, label="warm-up (excluded)")
        ax.set_title(f"clip {clip}", fontsize=9)
        ax.set_ylabel("ADE@6.4s (m)")
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("t0 (s)")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "ade_over_time.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ---- everything --------------------------------------------------------------------------------

def _jsonable(x):
    """NaN/inf -> null so results.json is strict JSON; numpy scalars -> Python."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_trajectories(run: EvalRun, path: Path) -> Path:
    """trajectories.npz: per configuration `<name>/clip` [N] str, `<name>/t0_us` [N], `<name>/xyz`
    [N, K, 64, 3] predictions and `<name>/gt_xyz` [N, 64, 3], in evaluation order (warm-up included)."""
    arrays = {}
    for name, rows in run.trajectories.items():
        arrays[f"{name}/clip"] = np.array([r[0] for r in rows])
        arrays[f"{name}/t0_us"] = np.array([r[1] for r in rows], dtype=np.int64)
        arrays[f"{name}/xyz"] = np.stack([r[2] for r in rows])
        arrays[f"{name}/gt_xyz"] = np.stack([r[3] for r in rows])
    np.savez_compressed(path, **arrays)
    return path


def write_report(run: EvalRun, out_dir: str | Path, meta: dict | None = None, plots: bool = True) -> dict:
    """Write results.json, report.md and plots/; returns {'summary', 'markdown', 'paths'}."""
    out = Path(out_dir)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    summary = summarize(run)
    meta = dict(meta or {})
    meta.setdefault("clips", len(run.windows))
    meta.setdefault("windows_per_config", sum(len(v) for v in run.windows.values()))
    meta.setdefault("warmup", run.warmup)
    meta.setdefault("skipped_clips", dict(run.skipped_clips))
    meta.setdefault("failed_configs", dict(run.failed_configs))
    markdown = markdown_report(summary, meta)
    results = {"meta": meta, "configs": [c.describe() for c in run.configs],
               "windows": {clip: t0s for clip, t0s in run.windows.items()},
               "summary": summary, "records": [r.as_dict() for r in run.records]}
    paths = {"json": out / "results.json", "markdown": out / "report.md"}
    paths["json"].write_text(json.dumps(_jsonable(results), indent=1, allow_nan=False))
    paths["markdown"].write_text(markdown)
    if run.trajectories:
        paths["trajectories"] = write_trajectories(run, out / "trajectories.npz")
    if plots and summary:  # nothing to draw when every configuration failed
        paths["plots"] = [*plot_bev(run, out / "plots"), plot_latency(summary, out / "plots"),
                          plot_ade_over_time(run, out / "plots")]
    elif plots:
        paths["plots"] = []
    return {"summary": summary, "markdown": markdown, "paths": paths}
