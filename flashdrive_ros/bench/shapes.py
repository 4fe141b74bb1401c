"""Named benchmark shapes: a model config plus the per-window workload (prompt layout, images, tokens).

The prompt is synthetic but has the layout of the 1.5 driving prompt (alpamayo.md §4, flashdrive.md §2):
    [system prefix][per view: camera label, then per frame: "frame k " + <vs> image_pad*N <ve>][tail]
Text token ids are random base-vocabulary ids (weights are random, so their values do not matter);
special ids come from the config. The full shape reproduces the 3 035-token, 16-image prompt of the
stock H100 measurement (flashdrive.md §1): 16 x (180 + 2) image blocks + 123 text tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.config import AlpamayoConfig, full_config, tiny_config
from ..engine.tokens import SPECIAL_TOKEN_NAMES

# The decoded-token count is fixed so that every row does the same work. 22 is the count of the stock
# H100 measurement the issue counts speed-ups against (flashdrive.md §1); a CoC sentence plus
# <|cot_end|><|traj_future_start|> is of that order.
DECODE_TOKENS = 22
FLOW_STEPS = 10          # baseline Euler steps (alpamayo.md §9)
ADAPTIVE_EVALS = 4       # FlashDrive 8-step grid with velocity reuse at steps 3-6 (flashdrive.md §5)
DRAFT_BLOCK = 8          # DFlash block size = verify query length (flashdrive.md §4)
ACCEPT_LENGTHS = (1.0, 3.0, 5.6, 8.0)  # scripted-drafter mean accept lengths (tokens per verify pass)
# Temporal draft (the engine's default temporal_draft): the previous window's reasoning rides in the streaming
# prefill as this many draft rows; the rows script how many ids that prefill emits (1 = nothing accepted,
# 9 = the first 8 drafts held, DECODE_TOKENS + 1 = the whole previous reasoning held: no verify pass).
TEMPORAL_DRAFT = 24
TEMPORAL_EMITS = (1, 9, DECODE_TOKENS + 1)
TEMPORAL_TAU = 5.6
# Rows of the scripted drafter's head (a draft vocabulary, docs/SPECULATIVE.md "Draft vocabulary"):
# 32 768 = 2^15, a multiple of 64 (no padding), 4.75x fewer rows than the 155 697 of the real vocabulary.
DRAFT_VOCAB = 32768


def default_draft_vocab(shape) -> int | None:
    """DRAFT_VOCAB where the target vocabulary is larger (full shapes), else None (the whole head)."""
    return DRAFT_VOCAB if shape.cfg.text.vocab_size > DRAFT_VOCAB else None


@dataclass(frozen=True)
class Shape:
    name: str
    cfg: AlpamayoConfig
    n_views: int
    n_frames: int
    grid_hw: tuple[int, int]      # patch grid of one image (t = 1)
    prefix_len: int               # system turn + "<|im_start|>user\n"
    view_label_len: int           # "Front left camera: "
    frame_label_len: int          # "frame k "
    tail_len: int                 # history block + instruction + "<|im_end|>\n<|im_start|>assistant\n<|cot_start|>"
    decode_tokens: int = DECODE_TOKENS

    @property
    def n_images(self) -> int:
        return self.n_views * self.n_frames

    @property
    def patches_per_image(self) -> int:
        return self.grid_hw[0] * self.grid_hw[1]

    @property
    def tokens_per_image(self) -> int:
        m = self.cfg.vision.spatial_merge_size
        return self.patches_per_image // (m * m)

    @property
    def patch_dim(self) -> int:
        v = self.cfg.vision
        return v.in_channels * v.temporal_patch_size * v.patch_size ** 2

    @property
    def block_len(self) -> int:
        return self.tokens_per_image + 2

    @property
    def prompt_len(self) -> int:
        return (self.prefix_len + self.n_views * self.view_label_len
                + self.n_images * (self.frame_label_len + self.block_len) + self.tail_len)

    @property
    def streaming_query_len(self) -> int:
        """New-frame blocks of every view + the recomputed tail (flashdrive.md §2)."""
        return self.n_views * self.block_len + self.tail_len

    def max_len(self, extra: int = DRAFT_BLOCK) -> int:
        """Cache slots: prompt + decoded tokens + a verify block of slack + 64 action slots."""
        return self.prompt_len + self.decode_tokens + extra + self.cfg.action_space.n_waypoints


def get_shape(name: str) -> Shape:
    if name == "full":
        # 1080x1920 -> 320x576 -> (1, 20, 36) patches -> 180 tokens (alpamayo.md §3).
        return Shape("full", full_config(), 4, 4, (20, 36), prefix_len=20, view_label_len=4,
                     frame_label_len=1, tail_len=71)
    if name == "full4":
        # the full widths with 4 LM / expert / vision layers: every kernel sees the real shapes, and a
        # float32 copy fits next to a bf16 one (scripts/gpu_fp32_reference.py)
        cfg = full_config()
        cfg.text.num_hidden_layers = 4
        cfg.vision.depth = 4
        cfg.vision.deepstack_visual_indexes = (1, 2, 3)
        return Shape("full4", cfg.validate(), 4, 4, (20, 36), prefix_len=20, view_label_len=4,
                     frame_label_len=1, tail_len=71)
    if name == "tiny":
        # tiny preset: 1080x1920 -> 128x224 -> (1, 8, 14) patches -> 28 tokens (docs/DESIGN.md).
        return Shape("tiny", tiny_config(), 4, 4, (8, 14), prefix_len=20, view_label_len=4,
                     frame_label_len=1, tail_len=71)
    raise ValueError(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")


SHAPES = ("tiny", "full", "full4")


def special_id(cfg: AlpamayoConfig, name: str) -> int:
    """Id of an Alpamayo special token (they follow the trajectory vocabulary in a fixed order)."""
    return cfg.special_token_start_idx + SPECIAL_TOKEN_NAMES.index(name)


@dataclass
class Workload:
    """One window's synthetic inputs (on `device`)."""

    input_ids: torch.Tensor         # [L] long
    pixel_values: torch.Tensor      # [n_images * patches, patch_dim]
    image_grid_thw: torch.Tensor    # [n_images, 3] long
    frame_slots: list[list[tuple[int, int]]]  # [view][frame] -> [vs, ve+1)
    tail: tuple[int, int]


def make_workload(shape: Shape, device, dtype, seed: int = 0) -> Workload:
    cfg = shape.cfg
    g = torch.Generator().manual_seed(seed)
    # Text ids drawn from the base vocabulary below the Qwen specials (tiny puts them at the top).
    text_hi = min(cfg.image_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id, cfg.video_token_id)

    def text(n: int) -> list[int]:
        return torch.randint(0, text_hi, (n,), generator=g).tolist()

    ids: list[int] = text(shape.prefix_len)
    frame_slots = []
    for _ in range(shape.n_views):
        ids += text(shape.view_label_len)
        fs = []
        for _ in range(shape.n_frames):
            ids += text(shape.frame_label_len)
            start = len(ids)
            ids += [cfg.vision_start_token_id] + [cfg.image_token_id] * shape.tokens_per_image + [cfg.vision_end_token_id]
            fs.append((start, len(ids)))
        frame_slots.append(fs)
    tail_start = len(ids)
    hist_lo = cfg.hist_token_start_idx
    n_hist = cfg.tokens_per_history_traj
    # tail: <|traj_history_start|> 48 history bins <|traj_history_end|> instruction ... <|cot_start|>
    tail = ([special_id(cfg, "traj_history_start")]
            + torch.randint(hist_lo, hist_lo + cfg.hist_tokenizer.num_bins, (n_hist,), generator=g).tolist()
            + [special_id(cfg, "traj_history_end")])
    tail += text(shape.tail_len - len(tail) - 1) + [special_id(cfg, "cot_start")]
    ids += tail
    assert len(ids) == shape.prompt_len, (len(ids), shape.prompt_len)
    grid = torch.tensor([[1, *shape.grid_hw]] * shape.n_images, dtype=torch.long)
    # Pixel patches are normalised to [-1, 1] in the real pipeline; uniform noise in that range.
    pix = torch.rand(shape.n_images * shape.patches_per_image, shape.patch_dim, generator=g) * 2 - 1
    return Workload(torch.tensor(ids, dtype=torch.long, device=device), pix.to(device, dtype), grid.to(device),
                    frame_slots, (tail_start, len(ids)))
