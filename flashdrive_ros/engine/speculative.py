"""Speculative reasoning with a DFlash block-diffusion drafter (flashdrive.md §4).

Drafter
    2 decoder layers of the target's shape (text_model.DecoderLayer), block size 8. It has no
    embedding table and no LM head of its own: the frozen target `embed_tokens` / `lm_head` are passed
    in at call time, so they are never part of the drafter's state dict. A learned MASK embedding
    (initialised to the mean target embedding) fills the 7 positions after the anchor.
    Conditioning: the target's hidden states of the last 8 positions before the anchor, taken from
    chosen target layers and concatenated (tiny: layers 1,2,3; real 36-layer model: 24,30,31,32,34),
    are fused by Linear + RMSNorm into context features. Every draft layer projects them with its own
    k/v projections (+ k_norm, RoPE) and puts them IN FRONT of the block's K/V. Queries come only from
    the block; attention is non-causal. The drafter is stateless: positions 0..7 (context) and 8..15
    (block) every call, so every call has the same shapes (graph-capturable).

Draft / verify loop (`speculative_decode`)
    anchor = the last chosen, not yet fed token (the first one comes from the prefill logits).
    1. draft: [anchor, MASK x 7] -> 7 draft tokens (greedy: argmax; sampling: drawn from the drafter's
       filtered distribution q), trajectory ids masked as in sampling.py; <|traj_future_start|> is put
       right after the first drafted <|cot_end|> (`place_closing`), as every reasoning ends that way.
    2. verify: the target runs [anchor, d1..d7] at slots [cur, cur + 8) of the static cache (q = 8).
       Query j sees keys <= cur + j (valid length); nothing beyond the block is visible.
    3. accept: greedy -> the longest prefix with d[j+1] == argmax posterior[j], plus the bonus
       posterior[a]. Sampling -> lossless rejection sampling against the SAME filtered target
       distribution the autoregressive path samples from (`target_probs`): accept d with
       min(1, p/q), otherwise resample from normalise(max(p - q, 0)); all 7 accepted -> bonus from p.
    4. slots of rejected drafts are zeroed (and stay masked: the next block starts right after the
       accepted span, and masks keys past each query's own slot).
    5. stop on <|cot_end|> inside the accepted span (truncate there) or at max_new_tokens (then
       <|cot_end|> is appended, as the autoregressive path does); feed what is missing so that
       <|cot_end|> and then <|traj_future_start|> have their K/V in the cache for the action expert, in
       one forward. When the stop is an accepted *drafted* <|cot_end|>, the block already wrote both
       (`closed_in_block`): no closing forward at all, one full target pass saved.
    Greedy output is token-for-token the autoregressive greedy output, whatever the drafter predicts.

Graphed greedy loop (engine/graphed.py `GraphedStages.speculative_decode`, on whenever the engine's
cuda_graphs are): the same steps 1-5 as two CUDA graphs per pass, `draft` (drafter forward -> the 7
proposed ids) and `verify` (target block forward -> target greedy ids, `greedy_accept`, then every
piece of loop state updated in place on the device: emitted ids, accept lengths, next anchor, next
start slot, drafter context, rejected slots zeroed, done flag). The host reads one small summary
tensor per pass (done flag + counters + ids) and nothing else; the closing tokens go through one
q = 3 `tail` graph. Sampling (temperature > 0) keeps this module's eager loop (its rejection sampling
draws from a CPU generator).

Draft vocabulary (FR-Spec / EAGLE-3 style, optional): `Drafter.set_draft_vocab(ids)` restricts the
drafter's head to K target ids (a sorted int64 buffer `draft_vocab`, saved with the drafter). The rows
of the target lm_head for those ids are gathered once into a contiguous [K padded to 64, H] weight
(`draft_head`, rebuilt when the target head's storage / device / dtype changes), so a draft pass reads
K rows instead of V. `draft_logits` then returns logits over the K ids, `draft_greedy` maps argmax
back to target ids, `full_logits` scatters them into a V-wide row (-inf elsewhere) for sampling: q is
then a proper distribution that is zero outside the draft vocabulary, which rejection sampling
handles exactly. Ids outside it are never proposed; verification is unchanged, so greedy output stays
token-for-token the target's (only tau can drop). `build_draft_vocab(sequences, size, always)` picks
the most frequent ids of token sequences (e.g. the rollouts the drafter was trained on).

Save / load: `save_drafter(drafter, dir)` -> dir/drafter.safetensors + dir/drafter_config.json;
`load_drafter(dir, target_model, target_dir=None)`; train_dflash records the target's
`target_fingerprint` (sha256 of its weights) in the drafter's notes, and load_drafter warns (never
fails) when `target_dir` holds different weights.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .rope import apply_rotary, mrope_cos_sin
from .sampling import choose_next_token, nucleus
from .text_model import DecoderLayer, RMSNorm

BLOCK_SIZE = 8
CONTEXT_LEN = 8
REAL_TARGET_LAYERS = (24, 30, 31, 32, 34)  # flashdrive.md §4, for the 36-layer 1.5 text model
CONFIG_NAME = "drafter_config.json"
WEIGHTS_NAME = "drafter.safetensors"


def default_target_layers(num_target_layers: int) -> tuple[int, ...]:
    """Target decoder layers (0-based) whose outputs condition the drafter."""
    if num_target_layers == 36:
        return REAL_TARGET_LAYERS
    # Small targets: the last three layers, never layer 0 (it is barely more than the embedding).
    return tuple(range(max(1, num_target_layers - 3), num_target_layers))


@dataclass
class DrafterConfig:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    target_layers: tuple[int, ...]
    num_layers: int = 2
    block_size: int = BLOCK_SIZE
    context_len: int = CONTEXT_LEN
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0  # the drafter's own 1-D RoPE (the target uses M-RoPE at 5e6)
    attention_bias: bool = False
    hidden_act: str = "silu"

    @classmethod
    def for_target(cls, text_cfg, target_layers: tuple[int, ...] | None = None, **overrides) -> "DrafterConfig":
        layers = tuple(target_layers) if target_layers is not None else default_target_layers(text_cfg.num_hidden_layers)
        bad = [i for i in layers if not 0 <= i < text_cfg.num_hidden_layers]
        if bad or not layers:
            raise ValueError(f"target_layers {layers} must be non-empty and in [0, {text_cfg.num_hidden_layers})")
        return cls(hidden_size=text_cfg.hidden_size, intermediate_size=text_cfg.intermediate_size,
                   num_attention_heads=text_cfg.num_attention_heads,
                   num_key_value_heads=text_cfg.num_key_value_heads, head_dim=text_cfg.head_dim,
                   vocab_size=text_cfg.vocab_size, target_layers=layers, rms_norm_eps=text_cfg.rms_norm_eps,
                   attention_bias=text_cfg.attention_bias, **overrides)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["target_layers"] = list(self.target_layers)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "DrafterConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown drafter config keys {sorted(unknown)}")
        d = dict(d)
        d["target_layers"] = tuple(d["target_layers"])
        return cls(**d)


# ---------------------------------------------------------------------------------- draft vocabulary helpers
@torch.no_grad()
def gather_head(weight: torch.Tensor, ids: torch.Tensor) -> nn.Linear:
    """A bias-free Linear whose K output rows are weight[ids] (one contiguous copy), padded by
    graphs.pad_output_head to a multiple of 64 rows when K is not one already (a PaddedHead)."""
    from . import graphs

    head = nn.Linear(weight.shape[1], ids.numel(), bias=False, device="meta")
    head.weight = nn.Parameter(weight.detach().index_select(0, ids.to(weight.device)), requires_grad=False)
    graphs.pad_output_head(head)
    return head


def head_logits(head: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """hidden [..., H] -> float32 logits [..., K] of a gather_head head, through graphs.linear on the
    padded weight (the GEMM runs over the 64-aligned width; the padding columns are dropped)."""
    from . import graphs

    w = getattr(head, "padded_weight", head.weight)
    return graphs.linear(hidden.to(w.dtype), w)[..., :head.out_features].float()


def vocab_greedy(logits: torch.Tensor, ids: torch.Tensor, banned: tuple[int, int]) -> torch.Tensor:
    """logits [..., K] over the sorted target ids `ids` [K] -> the argmax's target id, ids in
    [lo, hi) banned (trajectory ids); no host sync. Ties go to the smallest id, as over the full vocabulary."""
    lo, hi = banned
    ids = ids.to(logits.device)
    ban = (ids >= lo) & (ids < hi)
    return ids[logits.float().masked_fill(ban, float("-inf")).argmax(-1)]


class Drafter(nn.Module):
    """DFlash drafter. Owns: fc, hidden_norm, layers, norm, mask_embedding (nothing of the target)."""

    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        if cfg.block_size < 2 or cfg.context_len < 1:
            raise ValueError("block_size must be >= 2 and context_len >= 1")
        self.cfg = cfg
        h = cfg.hidden_size
        self.fc = nn.Linear(len(cfg.target_layers) * h, h, bias=False)
        self.hidden_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(h, cfg.rms_norm_eps)
        self.mask_embedding = nn.Parameter(torch.zeros(h))
        # Fixed positions: context 0..C-1, block C..C+B-1 (same every call). 1-D RoPE = M-RoPE with
        # equal t/h/w positions, so the target's rotation helpers apply unchanged.
        n = cfg.context_len + cfg.block_size
        half = cfg.head_dim // 2
        section = (half - 2 * (half // 3), half // 3, half // 3)
        cos, sin = mrope_cos_sin(torch.arange(n).expand(3, -1), cfg.head_dim, cfg.rope_theta, section)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # Optional draft vocabulary: sorted int64 target ids [K] (None = the whole target vocabulary).
        # A persistent buffer once set (saved by save_drafter), absent from the state dict while None.
        self.register_buffer("draft_vocab", None)
        self._head_cache: tuple | None = None  # (key, gathered head module) built by draft_head

    # ------------------------------------------------------------------ draft vocabulary
    @torch.no_grad()
    def set_draft_vocab(self, ids, always=()) -> None:
        """Restrict proposals to `ids` (any iterable / tensor of target ids; sorted, deduplicated,
        merged with `always`), or None for the whole vocabulary. Set it before graphs are built:
        a captured draft graph keeps the head it was captured with."""
        self._head_cache = None
        if ids is None:
            self.draft_vocab = None
            return
        t = torch.as_tensor(ids, dtype=torch.long).flatten().cpu()
        t = torch.cat([t, torch.as_tensor(list(always), dtype=torch.long)]).unique(sorted=True)
        if t.numel() == 0:
            raise ValueError("a draft vocabulary needs at least one id")
        if int(t[0]) < 0 or int(t[-1]) >= self.cfg.vocab_size:
            raise ValueError(f"draft vocabulary ids must lie in [0, {self.cfg.vocab_size}), got "
                             f"[{int(t[0])}, {int(t[-1])}]")
        self.draft_vocab = t.to(self.mask_embedding.device)

    @property
    def draft_vocab_size(self) -> int:
        """K: the number of ids the drafter can propose (the target vocabulary size without a draft vocabulary)."""
        return self.cfg.vocab_size if self.draft_vocab is None else int(self.draft_vocab.numel())

    @torch.no_grad()
    def draft_head(self, model) -> nn.Linear:
        """The target lm_head restricted to the draft vocabulary: a bias-free Linear [K -> H] whose rows
        are lm_head.weight[draft_vocab] (contiguous; graphs.pad_output_head pads it to a multiple of
        64 rows, like the full head). Built on first use and cached; rebuilt when the target head's
        weight is another tensor or moved to another device / dtype (or the vocabulary changed)."""
        import weakref

        w = model.vlm.lm_head.weight
        key = (w.data_ptr(), w.device, w.dtype, tuple(w.shape), self.draft_vocab.data_ptr(), self.draft_vocab.device)
        c = self._head_cache
        # the weak reference: a freed head whose address was reused by another tensor is not "the same"
        if c is None or c[0] != key or c[1]() is not w:
            self._head_cache = c = (key, weakref.ref(w), gather_head(w, self.draft_vocab))
        return c[2]

    def draft_greedy(self, logits: torch.Tensor, banned: tuple[int, int]) -> torch.Tensor:
        """Greedy draft ids (target ids) from draft_logits' output [..., K]: argmax with the id range
        [lo, hi) banned (trajectory ids), no host sync (graph-capturable). Ties go to the smallest id,
        as an argmax over the whole vocabulary would (draft_vocab is sorted)."""
        if self.draft_vocab is None:
            from . import graphs

            return graphs.greedy_token(logits, banned)
        return vocab_greedy(logits, self.draft_vocab, banned)

    def full_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """draft_logits' output [..., K] -> [..., V] float32 with -inf at every id outside the draft
        vocabulary (so softmax gives them probability exactly 0). Identity without a draft vocabulary."""
        if self.draft_vocab is None:
            return logits
        out = logits.new_full((*logits.shape[:-1], self.cfg.vocab_size), float("-inf"), dtype=torch.float32)
        ids = self.draft_vocab.to(logits.device).expand(*logits.shape[:-1], -1)
        return out.scatter(-1, ids, logits.float())

    @classmethod
    def for_target(cls, model, target_layers: tuple[int, ...] | None = None, seed: int | None = 0) -> "Drafter":
        """A fresh (untrained) drafter shaped for `model` (an AlpamayoModel), on its device/dtype,
        with the MASK embedding at the mean target embedding."""
        cfg = DrafterConfig.for_target(model.cfg.text, target_layers)
        if seed is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                drafter = cls(cfg)
        else:
            drafter = cls(cfg)
        with torch.no_grad():
            drafter.mask_embedding.copy_(model.language_model.embed_tokens.weight.float().mean(0))
        return drafter.to(device=model.device, dtype=model.dtype)

    # ------------------------------------------------------------------ forward
    def fuse_context(self, context: torch.Tensor) -> torch.Tensor:
        """Concatenated target hidden states [B, C, n_target_layers * H] -> context features [B, C, H]."""
        return self.hidden_norm(self.fc(context))

    def forward(self, block_embeds: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """block_embeds [B, S, H] (anchor + MASKs), context [B, C, n_target_layers * H] -> hidden [B, S, H]
        after the final norm. S <= block_size, C == context_len."""
        b, s, _ = block_embeds.shape
        c = context.shape[1]
        if c != self.cfg.context_len or s > self.cfg.block_size:
            raise ValueError(f"context must hold {self.cfg.context_len} states (got {c}) and the block "
                             f"at most {self.cfg.block_size} tokens (got {s})")
        ctx = self.fuse_context(context.to(block_embeds.dtype))
        cos, sin = self.rope_cos[:c + s], self.rope_sin[:c + s]
        x = block_embeds
        for layer in self.layers:
            attn = layer.self_attn

            def attention(normed: torch.Tensor, attn=attn) -> torch.Tensor:
                q, k, v = attn.project(normed)  # block queries / keys / values
                kc = attn.k_norm(attn.k_proj(ctx).view(b, c, attn.n_kv, attn.head_dim)).transpose(1, 2)
                vc = attn.v_proj(ctx).view(b, c, attn.n_kv, attn.head_dim).transpose(1, 2)
                keys = apply_rotary(torch.cat([kc, k], dim=2), cos, sin)
                values = torch.cat([vc, v], dim=2)
                # No mask: every block token sees the whole context and the whole block (non-causal).
                return attn.attend(apply_rotary(q, cos[c:], sin[c:]), keys, values, None)

            x = layer(x, attention)
        return self.norm(x)

    def block_embeds(self, anchor_embeds: torch.Tensor) -> torch.Tensor:
        """anchor embeddings [B, H] -> [B, block_size, H] = [anchor, MASK x (block_size - 1)]."""
        b, h = anchor_embeds.shape
        mask = self.mask_embedding.to(anchor_embeds.dtype).expand(b, self.cfg.block_size - 1, h)
        return torch.cat([anchor_embeds[:, None], mask], dim=1)

    def forward_fast(self, block_embeds: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """forward() through graphs.drafter_forward: fused QKV / gate-up (when fuse_projections ran),
        fused norms and rotary, no host sync (the graphed draft stage)."""
        from . import graphs

        c, s = context.shape[1], block_embeds.shape[1]
        ctx = graphs.fused_rms_norm(self.fc(context.to(block_embeds.dtype)), self.hidden_norm.weight,
                                    self.hidden_norm.eps)
        return graphs.drafter_forward(self.layers, self.norm, ctx, block_embeds, self.rope_cos[:c + s],
                                      self.rope_sin[:c + s])

    def draft_logits(self, model, anchor_ids: torch.Tensor, context: torch.Tensor,
                     check_ids: bool = True, fast: bool = False) -> torch.Tensor:
        """anchor ids [B] + context [B, C, n*H] -> float32 logits [B, block_size - 1, K] for the tokens
        after the anchor, through the target's frozen embedding and lm_head: K = V (column = target id)
        without a draft vocabulary, else column k is target id draft_vocab[k] (the head is `draft_head`;
        draft_greedy / full_logits map back to target ids). check_ids=False skips model.embed's id range
        check (a host sync; the graphed loop's anchors are argmax ids); fast=True runs forward_fast."""
        embed = model.embed if check_ids else model.language_model.embed_tokens
        block = self.block_embeds(embed(anchor_ids))
        hidden = self.forward_fast(block, context) if fast else self(block, context)
        if self.draft_vocab is None:
            return model.logits(hidden[:, 1:])
        return head_logits(self.draft_head(model), hidden[:, 1:])


def build_draft_vocab(sequences, size: int, always=(), vocab_size: int | None = None,
                      exclude: tuple[int, int] | None = None) -> torch.Tensor:
    """The `size` most frequent ids of `sequences` (an iterable of 1-D int tensors / lists; negative
    ids such as the -100 label padding are ignored), together with every id of `always` (those count
    towards `size`), as a sorted int64 tensor for Drafter.set_draft_vocab.

    Ties in frequency go to the smaller id. Ids in `exclude` = [lo, hi) (e.g. the trajectory ids,
    which are never proposed anyway) are not counted. With `vocab_size` and fewer distinct ids seen than
    `size`, the rest is filled with the smallest unseen ids (so the result has exactly `size` ids when
    the vocabulary allows it); without it the result may be smaller."""
    always = sorted({int(i) for i in always})
    if size < len(always):
        raise ValueError(f"size {size} is smaller than the {len(always)} ids that must always be included")
    counts: dict[int, int] = {}
    for seq in sequences:
        t = torch.as_tensor(seq, dtype=torch.long).flatten()
        t = t[t >= 0]
        if exclude is not None:
            t = t[(t < exclude[0]) | (t >= exclude[1])]
        ids, n = t.unique(return_counts=True)
        for i, c in zip(ids.tolist(), n.tolist()):
            counts[i] = counts.get(i, 0) + c
    chosen = set(always)
    for i, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(chosen) >= size:
            break
        chosen.add(i)
    if vocab_size is not None and len(chosen) < size:
        for i in range(vocab_size):
            if len(chosen) >= size:
                break
            if i not in chosen and (exclude is None or not exclude[0] <= i < exclude[1]):
                chosen.add(i)
    return torch.tensor(sorted(chosen), dtype=torch.long)


def context_features(captured: dict[int, torch.Tensor], target_layers: tuple[int, ...]) -> torch.Tensor:
    """TextModel capture dict {layer: [B, Q, H]} -> [B, Q, n_layers * H] in target_layers order."""
    missing = [i for i in target_layers if i not in captured]
    if missing:
        raise ValueError(f"target layers {missing} were not captured")
    return torch.cat([captured[i] for i in target_layers], dim=-1)


# ---------------------------------------------------------------------------------- save / load
def save_drafter(drafter: Drafter, directory: str | Path, extra: dict | None = None) -> Path:
    """Write drafter.safetensors (float32 on CPU) + drafter_config.json (+ optional `extra` notes)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().contiguous()
             for k, v in drafter.state_dict().items()}  # draft_vocab stays int64
    save_file(state, str(directory / WEIGHTS_NAME))
    meta = {"drafter": drafter.cfg.to_json()}
    if drafter.draft_vocab is not None:
        meta["draft_vocab_size"] = drafter.draft_vocab_size  # informational; the ids are in the weights file
    if extra:
        meta["notes"] = extra
    (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return directory


TARGET_HASH_MAX_BYTES = 2 * 1024 ** 3  # load_drafter re-hashes target weights only up to this size


def target_weight_files(directory: str | Path) -> list[Path]:
    """The weight files of a target checkpoint directory ("tiny" = the shipped tiny checkpoint), sorted."""
    from .loader import resolve_dir

    return sorted(resolve_dir(directory).glob("model*.safetensors"))


def target_fingerprint(directory: str | Path) -> dict:
    """Which target checkpoint a drafter belongs to: {"target_sha256", "target_weight_bytes"}.

    target_sha256 = sha256 of the single model.safetensors file (`sha256sum` prints the same), or for a
    sharded checkpoint the sha256 of the lines "<file name> <sha256 of that file>\n" in file-name order."""
    import hashlib

    files = target_weight_files(directory)
    if not files:
        return {}
    digests = []
    for f in files:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
        digests.append((f.name, h.hexdigest()))
    if len(digests) == 1:
        sha = digests[0][1]
    else:
        sha = hashlib.sha256("".join(f"{n} {d}\n" for n, d in digests).encode()).hexdigest()
    return {"target_sha256": sha, "target_weight_bytes": sum(f.stat().st_size for f in files)}


def check_drafter_target(directory: str | Path, target_dir: str | Path) -> str | None:
    """Compare the target fingerprint recorded with a saved drafter (drafter_config.json "notes") with the
    checkpoint in `target_dir`; warn (never raise: greedy/sampled output is lossless whatever the drafter)
    when they differ, since the drafter's acceptance rate (tau) was then measured on another target.
    Returns the warning text, or None when they match or nothing can be compared (no recorded hash; a
    target larger than TARGET_HASH_MAX_BYTES with the same total size is not re-hashed)."""
    import warnings

    notes = json.loads((Path(directory) / CONFIG_NAME).read_text()).get("notes") or {}
    want = notes.get("target_sha256")
    if not want:
        return None
    files = target_weight_files(target_dir)
    size = sum(f.stat().st_size for f in files)
    if notes.get("target_weight_bytes") not in (None, size):
        got = f"weights of {size} bytes, recorded {notes['target_weight_bytes']}"
    elif size > TARGET_HASH_MAX_BYTES:
        return None
    else:
        sha = target_fingerprint(target_dir).get("target_sha256")
        if sha == want:
            return None
        got = f"target sha256 {sha}, recorded {want}"
    msg = (f"drafter {directory} was trained on another target checkpoint than {target_dir} ({got}); "
           "output stays exact, but expect fewer accepted drafts (lower tau) — retrain it "
           "(docs/SPECULATIVE.md)")
    warnings.warn(msg, stacklevel=3)
    return msg


def has_drafter(directory: str | Path) -> bool:
    d = Path(directory)
    return (d / CONFIG_NAME).is_file() and (d / WEIGHTS_NAME).is_file()


def load_drafter(directory: str | Path, model, target_dir: str | Path | None = None) -> Drafter:
    """Load a saved drafter for `model` (checks that it was built for the same target shape). With
    `target_dir` (the checkpoint `model` was loaded from), also warns when the drafter was trained on a
    different checkpoint (`check_drafter_target`)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if not has_drafter(directory):
        raise FileNotFoundError(f"{directory} has no {CONFIG_NAME} + {WEIGHTS_NAME}")
    cfg = DrafterConfig.from_json(json.loads((directory / CONFIG_NAME).read_text())["drafter"])
    t = model.cfg.text
    if (cfg.hidden_size, cfg.vocab_size) != (t.hidden_size, t.vocab_size) or max(cfg.target_layers) >= t.num_hidden_layers:
        raise ValueError(f"drafter in {directory} (hidden {cfg.hidden_size}, vocab {cfg.vocab_size}, layers "
                         f"{cfg.target_layers}) does not fit the target (hidden {t.hidden_size}, vocab "
                         f"{t.vocab_size}, {t.num_hidden_layers} layers)")
    if target_dir is not None:
        check_drafter_target(directory, target_dir)
    drafter = Drafter(cfg)
    state = load_file(str(directory / WEIGHTS_NAME))
    vocab = state.get("draft_vocab")  # absent in drafters saved before draft vocabularies existed
    if vocab is not None:
        drafter.set_draft_vocab(vocab)
    drafter.load_state_dict(state, strict=True)
    return drafter.to(device=model.device, dtype=model.dtype).eval()


# ---------------------------------------------------------------------------------- sampling
def target_probs(logits: torch.Tensor, traj_start: int, traj_vocab_size: int, temperature: float,
                 top_p: float) -> torch.Tensor:
    """The distribution `choose_next_token` samples from, as full vectors: logits [N, V] -> probs [N, V].

    softmax(logits / T) -> top-p nucleus (before the trajectory mask) -> trajectory ids removed ->
    renormalised; a nucleus of only trajectory ids falls back to the most likely other token.
    """
    logits = logits.float()
    traj_end = traj_start + traj_vocab_size
    probs = (logits / temperature).softmax(dim=-1)
    vals, ids, keep = nucleus(probs, top_p)
    keep &= (ids < traj_start) | (ids >= traj_end)
    weights = torch.where(keep, vals, torch.zeros_like(vals))
    out = torch.zeros_like(probs).scatter(-1, ids, weights)
    empty = ~keep.any(dim=-1)
    if bool(empty.any()):
        fallback = choose_next_token(logits[empty], traj_start, traj_vocab_size)
        out[empty] = 0.0
        out[empty.nonzero()[:, 0], fallback] = 1.0
    return out / out.sum(dim=-1, keepdim=True)


def rejection_sample(p: torch.Tensor, q: torch.Tensor, draft: torch.Tensor,
                     generator: torch.Generator | None = None) -> tuple[int, int]:
    """Lossless verification of one drafted block (speculative sampling).

    p [n+1, V]: target distributions at the n draft positions and the bonus position;
    q [n, V]: draft distributions the n draft tokens `draft` [n] were drawn from.
    Returns (a, token): the first a drafts are accepted and `token` follows them (resampled from
    normalise(max(p - q, 0)) at the first rejection, or drawn from p[n] when all n are accepted).
    The emitted sequence is distributed exactly as sampling token by token from p.
    """
    n = draft.numel()
    idx = torch.arange(n)
    p_d, q_d = p[idx, draft], q[idx, draft]
    u = torch.rand(n, generator=generator)
    rejected = (u * q_d >= p_d).nonzero()  # accept iff u < p/q  (q_d > 0: the draft was drawn from q)
    if rejected.numel() == 0:
        return n, int(torch.multinomial(p[n], 1, generator=generator))
    a = int(rejected[0, 0])
    residual = (p[a] - q[a]).clamp_min(0.0)
    if float(residual.sum()) <= 0.0:  # p == q: a rejection has probability 0; guard rounding anyway
        residual = p[a]
    return a, int(torch.multinomial(residual, 1, generator=generator))


# ---------------------------------------------------------------------------------- greedy acceptance (device)
def greedy_accept(draft: torch.Tensor, target: torch.Tensor, n_gen: torch.Tensor, cot_end: int,
                  max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy verification of one block as tensor ops (no host sync; graph-capturable).

    draft [B-1]: the proposed ids after the anchor; target [B]: the target's greedy id after each
    block position (trajectory ids banned); n_gen [1]: ids generated before this block.
    Returns [1]-tensors (a, emitted, stop) with exactly `speculative_decode`'s greedy rules:
    a = the longest prefix with draft[j] == target[j]; the block then emits target[0..a] (accepted
    drafts equal the target ids, target[a] is the bonus), cut after the first <|cot_end|> or where
    the budget max_new_tokens is reached (stop = True, emitted = that index + 1), else emitted = a + 1.
    """
    n = target.shape[0]
    ar = torch.arange(n, device=target.device)
    a = (draft == target[:-1]).long().cumprod(0).sum(0, keepdim=True)
    ends = (target == cot_end) | (n_gen + ar + 1 >= max_new_tokens)
    ends = ends & (ar <= a)
    first = torch.where(ends, ar, n).min().reshape(1)
    stop = first < n
    emitted = torch.where(stop, first + 1, a + 1)
    return a, emitted, stop


def place_closing(draft: torch.Tensor, cot_end: int, traj_future_start: int) -> torch.Tensor:
    """draft [B-1] with <|traj_future_start|> right after its first <|cot_end|> (where the block has room).

    Every reasoning ends <|cot_end|><|traj_future_start|>, and the expert needs both in the cache. When the
    drafter proposes <|cot_end|> and the target accepts it, the forced id that follows has its K/V written
    by the same verify pass (its row sees exactly the accepted prefix), so no closing forward is needed
    (`closed_in_block`). A draft without <|cot_end|>, or with it last, is returned unchanged. Tensor ops
    only (graph-capturable); what follows the forced id is never emitted (the reasoning stops at
    <|cot_end|>), so greedy and sampled output are those of the unforced draft.
    """
    n = draft.shape[0]
    ar = torch.arange(n, device=draft.device)
    first = torch.where(draft == cot_end, ar, n).min()
    return torch.where(ar == first + 1, torch.full_like(draft, traj_future_start), draft)


def closed_in_block(block_ids: torch.Tensor, a: torch.Tensor, emitted: torch.Tensor, stop: torch.Tensor,
                    last: torch.Tensor, cot_end: int, traj_future_start: int) -> torch.Tensor:
    """[1] bool: this verify pass wrote the K/V of both closing tokens, so the loop needs no closing forward.

    block_ids [B]: [anchor, drafts]; a, emitted, stop: `greedy_accept`'s (or the sampled loop's) outcome;
    last [1]: the last emitted id. True when the block ended the reasoning at an *accepted draft*
    <|cot_end|> (emitted <= a: its row is in the block) and the next row holds <|traj_future_start|>
    (`place_closing`): the anchor + emitted rows and that one are kept.
    """
    kept = 1 + emitted  # rows anchor .. the emitted <|cot_end|> (emitted <= a)
    nxt = block_ids.gather(0, kept.clamp(max=block_ids.shape[0] - 1))
    return stop & (last == cot_end) & (emitted <= a) & (kept < block_ids.shape[0]) & (nxt == traj_future_start)


# ---------------------------------------------------------------------------------- temporal draft
def temporal_draft(previous: list[int] | None, size: int, cot_end: int, traj_future_start: int) -> torch.Tensor | None:
    """The first `size` ids of the previous window's reasoning as a draft block ([size] long, CPU), or None.

    Consecutive windows are 0.1 s apart, so the reasoning usually repeats; the streaming prefill appends
    these ids after the prompt and verifies them in the same forward (`first_block` of speculative_decode):
    a lossless guess that costs a few prompt rows and saves whole verify passes when it holds. A shorter
    reasoning is padded with <|traj_future_start|>, which also follows its <|cot_end|> (`place_closing`).
    """
    if not previous:
        return None
    ids = list(previous[:size]) + [traj_future_start] * max(0, size - len(previous))
    return place_closing(torch.tensor(ids, dtype=torch.long), cot_end, traj_future_start)


def first_block_outcome(draft: torch.Tensor, target: torch.Tensor, max_new_tokens: int, cot_end: int,
                        traj_future_start: int) -> dict[str, torch.Tensor]:
    """Greedy verification of the prefill's draft block (tensor ops; graph-capturable).

    draft [D]: ids at slots [start, start + D) behind the prompt; target [D + 1]: the target's greedy id
    after the last prompt row and after each draft row. Same rules as a verify pass whose anchor is the
    last prompt token (already in the cache): emits target[:emitted]; `kept` draft rows stay in the cache
    (accepted drafts, plus a forced <|traj_future_start|> when the block closed the reasoning).
    Returns [1]-tensors a, emitted, stop, kept, closed, pending (1: the last emitted id is the bonus).
    """
    zero = torch.zeros(1, dtype=torch.long, device=target.device)
    a, emitted, stop = greedy_accept(draft, target, zero, cot_end, max_new_tokens)
    last = target.gather(0, emitted - 1)
    block_ids = torch.cat([target[:1], draft])  # row 0 stands for the prompt's last row
    closed = closed_in_block(block_ids, a, emitted, stop, last, cot_end, traj_future_start)
    kept = torch.minimum(a, emitted) + closed.long()
    return {"a": a, "emitted": emitted, "stop": stop, "kept": kept, "closed": closed,
            "pending": (emitted == a + 1).long(), "last": last}


# ---------------------------------------------------------------------------------- decode loop
@dataclass
class SpeculativeResult:
    tokens: list[int]                 # generated ids, ending with <|cot_end|> (appended if the budget ran out)
    num_generated: int                # ids the model produced (the appended <|cot_end|> excluded)
    forward_passes: int               # target LM forwards in decode: verify blocks + one closing forward of
                                      # up to 3 ids, none when the last block closed (`closed_in_block`)
    verify_passes: int                # q = 8 verification forwards
    n_ctx: int                        # slots [0, n_ctx) hold the context up to and incl. <|traj_future_start|>
    accept_lengths: list[int] = field(default_factory=list)  # tokens emitted per verify pass (incl. bonus)
    prefill_tokens: int = 1           # ids the prefill's rows emitted: 1, or 1 + accepted temporal drafts

    @property
    def tau(self) -> float:
        """Mean tokens per verification pass (accepted drafts + the bonus token; max block size)."""
        return sum(self.accept_lengths) / max(len(self.accept_lengths), 1)


@torch.no_grad()
def speculative_decode(model, drafter: Drafter, cache, first_logits: torch.Tensor, context: torch.Tensor,
                       start: int, ids, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                       generator: torch.Generator | None = None,
                       first_block: tuple[torch.Tensor, torch.Tensor] | None = None) -> SpeculativeResult:
    """Reasoning decode from cache slot `start` with draft + verify (batch 1).

    first_logits [1, V]: the prefill's last-position logits. context [1, >= C, n*H]: concatenated
    captured target hidden states (drafter.cfg.target_layers) of the positions before `start`; the last
    C are used. `ids`: TokenIds (cot_end, traj_future_start, traj_start, traj_vocab_size).
    The cache needs max_len >= start + max_new_tokens + block_size. Sampling uses `generator` (CPU).
    first_block (greedy only): (draft [D], feats [1, D, n*H]) of a draft block the prefill already ran
    at slots [start, start + D) (`temporal_draft`); first_logits is then [D + 1, V]: the last prompt
    row and each draft row. It is verified like a block whose anchor is the last prompt token.
    """
    cfg = drafter.cfg
    block, n_draft = cfg.block_size, cfg.block_size - 1
    cot_end, tfs = ids.cot_end, ids.traj_future_start
    traj_start, traj_size = ids.traj_start, ids.traj_vocab_size
    if cache.batch != 1:
        raise ValueError("speculative_decode decodes one chain of causation (cache batch 1)")
    if context.shape[1] < cfg.context_len:
        raise ValueError(f"need {cfg.context_len} context states, got {context.shape[1]}")
    max_len = cache.max_len
    if start + max_new_tokens + block > max_len:
        raise ValueError(f"cache max_len {max_len} < start {start} + max_new_tokens {max_new_tokens} + block {block}")
    device, dtype = model.device, model.dtype
    lm = model.language_model
    keys = torch.arange(max_len, device=device)
    neg = torch.finfo(dtype).min
    offsets = torch.arange(block, device=device)
    sampling = temperature > 0.0

    def choose(logits: torch.Tensor) -> int:
        if not sampling:
            return int(choose_next_token(logits, traj_start, traj_size)[0])
        return int(choose_next_token(logits.float().cpu(), traj_start, traj_size, temperature, top_p,
                                     generator=generator)[0])

    def forward(token_ids: torch.Tensor, slot: int):
        """Target forward of token_ids [Q] at slots [slot, slot + Q); query j sees keys <= slot + j."""
        slots = slot + offsets[:token_ids.numel()]
        mask = torch.where(keys[None, :] <= slots[:, None], 0.0, neg).to(dtype)[None, None]
        hidden, cap = lm(model.embed(token_ids[None]), cache, slots, mask, max_len,
                         capture_layers=cfg.target_layers)
        return model.logits(hidden[0]), context_features(cap, cfg.target_layers)

    ctx = context[:, -cfg.context_len:].to(dtype)
    passes, accept_lengths = 0, []
    if first_block is None:
        generated = [choose(first_logits)]
        cur = start                  # slot of the anchor = generated[-1], not yet in the cache
        bonus_pending = True         # generated[-1] still has to be fed
        closed = False               # the last block holds <|cot_end|><|traj_future_start|>
        done = generated[-1] == cot_end or len(generated) >= max_new_tokens
    else:
        if sampling:
            raise ValueError("first_block (temporal draft) is verified greedily; sampling has no first block")
        draft0, feats0 = first_block
        d0 = draft0.numel()
        if first_logits.shape[0] != d0 + 1:
            raise ValueError(f"first_block of {d0} drafts needs {d0 + 1} logits rows, got {first_logits.shape[0]}")
        if start + d0 > max_len:
            raise ValueError(f"first block [{start}, {start + d0}) runs past the cache ({max_len} slots)")
        target = choose_next_token(first_logits, traj_start, traj_size)
        out = {k: int(v) for k, v in first_block_outcome(draft0.to(target.device), target, max_new_tokens,
                                                         cot_end, tfs).items()}
        generated = target[:out["emitted"]].tolist()
        kept = out["kept"]
        if kept < d0:
            cache.clear(start + torch.arange(kept, d0, device=device))
        ctx = torch.cat([ctx, feats0[:, :kept].to(dtype)], dim=1)[:, -cfg.context_len:]
        cur = start + kept
        bonus_pending, closed, done = bool(out["pending"]), bool(out["closed"]), bool(out["stop"])
    prefill_tokens = len(generated)
    while not done:
        anchor = torch.tensor([generated[-1]], device=device)
        d_logits = drafter.draft_logits(model, anchor, ctx)[0]                      # [7, K]
        if sampling:
            # q: the drafter's filtered distribution as a V-wide row, exactly 0 outside the draft vocabulary
            q = target_probs(drafter.full_logits(d_logits).cpu(), traj_start, traj_size, temperature, top_p)
            draft = torch.multinomial(q, 1, generator=generator)[:, 0]
        elif drafter.draft_vocab is None:
            draft = choose_next_token(d_logits, traj_start, traj_size).cpu()
        else:  # argmax over the K draft ids, mapped back to target ids
            draft = drafter.draft_greedy(d_logits, (traj_start, traj_start + traj_size)).cpu()
        draft = place_closing(draft, cot_end, tfs)
        block_ids = torch.cat([anchor, draft.to(device)])
        logits, feats = forward(block_ids, cur)                                    # [8, V], [1, 8, n*H]
        passes += 1
        if sampling:
            p = target_probs(logits.cpu(), traj_start, traj_size, temperature, top_p)
            a, bonus = rejection_sample(p, q, draft, generator)
        else:
            posterior = choose_next_token(logits, traj_start, traj_size).cpu()
            match = (draft == posterior[:n_draft]).long()
            a = int(match.cumprod(0).sum())
            bonus = int(posterior[a])
        new = draft[:a].tolist() + [bonus]
        # Emit in order; stop at <|cot_end|> or the budget exactly where the token-by-token loop would.
        emitted = 0
        for tok in new:
            generated.append(tok)
            emitted += 1
            if tok == cot_end or len(generated) >= max_new_tokens:
                done = True
                break
        accept_lengths.append(emitted)
        # Slots cur..cur+kept-1 hold the anchor and the kept drafts; the rest of the block is rejected.
        kept = 1 + min(a, emitted)
        bonus_pending = emitted == a + 1          # the last emitted token is the bonus (not in the cache)
        closed = done and bool(closed_in_block(block_ids.cpu(), torch.tensor([a]), torch.tensor([emitted]),
                                               torch.tensor([True]), torch.tensor([generated[-1]]), cot_end, tfs))
        kept += closed                            # the forced <|traj_future_start|> row stays
        if kept < block:
            cache.clear(cur + offsets[kept:])
        ctx = torch.cat([ctx, feats[:, :kept]], dim=1)[:, -cfg.context_len:]
        cur += kept

    # Close the reasoning exactly like the autoregressive path: the last token, <|cot_end|> if the
    # budget ran out, then <|traj_future_start|>, each with its K/V in the cache; one forward for all of
    # them, none when the last block already holds them.
    num_generated = len(generated)
    tail = [generated[-1]] if bonus_pending else []
    if generated[-1] != cot_end:
        generated.append(cot_end)
        tail.append(cot_end)
    if not closed:
        tail.append(tfs)
        forward(torch.tensor(tail, device=device), cur)
        cur += len(tail)
    return SpeculativeResult(tokens=generated, num_generated=num_generated, forward_passes=passes + bool(tail),
                             verify_passes=passes, n_ctx=cur, accept_lengths=accept_lengths,
                             prefill_tokens=prefill_tokens)
