"""DriveEngine's fast path: its stages as lazily built `graphs.StageGraph`s (issue 7).

`GraphedStages(engine)` holds one StageGraph per (stage, shapes) and is what `DriveEngine` calls
instead of its eager modules when `cuda_graphs` is on:

  encode          graphs.vision_forward (equal-size images)            key: pixel shape, grid
  full prefill    graphs.lm_forward over all L prompt slots             key: L
  stream prefill  graphs.lm_forward over the streaming query slots      key: L, k (new frames per view)
  decode step     q = 1: embed -> lm_forward -> logits + greedy token   key: max_len
  action          the whole flow.sample loop over graphs.expert_forward key: K, schedule
  shift           graphs.cache_shift of the streaming frame slots       key: #slots (differs per k)

Every graph but encode reads and writes the engine's StaticKVCache tensors in place, so those are
dropped (`invalidate`) whenever the cache is replaced or its position table changes (set_positions makes new
cos/sin tensors); `reset()` keeps them (cache.clear() zeroes in place). Constants a graph needs (masks,
slot indices, image-token rows) are built once at graph-build time and bound in its closure, so they
stay alive and at the same address for the replays.

StageGraph's warm-up runs the stage twice before capture. All stages here are idempotent for equal
inputs (they recompute the same K/V into the same slots) except the shift, whose graph is built on the
identity permutation (dst -> dst) and only then called with the real source slots.

On the CPU (and whenever CUDA graphs are unavailable) StageGraph runs the same functions eagerly on
the same buffers, which is what the CPU tests compare against the eager engine.
"""

from __future__ import annotations

import torch

from . import graphs as G
from .flow import FlowSchedule, sample as flow_sample
from .vision import ImageFeatures


def round_up(x: int, m: int = 16) -> int:
    """Key counts are kept multiples of 16 (SDPA's memory-efficient kernel pads unaligned masks per call)."""
    return (x + m - 1) // m * m


class GraphedStages:
    """See the module docstring. `engine` is the owning DriveEngine (model, cache, ids, dtype, device)."""

    def __init__(self, engine):
        self.engine = engine
        self.graphs: dict[tuple, G.StageGraph] = {}
        self.builds = 0  # how many graphs were built (tests / diagnostics)

    # ------------------------------------------------------------------ bookkeeping
    def invalidate(self) -> None:
        """Drop every graph that addresses the cache (its tensors were replaced); encode graphs stay."""
        for key in [k for k in self.graphs if k[0] != "encode"]:
            del self.graphs[key]

    def _get(self, key: tuple, build) -> G.StageGraph:
        g = self.graphs.get(key)
        if g is None:
            g = self.graphs[key] = build()
            self.builds += 1
        return g

    @property
    def _model(self):
        return self.engine.model

    @property
    def _lm(self):
        return self.engine.model.language_model

    def _banned(self) -> tuple[int, int]:
        ids = self.engine.ids
        return ids.traj_start, ids.traj_start + ids.traj_vocab_size

    def _n_pref(self, length: int) -> int:
        """Keys a prefill reads: L rounded up to 16 (slots >= L masked), never past the cache."""
        return min(round_up(length), self.engine.cache.max_len)

    # ------------------------------------------------------------------ encode
    def encode(self, pixels: torch.Tensor, grid_thw: torch.Tensor) -> ImageFeatures:
        """Vision tower on equal-size images -> ImageFeatures (static outputs: consume before the next call)."""
        grid_cpu = grid_thw.cpu()
        key = ("encode", tuple(pixels.shape), tuple(grid_cpu.flatten().tolist()))
        tower = self._model.visual

        def build():
            st = G.vision_static(tower, grid_thw.to(pixels.device))

            def fn(pix):
                emb, deep = G.vision_forward(tower, pix, st)
                return (emb, *deep)

            return G.StageGraph(fn, {"pix": pixels}, name="encode")

        out = self._get(key, build)(pix=pixels)
        merge = self.engine.cfg.vision.spatial_merge_size
        per_image = [int(t * h * w) // merge ** 2 for t, h, w in grid_cpu.tolist()]
        return ImageFeatures(embeds=out[0], deepstack=list(out[1:]), tokens_per_image=per_image)

    @staticmethod
    def _feat_inputs(feats: ImageFeatures) -> dict[str, torch.Tensor]:
        return {"emb": feats.embeds, **{f"d{i}": d for i, d in enumerate(feats.deepstack)}}

    def _lm_stage(self, name: str, ids: torch.Tensor, feats: ImageFeatures, slots: torch.Tensor,
                  mask: torch.Tensor, n: int, ctx_len: int) -> G.StageGraph:
        """A prefill graph: fn(ids, emb, d0..) -> (logits of the last row [1, V] float32, drafter context?)."""
        engine, lm, cache = self.engine, self._lm, self.engine.cache
        visual = ids == engine.ids.image_pad
        vis_idx = visual.nonzero().flatten()
        if vis_idx.numel() != feats.embeds.shape[0]:
            raise RuntimeError(f"prompt has {vis_idx.numel()} image tokens but the encoder produced "
                               f"{feats.embeds.shape[0]}")
        a0 = lm.layers[0].self_attn
        mask = G.fold_mask(mask.to(engine.dtype), a0.n_heads // a0.n_kv).contiguous()
        slots = slots.clone()
        n_deep = len(feats.deepstack)
        layers = engine._capture_layers
        model = self._model

        def fn(ids, emb, **deep):
            x = lm.embed_tokens(ids).index_copy(0, vis_idx, emb.to(engine.dtype))[None]
            ds = [deep[f"d{i}"] for i in range(n_deep)]
            h, cap = G.lm_forward(lm, x, cache, slots, mask, n, vis_idx, ds or None,
                                  capture_layers=layers, mask_folded=True)
            logits = model.logits(h[:, -1])
            if not layers:
                return (logits,)
            return logits, torch.cat([cap[i] for i in layers], dim=-1)[:, -ctx_len:]

        return G.StageGraph(fn, {"ids": ids, **self._feat_inputs(feats)}, name=name)

    def _run_prefill(self, g: G.StageGraph, ids: torch.Tensor, feats: ImageFeatures):
        out = g(ids=ids, **self._feat_inputs(feats))
        return out[0], (out[1] if len(out) > 1 else None)

    # ------------------------------------------------------------------ prefill
    def full_prefill(self, ids: torch.Tensor, feats: ImageFeatures, ctx_len: int = 0):
        """All L prompt tokens at slots [0, L), causal -> (logits [1, V] float32, drafter context or None)."""
        length = ids.shape[0]
        key = ("full_prefill", length, tuple(feats.embeds.shape), len(feats.deepstack))

        def build():
            dev = self.engine.device
            slots = torch.arange(length, device=dev)
            n = self._n_pref(length)
            mask = G.causal_slot_mask(slots, n, self.engine.dtype, limit=torch.tensor(length, device=dev))
            return self._lm_stage("full_prefill", ids, feats, slots, mask, n, ctx_len)

        return self._run_prefill(self._get(key, build), ids, feats)

    def streaming_prefill(self, q_ids: torch.Tensor, feats: ImageFeatures, layout, q_slots: torch.Tensor,
                          ctx_len: int = 0, k: int = 1):
        """Newest k frames per view + tail at the frozen query slots `layout.streaming_query_slots(k)`
        under the streaming mask (see StreamingLayout). One graph per k (its slots, mask and shapes)."""
        length = layout.prefill_len
        key = ("stream_prefill", length, k, q_ids.shape[0], tuple(feats.embeds.shape), len(feats.deepstack))

        def build():
            n = self._n_pref(length)
            mask = layout.streaming_mask(n, self.engine.dtype, k).to(self.engine.device)
            return self._lm_stage("stream_prefill", q_ids, feats, q_slots, mask, n, ctx_len)

        return self._run_prefill(self._get(key, build), q_ids, feats)

    def shift(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """cache.shift(src, dst) as a graph (built on the identity dst -> dst: its warm-up changes nothing)."""
        cache = self.engine.cache

        def build():
            return G.StageGraph(lambda src, dst: G.cache_shift(cache, src, dst),
                                {"src": dst.clone(), "dst": dst.clone()}, name="shift")

        self._get(("shift", src.numel()), build)(src=src, dst=dst)

    # ------------------------------------------------------------------ decode
    def decode_step(self, token: int, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed one token at `slot` (keys [0, max_len) read, every slot past `slot` masked) ->
        (logits [1, V] float32, greedy next token [1] with trajectory ids banned). Static outputs."""
        engine, lm, cache, model = self.engine, self._lm, self.engine.cache, self._model
        n = cache.max_len
        banned = self._banned()

        def build():
            def fn(tok, slot):
                h, _ = G.lm_forward(lm, lm.embed_tokens(tok), cache, slot,
                                    G.causal_slot_mask(slot, n, engine.dtype), n)
                logits = model.logits(h[:, -1])
                return logits, G.greedy_token(logits, banned)

            dev = engine.device
            return G.StageGraph(fn, {"tok": torch.full((1, 1), token, dtype=torch.long, device=dev),
                                     "slot": torch.full((1,), slot, dtype=torch.long, device=dev)},
                                name="decode")

        g = self._get(("decode", n), build)
        g.buffers["tok"].fill_(token)  # host scalars: no device->host sync
        g.buffers["slot"].fill_(slot)
        return g()

    # ------------------------------------------------------------------ action
    def action(self, noise: torch.Tensor, n_ctx: int, schedule: FlowSchedule) -> torch.Tensor:
        """The whole flow loop over the expert: noise [K, 64, 2] (drawn by the caller) -> actions [K, 64, 2].

        The 64 action tokens sit at cache slots [n_ctx, n_ctx + 64) (positions there continue the
        prompt's, the contract's action positions); with K > 1 and the batch-1 cache they append
        their own keys instead of writing the slots."""
        engine, cache, model = self.engine, self.engine.cache, self._model
        k, t_len = noise.shape[0], noise.shape[1]
        n = cache.max_len
        if n_ctx + t_len > n and k == cache.batch:
            raise RuntimeError(f"cache of {n} slots has no room for {t_len} action slots after n_ctx = {n_ctx}")
        shared = cache.batch != k

        def build():
            ar = torch.arange(t_len, device=engine.device)

            def fn(noise, n_ctx):
                act_slots = n_ctx + ar
                mask = G.action_mask(n_ctx, act_slots, n, engine.dtype, shared_batch=shared)

                def velocity(x, t):
                    h = G.expert_forward(model.expert, model.action_in_proj(x, t), cache, act_slots, mask, n)
                    return model.action_velocity(h)

                return flow_sample(velocity, noise, schedule)

            return G.StageGraph(fn, {"noise": noise, "n_ctx": torch.tensor(n_ctx, device=engine.device)},
                                name="action")

        g = self._get(("action", tuple(noise.shape), schedule), build)
        g.buffers["n_ctx"].fill_(n_ctx)
        return g(noise=noise)
