"""Next-token choice during reasoning decode (alpamayo.md §6).

Greedy (temperature 0) or temperature + top-p sampling. The discrete trajectory ids
[traj_start, traj_start + traj_vocab_size) are never emitted: they are set to -inf. As in the
reference (transformers 4.57.1 runs its custom logits processor after the warpers), the top-p
nucleus is computed on the unmasked distribution and the mask is applied afterwards.

Public API
----------
top_p_filter(logits [B, V], top_p) -> logits with the tail outside the nucleus set to -inf
nucleus(probs [B, V], top_p) -> (p, ids, keep) candidates of the nucleus (fast path used for sampling)
choose_next_token(logits [B, V], traj_start, traj_vocab_size=4000, temperature=0.0, top_p=1.0,
                  generator=None) -> LongTensor [B]
"""

from __future__ import annotations

import torch


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability mass reaches top_p (>= 1 token)."""
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_p == 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # Ascending order: drop tokens whose cumulative mass (from the least likely) is <= 1 - top_p.
    drop_sorted = cum <= (1.0 - top_p)
    drop_sorted[..., -1] = False  # always keep the most likely token
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def _mask_trajectory(logits: torch.Tensor, traj_start: int, traj_vocab_size: int) -> torch.Tensor:
    vocab = logits.shape[-1]
    if traj_start < 0 or traj_start + traj_vocab_size > vocab:
        raise ValueError(f"trajectory ids [{traj_start}, {traj_start + traj_vocab_size}) exceed vocab {vocab}")
    masked = logits.clone()
    masked[..., traj_start:traj_start + traj_vocab_size] = float("-inf")
    return masked


def nucleus(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-p nucleus without sorting the whole vocabulary.

    probs [B, V] -> (p [B, k], ids [B, k], keep [B, k] bool), candidates in descending probability.
    A token is kept iff the mass of the more likely tokens is < top_p (the most likely always is);
    this is the same set as top_p_filter. Candidates come from topk, grown until their mass reaches
    top_p, so a peaked distribution costs a topk of a few hundred instead of a full sort.
    """
    vocab = probs.shape[-1]
    k = min(vocab, 256)
    while True:
        vals, ids = probs.topk(k, dim=-1)
        if k == vocab or bool((vals.sum(dim=-1) >= top_p).all()):
            break
        k = min(vocab, k * 8)
    before = vals.cumsum(dim=-1) - vals
    keep = before < top_p
    keep[..., 0] = True
    return vals, ids, keep


def choose_next_token(logits: torch.Tensor, traj_start: int, traj_vocab_size: int = 4000,
                      temperature: float = 0.0, top_p: float = 1.0,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row of logits [B, V] (any float dtype), never a trajectory id.

    temperature 0 -> argmax. Otherwise softmax(logits / temperature) restricted to the top-p
    nucleus, trajectory ids masked, sampled with `generator` (seeded torch.Generator on the logits'
    device) for reproducibility. If the nucleus holds only trajectory ids, the most likely
    non-trajectory token is taken.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    traj_end = traj_start + traj_vocab_size
    if traj_start < 0 or traj_end > logits.shape[-1]:
        raise ValueError(f"trajectory ids [{traj_start}, {traj_end}) exceed vocab {logits.shape[-1]}")
    logits = logits.float()
    if temperature == 0.0:
        return _mask_trajectory(logits, traj_start, traj_vocab_size).argmax(dim=-1)

    probs = (logits / temperature).softmax(dim=-1)
    vals, ids, keep = nucleus(probs, top_p)
    # The trajectory mask comes after top-p: masked candidates leave the nucleus, which is not refilled.
    keep &= (ids < traj_start) | (ids >= traj_end)
    weights = torch.where(keep, vals, torch.zeros_like(vals))
    empty = ~keep.any(dim=-1)
    if bool(empty.any()):
        fallback = _mask_trajectory(logits, traj_start, traj_vocab_size).argmax(dim=-1)
        weights[empty] = 0.0
        weights[empty, 0] = 1.0
        ids = ids.clone()
        ids[empty, 0] = fallback[empty]
    # Sampling among the candidates in proportion to p equals sampling softmax of the masked logits.
    choice = torch.multinomial(weights, 1, generator=generator)
    return ids.gather(-1, choice).squeeze(-1)
