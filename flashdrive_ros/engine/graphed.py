"""DriveEngine's fast path: its stages as lazily built `graphs.StageGraph`s (issue 7).

`GraphedStages(engine)` holds one StageGraph per (stage, shapes) and is what `DriveEngine` calls
instead of its eager modules when `cuda_graphs` is on:

  encode          graphs.vision_forward (equal-size images)            key: pixel shape, grid
  full prefill    graphs.lm_forward over all L prompt slots             key: L
  stream prefill  graphs.lm_forward over the streaming query slots      key: L, k (new frames per view)
  decode step     q = 1: embed -> lm_forward -> logits + greedy token   key: max_len
  action          the whole flow.sample loop over graphs.expert_forward key: K, schedule
  action estimate one flow.one_step_estimate evaluation checking a      key: K, check time
                  drafted action (engine/action_draft.py)
  shift           graphs.cache_shift of the streaming frame slots       key: #slots (differs per k)
  draft           speculative: drafter forward -> proposed block ids    key: max_len, block, context,
                  (over its draft vocabulary when it has one)          draft vocabulary
  verify          speculative: q = block target forward + greedy        key: max_len, block
                  acceptance + every loop-state update, on the device
  close           greedy: the closing <= 3 tokens, one q = 3 pass       key: max_len
  tail            speculative: the same from the loop state on the      key: max_len
                  device; not run when the last block already holds them

Greedy speculative decoding (`speculative_decode`) keeps its loop state in device tensors (`_SpecState`):
anchor, proposed ids, drafter context, start slot, ids emitted so far, accept lengths, done flag.
A pass is two replays, draft then verify; verify ends by packing the state into one small `summary`
tensor, which is the only thing the host reads per pass (one sync: "done?" plus, on the last pass,
the ids and statistics). Passes after `done` would change nothing (every update is gated), so the
first pass can be launched before anyone looked at the prefill's token.

Every graph but encode reads and writes the engine's StaticKVCache tensors in place, so those are
dropped (`invalidate`) whenever the cache is replaced or its position table changes (set_positions makes new
cos/sin tensors); `reset()` keeps them (cache.clear() zeroes in place). Constants a graph needs (masks,
slot indices, image-token rows) are built once at graph-build time and bound in its closure, so they
stay alive and at the same address for the replays.

StageGraph's warm-up runs the stage twice before capture. All stages here are idempotent for equal
inputs (they recompute the same K/V into the same slots) except the shift, whose graph is built on the
identity permutation (dst -> dst) and only then called with the real source slots, and verify, which is
built with the loop state marked done (its warm-up then only writes and re-zeroes scratch slots past
the prompt) and initialised afterwards.

On the CPU (and whenever CUDA graphs are unavailable) StageGraph runs the same functions eagerly on
the same buffers, which is what the CPU tests compare against the eager engine.
"""

from __future__ import annotations

import torch

from dataclasses import dataclass

from . import graphs as G
from .flow import FlowSchedule, one_step_estimate, sample as flow_sample
from .vision import ImageFeatures

TAIL = 3  # closing tokens after a speculative loop: [last generated], [<|cot_end|>], <|traj_future_start|>


def round_up(x: int, m: int = 16) -> int:
    """Key counts are kept multiples of 16 (SDPA's memory-efficient kernel pads unaligned masks per call)."""
    return (x + m - 1) // m * m


class GraphedStages:
    """See the module docstring. `engine` is the owning DriveEngine (model, cache, ids, dtype, device)."""

    def __init__(self, engine):
        self.engine = engine
        self.graphs: dict[tuple, G.StageGraph] = {}
        self.builds = 0  # how many graphs were built (tests / diagnostics)
        self._spec: dict[tuple, _SpecState] = {}  # speculative loop state per (max_len, budget, drafter shape)
        self.speculative_graphs = True  # False: greedy speculative decoding runs the eager loop (tests)
        self.host_reads = 0  # device->host reads made by speculative_decode (diagnostics / tests)

    # ------------------------------------------------------------------ bookkeeping
    def invalidate(self) -> None:
        """Drop every graph that addresses the cache (its tensors were replaced); encode graphs stay.
        The speculative loop state goes too (draft/verify/tail graphs are bound to it)."""
        for key in [k for k in self.graphs if k[0] != "encode"]:
            del self.graphs[key]
        self._spec.clear()

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
        tower = self._model.visual
        # pos_embed's version: in-place weight updates (training) rebuild the precomputed position table
        key = ("encode", tuple(pixels.shape), tuple(grid_cpu.flatten().tolist()), tower.pos_embed.weight._version)

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
                  limit: torch.Tensor, n: int, ctx_len: int, n_draft: int = 0) -> G.StageGraph:
        """A prefill graph: fn(ids, emb, d0, ..) -> (logits of the last row [1, V] float32, drafter context?).
        Row q sees keys < limit[q] (graphs.lm_forward's key_limit). With n_draft > 0 the last n_draft ids
        are a draft block behind the prompt (text rows whatever their ids): the logits are those of the
        last 1 + n_draft rows and the context holds ctx_len prompt rows + the n_draft draft rows."""
        engine, lm, cache = self.engine, self._lm, self.engine.cache
        visual = ids == engine.ids.image_pad
        if n_draft:
            visual[-n_draft:] = False
        vis_idx = visual.nonzero().flatten()
        if vis_idx.numel() != feats.embeds.shape[0]:
            raise RuntimeError(f"prompt has {vis_idx.numel()} image tokens but the encoder produced "
                               f"{feats.embeds.shape[0]}")
        a0 = lm.layers[0].self_attn
        limit = limit.clone()
        mask = None
        if not G.kernels_usable(limit):  # the PyTorch path: the equivalent mask, folded once here
            mask = G.fold_mask(G.limit_mask(limit, n, engine.dtype), a0.n_heads // a0.n_kv).contiguous()
        slots = slots.clone()
        n_deep = len(feats.deepstack)
        layers = engine._capture_layers
        model = self._model

        def fn(ids, emb, **deep):
            x = lm.embed_tokens(ids).index_copy(0, vis_idx, emb.to(engine.dtype))[None]
            ds = [deep[f"d{i}"] for i in range(n_deep)]
            h, cap = G.lm_forward(lm, x, cache, slots, mask, n, vis_idx, ds or None, capture_layers=layers,
                                  mask_folded=True, key_limit=None if mask is not None else limit)
            logits = model.logits(h[0, -1 - n_draft:])
            if not layers:
                return (logits,)
            return logits, torch.cat([cap[i] for i in layers], dim=-1)[:, -ctx_len - n_draft:]

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
            return self._lm_stage("full_prefill", ids, feats, slots, slots + 1, n, ctx_len)

        return self._run_prefill(self._get(key, build), ids, feats)

    def streaming_prefill(self, q_ids: torch.Tensor, feats: ImageFeatures, layout, q_slots: torch.Tensor,
                          ctx_len: int = 0, k: int = 1, draft: torch.Tensor | None = None):
        """Newest k frames per view + tail at the frozen query slots `layout.streaming_query_slots(k)`
        under the streaming mask (see StreamingLayout). One graph per k (its slots, mask and shapes).
        draft [D] (temporal draft block): appended at slots [prefill_len, prefill_len + D), causal; the
        outputs then cover the last prompt row + the D draft rows (see _lm_stage)."""
        length = layout.prefill_len
        n_draft = 0 if draft is None else draft.numel()
        key = ("stream_prefill", length, k, q_ids.shape[0], n_draft, tuple(feats.embeds.shape), len(feats.deepstack))
        ids = q_ids if draft is None else torch.cat([q_ids, draft.to(q_ids.device)])

        def build():
            n = self._n_pref(length + n_draft)
            # row at slot s sees keys <= s and < prefill_len (layout.streaming_mask); draft rows keys <= s
            draft_slots = length + torch.arange(n_draft, device=q_slots.device)
            slots = torch.cat([q_slots, draft_slots])
            limit = torch.cat([(q_slots + 1).clamp(max=length), draft_slots + 1])
            return self._lm_stage("stream_prefill", ids, feats, slots, limit, n, ctx_len, n_draft)

        return self._run_prefill(self._get(key, build), ids, feats)

    def shift(self, src: torch.Tensor, dst: torch.Tensor, waves: tuple[int, ...] | None = None) -> None:
        """cache.shift(src, dst) as a graph (built on the identity dst -> dst: its warm-up changes nothing;
        moving a slot onto itself is safe in any wave order). waves: see graphs.cache_shift; a graph
        per wave plan, so the caller must pass pairs ordered for it (engine._shift does)."""
        cache = self.engine.cache

        def build():
            return G.StageGraph(lambda src, dst: G.cache_shift(cache, src, dst, waves),
                                {"src": dst.clone(), "dst": dst.clone()}, name="shift")

        self._get(("shift", src.numel(), waves), build)(src=src, dst=dst)

    # ------------------------------------------------------------------ decode
    def decode_step(self, token: int, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed one token at `slot` (keys [0, max_len) read, every slot past `slot` masked) ->
        (logits [1, V] float32, greedy next token [1] with trajectory ids banned). Static outputs."""
        engine, lm, cache, model = self.engine, self._lm, self.engine.cache, self._model
        n = cache.max_len
        banned = self._banned()

        def build():
            def fn(tok, slot):
                h, _ = G.lm_forward(lm, lm.embed_tokens(tok), cache, slot, None, n, key_limit=slot + 1)
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

    def close(self, ids: list[int], slot: int) -> None:
        """Feed the closing ids ([last generated] [<|cot_end|>] <|traj_future_start|>, 1 to TAIL of them)
        at slots [slot, slot + len(ids)) in one q = TAIL forward: left-aligned, the padding repeats the
        last id at scratch slots past them (the action slots that follow are rewritten by the expert)."""
        if not 1 <= len(ids) <= TAIL:
            raise ValueError(f"close feeds 1 to {TAIL} ids, got {len(ids)}")
        n, dev = self.engine.cache.max_len, self.engine.device
        ar = torch.arange(TAIL, device=dev)

        def build():
            def fn(ids, slot):
                self._causal_forward(ids, slot + ar)

            return G.StageGraph(fn, {"ids": torch.zeros(TAIL, dtype=torch.long, device=dev),
                                     "slot": torch.full((1,), slot, dtype=torch.long, device=dev)},
                                name="close")

        g = self._get(("close", n), build)
        padded = list(ids) + [ids[-1]] * (TAIL - len(ids))
        for i, tok in enumerate(padded):  # host scalars: no device->host sync
            g.buffers["ids"][i].fill_(tok)
        g.buffers["slot"].fill_(slot)
        g()

    # ------------------------------------------------------------------ action
    def action(self, noise: torch.Tensor, n_ctx: int, schedule: FlowSchedule) -> torch.Tensor:
        """The whole flow loop over the expert: noise [K, 64, 2] (drawn by the caller) -> actions [K, 64, 2].

        The 64 action tokens sit at cache slots [n_ctx, n_ctx + 64) (positions there continue the
        prompt's, the contract's action positions); with K > 1 and the batch-1 cache they append
        their own keys instead of writing the slots."""
        return self._expert_stage(("action", tuple(noise.shape), schedule), n_ctx, {"noise": noise},
                                  lambda velocity, noise: flow_sample(velocity, noise, schedule))

    def action_estimate(self, noise: torch.Tensor, draft: torch.Tensor, n_ctx: int, check_time: float) -> torch.Tensor:
        """One expert evaluation checking a drafted action (engine/action_draft.py): the model's estimate of
        the action from the point at `check_time` of the straight path noise -> draft, [K, 64, 2]."""
        return self._expert_stage(("action_estimate", tuple(noise.shape), float(check_time)), n_ctx,
                                  {"noise": noise, "draft": draft},
                                  lambda velocity, noise, draft: one_step_estimate(velocity, noise, draft, check_time))

    def _expert_stage(self, key: tuple, n_ctx: int, inputs: dict[str, torch.Tensor], body) -> torch.Tensor:
        """A graph of body(velocity, **inputs) where velocity(x, t) runs the expert over the cache's first
        n_ctx slots (one graph per key; n_ctx is a device scalar set per call)."""
        engine, cache, model = self.engine, self.engine.cache, self._model
        noise = inputs["noise"]
        k, t_len = noise.shape[0], noise.shape[1]
        n = cache.max_len
        if n_ctx + t_len > n and k == cache.batch:
            raise RuntimeError(f"cache of {n} slots has no room for {t_len} action slots after n_ctx = {n_ctx}")
        shared = cache.batch != k

        def build():
            ar = torch.arange(t_len, device=engine.device)

            def fn(n_ctx, **bufs):
                act_slots = n_ctx + ar
                # batch-K cache: the action slots follow the context, so rows see keys < n_ctx + T
                mask = G.action_mask(n_ctx, act_slots, n, engine.dtype, shared_batch=True) if shared else None
                limit = None if shared else n_ctx + t_len
                rope = G.action_rope(cache, act_slots, engine.dtype)  # once for all flow evaluations

                def velocity(x, t):
                    h = G.expert_forward(model.expert, G.action_tokens(model.action_in_proj, x, t), cache, act_slots,
                                         mask, n, key_limit=limit, rope=rope)
                    return model.action_velocity(h)

                return body(velocity, **bufs)

            return G.StageGraph(fn, {**inputs, "n_ctx": torch.tensor(n_ctx, device=engine.device)}, name=key[0])

        g = self._get(key, build)
        g.buffers["n_ctx"].fill_(n_ctx)
        return g(**inputs)

    # ------------------------------------------------------------------ speculative (greedy)
    def _causal_forward(self, ids: torch.Tensor, slots: torch.Tensor, capture_layers: tuple[int, ...] = ()):
        """Block ids [Q] at cache slots [Q] (device tensors), row q sees keys <= slots[q], over the fixed
        key window [0, max_len) -> (normed hidden [1, Q, H], captured layers)."""
        lm, cache = self._lm, self.engine.cache
        n = cache.max_len
        return G.lm_forward(lm, lm.embed_tokens(ids)[None], cache, slots, None, n,
                            capture_layers=capture_layers, key_limit=slots + 1)

    def _spec_state(self, max_new: int) -> "_SpecState":
        engine = self.engine
        drafter = engine.drafter
        cfg = drafter.cfg
        vocab = getattr(drafter, "draft_vocab", None)  # the draft graph binds the drafter's head
        key = (engine.cache.max_len, max_new, cfg.block_size, cfg.context_len, len(cfg.target_layers),
               None if vocab is None else (vocab.numel(), vocab.data_ptr()))
        st = self._spec.get(key)
        if st is None:
            st = self._spec[key] = _SpecState.allocate(key, max_new, cfg.block_size, cfg.context_len,
                                                       len(cfg.target_layers) * cfg.hidden_size,
                                                       engine.dtype, engine.device)
        return st

    def _spec_graphs(self, st: "_SpecState", start: int) -> tuple[G.StageGraph, G.StageGraph, G.StageGraph]:
        """The draft, verify and tail graphs bound to `st` (built on first use; verify/tail with the
        state marked done at slot `start`, i.e. warm-ups that only touch scratch slots >= start)."""
        from .speculative import closed_in_block, greedy_accept, place_closing

        engine, model, cache, drafter = self.engine, self._model, self.engine.cache, self.engine.drafter
        cfg = drafter.cfg
        block, n_ctx_rows = cfg.block_size, cfg.context_len
        layers = tuple(cfg.target_layers)
        banned = self._banned()
        cot_end, tfs = engine.ids.cot_end, engine.ids.traj_future_start
        max_new = st.max_new
        dev = engine.device
        bufs = st.buffers()
        shared = tuple(bufs)
        if ("verify",) + st.key not in self.graphs or ("tail",) + st.key not in self.graphs:
            st.done.fill_(True)
            st.cur.fill_(start)

        def build_draft():
            def fn(anchor, ctx, draft, **_):
                # [block - 1, K]: K = V, or the draft vocabulary (its gathered head; ids mapped back)
                logits = drafter.draft_logits(model, anchor, ctx, check_ids=False, fast=True)[0]
                draft.copy_(place_closing(drafter.draft_greedy(logits, banned), cot_end, tfs))

            return G.StageGraph(fn, bufs, shared=shared, name="draft")

        def build_verify():

            ar = torch.arange(block, device=dev)
            ar_ctx = torch.arange(n_ctx_rows, device=dev)

            def fn(anchor, draft, ctx, cur, n_gen, done, pending, closed, passes, acc, tokens, summary, **_):
                live = done.logical_not().long()               # 0: the loop had already ended -> no-op
                slots = cur + ar
                block_ids = torch.cat([anchor, draft])
                h, cap = self._causal_forward(block_ids, slots, layers)
                target = G.greedy_token(model.logits(h[0]), banned)            # [block]
                feats = torch.cat([cap[i][0] for i in layers], dim=-1)         # [block, n*H]
                a, emitted, stop = greedy_accept(draft, target, n_gen, cot_end, max_new)
                emitted = emitted * live
                last = target.gather(0, (emitted - 1).clamp(min=0))
                # the block ended on an accepted <|cot_end|> with <|traj_future_start|> after it: keep that row
                closes = closed_in_block(block_ids, a, emitted, stop, last, cot_end, tfs) & live.bool()
                kept = (1 + torch.minimum(a, emitted) + closes.long()) * live  # rows now in the cache
                pos = n_gen + ar
                tokens[pos] = torch.where(ar < emitted, target, tokens[pos])
                acc[passes] = torch.where(live.bool(), emitted, acc[passes])
                _zero_rejected(cache, slots, ar >= kept)
                ctx.copy_(torch.cat([ctx[0], feats.to(ctx.dtype)]).index_select(0, kept + ar_ctx)[None])
                anchor.copy_(torch.where(live.bool(), last, anchor))
                pending.copy_(torch.where(live.bool(), (emitted == a + 1).long(), pending))
                closed.copy_(torch.where(live.bool(), closes.long(), closed))
                cur.add_(kept)
                n_gen.add_(emitted)
                passes.add_(live)
                done.logical_or_(stop)
                summary.copy_(torch.cat([done.long(), n_gen, cur, pending, passes, closed, acc, tokens]))

            return G.StageGraph(fn, bufs, shared=shared, name="verify")

        def build_tail():
            ar = torch.arange(TAIL, device=dev)
            fixed = torch.tensor([cot_end, tfs], device=dev)

            def fn(anchor, cur, pending, tail, **_):
                # [anchor if its K/V is missing] ++ [<|cot_end|> unless it ended the reasoning] ++ [tfs],
                # left-aligned; padding (tfs) writes scratch slots past n_ctx
                inc = torch.cat([pending.bool(), anchor != cot_end, torch.ones_like(anchor, dtype=torch.bool)])
                vals = torch.cat([anchor, fixed])
                dst = torch.where(inc, inc.long().cumsum(0) - 1, TAIL)
                ids = torch.full((TAIL + 1,), tfs, dtype=torch.long, device=dev).scatter(0, dst, vals)[:TAIL]
                tail.copy_(ids)
                self._causal_forward(ids, cur + ar)

            return G.StageGraph(fn, bufs, shared=shared, name="tail")

        return (self._get(("draft",) + st.key, build_draft), self._get(("verify",) + st.key, build_verify),
                self._get(("tail",) + st.key, build_tail))

    def speculative_decode(self, first_logits: torch.Tensor, context: torch.Tensor, start: int,
                           max_new_tokens: int, first_block: tuple[torch.Tensor, torch.Tensor] | None = None):
        """Greedy draft + verify from slot `start` on graphs -> speculative.SpeculativeResult, the same
        tokens, verify passes and accept lengths as `speculative.speculative_decode` at temperature 0
        (forward_passes counts the closing tokens as the one tail forward they are here).
        first_block: (draft [D], states [1, D, n*H]) that the prefill verified (first_logits [1 + D, V])."""
        from .speculative import SpeculativeResult, first_block_outcome

        engine, cache = self.engine, self.engine.cache
        cfg = engine.drafter.cfg
        block = cfg.block_size
        cot_end = engine.ids.cot_end
        if cache.batch != 1:
            raise ValueError("speculative_decode decodes one chain of causation (cache batch 1)")
        if context.shape[1] < cfg.context_len:
            raise ValueError(f"need {cfg.context_len} context states, got {context.shape[1]}")
        if start + max_new_tokens + block > cache.max_len:
            raise ValueError(f"cache max_len {cache.max_len} < start {start} + max_new_tokens {max_new_tokens} "
                             f"+ block {block}")
        st = self._spec_state(max_new_tokens)
        # graphs built now warm up past the prefill's draft rows (their accepted K/V must survive)
        draft_g, verify_g, tail_g = self._spec_graphs(st, start + (0 if first_block is None else first_block[0].numel()))
        st.tokens.zero_()
        st.acc.zero_()
        st.passes.zero_()
        if first_block is None:
            # initial state (device ops, no sync): the prefill's greedy token is the first anchor
            tok0 = G.greedy_token(first_logits, self._banned()).reshape(1)
            st.anchor.copy_(tok0)
            st.tokens[:1] = tok0
            st.ctx.copy_(context[:, -cfg.context_len:])
            st.cur.fill_(start)
            st.n_gen.fill_(1)
            st.pending.fill_(1)
            st.closed.zero_()
            if max_new_tokens <= 1:
                st.done.fill_(True)
            else:
                st.done.copy_(tok0 == cot_end)
        else:  # the prefill verified a draft block: its outcome is the loop's state (device ops, no sync)
            draft0, states0 = first_block
            d0 = draft0.numel()
            if first_logits.shape[0] != d0 + 1 or start + d0 > cache.max_len:
                raise ValueError(f"first block of {d0} drafts: {first_logits.shape[0]} logits rows, start {start}")
            target = G.greedy_token(first_logits, self._banned()).reshape(-1)  # [D + 1]
            out = first_block_outcome(draft0, target, max_new_tokens, cot_end, engine.ids.traj_future_start)
            ar = torch.arange(d0 + 1, device=target.device)
            st.tokens[:d0 + 1] = torch.where(ar < out["emitted"], target, 0)
            st.anchor.copy_(out["last"])
            both = torch.cat([context[0, -cfg.context_len:], states0[0].to(context.dtype)])
            st.ctx.copy_(both.index_select(0, out["kept"] + torch.arange(cfg.context_len, device=both.device))[None])
            _zero_rejected(cache, start + ar[:d0], ar[:d0] >= out["kept"])
            st.cur.copy_(start + out["kept"])
            st.n_gen.copy_(out["emitted"])
            st.pending.copy_(out["pending"])
            st.closed.copy_(out["closed"].long())
            st.done.copy_(out["stop"])
        for _ in range(max_new_tokens + 1):  # each live pass emits >= 1 token: done within max_new - 1
            draft_g()
            verify_g()
            summary = st.read()
            self.host_reads += 1
            if summary[0]:
                break
        else:
            raise RuntimeError("speculative loop did not finish within max_new_tokens passes")
        n_gen, cur, pending, passes, closed = summary[1:6]
        prefill_tokens = n_gen - sum(summary[6:6 + passes])
        accept_lengths = summary[6:6 + passes]
        generated = summary[6 + st.acc.numel():][:n_gen]
        n_tail = 0
        if not closed:  # the closing ids were not all in the last block: one q = 3 forward feeds them
            tail_g()
            n_tail = int(pending) + 1
        if generated[-1] != cot_end:
            generated.append(cot_end)
            n_tail += 1
        return SpeculativeResult(tokens=generated, num_generated=n_gen, forward_passes=passes + (not closed),
                                 verify_passes=passes, n_ctx=cur + n_tail, accept_lengths=accept_lengths,
                                 prefill_tokens=prefill_tokens)


def _zero_rejected(cache, slots: torch.Tensor, rejected: torch.Tensor) -> None:
    """Zero the K/V of the rejected block rows at `slots` (as cache.clear, without a host sync)."""
    for t in (cache.k, cache.v, cache.k_rot):
        t[:, :, :, slots] = t[:, :, :, slots].masked_fill(rejected[:, None], 0)


@dataclass
class _SpecState:
    """Device tensors of the greedy speculative loop (shared by the draft, verify and tail graphs)."""

    key: tuple
    max_new: int
    anchor: torch.Tensor    # [1] last generated id (not yet in the cache while the loop runs)
    draft: torch.Tensor     # [block - 1] proposed ids
    ctx: torch.Tensor       # [1, context_len, n_layers * H] drafter context (rolling)
    cur: torch.Tensor       # [1] cache slot of the anchor = start of the next block
    n_gen: torch.Tensor     # [1] ids generated so far
    done: torch.Tensor      # [1] bool
    pending: torch.Tensor   # [1] 1: the anchor's K/V is not in the cache (the tail feeds it)
    closed: torch.Tensor    # [1] 1: the last block wrote <|cot_end|><|traj_future_start|> (no tail forward)
    passes: torch.Tensor    # [1] verify passes that emitted tokens
    acc: torch.Tensor       # [max_new + 1] tokens emitted per pass
    tokens: torch.Tensor    # [max_new + block] generated ids
    tail: torch.Tensor      # [3] the ids the tail graph fed (diagnostics)
    summary: torch.Tensor   # [6 + len(acc) + len(tokens)] done, n_gen, cur, pending, passes, closed, acc, tokens
    host: torch.Tensor      # pinned host copy of summary (CUDA)

    @classmethod
    def allocate(cls, key, max_new: int, block: int, context_len: int, ctx_width: int, dtype, device):
        def z(n, dt=torch.long):
            return torch.zeros(n, dtype=dt, device=device)

        acc, tokens = z(max_new + 1), z(max_new + block)
        summary = z(6 + acc.numel() + tokens.numel())
        host = torch.empty(summary.shape, dtype=torch.long, pin_memory=device.type == "cuda")
        return cls(key=key, max_new=max_new, anchor=z(1), draft=z(block - 1),
                   ctx=torch.zeros(1, context_len, ctx_width, dtype=dtype, device=device), cur=z(1), n_gen=z(1),
                   done=z(1, torch.bool), pending=z(1), closed=z(1), passes=z(1), acc=acc, tokens=tokens,
                   tail=z(TAIL),
                   summary=summary, host=host)

    def buffers(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in ("anchor", "draft", "ctx", "cur", "n_gen", "done", "pending",
                                               "closed", "passes", "acc", "tokens", "tail", "summary")}

    def read(self) -> list[int]:
        """The one device->host transfer of a pass (waits for the pass)."""
        if self.summary.device.type == "cuda":
            self.host.copy_(self.summary, non_blocking=True)
            torch.cuda.current_stream().synchronize()
            return self.host.tolist()
        return self.summary.tolist()
