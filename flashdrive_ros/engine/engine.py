"""DriveEngine: one window of 4 cameras x 4 frames + ego history -> reasoning text + K trajectories.

Two pipelines over the same weights and the same static, pre-RoPE KV cache:

baseline (and the first window after every reset in streaming mode)
    preprocess 16 images -> encode 16 -> build prompt ids (history ids scattered into the 48
    placeholders) -> full prefill at slots [0, L) with M-RoPE positions from `rope_index`, extended by
    consecutive values -> decode token by token until <|cot_end|> (or max_new_tokens, then
    <|cot_end|> is forced) -> feed <|traj_future_start|> so its K/V is cached -> action expert over
    slots [0, that slot + 1) with K noise samples in one batch -> flow sampler -> unicycle decode.

streaming (later windows, flashdrive.md §2)
    the window is k = 1, 2 or 3 strides (0.1 s) after the previous one (k > 1: the caller dropped
    windows) -> for k > 1 first shift the cache by k - 1 more frames -> preprocess + encode only the
    newest k frames of each camera (4k images) -> write them plus the recomputed tail at
    `StreamingLayout.streaming_query_slots(k)` with the streaming mask; every slot keeps its window-0
    position (keys are stored pre-RoPE and rotated at read time) -> decode / expert exactly as above ->
    shift frames 1..3 onto 0..2 with one index copy.

Cache invariant between windows (streaming mode): after every step the prompt slots hold that window's
K/V shifted by one stride — frame f + 1 of each view at frame f's slots (f = 0..2), frame 3's slots
stale. That is exactly the reused part of a window one stride later; a window k strides later shifts by
k - 1 more (frames k - 1..3 onto 0..4 - k) at the start of its prefill, so its frames 0..3 - k are the
previous window's frames k..3 and its newest k frames are recomputed. The per-step shift by one is kept
unconditional (also before a reset) so k = 1 costs one index copy as before.

Decode reads a fixed key window [0, max_len) with an explicit valid-length mask, so a decode token
never sees stale slots (previous window's decode / action K/V, garbage) — pitfall 2 of flashdrive.md §9.

Stream gap rule: with gap = t0 - previous t0, the window continues the stream with k new frames per
view when gap lies in [stream_min_gap_us + (k-1)·stream_stride_us, stream_max_gap_us + (k-1)·stream_stride_us]
for k = 1, 2, 3 (defaults 50..150 ms, 150..250 ms, 250..350 ms; the smallest matching k wins on a
shared boundary). The stream is reset (next step = full prefill) on `reset()`, on a gap matching no k
(t0 going backwards, a repeated t0, or 4 or more strides: no frame is shared), and on a prompt layout
change (e.g. a different image size changes the token count): the step then simply runs the full
prefill and reports `full_prefill=True`.

Randomness (token sampling at temperature > 0, flow noise) comes from generators seeded from
(seed, t0_us), so a window's result does not depend on what ran before it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .action_draft import ActionDraftPolicy, ActionDrafter
from .action_space import UnicycleActionSpace
from .flow import FlowSchedule, one_step_estimate, sample as flow_sample
from .graphed import round_up
from .history import encode_history, history_kwargs
from .kv_cache import StaticKVCache
from .loader import TINY_DIR, create_tiny, load_model, resolve_dtype
from .preprocess import FrameUploader, image_grid, preprocess_images, tokens_per_image
from .prompt import PromptLayout, build_prompt, extract_reasoning
from .rope import extend_positions, rope_index
from .sampling import choose_next_token
from .streaming import LayoutChanged, StreamingLayout, causal_mask
from .tokens import TokenIds, load_tokenizer

CAMERA_NAMES = ("camera_cross_left_120fov", "camera_front_wide_120fov",
                "camera_cross_right_120fov", "camera_front_tele_30fov")
CAMERA_INDICES = (0, 1, 2, 6)  # Alpamayo camera indices of CAMERA_NAMES, sorted
N_FRAMES = 4
HISTORY_STEPS = 16
N_WAYPOINTS = 64
STAGES = ("preprocess", "encode", "prefill", "decode", "action", "total")


@dataclass
class StepResult:
    """Output of one window. Arrays are numpy float32; K = num_samples."""

    xyz: np.ndarray                 # [K, 64, 3] waypoints in the ego frame at t0 (k -> t0 + (k+1)*0.1 s)
    yaw: np.ndarray                 # [K, 64]
    rot: np.ndarray                 # [K, 64, 3, 3]
    reasoning: str                  # chain-of-causation text
    num_tokens: int                 # generated reasoning tokens (incl. <|cot_end|> when the model emitted it)
    timings_ms: dict[str, float]    # preprocess, encode, prefill, decode, action, total
    full_prefill: bool              # True: all 16 frames were encoded and prefilled
    verify_passes: int              # token-producing target passes: = num_tokens without speculation,
                                    # q=8 verification forwards with it
    tokens_per_pass: float          # mean tokens per verify pass (tau); 1.0 without speculation
    t0_us: int
    token_ids: list[int] = field(default_factory=list)  # generated ids (for tests / evaluation)
    decode_forwards: int = 0        # target forwards of the decode stage. Greedy: one per generated id after
                                    # the first, plus one for the closing ids. Speculative: verify_passes, plus
                                    # one closing forward unless the last block ended on a drafted <|cot_end|>
    prefill_tokens: int = 1         # reasoning ids the prefill emitted: 1, or 1 + the accepted ids of the
                                    # temporal draft block (the previous window's reasoning) it verified
    flow_evaluations: int = 0       # expert evaluations of the action stage (an action draft's check included)
    action_draft: str = "off"       # what the action drafter did: "off", "accepted", "rejected: ...", or why
                                    # no draft was checked ("the reasoning changed", "no previous action", ...)
    action_draft_gap_m: float = float("nan")  # checked draft: largest distance to the model's estimate [m]


class StageTimer:
    """Per-stage wall time: perf_counter on CPU; CUDA events on GPU, synchronised once in `finish`."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._spans: dict[str, list] = {name: [] for name in STAGES if name != "total"}
        self._t0 = time.perf_counter()
        if self.cuda:
            self._start_event = self._event()

    def _event(self):
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def stage(self, name: str) -> "_Span":
        if name not in self._spans:
            raise ValueError(f"unknown stage {name!r}; stages are {tuple(self._spans)}")
        return _Span(self, name)

    def finish(self) -> dict[str, float]:
        if self.cuda:
            end = self._event()
            torch.cuda.synchronize()
            out = {n: sum(a.elapsed_time(b) for a, b in spans) for n, spans in self._spans.items()}
            out["total"] = self._start_event.elapsed_time(end)
        else:
            out = {n: 1e3 * sum(b - a for a, b in spans) for n, spans in self._spans.items()}
            out["total"] = 1e3 * (time.perf_counter() - self._t0)
        return out


class _Span:
    def __init__(self, timer: StageTimer, name: str):
        self.timer, self.name = timer, name

    def __enter__(self):
        self.start = self.timer._event() if self.timer.cuda else time.perf_counter()

    def __exit__(self, *exc):
        end = self.timer._event() if self.timer.cuda else time.perf_counter()
        self.timer._spans[self.name].append((self.start, end))


# --------------------------------------------------------------------------------- input checks
@dataclass(frozen=True)
class WindowFrames:
    """A window's 16 camera frames, held without copying: images[c][k] is camera c at t0 - (3 - k) * 0.1 s.

    step() takes either one uint8 array [4, 4, H, W, 3] or nested sequences of [H, W, 3] uint8 numpy arrays or
    torch tensors (frames decoded on the GPU stay there); the second spares a caller that keeps decoded
    frames per camera (the drive node) assembling a 16-frame array per window, of which a streaming step
    reads only the 4 newest.
    """
    images: tuple
    height: int
    width: int

    def newest(self, k: int) -> list[np.ndarray]:
        """The newest k frames of every camera, camera-major and oldest first; k = 0: all frames."""
        return [im for cam in self.images for im in (cam[N_FRAMES - k:] if k else cam)]


def as_window_frames(frames) -> WindowFrames:
    """Check a window's frames (see WindowFrames); raise ValueError naming what is wrong."""
    if isinstance(frames, WindowFrames):
        return frames
    n_cams = len(CAMERA_NAMES)
    if isinstance(frames, np.ndarray):
        if frames.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 RGB, got dtype {frames.dtype}")
        if frames.ndim != 5 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be [n_cams={n_cams}, {N_FRAMES}, H, W, 3], got shape {frames.shape}")
    elif not isinstance(frames, (list, tuple)):
        raise ValueError(f"frames must be a numpy array [{n_cams}, {N_FRAMES}, H, W, 3] or {n_cams} sequences of "
                         f"{N_FRAMES} [H, W, 3] arrays, got {type(frames).__name__}")
    if len(frames) != n_cams:
        raise ValueError(f"frames has {len(frames)} cameras, expected {n_cams} {CAMERA_NAMES}")
    shape = None
    for c, cam in enumerate(frames):
        if not isinstance(cam, (list, tuple, np.ndarray)):
            raise ValueError(f"frames[{c}] must be a sequence of {N_FRAMES} frames, got {type(cam).__name__}")
        if len(cam) != N_FRAMES:
            raise ValueError(f"frames has {len(cam)} frames per camera (camera {c}), expected {N_FRAMES} (t0-0.3 s .. t0)")
        for k, im in enumerate(cam):
            if not isinstance(im, (np.ndarray, torch.Tensor)):
                raise ValueError(f"frames[{c}][{k}] must be a numpy array or torch tensor, got {type(im).__name__}")
            if im.dtype not in (np.uint8, torch.uint8):
                raise ValueError(f"frames must be uint8 RGB, got dtype {im.dtype} at [{c}][{k}]")
            if im.ndim != 3 or im.shape[-1] != 3:
                raise ValueError(f"frames[{c}][{k}] must be [H, W, 3] RGB, got shape {im.shape}")
            shape = shape or tuple(im.shape)
            if tuple(im.shape) != shape:
                raise ValueError(f"frames[{c}][{k}] is {im.shape[1]}x{im.shape[0]}, frames[0][0] is "
                                 f"{shape[1]}x{shape[0]}: all frames of a window must have one size")
    return WindowFrames(tuple(tuple(cam) for cam in frames), int(shape[0]), int(shape[1]))


def validate_inputs(frames, t0_us, ego_history_xyz, ego_history_rot) -> tuple[WindowFrames, int, np.ndarray, np.ndarray]:
    """Check the step() arguments; raise ValueError naming what is wrong."""
    frames = as_window_frames(frames)
    if isinstance(t0_us, bool) or not isinstance(t0_us, (int, np.integer)):
        raise ValueError(f"t0_us must be an integer number of microseconds, got {type(t0_us).__name__}")
    xyz = np.asarray(ego_history_xyz, dtype=np.float64)
    rot = np.asarray(ego_history_rot, dtype=np.float64)
    if xyz.shape != (HISTORY_STEPS, 3):
        raise ValueError(f"ego_history_xyz must be [{HISTORY_STEPS}, 3], got shape {xyz.shape}")
    if rot.shape != (HISTORY_STEPS, 3, 3):
        raise ValueError(f"ego_history_rot must be [{HISTORY_STEPS}, 3, 3], got shape {rot.shape}")
    if not np.isfinite(xyz).all():
        raise ValueError("ego_history_xyz contains NaN or inf")
    if not np.isfinite(rot).all():
        raise ValueError("ego_history_rot contains NaN or inf")
    return frames, int(t0_us), xyz, rot


def _shift_plan(src: torch.Tensor, dst: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor, tuple | None]:
    """(src, dst, waves) of a streaming shift, pairs regrouped so that the cache kernel can move them in
    place (cache_kernels.shift_waves; computed once per layout on the host); waves None = as given."""
    from .cache_kernels import shift_waves

    plan = shift_waves(src, dst)
    if plan is not None:
        src, dst, waves = plan
    else:
        waves = None
    return src.to(device), dst.to(device), waves


def _step_seed(seed: int, t0_us: int) -> int:
    # A window's randomness depends only on (seed, t0), not on the history of calls.
    return (seed * 1_000_003 + t0_us) % (2 ** 63 - 1)


# --------------------------------------------------------------------------------- engine
class DriveEngine:
    """See the module docstring. Build with `DriveEngine.from_pretrained(...)`."""

    def __init__(self, model, tokenizer, *, streaming: bool = True, flow_schedule: str = "uniform",
                 num_samples: int = 1, speculative: bool = False, max_new_tokens: int = 64,
                 temperature: float = 0.0, top_p: float = 0.98, seed: int = 0,
                 stream_min_gap_us: int = 50_000, stream_max_gap_us: int = 150_000,
                 stream_stride_us: int = 100_000,
                 shift_mode: str = "vision_only", diffusion_temperature: float = 1.0,
                 drafter=None, weights_description: str = "", cuda_graphs: bool | None = None,
                 temporal_draft: int = 24, action_draft_m: float = 0.0, action_draft_check_time: float = 0.5,
                 action_draft_max_reuse: int = 4):
        if speculative and drafter is None:
            raise ValueError("speculative=True needs a drafter (speculative.Drafter); from_pretrained finds or builds one")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if not 0 < stream_min_gap_us <= stream_max_gap_us:
            raise ValueError(f"need 0 < stream_min_gap_us ({stream_min_gap_us}) <= stream_max_gap_us ({stream_max_gap_us})")
        self.model = model.eval()
        self.cfg = model.cfg
        self.tokenizer = tokenizer
        self.ids = TokenIds.from_tokenizer(
            tokenizer, self.cfg.traj_token_start_idx, self.cfg.traj_vocab_size, self.cfg.future_traj_bins,
            self.cfg.hist_tokenizer.num_bins, self.cfg.traj_token_ids or None)
        if self.ids.vocab_size != self.cfg.vocab_size:
            raise ValueError(f"tokenizer vocabulary ({self.ids.vocab_size}) != model vocab_size ({self.cfg.vocab_size})")
        self.device, self.dtype = model.device, model.dtype
        self.streaming = streaming
        self.schedule = FlowSchedule.from_name(flow_schedule)
        self.flow_schedule = flow_schedule
        self.num_samples = num_samples
        self.max_new_tokens = max_new_tokens
        self.temperature, self.top_p, self.seed = float(temperature), float(top_p), int(seed)
        if stream_stride_us <= 0:
            raise ValueError(f"stream_stride_us must be > 0, got {stream_stride_us}")
        self.stream_min_gap_us, self.stream_max_gap_us = int(stream_min_gap_us), int(stream_max_gap_us)
        self.stream_stride_us = int(stream_stride_us)
        self.shift_mode = shift_mode
        self.diffusion_temperature = float(diffusion_temperature)
        self.weights_description = weights_description
        self.speculative = bool(speculative)
        self.drafter = drafter.to(device=self.device, dtype=self.dtype).eval() if speculative else None
        if self.speculative and getattr(self.drafter, "draft_vocab", None) is not None:
            # the ids that end the reasoning must be proposable (speculative.build_draft_vocab's `always`)
            need = {self.ids.cot_end, self.ids.traj_future_start}
            missing = need - set(self.drafter.draft_vocab.tolist())
            if missing:
                import warnings

                warnings.warn(f"drafter's draft vocabulary lacks {sorted(missing)} (<|cot_end|> / "
                              "<|traj_future_start|>); adding them", stacklevel=2)
                self.drafter.set_draft_vocab(self.drafter.draft_vocab, always=need)
        # The drafter is conditioned on captured target hidden states of the last prompt positions.
        self._capture_layers = tuple(self.drafter.cfg.target_layers) if self.speculative else ()
        self._context: torch.Tensor | None = None
        # Temporal draft (greedy speculative streaming windows): the first `temporal_draft` ids of the
        # previous window's reasoning ride along in the streaming prefill as a draft block
        # (speculative.temporal_draft); 0 = off. The prefill is compute bound, so a few rows are cheap.
        if isinstance(temporal_draft, bool):
            temporal_draft = 24 if temporal_draft else 0
        if int(temporal_draft) < 0:
            raise ValueError(f"temporal_draft must be >= 0 ids, got {temporal_draft}")
        # more than max_new_tokens + 1 rows can never be emitted
        self.temporal_draft = min(int(temporal_draft), self.max_new_tokens + 1)
        self._previous_reasoning: list[int] | None = None
        self._first_block: tuple[torch.Tensor, torch.Tensor] | None = None  # (draft ids, their context states)
        self._prefill_tokens = 1
        # Action draft (lossy, off by default): the previous window's plan, checked by one expert
        # evaluation, replaces the flow when the model's estimate stays within action_draft_m metres of it.
        if action_draft_m < 0:
            raise ValueError(f"action_draft_m must be >= 0 metres (0 = off), got {action_draft_m}")
        self._action_drafter = (ActionDrafter(ActionDraftPolicy(float(action_draft_m), float(action_draft_check_time),
                                                                int(action_draft_max_reuse)))
                                if action_draft_m > 0 else None)
        self._hist_kwargs = history_kwargs(self.cfg.hist_tokenizer)
        self.action_space = UnicycleActionSpace(self.cfg.action_space)
        if self.action_space.n_waypoints != N_WAYPOINTS:
            raise ValueError(f"action space has {self.action_space.n_waypoints} waypoints, the engine needs {N_WAYPOINTS}")
        self._templates: dict[int, tuple[torch.Tensor, PromptLayout]] = {}
        self.cache: StaticKVCache | None = None
        # Fast path (issue 7): fused projections + one StageGraph per stage and shape (engine/graphed.py).
        # On by default on CUDA; forced on elsewhere it runs the same stage functions eagerly.
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else bool(cuda_graphs)
        self._fast = None
        self._noise_host: torch.Tensor | None = None  # pinned staging buffer of the flow noise (CUDA)
        self._uploader = FrameUploader(self.device)  # camera frames go up through reused pinned memory
        if self.cuda_graphs:
            from . import graphs
            from .graphed import GraphedStages

            graphs.fuse_projections(self.model)  # idempotent; state_dict keys/values unchanged
            self._fast = GraphedStages(self)
        self.reset()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, model: str | Path = "tiny", device: str | torch.device = "cpu",
                        dtype: torch.dtype | str = torch.float32, cuda_graphs: bool | None = None,
                        **kwargs) -> "DriveEngine":
        """'tiny': the shipped checkpoint in flashdrive_ros/assets/tiny if it has weights, otherwise
        `create_tiny(seed)` in memory (random weights) with the shipped tokenizer. Anything else is a
        checkpoint directory holding config.json, weights and tokenizer files.
        cuda_graphs: None -> on when `device` is CUDA (fused projections + CUDA graphs per stage)."""
        dtype = resolve_dtype(dtype)
        device = torch.device(device)
        seed = int(kwargs.get("seed", 0))
        if str(model) == "tiny":
            directory = TINY_DIR
            has_weights = (directory / "config.json").is_file() and any(directory.glob("model*.safetensors"))
            if has_weights:
                net = load_model(directory, dtype, device)
                desc = f"trained tiny checkpoint {directory}"
            else:
                net = create_tiny(seed).to(device=device, dtype=dtype)
                desc = f"random tiny weights (create_tiny(seed={seed}), nothing trained)"
        else:
            directory = Path(model)
            net = load_model(directory, dtype, device)
            logs = [n for n in ("train_summary.json", "finetune_log.jsonl", "train_log.jsonl") if (directory / n).is_file()]
            desc = f"checkpoint {directory}" + (f" (trained: {', '.join(logs)})" if logs else " (provenance not recorded)")
        tokenizer = load_tokenizer(directory, net.cfg.traj_token_start_idx, net.cfg.traj_vocab_size)
        if kwargs.get("speculative") and kwargs.get("drafter") is None:
            kwargs["drafter"], drafter_desc = cls._find_drafter(directory, net, seed)
            desc += f"; drafter: {drafter_desc}"
        elif isinstance(kwargs.get("drafter"), (str, Path)):  # drafter= a saved drafter directory
            from .speculative import load_drafter

            desc += f"; drafter: {kwargs['drafter']}"
            kwargs["drafter"] = load_drafter(kwargs["drafter"], net, target_dir=directory)
        return cls(net, tokenizer, weights_description=desc, cuda_graphs=cuda_graphs, **kwargs)

    @staticmethod
    def _find_drafter(directory: Path, model, seed: int):
        """A saved DFlash drafter in <checkpoint> or <checkpoint>/drafter; for the tiny preset without
        one, a random drafter (greedy speculative output is still exactly the autoregressive output)."""
        from .speculative import Drafter, has_drafter, load_drafter

        # the tiny preset's trained drafter ships beside it in assets/tiny_dflash
        extra = (TINY_DIR.parent / "tiny_dflash",) if directory == TINY_DIR else ()
        for d in (directory, directory / "drafter", *extra):
            if has_drafter(d):
                return load_drafter(d, model, target_dir=directory), f"{d}"
        if directory == TINY_DIR:
            return Drafter.for_target(model, seed=seed), f"random (Drafter.for_target(seed={seed}))"
        raise FileNotFoundError(f"speculative=True but no drafter in {directory} or {directory / 'drafter'}")

    # ------------------------------------------------------------------ stream state
    def reset(self) -> None:
        """Forget the stream: the next step runs a full prefill of all 16 frames."""
        self.layout: StreamingLayout | None = None
        self._last_t0: int | None = None
        self._previous_reasoning = None
        self._first_block = None
        if getattr(self, "_action_drafter", None) is not None:
            self._action_drafter.reset()
        if self.cache is not None:
            self.cache.clear()

    def _continues_stream(self, t0_us: int) -> int:
        """k in {1, .., N_FRAMES - 1}: this window is k strides after the previous one and continues the
        stream with k new frames per view; 0: reset (see the module docstring's gap rule)."""
        if not self.streaming or self.layout is None or self._last_t0 is None:
            return 0
        gap = t0_us - self._last_t0
        for k in range(1, N_FRAMES):
            extra = (k - 1) * self.stream_stride_us
            if self.stream_min_gap_us + extra <= gap <= self.stream_max_gap_us + extra:
                return k
        return 0

    # ------------------------------------------------------------------ prompt
    def _prompt(self, n_image_tokens: int, history_ids: torch.Tensor) -> tuple[torch.Tensor, PromptLayout]:
        """Prompt ids [L] with this window's history ids; the template is built once per image size."""
        if n_image_tokens not in self._templates:
            self._templates[n_image_tokens] = build_prompt(
                self.tokenizer, self.ids, CAMERA_INDICES, N_FRAMES, n_image_tokens,
                include_camera_ids=self.cfg.include_camera_ids, include_frame_nums=self.cfg.include_frame_nums)
        template, layout = self._templates[n_image_tokens]
        ids = template.clone()
        ids[layout.history_positions] = history_ids.to(ids.dtype)
        return ids, layout

    @staticmethod
    def streaming_layout(layout: PromptLayout) -> StreamingLayout:
        """Frozen streaming slot ranges of a prompt (see StreamingLayout.from_prompt_layout)."""
        return StreamingLayout.from_prompt_layout(layout)

    def _ensure_cache(self, max_len: int, positions: torch.Tensor) -> None:
        if self.cache is None or self.cache.max_len != max_len:
            self.cache = StaticKVCache.for_config(self.cfg.text, 1, max_len, positions, self.dtype, self.device)
        elif not torch.equal(self.cache.positions, positions.to(self.cache.positions.device)):
            self.cache.set_positions(positions)
        else:
            return
        if self._fast is not None:  # graphs address the old cache tensors / cos-sin tables
            self._fast.invalidate()

    # ------------------------------------------------------------------ step
    @torch.no_grad()  # not inference_mode: the cache must stay writable outside step() (reset, tests)
    def step(self, frames, t0_us, ego_history_xyz, ego_history_rot) -> StepResult:
        """One window -> StepResult (see docs/DESIGN.md "Engine API")."""
        frames, t0_us, hist_xyz, hist_rot = validate_inputs(frames, t0_us, ego_history_xyz, ego_history_rot)
        timer = StageTimer(self.device)
        logits, playout, new_frames = self.prefill(frames, t0_us, hist_xyz, timer)
        # the start speed of the trajectory depends on the history only: fitted on the host while the
        # device runs the prefill (the graphs are queued), so it is off the action stage's path
        hist_xyz_t, hist_rot_t = torch.from_numpy(hist_xyz), torch.from_numpy(hist_rot)
        v0 = self.action_space.estimate_v0(hist_xyz_t, hist_rot_t)
        gen = self._make_generator(t0_us)
        with timer.stage("decode"):
            tokens, n_generated, passes, n_ctx, per_pass, forwards = self.decode(logits, playout.length, gen)
        with timer.stage("action"):
            (xyz, yaw, rot), action_info = self._action(n_ctx, hist_xyz_t, hist_rot_t, v0, gen,
                                                        stride=new_frames, reasoning=tokens)
        if self.streaming:
            with timer.stage("prefill"):  # cache maintenance for the next window's prefill
                self.shift()
            self._last_t0 = t0_us
            self._previous_reasoning = list(tokens)  # the next window's temporal draft
        timings = timer.finish()
        reasoning = extract_reasoning(tokens, self.tokenizer, self.ids)
        return StepResult(xyz=xyz, yaw=yaw, rot=rot, reasoning=reasoning, num_tokens=n_generated,
                          timings_ms=timings, full_prefill=not new_frames, verify_passes=passes,
                          tokens_per_pass=per_pass, t0_us=t0_us, token_ids=tokens, decode_forwards=forwards,
                          prefill_tokens=self._prefill_tokens, **action_info)

    # ------------------------------------------------------------------ public building blocks
    @torch.no_grad()
    def prefill(self, frames, t0_us: int, hist_xyz: np.ndarray,
                timer: StageTimer | None = None) -> tuple[torch.Tensor, PromptLayout, int]:
        """Preprocess + encode + prefill one window (streaming when the stream continues, else full).

        Returns (logits of the last prompt token [1, V] float32, PromptLayout, k): k = new frames per
        view of a streaming window (1..3, truthy), 0 for a full prefill. Decode then starts at slot
        `layout.length`. With a temporal draft block (greedy speculative streaming windows) the logits
        are [1 + D, V]: the last prompt row, then each of the D draft rows at slots [length, length + D). A k-stride window shifts by k - 1 itself before its prefill; the per-window
        shift by one is the caller's: call `shift()` after the window is done.
        """
        timer = timer or StageTimer(self.device)
        frames = as_window_frames(frames)
        h, w = frames.height, frames.width
        with timer.stage("preprocess"):
            n_img_tok = tokens_per_image(h, w, self.cfg.min_pixels, self.cfg.max_pixels,
                                         self.cfg.vision.patch_size, self.cfg.vision.spatial_merge_size)
            history_ids = encode_history(torch.as_tensor(np.asarray(hist_xyz, dtype=np.float64)).float(),
                                         self.ids.history_start, **self._hist_kwargs)
            ids, playout = self._prompt(n_img_tok, history_ids)
            stream = self._continues_stream(t0_us)  # k new frames per view, 0 = full prefill
            if stream:
                try:
                    self.layout.check_same_layout(self.streaming_layout(playout))
                except LayoutChanged:
                    stream = 0  # token count changed: the frozen slots are invalid -> full prefill
            # newest k frames per view, view-major and oldest first: the order of new_frame_slots(k)
            images = frames.newest(stream)
            pixels, grid_thw = preprocess_images(images, self.cfg.min_pixels, self.cfg.max_pixels,
                                                 self.cfg.vision.patch_size, self.cfg.vision.temporal_patch_size,
                                                 self.cfg.vision.spatial_merge_size, device=self.device,
                                                 uploader=self._uploader)
            # the same grid on the host: reading the device copy back would wait for the upload
            grid_cpu = torch.tensor([image_grid(h, w, self.cfg.min_pixels, self.cfg.max_pixels,
                                                self.cfg.vision.patch_size, self.cfg.vision.spatial_merge_size)]
                                    * len(images), dtype=torch.long)
            ids = ids.to(self.device, non_blocking=True)
        with timer.stage("encode"):
            if self._fast is not None:
                feats = self._fast.encode(pixels, grid_cpu)
            else:
                feats = self.model.encode_images(pixels, grid_thw.to(self.device))
        with timer.stage("prefill"):
            if stream:
                last_hidden = self._streaming_prefill(ids, feats, stream)
            else:
                last_hidden = self._full_prefill(ids, playout, feats, grid_cpu)
            # the fast path's prefill graphs end with the logits already
            logits = last_hidden if self._fast is not None else self.model.logits(last_hidden)
        return logits, playout, stream

    @torch.no_grad()
    def decode(self, logits: torch.Tensor, start: int, gen: torch.Generator | None = None):
        """Reasoning from slot `start` (token by token, or draft + verify when speculative).

        Leaves <|cot_end|><|traj_future_start|> in the cache. Returns (ids incl. <|cot_end|>,
        number the model generated, verify passes, n_ctx for the expert, tokens per verify pass,
        target forwards in all).
        """
        self._prefill_tokens = 1
        if not self.speculative:
            # One target pass per emitted token (the prefill gives the first): tau = 1 by definition.
            tokens, n_generated, forwards, n_ctx = self._decode(logits, start, gen)
            return tokens, n_generated, n_generated, n_ctx, 1.0, forwards
        from .speculative import speculative_decode

        first_block, self._first_block = self._first_block, None
        if first_block is not None and logits.shape[0] != first_block[0].numel() + 1:
            raise RuntimeError("decode: the prefill's logits do not match its temporal draft block")
        if self._fast is not None and self.temperature == 0.0 and self._fast.speculative_graphs:
            # greedy: draft / verify / tail graphs, loop state on the device, one host read per pass
            res = self._fast.speculative_decode(logits, self._context, start, self.max_new_tokens,
                                                first_block=first_block)
        else:  # sampling (rejection sampling on a CPU generator) stays the eager loop
            res = speculative_decode(self.model, self.drafter, self.cache, logits, self._context, start,
                                     self.ids, self.max_new_tokens, self.temperature, self.top_p, generator=gen,
                                     first_block=first_block)
        self._prefill_tokens = res.prefill_tokens
        return res.tokens, res.num_generated, res.verify_passes, res.n_ctx, res.tau, res.forward_passes

    def shift(self, k: int = 1) -> None:
        """Move frames k..3 of every view onto frames 0..3-k (one index copy over all layers)."""
        if self.layout is None:
            raise RuntimeError("shift() before the first full prefill of the stream")
        if k not in self._shift:
            raise ValueError(f"shift by k must be in {sorted(self._shift)}, got {k}")
        src, dst, waves = self._shift[k]
        if self._fast is not None:
            self._fast.shift(src, dst, waves)
        else:
            self.cache.shift(src, dst)

    # ------------------------------------------------------------------ stages
    def _full_prefill(self, ids: torch.Tensor, playout: PromptLayout, feats, grid_thw: torch.Tensor) -> torch.Tensor:
        """All prompt tokens at slots [0, L), causal. Freezes the streaming layout. Returns hidden [1, H]."""
        length = playout.length
        # + forced <|cot_end|> + <|traj_future_start|>; speculation may verify a whole block past the budget
        max_len = length + self.max_new_tokens + max(2, self.drafter.cfg.block_size if self.speculative else 0)
        if self._fast is not None:
            # + the 64 action slots the graphed expert writes its K/V into; a multiple of 16 keys
            max_len = round_up(max_len + N_WAYPOINTS)
        positions, _ = rope_index(ids.cpu(), grid_thw.cpu(), self.ids.image_pad, self.cfg.vision.spatial_merge_size)
        self._ensure_cache(max_len, extend_positions(positions, max_len))
        if self._fast is not None:
            logits, ctx = self._fast.full_prefill(ids, feats, self._ctx_len())
            self._keep_fast_context(ctx)
        else:
            visual = ids == self.ids.image_pad
            embeds = self._embed_with_images(ids, visual, feats)
            slots = torch.arange(length, device=self.device)
            hidden, captured = self.model.language_model(
                embeds, self.cache, slots, causal_mask(slots, length, self.dtype), length,
                visual_pos_mask=visual, deepstack=feats.deepstack, capture_layers=self._capture_layers)
            self._keep_context(captured)
        if self.streaming:
            self.layout = self.streaming_layout(playout)
            ks = range(1, self.layout.n_frames)  # new frames per view of a streaming window
            self._query_slots = {k: self.layout.streaming_query_slots(k).to(self.device) for k in ks}
            self._stream_mask = {k: self.layout.streaming_mask(length, self.dtype, k).to(self.device) for k in ks}
            self._shift = {k: _shift_plan(*self.layout.shift_indices(self.shift_mode, k), self.device) for k in ks}
        return logits if self._fast is not None else hidden[:, -1]

    def _streaming_prefill(self, ids: torch.Tensor, feats, k: int = 1) -> torch.Tensor:
        """Newest k frames of every view + the tail, at their frozen slots, under the streaming mask.

        The cache holds the previous window shifted by one (see the module docstring); k > 1 strides
        first shift by k - 1 more so frames 0..3-k are the previous window's frames k..3."""
        if k > 1:
            self.shift(k - 1)
        q_slots = self._query_slots[k]
        q_ids = ids[q_slots]
        draft = self._temporal_block()
        self._first_block = None
        if self._fast is not None:  # returns the logits
            logits, ctx = self._fast.streaming_prefill(q_ids, feats, self.layout, q_slots, self._ctx_len(), k,
                                                       draft=draft)
            if draft is not None:  # the draft rows' states are the first block's, not the prompt context
                self._first_block = (draft, ctx[:, -draft.numel():].clone())
                ctx = ctx[:, :-draft.numel()]
            self._keep_fast_context(ctx)
            return logits
        length = self.layout.prefill_len
        mask, n_keys = self._stream_mask[k], length
        if draft is not None:  # draft rows at [length, length + D): each sees the prompt and the drafts before it
            d = draft.numel()
            draft_slots = length + torch.arange(d, device=self.device)
            n_keys = length + d
            prompt_rows = torch.nn.functional.pad(mask, (0, d), value=torch.finfo(self.dtype).min)
            mask = torch.cat([prompt_rows, causal_mask(draft_slots, n_keys, self.dtype)], dim=2)
            q_slots, q_ids = torch.cat([q_slots, draft_slots]), torch.cat([q_ids, draft])
        visual = q_ids == self.ids.image_pad
        embeds = self._embed_with_images(q_ids, visual, feats)
        hidden, captured = self.model.language_model(
            embeds, self.cache, q_slots, mask, n_keys,
            visual_pos_mask=visual, deepstack=feats.deepstack, capture_layers=self._capture_layers)
        if draft is None:
            self._keep_context(captured)
            return hidden[:, -1]
        from .speculative import context_features

        d = draft.numel()
        states = context_features(captured, self._capture_layers)
        self._context = states[:, :-d][:, -self.drafter.cfg.context_len:]
        self._first_block = (draft, states[:, -d:])
        return hidden[0, -(d + 1):]

    def _temporal_block(self) -> torch.Tensor | None:
        """Draft ids [D] on the device for this streaming window's prefill, or None (see __init__)."""
        if not (self.temporal_draft and self.speculative and self.temperature == 0.0):
            return None
        from .speculative import temporal_draft

        draft = temporal_draft(self._previous_reasoning, self.temporal_draft, self.ids.cot_end,
                               self.ids.traj_future_start)
        return None if draft is None else draft.to(self.device)

    def _keep_context(self, captured: dict) -> None:
        """Drafter context: captured target states of the last prompt positions (the tail's end)."""
        if self.speculative:
            from .speculative import context_features

            self._context = context_features(captured, self._capture_layers)[:, -self.drafter.cfg.context_len:]

    def _ctx_len(self) -> int:
        return self.drafter.cfg.context_len if self.speculative else 0

    def _keep_fast_context(self, ctx: torch.Tensor | None) -> None:
        # a copy: the graph's static output is overwritten by the next prefill
        if self.speculative:
            self._context = ctx.clone()

    def _embed_with_images(self, ids: torch.Tensor, visual: torch.Tensor, feats) -> torch.Tensor:
        n_vis = int(visual.sum())
        if n_vis != feats.embeds.shape[0]:
            raise RuntimeError(f"prompt has {n_vis} image tokens but the encoder produced {feats.embeds.shape[0]}")
        embeds = self.model.embed(ids[None])
        embeds[0, visual] = feats.embeds.to(embeds.dtype)
        return embeds

    def _make_generator(self, t0_us: int) -> torch.Generator:
        return torch.Generator(device="cpu").manual_seed(_step_seed(self.seed, t0_us))

    def _decode(self, logits: torch.Tensor, start: int, gen: torch.Generator) -> tuple[list[int], int, int, int]:
        """Greedy / sampled reasoning from slot `start`; ends with <|cot_end|><|traj_future_start|> in the cache.

        Every forward reads the fixed key window [0, max_len) with a valid-length mask (keys <= own slot).
        Returns (generated ids, number the model generated, forward passes, n_ctx for the expert).
        """
        cot_end, tfs = self.ids.cot_end, self.ids.traj_future_start
        max_len = self.cache.max_len
        keys = torch.arange(max_len, device=self.device)
        neg = torch.finfo(self.dtype).min
        lm = self.model.language_model
        generated: list[int] = []
        slot, passes = start, 0
        greedy: torch.Tensor | None = None  # fast path: the decode graph's own greedy token

        def feed(token: int) -> torch.Tensor:
            nonlocal slot, passes, greedy
            if self._fast is not None:
                logits, greedy = self._fast.decode_step(token, slot)
            else:
                slots = torch.tensor([slot], device=self.device)
                mask = torch.where(keys <= slot, 0.0, neg).to(self.dtype).view(1, 1, 1, max_len)
                # embed_tokens directly: the id comes from our own sampler (model.embed's range check syncs)
                hidden, _ = lm(lm.embed_tokens(slots.new_tensor([[token]])), self.cache, slots, mask, max_len)
                logits = self.model.logits(hidden[:, -1])
            slot += 1
            passes += 1
            return logits

        while True:
            if greedy is not None and self.temperature == 0.0:
                token = int(greedy[0])  # = choose_next_token's argmax with trajectory ids banned
            else:
                token = self._choose(logits, gen)  # sampling (temperature > 0) stays outside the graph
            generated.append(token)
            if token == cot_end or len(generated) >= self.max_new_tokens:
                break
            logits = feed(token)
        n_generated = len(generated)
        closing = [generated[-1]]
        if generated[-1] != cot_end:
            generated.append(cot_end)  # budget exhausted: close the reasoning as the expert expects
            closing.append(cot_end)
        closing.append(tfs)
        # one forward for the closing ids (their logits are not needed): a pass fewer than feeding each
        if self._fast is not None:
            self._fast.close(closing, slot)
        else:
            slots = slot + torch.arange(len(closing), device=self.device)
            mask = torch.where(keys[None, :] <= slots[:, None], 0.0, neg).to(self.dtype)[None, None]
            lm(lm.embed_tokens(torch.tensor([closing], device=self.device)), self.cache, slots, mask, max_len)
        slot += len(closing)
        passes += 1
        return generated, n_generated, passes, slot

    def _choose(self, logits: torch.Tensor, gen: torch.Generator) -> int:
        if self.temperature == 0.0:
            return int(choose_next_token(logits, self.ids.traj_start, self.ids.traj_vocab_size)[0])
        return int(choose_next_token(logits.float().cpu(), self.ids.traj_start, self.ids.traj_vocab_size,
                                     self.temperature, self.top_p, generator=gen)[0])

    def _action(self, n_ctx: int, hist_xyz: torch.Tensor, hist_rot: torch.Tensor, v0: torch.Tensor,
                gen: torch.Generator, stride: int = 0, reasoning: list[int] = ()):
        """K flow samples batched through the expert over cache slots [0, n_ctx) -> (trajectories that start
        at speed v0 (`action_space.estimate_v0` of the history), StepResult's action fields). With the action
        drafter, a window `stride` strides after the previous one first checks that window's plan
        (engine/action_draft.py) and runs the flow only when the check fails."""
        noise = self._noise(gen)
        drafter, actions, evaluations, gap = self._action_drafter, None, 0, float("nan")
        draft = drafter.propose(stride, reasoning, self.num_samples) if drafter is not None else None
        if draft is not None:
            c = drafter.policy.check_time
            guess = draft.to(self.device, noise.dtype)
            if self._fast is not None:
                estimate = self._fast.action_estimate(noise, guess, n_ctx, c)
            else:
                estimate = one_step_estimate(self._expert_velocity(n_ctx), noise, guess, c)
            evaluations = 1
            accepted, gap = drafter.judge(self.action_space, draft, estimate, v0)
            if accepted:
                actions = draft
        if actions is None:
            if self._fast is not None:  # the whole flow loop is one graph; noise drawn above, outside it
                actions = self._fast.action(noise, n_ctx, self.schedule)
            else:
                actions = flow_sample(self._expert_velocity(n_ctx), noise, self.schedule)
            evaluations += self.schedule.num_evaluations
        info = dict(flow_evaluations=evaluations, action_draft="off", action_draft_gap_m=gap)
        if drafter is not None:
            drafter.record(actions, reasoning, drafted=actions is draft)
            info["action_draft"] = drafter.last_reason
        return self._trajectory(actions, hist_xyz, hist_rot, v0), info

    def _expert_velocity(self, n_ctx: int):
        """Eager velocity(x [K, 64, 2], t [K]) of the expert over cache slots [0, n_ctx)."""
        start = int(self.cache.positions[:, n_ctx - 1].max()) + 1
        action_positions = torch.arange(start, start + N_WAYPOINTS, device=self.device).expand(3, -1)

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            tokens = self.model.action_in_proj(x, t)
            hidden = self.model.expert(tokens, self.cache, n_ctx, action_positions)
            return self.model.action_velocity(hidden)

        return velocity

    def _noise(self, gen: torch.Generator) -> torch.Tensor:
        """The flow's starting noise [K, 64, 2], drawn from the window's CPU generator (so a seed gives the
        same trajectory on every device). On CUDA it goes up through a pinned buffer without a stream sync,
        so the action graph is queued behind the decode stage's last pass instead of waiting for it."""
        noise = torch.randn((self.num_samples, N_WAYPOINTS, 2), generator=gen) * self.diffusion_temperature
        if self.device.type != "cuda":
            return noise.to(self.device)
        if self._noise_host is None or self._noise_host.shape != noise.shape:
            self._noise_host = torch.empty(noise.shape, dtype=noise.dtype, pin_memory=True)
        # the previous window's copy is done: its trajectory was read back (synchronised) after it
        self._noise_host.copy_(noise)
        return self._noise_host.to(self.device, non_blocking=True)

    def _trajectory(self, actions: torch.Tensor, hist_xyz: torch.Tensor, hist_rot: torch.Tensor,
                    v0: torch.Tensor | None = None):
        """Normalized (accel, curvature) [K, 64, 2] -> numpy xyz [K,64,3], yaw [K,64], rot [K,64,3,3].

        Integrated on the CPU in float64 (64 sequential steps; cheaper than on the GPU)."""
        traj = self.action_space.action_to_trajectory(actions.detach().to("cpu", torch.float64), hist_xyz, hist_rot,
                                                      v0=v0)
        return (traj.xyz.float().numpy(), traj.yaw.float().numpy(), traj.rot.float().numpy())
