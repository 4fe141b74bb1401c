"""Model configuration: dataclasses for every part of an Alpamayo 1.5 style model.

`AlpamayoConfig.from_config_json(d)` reads the nvidia/Alpamayo-1.5-10B config.json layout
(flat fields + Hydra-style `_target_` dicts, parsed by hand) and `to_config_json()` writes the
same layout back. Unknown keys are kept in `extra` so a round trip does not lose them.
`full_config()` is the real 10B shape, `tiny_config()` the small preset of docs/DESIGN.md.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .tokens import QWEN_TOKENS, SPECIAL_TOKEN_NAMES, TRAJ_TOKEN_ID_KEYS

NUM_SPECIAL_TOKENS = len(SPECIAL_TOKEN_NAMES)  # 28 (`<|image_pad|>` already exists in the base vocab)

ACTION_DIM = 2  # (acceleration, curvature) per waypoint


class ConfigError(ValueError):
    """A configuration is inconsistent or cannot be parsed."""


@dataclass
class TextConfig:
    """Qwen3-VL text decoder (also the base of the action expert)."""

    vocab_size: int = 155697
    hidden_size: int = 4096
    intermediate_size: int = 12288
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 5_000_000.0
    mrope_section: tuple[int, int, int] = (24, 20, 20)
    mrope_interleaved: bool = True
    hidden_act: str = "silu"
    attention_bias: bool = False
    max_position_embeddings: int = 262144


@dataclass
class VisionConfig:
    """Qwen3-VL vision tower (field names as in transformers' Qwen3VLVisionConfig)."""

    depth: int = 27
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    out_hidden_size: int = 4096
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)
    hidden_act: str = "gelu_pytorch_tanh"


@dataclass
class ExpertConfig:
    """`expert_cfg`: overrides applied to a copy of the text config (alpamayo.md §7).

    Layer count, KV heads and head_dim are inherited from the text model and must stay equal
    to it, because the expert attends to the LM's KV cache layer by layer.
    """

    hidden_size: int = 2048
    intermediate_size: int = 8256
    num_attention_heads: int = 16
    head_dim: int | None = None  # None = inherit; if given it must equal the text head_dim
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ActionInProjConfig:
    """`action_in_proj_cfg` (PerWaypointActionInProjV2): Fourier features + MLP trunk."""

    hidden_size: int = 512
    num_enc_layers: int = 2
    num_fourier_feats: int = 20
    max_freq: float = 100.0
    target: str = "alpamayo1_5.models.action_in_proj.PerWaypointActionInProjV2"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def input_features(self) -> int:
        """accel, curvature and timestep are each Fourier-encoded to `num_fourier_feats`."""
        return 3 * self.num_fourier_feats


@dataclass
class ActionSpaceConfig:
    """`action_space_cfg` (UnicycleAccelCurvatureActionSpace) normalisation and smoothing."""

    accel_mean: float = 0.02902694707164455
    accel_std: float = 0.6810426736454882
    curvature_mean: float = 0.0002692167976330542
    curvature_std: float = 0.026148280660833106
    accel_bounds: tuple[float, float] = (-9.8, 9.8)
    curvature_bounds: tuple[float, float] = (-0.33, 0.33)
    dt: float = 0.1
    n_waypoints: int = 64
    theta_lambda: float = 1e-6
    theta_ridge: float = 1e-8
    v_lambda: float = 1e-6
    v_ridge: float = 1e-4
    a_lambda: float = 1e-4
    a_ridge: float = 1e-4
    kappa_lambda: float = 1e-4
    kappa_ridge: float = 1e-4
    target: str = "alpamayo1_5.action_space.UnicycleAccelCurvatureActionSpace"
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class HistoryTokenizerConfig:
    """`hist_traj_tokenizer_cfg` (DeltaTrajectoryTokenizer): per-step xyz deltas -> bins."""

    num_bins: int = 1000
    ego_xyz_min: tuple[float, float, float] = (-4.0, -4.0, -10.0)
    ego_xyz_max: tuple[float, float, float] = (4.0, 4.0, 10.0)
    target: str = "alpamayo1_5.models.delta_tokenizer.DeltaTrajectoryTokenizer"
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class DiffusionConfig:
    """`diffusion_cfg` (FlowMatching): Euler steps from noise to the normalised action."""

    num_inference_steps: int = 10
    target: str = "alpamayo1_5.diffusion.flow_matching.FlowMatching"
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class AlpamayoConfig:
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    expert: ExpertConfig = field(default_factory=ExpertConfig)
    action_in_proj: ActionInProjConfig = field(default_factory=ActionInProjConfig)
    action_space: ActionSpaceConfig = field(default_factory=ActionSpaceConfig)
    hist_tokenizer: HistoryTokenizerConfig = field(default_factory=HistoryTokenizerConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)

    vlm_name_or_path: str = "nvidia/Cosmos-Reason2-8B"
    vlm_backend: str = "qwenvl3"
    base_vocab_size: int = 151669  # tokenizer length before the trajectory tokens
    traj_vocab_size: int = 4000
    future_traj_bins: int = 3000  # `traj_tokenizer_cfg` vocab: future bins come first
    tokens_per_history_traj: int = 48
    tokens_per_future_traj: int = 128
    traj_token_start_idx: int = 151669
    traj_token_ids: dict[str, int] = field(default_factory=dict)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    min_pixels: int = 163840
    max_pixels: int = 196608
    model_dtype: str = "bfloat16"
    attn_implementation: str = "sdpa"
    expert_non_causal_attention: bool = True
    include_camera_ids: bool = True
    include_frame_nums: bool = True
    traj_tokenizer_cfg: dict[str, Any] | None = None  # training-only future tokenizer, kept raw
    extra: dict[str, Any] = field(default_factory=dict)  # every other config.json key, kept verbatim

    # ---- derived quantities -------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.text.vocab_size

    @property
    def hist_token_start_idx(self) -> int:
        """History bins follow the future bins inside the trajectory vocabulary."""
        return self.traj_token_start_idx + self.future_traj_bins

    @property
    def special_token_start_idx(self) -> int:
        return self.traj_token_start_idx + self.traj_vocab_size

    @property
    def num_history_steps(self) -> int:
        return self.tokens_per_history_traj // 3

    def expert_text_config(self) -> TextConfig:
        """The text config with `expert_cfg` overrides: what the expert's layers are built from."""
        t = dataclasses.replace(self.text)
        t.hidden_size = self.expert.hidden_size
        t.intermediate_size = self.expert.intermediate_size
        t.num_attention_heads = self.expert.num_attention_heads
        return t

    # ---- checks -------------------------------------------------------------------------------
    def validate(self) -> "AlpamayoConfig":
        """Check the invariants of alpamayo.md §14; raise ConfigError naming the broken one."""
        t, v, e = self.text, self.vision, self.expert

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "vocab_size"):
            need(getattr(t, name) > 0, f"text.{name} must be positive, got {getattr(t, name)}")
        need(t.num_attention_heads % t.num_key_value_heads == 0,
             f"text.num_attention_heads ({t.num_attention_heads}) must be a multiple of "
             f"text.num_key_value_heads ({t.num_key_value_heads})")
        need(t.head_dim % 2 == 0, f"text.head_dim must be even, got {t.head_dim}")
        need(len(t.mrope_section) == 3 and sum(t.mrope_section) == t.head_dim // 2,
             f"text.mrope_section {tuple(t.mrope_section)} must have 3 entries summing to "
             f"head_dim/2 = {t.head_dim // 2}")
        need(t.mrope_interleaved, "only interleaved M-RoPE (Qwen3-VL) is supported: text.mrope_interleaved")
        # Interleaving puts H/W frequencies at 3i+1 / 3i+2: they must fit into the slot count.
        need(3 * max(t.mrope_section[1], t.mrope_section[2]) <= t.head_dim // 2 + 1,
             f"text.mrope_section {tuple(t.mrope_section)} does not fit interleaved into "
             f"{t.head_dim // 2} frequency slots")
        need(t.hidden_act == "silu", f"text.hidden_act must be 'silu', got {t.hidden_act!r}")

        need(v.hidden_size % v.num_heads == 0,
             f"vision.hidden_size ({v.hidden_size}) must be divisible by vision.num_heads ({v.num_heads})")
        need(v.out_hidden_size == t.hidden_size,
             f"vision.out_hidden_size ({v.out_hidden_size}) must equal text.hidden_size ({t.hidden_size})")
        need(all(0 <= i < v.depth for i in v.deepstack_visual_indexes),
             f"vision.deepstack_visual_indexes {tuple(v.deepstack_visual_indexes)} must be < vision.depth ({v.depth})")
        need(len(v.deepstack_visual_indexes) <= t.num_hidden_layers,
             f"{len(v.deepstack_visual_indexes)} deepstack levels exceed text.num_hidden_layers ({t.num_hidden_layers})")
        side = int(round(v.num_position_embeddings ** 0.5))
        need(side * side == v.num_position_embeddings,
             f"vision.num_position_embeddings ({v.num_position_embeddings}) must be a square")

        need(e.head_dim is None or e.head_dim == t.head_dim,
             f"expert head_dim ({e.head_dim}) must equal text.head_dim ({t.head_dim}): the expert reads the LM cache")
        for key in ("num_hidden_layers", "num_key_value_heads"):
            if key in e.extra:
                need(e.extra[key] == getattr(t, key),
                     f"expert {key} ({e.extra[key]}) must equal text.{key} ({getattr(t, key)})")
        need(e.num_attention_heads % t.num_key_value_heads == 0,
             f"expert.num_attention_heads ({e.num_attention_heads}) must be a multiple of "
             f"text.num_key_value_heads ({t.num_key_value_heads})")
        need(e.hidden_size > 0 and e.intermediate_size > 0, "expert hidden/intermediate sizes must be positive")

        a = self.action_in_proj
        need(a.num_fourier_feats > 0 and a.num_fourier_feats % 2 == 0,
             f"action_in_proj.num_fourier_feats must be positive and even, got {a.num_fourier_feats}")
        need(a.num_enc_layers >= 1, f"action_in_proj.num_enc_layers must be >= 1, got {a.num_enc_layers}")
        need(self.action_space.accel_std > 0 and self.action_space.curvature_std > 0,
             "action_space accel_std and curvature_std must be positive")

        need(self.future_traj_bins + self.hist_tokenizer.num_bins == self.traj_vocab_size,
             f"future bins ({self.future_traj_bins}) + history bins ({self.hist_tokenizer.num_bins}) "
             f"must equal traj_vocab_size ({self.traj_vocab_size})")
        need(self.traj_token_start_idx == self.base_vocab_size,
             f"traj_token_start_idx ({self.traj_token_start_idx}) must equal base_vocab_size ({self.base_vocab_size})")
        expected_vocab = self.base_vocab_size + self.traj_vocab_size + NUM_SPECIAL_TOKENS
        need(t.vocab_size == expected_vocab,
             f"vocab_size ({t.vocab_size}) must equal base ({self.base_vocab_size}) + traj_vocab "
             f"({self.traj_vocab_size}) + {NUM_SPECIAL_TOKENS} specials = {expected_vocab}")
        need(self.tokens_per_history_traj % 3 == 0,
             f"tokens_per_history_traj ({self.tokens_per_history_traj}) must be 3 x history steps")
        for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            need(0 <= getattr(self, name) < self.base_vocab_size,
                 f"{name} ({getattr(self, name)}) must lie in the base vocabulary [0, {self.base_vocab_size})")
        for k, tid in self.traj_token_ids.items():
            need(self.special_token_start_idx <= tid < t.vocab_size,
                 f"traj_token_ids[{k!r}] = {tid} is outside the special-token range "
                 f"[{self.special_token_start_idx}, {t.vocab_size})")
        need(0 < self.min_pixels <= self.max_pixels,
             f"need 0 < min_pixels ({self.min_pixels}) <= max_pixels ({self.max_pixels})")
        need(self.diffusion.num_inference_steps >= 1,
             f"diffusion.num_inference_steps must be >= 1, got {self.diffusion.num_inference_steps}")
        return self

    # ---- config.json ----------------------------------------------------------------------------
    @classmethod
    def from_config_json(cls, d: dict[str, Any]) -> "AlpamayoConfig":
        """Parse the nvidia/Alpamayo-1.5-10B config.json layout (a dict, already json-loaded)."""
        if not isinstance(d, dict):
            raise ConfigError(f"config.json must be a JSON object, got {type(d).__name__}")
        d = copy.deepcopy(d)
        cfg = cls()
        cfg.text, cfg.vision, vlm_ids = _parse_vlm(d)
        for k, v in vlm_ids.items():
            setattr(cfg, k, v)

        if "vocab_size" in d:
            cfg.text.vocab_size = int(d.pop("vocab_size"))
        if "expert_cfg" in d:
            cfg.expert = _parse_expert(d.pop("expert_cfg"))
        if "action_in_proj_cfg" in d:
            cfg.action_in_proj = _parse_target(d.pop("action_in_proj_cfg"), ActionInProjConfig,
                                               "action_in_proj_cfg", aliases={"fourier_max_freq": "max_freq"})
        if "action_space_cfg" in d:
            cfg.action_space = _parse_target(d.pop("action_space_cfg"), ActionSpaceConfig, "action_space_cfg")
        if "hist_traj_tokenizer_cfg" in d:
            cfg.hist_tokenizer = _parse_target(d.pop("hist_traj_tokenizer_cfg"), HistoryTokenizerConfig,
                                               "hist_traj_tokenizer_cfg")
        if "diffusion_cfg" in d:
            cfg.diffusion = _parse_target(d.pop("diffusion_cfg"), DiffusionConfig, "diffusion_cfg")
        if "traj_tokenizer_cfg" in d:
            cfg.traj_tokenizer_cfg = d.pop("traj_tokenizer_cfg")

        if "traj_vocab_size" in d:
            cfg.traj_vocab_size = int(d.pop("traj_vocab_size"))
        if "traj_token_start_idx" in d:
            cfg.traj_token_start_idx = int(d.pop("traj_token_start_idx"))
        cfg.base_vocab_size = int(d.pop("base_vocab_size", cfg.traj_token_start_idx))
        # Future bins = the future tokenizer's vocabulary (the real one has 3000); otherwise what is
        # left of the trajectory vocabulary after the history bins.
        fut = cfg.traj_tokenizer_cfg or {}
        cfg.future_traj_bins = int(fut.get("vocab_size", fut.get("num_bins",
                                   cfg.traj_vocab_size - cfg.hist_tokenizer.num_bins)))
        if "traj_token_ids" in d:
            ids = d.pop("traj_token_ids")
            if not isinstance(ids, dict):
                raise ConfigError(f"traj_token_ids must be an object, got {type(ids).__name__}")
            cfg.traj_token_ids = {str(k): int(v) for k, v in ids.items()}

        simple = ("vlm_name_or_path", "vlm_backend", "tokens_per_history_traj", "tokens_per_future_traj",
                  "min_pixels", "max_pixels", "model_dtype", "attn_implementation",
                  "expert_non_causal_attention", "include_camera_ids", "include_frame_nums")
        for name in simple:
            value = d.pop(name, None)
            if value is not None:
                setattr(cfg, name, _coerce(value, getattr(cfg, name), name))
        cfg.extra = d
        return cfg.validate()

    def to_config_json(self) -> dict[str, Any]:
        """Write the config.json layout read by `from_config_json` (and by the reference code)."""
        t, v = self.text, self.vision
        out: dict[str, Any] = copy.deepcopy(self.extra)
        out.update({
            "vlm_name_or_path": self.vlm_name_or_path,
            "vlm_backend": self.vlm_backend,
            # The real checkpoint only names the VLM; we also embed its shape so that small or
            # modified variants can be rebuilt offline.
            "vlm_config": {
                "model_type": "qwen3_vl",
                "image_token_id": self.image_token_id,
                "video_token_id": self.video_token_id,
                "vision_start_token_id": self.vision_start_token_id,
                "vision_end_token_id": self.vision_end_token_id,
                "text_config": {
                    "model_type": "qwen3_vl_text",
                    "vocab_size": self.base_vocab_size,
                    "hidden_size": t.hidden_size,
                    "intermediate_size": t.intermediate_size,
                    "num_hidden_layers": t.num_hidden_layers,
                    "num_attention_heads": t.num_attention_heads,
                    "num_key_value_heads": t.num_key_value_heads,
                    "head_dim": t.head_dim,
                    "rms_norm_eps": t.rms_norm_eps,
                    "hidden_act": t.hidden_act,
                    "attention_bias": t.attention_bias,
                    "max_position_embeddings": t.max_position_embeddings,
                    "rope_scaling": {"rope_type": "default", "mrope_section": list(t.mrope_section),
                                     "mrope_interleaved": t.mrope_interleaved},
                    "rope_theta": t.rope_theta,
                },
                "vision_config": {"model_type": "qwen3_vl_vision",
                                  **{f.name: _jsonable(getattr(v, f.name)) for f in dataclasses.fields(v)}},
            },
            "vocab_size": t.vocab_size,
            "traj_vocab_size": self.traj_vocab_size,
            "traj_token_start_idx": self.traj_token_start_idx,
            "traj_token_ids": dict(self.traj_token_ids),
            "tokens_per_history_traj": self.tokens_per_history_traj,
            "tokens_per_future_traj": self.tokens_per_future_traj,
            "min_pixels": self.min_pixels,
            "max_pixels": self.max_pixels,
            "model_dtype": self.model_dtype,
            "attn_implementation": self.attn_implementation,
            "expert_non_causal_attention": self.expert_non_causal_attention,
            "include_camera_ids": self.include_camera_ids,
            "include_frame_nums": self.include_frame_nums,
            "expert_cfg": _dump_expert(self.expert),
            "action_in_proj_cfg": _dump_target(self.action_in_proj),
            "action_space_cfg": _dump_target(self.action_space),
            "hist_traj_tokenizer_cfg": _dump_target(self.hist_tokenizer),
            "diffusion_cfg": _dump_target(self.diffusion),
        })
        if self.base_vocab_size != self.traj_token_start_idx:
            out["base_vocab_size"] = self.base_vocab_size
        if self.traj_tokenizer_cfg is not None:
            out["traj_tokenizer_cfg"] = copy.deepcopy(self.traj_tokenizer_cfg)
        return out


# ---- parsing helpers ------------------------------------------------------------------------------

def _jsonable(x: Any) -> Any:
    return list(x) if isinstance(x, tuple) else x


def _coerce(value: Any, default: Any, where: str) -> Any:
    """Convert a JSON value to the type of the dataclass default (tuples stay tuples)."""
    try:
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise TypeError("expected true/false")
            return value
        if isinstance(default, tuple):
            return tuple(type(default[0])(x) for x in value) if default else tuple(value)
        if isinstance(default, (int, float, str)):
            if isinstance(default, int) and isinstance(value, float) and not value.is_integer():
                raise TypeError("expected an integer")
            return type(default)(value)
        return value
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: cannot use {value!r} ({exc})") from None


def _fill(obj: Any, d: dict[str, Any], where: str, aliases: dict[str, str] | None = None) -> dict[str, Any]:
    """Set dataclass fields of `obj` from `d`; return the keys that are not fields."""
    names = {f.name for f in dataclasses.fields(obj)} - {"extra", "target"}
    rest = {}
    for key, value in d.items():
        name = (aliases or {}).get(key, key)
        if name in names and value is not None:
            setattr(obj, name, _coerce(value, getattr(obj, name), f"{where}.{key}"))
        else:
            rest[key] = value
    return rest


def _parse_target(d: Any, cls: type, where: str, aliases: dict[str, str] | None = None) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must be an object with a '_target_', got {type(d).__name__}")
    d = dict(d)
    obj = cls()
    if "_target_" in d:
        obj.target = str(d.pop("_target_"))
    obj.extra = _fill(obj, d, where, aliases)
    return obj


def _dump_target(obj: Any) -> dict[str, Any]:
    out = {"_target_": obj.target}
    for f in dataclasses.fields(obj):
        if f.name not in ("target", "extra"):
            out[f.name] = _jsonable(getattr(obj, f.name))
    out.update(copy.deepcopy(obj.extra))
    return out


def _parse_expert(d: Any) -> ExpertConfig:
    if not isinstance(d, dict):
        raise ConfigError(f"expert_cfg must be an object, got {type(d).__name__}")
    e = ExpertConfig()
    e.extra = _fill(e, d, "expert_cfg")
    return e


def _dump_expert(e: ExpertConfig) -> dict[str, Any]:
    out = {"hidden_size": e.hidden_size, "intermediate_size": e.intermediate_size,
           "num_attention_heads": e.num_attention_heads}
    if e.head_dim is not None:
        out["head_dim"] = e.head_dim
    out.update(copy.deepcopy(e.extra))
    return out


# Qwen3-VL-8B-Instruct (= Cosmos-Reason2-8B) shape, used when config.json only names the VLM.
_KNOWN_VLMS = ("qwen/qwen3-vl-8b-instruct", "nvidia/cosmos-reason2-8b")


def _parse_vlm(d: dict[str, Any]) -> tuple[TextConfig, VisionConfig, dict[str, int]]:
    """Text/vision shapes from an embedded `vlm_config` (or top-level `text_config` /
    `vision_config`), falling back to the Qwen3-VL-8B values when only the name is given."""
    vlm = d.pop("vlm_config", None)
    if vlm is not None and not isinstance(vlm, dict):
        raise ConfigError(f"vlm_config must be an object, got {type(vlm).__name__}")
    vlm = vlm or {}
    text_d = vlm.get("text_config", d.pop("text_config", None))
    vision_d = vlm.get("vision_config", d.pop("vision_config", None))
    name = str(d.get("vlm_name_or_path", "")).lower().rstrip("/")
    if text_d is None and vision_d is None and not any(name.endswith(k) for k in _KNOWN_VLMS) and name:
        # Not fatal: other Qwen3-VL-8B derivatives share the shape, but say what we assume.
        import warnings
        warnings.warn(f"vlm_name_or_path {name!r} has no embedded vlm_config; assuming the Qwen3-VL-8B shape")

    text = TextConfig()
    if text_d is not None:
        if not isinstance(text_d, dict):
            raise ConfigError(f"text_config must be an object, got {type(text_d).__name__}")
        text_d = dict(text_d)
        rope = text_d.pop("rope_scaling", None) or text_d.pop("rope_parameters", None) or {}
        if "rope_theta" in rope:
            text_d.setdefault("rope_theta", rope["rope_theta"])
        for key in ("mrope_section", "mrope_interleaved"):
            if key in rope:
                text_d[key] = rope[key]
        text_d.pop("vocab_size", None)  # the extended vocabulary comes from the top level
        _fill(text, text_d, "text_config")
    vision = VisionConfig()
    if vision_d is not None:
        if not isinstance(vision_d, dict):
            raise ConfigError(f"vision_config must be an object, got {type(vision_d).__name__}")
        _fill(vision, vision_d, "vision_config")
    ids = {k: int(vlm[k]) for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                    "vision_end_token_id") if k in vlm}
    return text, vision, ids


# ---- presets --------------------------------------------------------------------------------------

def _traj_token_ids(start: int) -> dict[str, int]:
    """config.json `traj_token_ids` for specials starting at `start` (fixed Alpamayo order)."""
    special = {name: start + i for i, name in enumerate(SPECIAL_TOKEN_NAMES)}
    return {key: special[name] for key, name in TRAJ_TOKEN_ID_KEYS.items()}


# config field <- Qwen token whose id it records
_VISION_ID_TOKENS = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
                     "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}


def with_tokenizer_ids(cfg: AlpamayoConfig, vocab: dict[str, int]) -> AlpamayoConfig:
    """Copy the Qwen vision token ids from a tokenizer vocabulary (`tokenizer.get_vocab()`) into `cfg`."""
    cfg = copy.deepcopy(cfg)
    for fld, token in _VISION_ID_TOKENS.items():
        if token not in vocab:
            raise ConfigError(f"tokenizer vocabulary lacks {token!r} (needed for {fld})")
        setattr(cfg, fld, int(vocab[token]))
    return cfg.validate()


def _fill_preset_defaults(cfg: AlpamayoConfig) -> None:
    """The release-layout keys that our code does not interpret but config.json carries."""
    cfg.traj_token_ids = _traj_token_ids(cfg.special_token_start_idx)
    cfg.traj_tokenizer_cfg = {
        "_target_": "alpamayo1_5.action_space.discrete_action_space.DiscreteTrajectoryTokenizer",
        "vocab_size": cfg.future_traj_bins}
    cfg.extra = {"model_type": "alpamayo1_5", "architectures": ["Alpamayo1_5"],
                 "action_out_proj_cfg": {"_target_": "torch.nn.Linear", "in_features": cfg.expert.hidden_size,
                                         "out_features": ACTION_DIM}}


def full_config() -> AlpamayoConfig:
    """The real nvidia/Alpamayo-1.5-10B shape (alpamayo.md §2, §7, §8, §10)."""
    cfg = AlpamayoConfig()
    _fill_preset_defaults(cfg)
    return cfg.validate()


def tiny_config() -> AlpamayoConfig:
    """The tiny preset of docs/DESIGN.md: same layout, small shapes, base vocabulary of 1024."""
    base = 1024
    cfg = AlpamayoConfig(
        text=TextConfig(vocab_size=base + 4000 + NUM_SPECIAL_TOKENS, hidden_size=128, intermediate_size=256,
                        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                        rms_norm_eps=1e-6, rope_theta=5_000_000.0, mrope_section=(6, 5, 5),
                        max_position_embeddings=8192),
        vision=VisionConfig(depth=4, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=16,
                            temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=128,
                            num_position_embeddings=256, deepstack_visual_indexes=(1, 2, 3)),
        expert=ExpertConfig(hidden_size=96, intermediate_size=192, num_attention_heads=4),
        action_in_proj=ActionInProjConfig(hidden_size=64, num_enc_layers=2, num_fourier_feats=20, max_freq=100.0),
        vlm_name_or_path="flashdrive/tiny-qwen3-vl",
        base_vocab_size=base,
        traj_token_start_idx=base,
        min_pixels=16384,
        max_pixels=32768,
        model_dtype="float32",
    )
    # The tiny tokenizer (engine/tiny_tokenizer.py) owns the Qwen token ids; these defaults put the
    # seven Qwen tokens at the top of the base vocabulary in QWEN_TOKENS order, and
    # `with_tokenizer_ids` replaces them with the tokenizer's actual ids.
    top = {tok: base - len(QWEN_TOKENS) + i for i, tok in enumerate(QWEN_TOKENS)}
    for fld, token in _VISION_ID_TOKENS.items():
        setattr(cfg, fld, top[token])
    _fill_preset_defaults(cfg)
    return cfg.validate()
