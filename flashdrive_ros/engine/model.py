"""AlpamayoModel: every weight of the checkpoint, under the checkpoint's own key names.

    vlm.model.visual.*            Qwen3-VL vision tower (+ merger, deepstack mergers)
    vlm.model.language_model.*    text decoder (embed_tokens, layers, norm)
    vlm.lm_head.weight            untied output head [vocab, H]
    expert.layers.N.*, expert.norm.weight
    action_in_proj.*              Fourier features + MLP trunk (engine/action_proj.py)
    action_out_proj.{weight,bias} Linear(expert hidden -> 2)

The pipelines (engine.py) drive the pieces directly; this class only holds them and offers the
small conveniences embed / encode_images / logits.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ACTION_DIM, AlpamayoConfig
from .expert import Expert
from .text_model import TextModel
from .vision import ImageFeatures, build_vision_tower, encode_images


class _VLMCore(nn.Module):
    """`vlm.model`: vision tower + language model (names as in Qwen3VLModel)."""

    def __init__(self, cfg: AlpamayoConfig):
        super().__init__()
        self.visual = build_vision_tower(cfg.vision, "sdpa")
        self.language_model = TextModel(cfg.text)


class _VLM(nn.Module):
    """`vlm`: Qwen3VLForConditionalGeneration's layout (model + lm_head)."""

    def __init__(self, cfg: AlpamayoConfig):
        super().__init__()
        self.model = _VLMCore(cfg)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)


class AlpamayoModel(nn.Module):
    def __init__(self, cfg: AlpamayoConfig):
        super().__init__()
        # Imported here so the model core can be built and tested while action_proj.py evolves.
        from .action_proj import ActionInProj

        cfg.validate()
        self.cfg = cfg
        self.vlm = _VLM(cfg)
        self.expert = Expert(cfg.expert_text_config())
        self.action_in_proj = ActionInProj(cfg.expert.hidden_size, cfg.action_in_proj)
        self.action_out_proj = nn.Linear(cfg.expert.hidden_size, ACTION_DIM, bias=True)

    def computed_buffers(self) -> dict[str, torch.Tensor]:
        """Fresh values of every non-persistent buffer (not stored in checkpoints), computed on CPU
        by building the small modules that own them. The loader uses this after a meta-device
        build; the owners are cheap (RoPE tables, Fourier frequencies)."""
        from .action_proj import ActionInProj

        with torch.device("cpu"):
            owners = {
                "vlm.model.visual.rotary_pos_emb": type(self.visual.rotary_pos_emb)(self.visual.config),
                "action_in_proj": ActionInProj(self.cfg.expert.hidden_size, self.cfg.action_in_proj),
            }
        return {f"{prefix}.{name}": buf for prefix, owner in owners.items()
                for name, buf in owner.named_buffers()}

    # ---- shortcuts to the parts the pipelines drive ------------------------------------------
    @property
    def visual(self) -> nn.Module:
        return self.vlm.model.visual

    @property
    def language_model(self) -> TextModel:
        return self.vlm.model.language_model

    @property
    def dtype(self) -> torch.dtype:
        return self.vlm.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.vlm.lm_head.weight.device

    # ---- conveniences -----------------------------------------------------------------------
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [...] -> embeddings [..., H]."""
        vocab = self.cfg.text.vocab_size
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise ValueError(f"token ids must be in [0, {vocab}), got min {int(ids.min())} max {int(ids.max())}")
        return self.language_model.embed_tokens(ids)

    def encode_images(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> ImageFeatures:
        """Patches [N, 3*2*p*p] + grid_thw [n_images, 3] -> merged embeds + deepstack features."""
        return encode_images(self.visual, pixel_values, grid_thw)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states [..., H] -> logits [..., vocab] (float32 for stable sampling)."""
        return self.vlm.lm_head(hidden).float()

    def action_velocity(self, expert_hidden: torch.Tensor) -> torch.Tensor:
        """Expert output [K, 64, He] -> flow velocity [K, 64, 2] (float32)."""
        return self.action_out_proj(expert_hidden).float()
