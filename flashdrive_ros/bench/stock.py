"""The stock transformers pipeline at a named shape: what users of Alpamayo 1.5 run today.

Qwen3VLForConditionalGeneration forward (vision tower inside it, DynamicCache, eager PyTorch + SDPA),
greedy decode one token per forward, then the action expert as a transformers Qwen3VLTextModel
(no embeddings) attending to the same DynamicCache: per flow step it appends its 64 K/V with a 4-D
additive mask and crops them again (the NVlabs/alpamayo1.5 loop, alpamayo.md §7, §9). Weights are
random and created directly on the target device (timing only).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLTextConfig, Qwen3VLTextModel
from transformers.cache_utils import DynamicCache

from ..engine.config import AlpamayoConfig, TextConfig
from .shapes import FLOW_STEPS, Shape, Workload
from .timing import Clock


def _text_config_dict(t: TextConfig, vocab_size: int) -> dict:
    return dict(vocab_size=vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                num_key_value_heads=t.num_key_value_heads, head_dim=t.head_dim, hidden_act=t.hidden_act,
                rms_norm_eps=t.rms_norm_eps, attention_bias=t.attention_bias,
                max_position_embeddings=t.max_position_embeddings,
                rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta,
                                 "mrope_section": list(t.mrope_section), "mrope_interleaved": t.mrope_interleaved})


def hf_vlm_config(cfg: AlpamayoConfig) -> Qwen3VLConfig:
    v = cfg.vision
    vision = dict(depth=v.depth, hidden_size=v.hidden_size, hidden_act=v.hidden_act,
                  intermediate_size=v.intermediate_size, num_heads=v.num_heads, in_channels=v.in_channels,
                  patch_size=v.patch_size, spatial_merge_size=v.spatial_merge_size,
                  temporal_patch_size=v.temporal_patch_size, out_hidden_size=v.out_hidden_size,
                  num_position_embeddings=v.num_position_embeddings,
                  deepstack_visual_indexes=list(v.deepstack_visual_indexes))
    qc = Qwen3VLConfig(text_config=_text_config_dict(cfg.text, cfg.vocab_size), vision_config=vision,
                       image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
                       vision_start_token_id=cfg.vision_start_token_id, vision_end_token_id=cfg.vision_end_token_id,
                       tie_word_embeddings=False)
    qc._attn_implementation = "sdpa"
    return qc


def hf_expert_config(cfg: AlpamayoConfig) -> Qwen3VLTextConfig:
    # vocab 1: the expert has no embeddings (deleted after construction, as the reference does).
    ec = Qwen3VLTextConfig(**_text_config_dict(cfg.expert_text_config(), 1))
    ec._attn_implementation = "sdpa"
    return ec


class StockActionInProj(nn.Module):
    """PerWaypointActionInProjV2 shape (alpamayo.md §8): Fourier(accel, curvature, t) -> MLP trunk -> LayerNorm."""

    def __init__(self, cfg: AlpamayoConfig):
        super().__init__()
        a = cfg.action_in_proj
        self.n_freq = a.num_fourier_feats // 2
        self.register_buffer("freqs", torch.logspace(0, math.log10(a.max_freq), self.n_freq), persistent=False)
        layers: list[nn.Module] = [nn.Linear(a.input_features, a.hidden_size), nn.SiLU(), nn.RMSNorm(a.hidden_size, eps=1e-5)]
        for _ in range(a.num_enc_layers - 1):
            layers += [nn.Linear(a.hidden_size, a.hidden_size), nn.SiLU(), nn.RMSNorm(a.hidden_size, eps=1e-5)]
        layers.append(nn.Linear(a.hidden_size, cfg.expert.hidden_size))
        self.trunk = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(cfg.expert.hidden_size)

    def fourier(self, x: torch.Tensor) -> torch.Tensor:
        ang = 2 * math.pi * x[..., None].float() * self.freqs
        return math.sqrt(2) * torch.cat([ang.sin(), ang.cos()], dim=-1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x [K, 64, 2] normalised action, t [K] flow time -> [K, 64, expert hidden]."""
        tt = t.view(-1, 1).expand(-1, x.shape[1])
        feats = torch.cat([self.fourier(x[..., 0]), self.fourier(x[..., 1]), self.fourier(tt)], dim=-1)
        w = self.trunk[0].weight
        return self.norm(self.trunk(feats.to(w.dtype)))


def _randomize_(module: nn.Module, std: float = 0.02) -> None:
    """Fresh random weights (never zeros: they can time faster than real data); norms at 1."""
    g = torch.Generator(device=next(module.parameters()).device).manual_seed(0)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 1 and ("norm" in name or name.endswith("ln_q.weight")):
                p.fill_(1.0)
            elif p.dim() == 1:
                p.normal_(0.0, std, generator=g)
            else:
                p.normal_(0.0, std, generator=g)


class StockPipeline:
    """Holds the transformers modules and runs one timed window (baseline: full re-encode + prefill)."""

    def __init__(self, shape: Shape, device: torch.device, dtype: torch.dtype):
        self.shape, self.device, self.dtype = shape, torch.device(device), dtype
        cfg = shape.cfg
        with torch.device(self.device):
            self.vlm = Qwen3VLForConditionalGeneration._from_config(hf_vlm_config(cfg), dtype=dtype).eval()
            self.expert = Qwen3VLTextModel._from_config(hf_expert_config(cfg), dtype=dtype).eval()
            del self.expert.embed_tokens
            self.action_in_proj = StockActionInProj(cfg).to(dtype).eval()
            self.action_out_proj = nn.Linear(cfg.expert.hidden_size, 2).to(dtype).eval()
        for m in (self.vlm, self.expert, self.action_in_proj, self.action_out_proj):
            _randomize_(m)
            m.requires_grad_(False)
        self.traj_lo, self.traj_hi = cfg.traj_token_start_idx, cfg.special_token_start_idx

    def parameter_count(self) -> int:
        return sum(p.numel() for m in (self.vlm, self.expert, self.action_in_proj, self.action_out_proj)
                   for p in m.parameters())

    def _greedy(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits[:, -1].float()
        logits[:, self.traj_lo:self.traj_hi] = float("-inf")  # trajectory ids are never sampled in text
        return logits.argmax(-1, keepdim=True)

    @torch.no_grad()
    def step(self, w: Workload, clock: Clock, n_decode: int | None = None, flow_steps: int = FLOW_STEPS,
             seed: int = 0) -> dict[str, float]:
        shape = self.shape
        n_decode = shape.decode_tokens if n_decode is None else n_decode
        ids = w.input_ids[None]
        mm_types = (ids == shape.cfg.image_token_id).int()
        marks: dict[str, object] = {}
        visual = self.vlm.model.visual

        def mark(key: str):
            def hook(*_):  # must return None (a pre-hook's return value replaces the inputs)
                marks.setdefault(key, clock.mark())
            return hook

        h1 = visual.register_forward_pre_hook(mark("enc0"))
        h2 = visual.register_forward_hook(mark("enc1"))
        try:
            self.vlm.model.rope_deltas = None
            cache = DynamicCache()
            t0 = clock.mark()
            out = self.vlm(input_ids=ids, pixel_values=w.pixel_values, image_grid_thw=w.image_grid_thw,
                           mm_token_type_ids=mm_types, past_key_values=cache, use_cache=True, logits_to_keep=1)
            tok = self._greedy(out.logits)
            t1 = clock.mark()
        finally:
            h1.remove()
            h2.remove()
        for _ in range(n_decode):
            out = self.vlm(input_ids=tok, past_key_values=cache, use_cache=True, logits_to_keep=1)
            tok = self._greedy(out.logits)
        t2 = clock.mark()
        # Action: flow matching over the cache (prompt + decoded tokens). Positions continue the
        # M-RoPE sequence: cache length + rope_deltas, equal on all three axes.
        n_ctx = cache.get_seq_length()
        n_act = shape.cfg.action_space.n_waypoints
        start = n_ctx + int(self.vlm.model.rope_deltas.flatten()[0])
        pos = torch.arange(start, start + n_act, device=self.device).view(1, 1, -1).expand(3, 1, -1)
        mask = torch.zeros(1, 1, n_act, n_ctx + n_act, dtype=self.dtype, device=self.device)
        g = torch.Generator(device=self.device).manual_seed(seed)
        x = torch.randn(1, n_act, 2, generator=g, device=self.device)
        dt = 1.0 / flow_steps
        for i in range(flow_steps):
            t = torch.full((1,), i * dt, device=self.device)
            emb = self.action_in_proj(x, t)
            hid = self.expert(inputs_embeds=emb, position_ids=pos, past_key_values=cache, attention_mask=mask,
                              use_cache=True).last_hidden_state
            cache.crop(-n_act)
            x = x + dt * self.action_out_proj(hid[:, -n_act:]).float()
        t3 = clock.mark()
        clock.sync()
        enc = clock.ms(marks["enc0"], marks["enc1"])
        res = {"encode": enc, "prefill": clock.ms(t0, t1) - enc, "decode": clock.ms(t1, t2),
               "action": clock.ms(t2, t3), "total": clock.ms(t0, t3)}
        self.last_action = x
        return res
