"""Our engine's stages at a named shape, timed per stage, in every benchmark mode.

The pipeline drives the engine pieces the way engine.py's pipelines do (AlpamayoModel, StaticKVCache,
StreamingLayout, flow.FlowSchedule), on the synthetic window of bench/shapes.py:

  baseline    full re-encode of 16 images, full prefill, autoregressive decode (q = 1), 10 flow
              evaluations; the engine's eager modules (TextModel / Expert / transformers vision tower).
  streaming   encode the 4 newest images, shift the cache, re-prefill new frames + tail only.
  spec τ      decode as verify passes of q = 8 with a *scripted drafter*: the block holds the target's
              own greedy continuation and the pass accepts a scripted count so that the mean accept
              length is τ (random weights accept nothing on their own). The DFlash-shaped draft model
              (2 decoder layers + context projection + lm_head) still runs every pass with random
              weights, so its time is counted; its tokens are replaced by the script. Its head covers a
              draft vocabulary of K target ids (`draft_vocab`; default shapes.default_draft_vocab: 32 768
              at the full shape, the whole vocabulary where that is smaller), the target lm_head rows
              gathered once (speculative.gather_head), so the draft GEMM reads K rows instead of V.
  temporal    (graphed streaming rows) the engine's temporal draft: TEMPORAL_DRAFT ids of the previous
              window's reasoning ride in the streaming prefill as causal draft rows, whose logits the
              prefill returns with the last prompt row's; the prefill then emits a *scripted* number of
              ids (1 = nothing accepted ... DECODE_TOKENS + 1 = all) and the verify passes decode the rest.
  adaptive    FlashDrive's 8-step flow schedule with velocity reuse: 4 expert evaluations.
  action draft (graphed rows) the engine's action drafter (engine/action_draft.py): one expert evaluation
              checks a drafted action (flow.one_step_estimate), its estimate is read back and both plans
              are rolled out and compared on the host; the outcome is *scripted* ("hit": the draft is used,
              "miss": the full flow runs after the check), since random weights decide nothing.
  graphs      fused QKV / gate-up projections + one CUDA graph per stage (graphs.py).

Weights are random bf16 created on the device: the numbers are timings only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..engine import graphs as G
from ..engine.cache_kernels import shift_waves
from ..engine.flow import FlowSchedule, one_step_estimate, sample
from ..engine.kv_cache import StaticKVCache
from ..engine.rope import extend_positions, mrope_cos_sin, rope_index
from ..engine.streaming import StreamingLayout, causal_mask
from ..engine.text_model import DecoderLayer, RMSNorm
from .shapes import DRAFT_BLOCK, TEMPORAL_DRAFT, Shape, default_draft_vocab, make_workload, special_id
from .timing import Clock


@dataclass(frozen=True)
class Mode:
    streaming: bool = False
    tau: float | None = None      # scripted mean accept length; None = autoregressive decode
    flow: str = "uniform"         # "uniform" (10 evaluations) | "adaptive" (4)
    graphs: bool = False          # fused projections + CUDA graphs
    temporal: int | None = None   # temporal draft rows in the prefill: ids the prefill emits (scripted)
    action_draft: str | None = None  # "hit" | "miss": the action drafter's check, outcome scripted

    def __post_init__(self) -> None:
        if self.temporal is not None and not (self.graphs and self.streaming and self.tau is not None):
            raise ValueError("the temporal draft rows are timed on the graphed streaming speculative path only")
        if self.temporal is not None and not 1 <= self.temporal <= TEMPORAL_DRAFT + 1:
            raise ValueError(f"the prefill emits 1..{TEMPORAL_DRAFT + 1} ids, got {self.temporal}")
        if self.action_draft not in (None, "hit", "miss"):
            raise ValueError(f"action_draft must be None, 'hit' or 'miss', got {self.action_draft!r}")
        if self.action_draft is not None and not self.graphs:
            raise ValueError("the action draft is timed on the graphed path only")

    def label(self) -> str:
        parts = []
        if self.graphs:
            parts.append("graphs+fusion")
        if self.streaming:
            parts.append("streaming")
        if self.tau is not None:
            parts.append(f"spec τ={self.tau:g} (scripted drafter)")
        if self.temporal is not None:
            parts.append(f"temporal draft (prefill emits {self.temporal}, scripted)")
        if self.flow == "adaptive":
            parts.append("adaptive flow")
        if self.action_draft is not None:
            parts.append(f"action draft {self.action_draft} (scripted)")
        return " + ".join(parts) if parts else "baseline"


def accept_schedule(n_tokens: int, tau: float, block: int = DRAFT_BLOCK) -> list[int]:
    """Tokens accepted per verify pass (bonus token included): ceil(n / τ) passes, as even as possible."""
    if not 1.0 <= tau <= block:
        raise ValueError(f"τ must be in [1, {block}], got {tau}")
    n_pass = math.ceil(n_tokens / tau - 1e-9)
    base, extra = divmod(n_tokens, n_pass)
    sched = [base + 1] * extra + [base] * (n_pass - extra)
    assert sum(sched) == n_tokens and max(sched) <= block
    return sched


def _round_up(x: int, m: int = 16) -> int:
    # key counts are kept multiples of 16: SDPA's memory-efficient kernel pads unaligned masks per call
    return (x + m - 1) // m * m


def dflash_context_layers(n_layers: int) -> tuple[int, ...]:
    """Target layers whose hidden states condition the drafter (flashdrive.md §4), scaled to small models."""
    if n_layers == 36:
        return (24, 30, 31, 32, 34)
    return tuple(range(max(0, n_layers - 5), n_layers))


class DraftStandIn(nn.Module):
    """A DFlash-shaped drafter with random weights (2 target-width decoder layers, context projection of
    the captured target states, shared lm_head): it makes the draft pass cost what the real one costs."""

    def __init__(self, text_cfg, n_ctx_layers: int, n_layers: int = 2):
        super().__init__()
        h = text_cfg.hidden_size
        self.fc = nn.Linear(n_ctx_layers * h, h, bias=False)
        self.ctx_norm = RMSNorm(h, text_cfg.rms_norm_eps)
        self.layers = nn.ModuleList(DecoderLayer(text_cfg) for _ in range(n_layers))
        self.norm = RMSNorm(h, text_cfg.rms_norm_eps)
        pos = torch.arange(2 * DRAFT_BLOCK).expand(3, -1)  # positions 0..15, reset every pass (stateless)
        cos, sin = mrope_cos_sin(pos, text_cfg.head_dim, 1_000_000.0, text_cfg.mrope_section)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, ctx: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
        """ctx [1, 8, n_ctx_layers*H] target states, block [1, 8, H] embeds -> hidden [1, 8, H]
        (the engine drafter's fast path, graphs.drafter_forward: block rows non-causal over ctx ‖ block)."""
        c = G.fused_rms_norm(self.fc(ctx), self.ctx_norm.weight, self.ctx_norm.eps)
        return G.drafter_forward(self.layers, self.norm, c, block, self.cos, self.sin)


@torch.no_grad()
def random_init_(module: nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Random weights on the module's device (norm weights 1, everything else N(0, std))."""
    dev = next(module.parameters()).device
    g = torch.Generator(device=dev).manual_seed(seed)
    norm_params = {f"{n}.weight" if n else "weight" for n, m in module.named_modules()
                   if "norm" in type(m).__name__.lower() and isinstance(getattr(m, "weight", None), torch.Tensor)}
    for name, p in module.named_parameters():
        if name in norm_params:
            p.fill_(1.0)
        else:
            p.normal_(0.0, std, generator=g)


def build_model(cfg, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """AlpamayoModel with random weights materialised directly on `device` (no CPU copy)."""
    from ..engine.loader import _build_empty

    model = _build_empty(cfg, dtype, torch.device(device))
    random_init_(model, seed)
    return model.eval().requires_grad_(False)


@dataclass
class _Graphs:
    stages: dict[str, G.StageGraph] = field(default_factory=dict)


def bench_draft_vocab(cfg, size: int) -> torch.Tensor:
    """The scripted drafter's draft vocabulary of `size` ids: the smallest base-vocabulary ids plus
    <|cot_end|> and <|traj_future_start|> (which ids does not matter for timing: the script replaces
    the drafter's tokens; the count K sets the head GEMM's width)."""
    from ..engine.speculative import build_draft_vocab

    lo = cfg.traj_token_start_idx
    return build_draft_vocab([], size, always=(special_id(cfg, "cot_end"), special_id(cfg, "traj_future_start")),
                             vocab_size=cfg.text.vocab_size, exclude=(lo, lo + cfg.traj_vocab_size))


class OursPipeline:
    def __init__(self, shape: Shape, device, dtype: torch.dtype, seed: int = 0, draft_vocab: int | str | None = "auto"):
        """draft_vocab: K ids for the scripted drafter's head; "auto" = shapes.default_draft_vocab(shape);
        None (or >= the vocabulary size) = the target's whole lm_head."""
        self.shape, self.device, self.dtype = shape, torch.device(device), dtype
        cfg = self.cfg = shape.cfg
        self.model = build_model(cfg, dtype, self.device, seed)
        self.n_ctx_layers = dflash_context_layers(cfg.text.num_hidden_layers)
        with torch.device(self.device):
            self.drafter = DraftStandIn(cfg.text, len(self.n_ctx_layers)).to(dtype)
        random_init_(self.drafter, seed + 1)
        self.drafter.eval().requires_grad_(False)
        if draft_vocab == "auto":
            draft_vocab = default_draft_vocab(shape)
        if draft_vocab is not None and draft_vocab >= cfg.text.vocab_size:
            draft_vocab = None
        self.draft_ids = None if draft_vocab is None else bench_draft_vocab(cfg, draft_vocab).to(self.device)
        self._draft_head_cache: tuple | None = None

        w = self.w = make_workload(shape, self.device, dtype, seed)
        ids_cpu = w.input_ids.cpu()
        self.L = L = shape.prompt_len
        self.max_len = _round_up(shape.max_len())
        self.n_pref = _round_up(L)  # keys read by a prefill (slots >= L are masked)
        pos, _ = rope_index(ids_cpu, w.image_grid_thw.cpu(), cfg.image_token_id, cfg.vision.spatial_merge_size)
        self.cache = StaticKVCache.for_config(cfg.text, 1, self.max_len, extend_positions(pos, self.max_len),
                                              dtype, self.device)
        self.layout = StreamingLayout.from_ids(ids_cpu, cfg.vision_start_token_id, cfg.vision_end_token_id,
                                               shape.n_views, shape.n_frames, prefix_len=shape.prefix_len)
        dev = self.device
        self.ids = w.input_ids
        self.full_slots = torch.arange(L, device=dev)
        self.vis_full = (w.input_ids == cfg.image_token_id)
        self.q_slots = self.layout.streaming_query_slots().to(dev)
        self.q_ids = w.input_ids[self.q_slots]
        self.vis_q = self.q_ids == cfg.image_token_id
        src, dst = self.layout.shift_indices("vision_only")
        plan = shift_waves(src, dst)  # in-place wave order for the cache kernel, as the engine does
        if plan is not None:
            src, dst, self.shift_waves = plan
        else:
            self.shift_waves = None
        self.shift_src, self.shift_dst = src.to(dev), dst.to(dev)
        self.stream_mask = self.layout.streaming_mask(self.max_len, dtype).to(dev)
        # pixel patches of the newest frame of each view (images are view-major, frame-minor)
        ppi = shape.patches_per_image
        newest = [v * shape.n_frames + shape.n_frames - 1 for v in range(shape.n_views)]
        self.pix_new = torch.cat([w.pixel_values[i * ppi:(i + 1) * ppi] for i in newest])
        self.grid_new = w.image_grid_thw[newest]
        self.banned = (cfg.traj_token_start_idx, cfg.special_token_start_idx)
        self.n_dec = shape.decode_tokens
        self.n_act = cfg.action_space.n_waypoints
        self.noise = torch.randn(1, self.n_act, 2, device=dev, generator=torch.Generator(device=dev).manual_seed(seed))
        self.ref_tokens: torch.Tensor | None = None  # the target's greedy continuation (scripted drafter)
        self._fused = False
        self._g: dict[str, G.StageGraph] = {}
        self._vstatic: dict[int, G.VisionStatic] = {}
        self._sched_host: dict = {}
        self._draft: tuple | None = None  # the action-draft rows' fixed plan (host) and action space
        self._last_gap = float("nan")

    # ------------------------------------------------------------------ shared helpers
    @property
    def lm(self):
        return self.model.language_model

    def _embed(self, ids: torch.Tensor, img: torch.Tensor, vis: torch.Tensor) -> torch.Tensor:
        x = self.lm.embed_tokens(ids)
        x = x.masked_scatter(vis[:, None], img.to(x.dtype))
        return x[None]

    def _greedy(self, hidden: torch.Tensor) -> torch.Tensor:
        return G.greedy_token(self.model.vlm.lm_head(hidden), self.banned)

    @property
    def draft_vocab_size(self) -> int:
        """K: rows of the scripted drafter's head (the vocabulary size without a draft vocabulary)."""
        return self.cfg.text.vocab_size if self.draft_ids is None else int(self.draft_ids.numel())

    def _draft_head(self):
        """lm_head rows of the draft vocabulary, gathered once per lm_head weight (fusion pads the
        target head into new storage, so the fused path gathers again)."""
        from ..engine.speculative import gather_head

        w = self.model.vlm.lm_head.weight
        key = (w.data_ptr(), w.dtype)
        if self._draft_head_cache is None or self._draft_head_cache[0] != key:
            self._draft_head_cache = (key, gather_head(w, self.draft_ids))
        return self._draft_head_cache[1]

    def _draft_greedy(self, hidden: torch.Tensor) -> torch.Tensor:
        """The drafter's greedy ids: over the draft vocabulary when there is one, else as _greedy."""
        if self.draft_ids is None:
            return self._greedy(hidden)
        from ..engine.speculative import head_logits, vocab_greedy

        return vocab_greedy(head_logits(self._draft_head(), hidden), self.draft_ids, self.banned)

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    # ------------------------------------------------------------------ eager stages (engine modules)
    def encode_eager(self, streaming: bool):
        pix, grid = (self.pix_new, self.grid_new) if streaming else (self.w.pixel_values, self.w.image_grid_thw)
        f = self.model.encode_images(pix, grid)
        return f.embeds, f.deepstack

    def prefill_eager(self, streaming: bool, img, deep) -> torch.Tensor:
        if streaming:
            self.cache.shift(self.shift_src, self.shift_dst)
            x = self._embed(self.q_ids, img, self.vis_q)
            h, _ = self.lm(x, self.cache, self.q_slots, self.stream_mask[..., :self.L], self.L, self.vis_q, deep)
        else:
            x = self._embed(self.ids, img, self.vis_full)
            h, _ = self.lm(x, self.cache, self.full_slots, causal_mask(self.full_slots, self.L).to(self.dtype),
                           self.L, self.vis_full, deep)
        return self._greedy(h[:, -1])

    def decode_eager(self, tok: torch.Tensor) -> torch.Tensor:
        toks = []
        for i in range(self.n_dec):
            cur = self.L + i
            h, _ = self.lm(self.lm.embed_tokens(tok)[None], self.cache, torch.tensor([cur], device=self.device),
                           None, cur + 1)
            tok = self._greedy(h[:, -1])
            toks.append(tok)
        return torch.cat(toks)

    def _script_block(self, tok: torch.Tensor, done: int) -> torch.Tensor:
        """Verify block: [anchor, the target's own next 7 greedy tokens] (the scripted drafter)."""
        ref = self.ref_tokens  # ref[0] = first token (from prefill), ref[i] = i-th decoded token
        nxt = ref[done + 1:done + DRAFT_BLOCK]
        if nxt.numel() < DRAFT_BLOCK - 1:
            nxt = torch.cat([nxt, ref[-1:].expand(DRAFT_BLOCK - 1 - nxt.numel())])
        return torch.cat([tok.view(1), nxt])

    def verify_eager(self, tok: torch.Tensor, tau: float) -> tuple[int, int]:
        """Verify passes with the scripted accept lengths; returns (passes, tokens matching the script)."""
        done, cur, agree = 0, self.L, 0
        sched = accept_schedule(self.n_dec, tau)
        for a in sched:
            block = self._script_block(tok, done)
            slots = torch.arange(cur, cur + DRAFT_BLOCK, device=self.device)
            h, cap = self.lm(self.lm.embed_tokens(block)[None], self.cache, slots,
                             causal_mask(slots, cur + DRAFT_BLOCK).to(self.dtype), cur + DRAFT_BLOCK,
                             capture_layers=self.n_ctx_layers)
            post = self._greedy(h[0])
            self._draft_eager(cap, post[a - 1:a])
            agree += int((post[:a - 1] == block[1:a]).sum())  # host reads the acceptance, as DFlash must
            tok = post[a - 1:a] if done + a < self.n_dec else tok
            done += a
            cur += a
        return len(sched), agree

    def _draft_eager(self, cap: dict, anchor: torch.Tensor) -> torch.Tensor:
        ctx = torch.cat([cap[i] for i in self.n_ctx_layers], dim=-1)
        blk = self.lm.embed_tokens(anchor.expand(DRAFT_BLOCK))[None]  # anchor + MASK stand-ins
        h = self.drafter(ctx, blk)
        return self._draft_greedy(h[0, 1:])

    def action_eager(self, schedule: FlowSchedule) -> torch.Tensor:
        n_ctx = self.L + self.n_dec
        positions = self.cache.positions[:, n_ctx:n_ctx + self.n_act]
        m = self.model

        def velocity(x, t):
            return m.action_velocity(m.expert(m.action_in_proj(x, t), self.cache, n_ctx, positions))

        return sample(velocity, self.noise, schedule)

    # ------------------------------------------------------------------ graphed stages
    def _ensure_fused(self) -> None:
        if not self._fused:
            G.fuse_projections(self.model)
            G.fuse_projections(self.drafter)
            self._fused = True

    def _graph(self, name: str, build):
        if name not in self._g:
            self._ensure_fused()
            self._g[name] = build()
        return self._g[name]

    def _encode_graph(self, streaming: bool) -> G.StageGraph:
        def build():
            pix, grid = (self.pix_new, self.grid_new) if streaming else (self.w.pixel_values, self.w.image_grid_thw)
            st = G.vision_static(self.model.visual, grid)
            tower = self.model.visual
            return G.StageGraph(lambda pix: (lambda e, d: (e, *d))(*G.vision_forward(tower, pix, st)),
                                {"pix": pix}, name="encode")
        return self._graph(f"encode{int(streaming)}", build)

    def _prefill_graph(self, streaming: bool, temporal: bool = False) -> G.StageGraph:
        """The prefill graph -> the target's greedy id after the last prompt row [1]; with `temporal`
        (streaming only) TEMPORAL_DRAFT draft rows follow the prompt at slots [L, L + D), as the engine's
        temporal draft puts them: -> greedy ids after the last prompt row and each draft row [1 + D],
        with the engine's on-device block verification and drafter context capture."""
        enc = self._encode_graph(streaming)
        n_draft = TEMPORAL_DRAFT if temporal else 0

        def build():
            from ..engine.speculative import first_block_outcome

            cache, lm = self.cache, self.lm
            if streaming:
                ids, slots, vis = self.q_ids, self.q_slots, self.vis_q
            else:
                ids, slots, vis = self.ids, self.full_slots, self.vis_full
            limit = (slots + 1).clamp(max=self.L)  # row sees keys <= its slot and < L
            n_pref = self.n_pref
            if n_draft:  # the scripted drafts: the target's own continuation (what a repeated reasoning is)
                draft = torch.cat([self.ref_tokens, self.ref_tokens[-1:].expand(n_draft)])[:n_draft]
                d_slots = self.L + torch.arange(n_draft, device=self.device)
                ids, slots = torch.cat([ids, draft]), torch.cat([slots, d_slots])
                limit = torch.cat([limit, d_slots + 1])
                vis = torch.cat([vis, torch.zeros(n_draft, dtype=torch.bool, device=self.device)])
                n_pref = _round_up(self.L + n_draft)
            vis_idx = vis.nonzero().flatten()
            mask = None
            if not G.kernels_usable(limit):  # the PyTorch path: the equivalent additive mask, folded once
                mask = G.fold_mask(G.limit_mask(limit, n_pref, self.dtype),
                                   lm.layers[0].self_attn.n_heads // lm.layers[0].self_attn.n_kv).contiguous()
            layers = self.n_ctx_layers if n_draft else ()
            cot_end, tfs = special_id(self.cfg, "cot_end"), special_id(self.cfg, "traj_future_start")

            def fn(ids, emb, d0, d1, d2):
                if streaming:  # the slot shift of the previous window, inside the graph
                    G.cache_shift(cache, self.shift_src, self.shift_dst, self.shift_waves)
                x = lm.embed_tokens(ids).index_copy(0, vis_idx, emb.to(self.dtype))[None]
                h, cap = G.lm_forward(lm, x, cache, slots, mask, n_pref, vis_idx, [d0, d1, d2][:len(ds)],
                                      mask_folded=True, key_limit=limit, capture_layers=layers)
                if not n_draft:
                    return self._greedy(h[:, -1])
                target = self._greedy(h[0, -1 - n_draft:])
                # what the engine does with them on the device (the script decides the outcome here)
                first_block_outcome(ids[-n_draft:], target, self.n_dec + 1, cot_end, tfs)
                ctx = torch.cat([cap[i] for i in layers], dim=-1)[:, -DRAFT_BLOCK - n_draft:]
                return target, ctx

            out = enc.outputs if enc.outputs is not None else enc()
            ds = out[1:]
            return G.StageGraph(fn, {"ids": ids, **_prefill_inputs(out)}, shared=("emb", "d0", "d1", "d2"),
                                name="prefill")
        return self._graph(f"prefill{int(streaming)}{'t' if temporal else ''}", build)

    def _decode_graph(self) -> G.StageGraph:
        def build():
            lm, cache, n = self.lm, self.cache, self.max_len
            dev = self.device

            def fn(tok, cur, out, step):
                x = lm.embed_tokens(tok)[None]
                h, _ = G.lm_forward(lm, x, cache, cur, None, n, key_limit=cur + 1)
                nxt = self._greedy(h[:, -1])
                out.index_copy_(0, step, nxt)
                tok.copy_(nxt)
                cur.add_(1)
                step.add_(1)
                return nxt

            z = torch.zeros(1, dtype=torch.long, device=dev)
            sg = G.StageGraph(fn, {"tok": z, "cur": z + self.L, "out": torch.zeros(self.n_dec, dtype=torch.long, device=dev),
                                   "step": z.clone()}, name="decode")
            return sg
        return self._graph("decode", build)

    def _verify_graph(self) -> G.StageGraph:
        """One verify pass with its bookkeeping on the device: the block is [anchor, the target's own
        next 7 greedy tokens] (scripted drafter), the pass accepts sched[pass] tokens, and the graph
        advances state = [done, cur, pass, agreeing draft tokens] and the next anchor itself, so the
        host only replays and reads `done` once per pass."""
        def build():
            lm, cache, n = self.lm, self.cache, self.max_len
            ar = torch.arange(DRAFT_BLOCK, device=self.device)
            ar_draft = ar[:-1]
            layers = self.n_ctx_layers
            ref = torch.cat([self.ref_tokens, self.ref_tokens[-1:].expand(DRAFT_BLOCK)])
            one = torch.ones((), dtype=torch.long, device=self.device)

            def fn(anchor, state, sched):
                done, cur = state[0], state[1]
                # indices clamped: a replay past the schedule's end (timing a pass alone) stays in bounds
                p = state[2:3].clamp(max=sched.numel() - 1)
                a = sched.index_select(0, p)[0]  # not sched[state[2]]: a 0-d tensor index syncs
                block = torch.cat([anchor, ref[(done + 1 + ar_draft).clamp(max=ref.numel() - 1)]])
                slots = (cur + ar).clamp(max=n - 1)
                h, cap = G.lm_forward(lm, lm.embed_tokens(block)[None], cache, slots, None, n,
                                      capture_layers=layers, key_limit=slots + 1)
                post = self._greedy(h[0])
                agree = ((post[:-1] == block[1:]) & (ar_draft < a - 1)).sum()
                anchor.copy_(post.index_select(0, (a - 1).reshape(1)))
                state.add_(torch.stack([a, a, one, agree]))
                return post, torch.cat([cap[i] for i in layers], dim=-1)

            z = torch.zeros(1, dtype=torch.long, device=self.device)
            state = torch.tensor([0, self.L, 0, 0], dtype=torch.long, device=self.device)
            sched = torch.ones(self.n_dec, dtype=torch.long, device=self.device)
            return G.StageGraph(fn, {"anchor": z, "state": state, "sched": sched}, name="verify")
        return self._graph("verify", build)

    def _draft_graph(self) -> G.StageGraph:
        ver = self._verify_graph()

        def build():
            def fn(ctx, anchor):
                blk = self.lm.embed_tokens(anchor.expand(DRAFT_BLOCK))[None]
                return self._draft_greedy(self.drafter(ctx, blk)[0, 1:])

            if self.draft_ids is not None:
                self._draft_head()  # gathered before capture (the fused lm_head's rows)

            ctx = ver.outputs[1] if ver.outputs is not None else ver()[1]
            return G.StageGraph(fn, {"ctx": ctx, "anchor": ver.buffers["anchor"]},
                                shared=("ctx", "anchor"), name="draft")
        return self._graph("draft", build)

    def _action_graph(self, flow: str) -> G.StageGraph:
        sched = FlowSchedule.from_name(flow)
        return self._expert_graph(f"action_{flow}", {"noise": self.noise},
                                  lambda velocity, noise: sample(velocity, noise, sched))

    def _action_check(self) -> torch.Tensor:
        """The action drafter's check as the engine runs it: one graphed evaluation at the draft's check
        point, the estimate read back, both plans rolled out from v0 and compared (gap kept in _last_gap)."""
        from ..engine.action_draft import ActionDraftPolicy, trajectory_gap_m
        from ..engine.action_space import UnicycleActionSpace

        c = ActionDraftPolicy(tolerance_m=1.0).check_time
        if self._draft is None:  # a fixed plan of small random controls (normalized), and its device copy
            gen = torch.Generator().manual_seed(7)
            self._draft = (0.3 * torch.randn(1, self.n_act, 2, generator=gen, dtype=torch.float64),
                           UnicycleActionSpace(self.cfg.action_space))
        draft, space = self._draft
        g = self._expert_graph("action_check", {"noise": self.noise, "draft": draft.to(self.device, self.noise.dtype)},
                               lambda velocity, noise, draft: one_step_estimate(velocity, noise, draft, c))
        est = g()
        self._last_gap = float(trajectory_gap_m(space, draft, est.to("cpu", torch.float64), 10.0).max())
        return est

    def _expert_graph(self, name: str, inputs: dict[str, torch.Tensor], body) -> G.StageGraph:
        """A graph of body(velocity, **inputs), velocity(x, t) = the expert over the context and decode slots."""
        def build():
            m, cache, n = self.model, self.cache, self.max_len
            ar = torch.arange(self.n_act, device=self.device)

            def fn(n_ctx, **bufs):
                act_slots = n_ctx + ar  # right after the context: every action row sees keys < n_ctx + T
                limit = n_ctx + self.n_act
                rope = G.action_rope(cache, act_slots, self.dtype)  # once for all flow evaluations

                def velocity(x, t):
                    h = G.expert_forward(m.expert, G.action_tokens(m.action_in_proj, x, t), cache, act_slots, None,
                                         n, key_limit=limit, rope=rope)
                    return m.action_velocity(h)

                return body(velocity, **bufs)

            return G.StageGraph(fn, {**inputs, "n_ctx": torch.tensor(self.L + self.n_dec, device=self.device)},
                                name=name)
        return self._graph(name, build)

    # ------------------------------------------------------------------ fast path vs eager, same inputs
    @torch.no_grad()
    def fast_path_check(self) -> dict[str, float]:
        """Relative difference of each fast stage function (fused, compiled on CUDA, chosen attention)
        against the engine's eager module on identical inputs: encode, full prefill, one expert pass."""
        self._ensure_fused()

        def rel(a, b):
            return float((a.float() - b.float()).norm() / b.float().norm())

        out = {}
        img, deep = self.encode_eager(False)
        st = G.vision_static(self.model.visual, self.w.image_grid_thw)
        e_f, d_f = G.vision_forward(self.model.visual, self.w.pixel_values, st)
        out["encode"] = rel(e_f, img)
        x = self._embed(self.ids, img, self.vis_full)
        h_e, _ = self.lm(x, self.cache, self.full_slots, causal_mask(self.full_slots, self.L).to(self.dtype),
                         self.L, self.vis_full, deep)
        lim = torch.tensor(self.L, device=self.device)
        h_f, _ = G.lm_forward(self.lm, x, self.cache, self.full_slots,
                              G.causal_slot_mask(self.full_slots, self.n_pref, self.dtype, limit=lim), self.n_pref,
                              self.vis_full.nonzero().flatten(), deep, key_limit=self.full_slots + 1)
        out["prefill"] = rel(h_f, h_e)
        n_ctx = self.L
        emb = self.model.action_in_proj(self.noise, torch.full((1,), 0.5, device=self.device))
        act = torch.arange(n_ctx, n_ctx + self.n_act, device=self.device)
        v_e = self.model.expert(emb, self.cache, n_ctx, self.cache.positions[:, act])
        v_f = G.expert_forward(self.model.expert, emb, self.cache, act,
                               G.action_mask(torch.tensor(n_ctx, device=self.device), act, self.max_len, self.dtype),
                               self.max_len, key_limit=torch.tensor(n_ctx + self.n_act, device=self.device))
        out["action"] = rel(v_f, v_e)
        return out

    @torch.no_grad()
    def stage_outputs(self, fast: bool) -> dict[str, torch.Tensor]:
        """Encode -> full prefill -> one expert pass (t = 0.5), chained, through the eager engine modules
        or the fast stage functions (fused, compiled, Triton kernels on CUDA): for comparing paths and
        dtypes against a float32 reference (scripts/gpu_fp32_reference.py)."""
        n_ctx = self.L
        emb = self.model.action_in_proj(self.noise, torch.full((1,), 0.5, device=self.device))
        act = torch.arange(n_ctx, n_ctx + self.n_act, device=self.device)
        if not fast:
            img, deep = self.encode_eager(False)
            x = self._embed(self.ids, img, self.vis_full)
            h, _ = self.lm(x, self.cache, self.full_slots, causal_mask(self.full_slots, self.L).to(self.dtype),
                           self.L, self.vis_full, deep)
            v = self.model.expert(emb, self.cache, n_ctx, self.cache.positions[:, act])
        else:
            self._ensure_fused()
            st = G.vision_static(self.model.visual, self.w.image_grid_thw)
            img, deep = G.vision_forward(self.model.visual, self.w.pixel_values, st)
            x = self._embed(self.ids, img, self.vis_full)
            h, _ = G.lm_forward(self.lm, x, self.cache, self.full_slots, None, self.n_pref,
                                self.vis_full.nonzero().flatten(), deep, key_limit=self.full_slots + 1)
            v = G.expert_forward(self.model.expert, emb, self.cache, act, None, self.max_len,
                                 key_limit=torch.tensor(n_ctx + self.n_act, device=self.device))
        return {"encode": img.clone(), "prefill": h.clone(), "action": v.clone()}

    # ------------------------------------------------------------------ one window
    @torch.no_grad()
    def full_prefill_window(self) -> None:
        """Window 0 of a stream (or any non-streaming window): fill every prompt slot."""
        img, deep = self.encode_eager(False)
        self.prefill_eager(False, img, deep)

    @torch.no_grad()
    def reference_tokens(self) -> torch.Tensor:
        """The target's greedy continuation after a full prefill (what the scripted drafter proposes)."""
        img, deep = self.encode_eager(False)
        tok = self.prefill_eager(False, img, deep)
        rest = self.decode_eager(tok)
        self.ref_tokens = torch.cat([tok, rest])
        return self.ref_tokens

    @torch.no_grad()
    def step(self, mode: Mode, clock: Clock) -> dict[str, float]:
        info: dict[str, float] = {}
        t0 = clock.mark()
        if mode.graphs:
            eo = self._encode_graph(mode.streaming)()
            t1 = clock.mark()
            # graph mode: these are the prefill graph's own (shared) buffers, so nothing is copied
            tok = self._prefill_graph(mode.streaming, mode.temporal is not None)(**_prefill_inputs(eo))
            if mode.temporal is not None:
                tok = tok[0]  # [1 + D] greedy ids; the script says how many of them the prefill emits
            t2 = clock.mark()
            if mode.tau is None:
                dec = self._decode_graph()
                dec.buffers["tok"].copy_(tok)
                dec.buffers["cur"].fill_(self.L)
                dec.buffers["step"].zero_()
                for _ in range(self.n_dec):
                    dec()
                passes = self.n_dec
                self.last_tokens = dec.buffers["out"].clone()
            else:
                passes, agree = self._verify_graphed(tok, mode.tau, mode.temporal or 1)
                info["script_agree"] = agree
            t3 = clock.mark()
            evaluations = FlowSchedule.from_name(mode.flow).num_evaluations
            if mode.action_draft is None:
                x = self._action_graph(mode.flow)()
            else:
                x = self._action_check()
                info["action_draft_gap_m"] = self._last_gap
                if mode.action_draft == "miss":  # scripted: the full flow runs after the check
                    x = self._action_graph(mode.flow)()
                evaluations = 1 + (evaluations if mode.action_draft == "miss" else 0)
            t4 = clock.mark()
        else:
            img, deep = self.encode_eager(mode.streaming)
            t1 = clock.mark()
            tok = self.prefill_eager(mode.streaming, img, deep)
            t2 = clock.mark()
            if mode.tau is None:
                self.last_tokens = self.decode_eager(tok)
                passes = self.n_dec
            else:
                passes, agree = self.verify_eager(tok, mode.tau)
                info["script_agree"] = agree
            t3 = clock.mark()
            x = self.action_eager(FlowSchedule.from_name(mode.flow))
            evaluations = FlowSchedule.from_name(mode.flow).num_evaluations
            t4 = clock.mark()
        clock.sync()
        self.last_action = x
        res = {"encode": clock.ms(t0, t1), "prefill": clock.ms(t1, t2), "decode": clock.ms(t2, t3),
               "action": clock.ms(t3, t4), "total": clock.ms(t0, t4)}
        res["decode_passes"] = float(passes)
        res["flow_evaluations"] = float(evaluations)
        res.update(info)
        return res

    def _verify_graphed(self, tok: torch.Tensor, tau: float, prefill_emits: int = 1) -> tuple[int, int]:
        """Verify + draft passes until n_dec ids after the prefill's first are decoded. prefill_emits > 1:
        the prefill's temporal draft rows already emitted that many ids (tok = its [1 + D] greedy ids)."""
        ver, dra = self._verify_graph(), self._draft_graph()
        done0 = prefill_emits - 1
        if done0 >= self.n_dec:  # the whole reasoning came out of the prefill: no verify pass
            return 0, 0
        sched = accept_schedule(self.n_dec - done0, tau)
        if self._sched_host.get("key") != (tau, done0):  # changes with the row only: no copy per step
            ver.buffers["sched"][:len(sched)].copy_(torch.tensor(sched))
            state0 = torch.tensor([done0, self.L + done0, 0, 0], dtype=torch.long)
            self._sched_host = {"key": (tau, done0),
                                "state0": state0.pin_memory() if self.device.type == "cuda" else state0}
        ver.buffers["anchor"].copy_(tok.reshape(-1)[done0:done0 + 1])
        ver.buffers["state"].copy_(self._sched_host["state0"], non_blocking=True)
        passes = 0
        while True:
            ver()
            dra()
            passes += 1
            if int(ver.buffers["state"][0]) >= self.n_dec:  # one host read per pass, as a real loop must
                break
        return passes, int(ver.buffers["state"][3])


def _prefill_inputs(enc_out) -> dict[str, torch.Tensor]:
    """Encode stage outputs (embeds, *deepstack) -> the prefill stage's inputs (3 deepstack slots;
    a config with fewer levels repeats the first, and the prefill body ignores the extras)."""
    ds = list(enc_out[1:])
    ds = ds + [ds[0]] * (3 - len(ds))
    return {"emb": enc_out[0], "d0": ds[0], "d1": ds[1], "d2": ds[2]}
