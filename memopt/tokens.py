"""Token elimination (LeMo): which blocks of tokens a layer's attention keeps.

Note [Contextual token sparsity]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
In long contexts many tokens receive little attention in a given layer; LeMo drops them from that layer's
attention sublayer (they pass through on the residual stream), so their activations there are never
stored. What to keep is decided per step and layer, without gradients, by a scorer cheap beside attention:

- tokens are grouped in blocks of ``block_size`` (the last block may be partial); queries and keys are
  mean-pooled per block, per head;
- a query block's affinity to a key block is the pooled product ``q̄ · k̄ * scale``, its positive part
  only, over causal pairs (key block ≤ query block); a key block's score is the affinity it receives,
  summed over query blocks and heads;
- the top ``ceil(keep_ratio * blocks)`` blocks are kept, always with the first (attention sinks) and the
  last (the newest tokens, and the partial block, so the kept count is static), sorted so that the kept
  tokens stay in order and a causal mask among them is the original one restricted to them.

:func:`attention_mass` is the exact quantity the scorer stands for (softmax attention received per key
block), for measuring the scorer's recall.
"""

from __future__ import annotations

import fractions
import math

import torch

__all__ = ["attention_mass", "block_recall", "block_scores", "gather_tokens", "kept_blocks", "kept_count",
           "kept_positions", "mass_coverage", "pooled_scores", "scatter_tokens", "select_tokens"]


def _blocks(seq: int, block_size: int) -> int:
    return -(-seq // block_size)


def _pooled(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """(..., S, D) -> (..., blocks, D): the mean over each block's tokens (the last block's own count)."""
    seq = x.shape[-2]
    blocks = _blocks(seq, block_size)
    # cat, not pad: constant_pad_nd has no fake kernel for a symbolic length.
    padded = torch.cat([x, x.new_zeros(*x.shape[:-2], blocks * block_size - seq, x.shape[-1])], -2)
    sums = padded.unflatten(-2, (blocks, block_size)).sum(-2)
    return torch.cat([sums[..., :-1, :] / block_size, sums[..., -1:, :] / (seq - (blocks - 1) * block_size)], -2)


def _grouped(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``k`` with its heads repeated to ``q``'s (grouped-query attention)."""
    if k.shape[1] == q.shape[1]:
        return k
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} are not a multiple of key heads {k.shape[1]}")
    return k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)


@torch.no_grad()
def block_scores(q: torch.Tensor, k: torch.Tensor, block_size: int, scale: float | None = None) -> torch.Tensor:
    """(B, blocks): the positive pooled affinity each key block receives (Note [Contextual token sparsity]).
    ``q`` (B, Hq, S, D), ``k`` (B, Hk, S, D)."""
    qb, kb = _pooled(q.float(), block_size), _pooled(_grouped(q, k).float(), block_size)
    return _received(qb, kb, 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)


def _received(qb: torch.Tensor, kb: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, blocks): per key block, the positive part of the pooled products ``qb . kb * scale`` over causal
    block pairs, summed over query blocks and heads; ``qb``, ``kb`` (B, H, blocks, D)."""
    affinity = (qb @ kb.transpose(-1, -2) * scale).clamp_min(0)          # (B, H, query block, key block)
    blocks = qb.shape[2]
    causal = torch.ones(blocks, blocks, dtype=torch.bool, device=qb.device).tril()
    return affinity.masked_fill(~causal, 0).sum(dim=(1, 2))


def kept_count(blocks: int, keep_ratio: float) -> int:
    """Blocks kept of ``blocks``: ``ceil(keep_ratio * blocks)``, at least the first and the last. The
    ratio is taken as the nearest fraction of denominator 10^6 or less (0.4 as 2/5, not 0.4000000000000000222),
    so the count is integer arithmetic: exact, and an expression without a guard when ``blocks`` is
    symbolic (a SymInt)."""
    ratio = fractions.Fraction(keep_ratio).limit_denominator(10**6)
    return torch.sym_min(blocks, torch.sym_max(2, -(-(ratio.numerator * blocks) // ratio.denominator)))


@torch.no_grad()
def kept_blocks(scores: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """(B, kept) block indices, sorted: the best-scored blocks, the first and the last always among them."""
    blocks = scores.shape[1]
    count = kept_count(blocks, keep_ratio)
    forced = scores.clone()
    forced[:, 0] = forced[:, -1] = float("inf")
    return forced.topk(count, dim=1).indices.sort(dim=1).values


def kept_positions(blocks: torch.Tensor, block_size: int, seq: int) -> torch.Tensor:
    """(B, tokens) token positions of the kept blocks, in order; the last block may be partial."""
    offsets = torch.arange(block_size, device=blocks.device)
    positions = (blocks[..., None] * block_size + offsets).flatten(1)
    tail = _blocks(seq, block_size) * block_size - seq          # positions past the sequence, all at the end
    return positions.narrow(1, 0, positions.shape[1] - tail)


@torch.no_grad()
def attention_mass(q: torch.Tensor, k: torch.Tensor, block_size: int, scale: float | None = None) -> torch.Tensor:
    """(B, blocks): causal softmax attention received by each key block, summed over queries and heads."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = q.float() @ _grouped(q, k).float().transpose(-1, -2) * scale
    seq = q.shape[2]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=q.device).tril()
    probs = logits.masked_fill(~causal, float("-inf")).softmax(-1).sum(dim=(1, 2))     # (B, S) per key
    blocks = _blocks(seq, block_size)
    return torch.nn.functional.pad(probs, (0, blocks * block_size - seq)).unflatten(1, (blocks, block_size)).sum(2)


def block_recall(scores: torch.Tensor, exact: torch.Tensor, keep_ratio: float) -> float:
    """Share of the blocks the exact attention mass would keep that ``scores`` keeps too (mean over the
    batch), both with the first and last block forced in."""
    chosen, truth = kept_blocks(scores, keep_ratio), kept_blocks(exact, keep_ratio)
    hits = [len(set(a.tolist()) & set(b.tolist())) / b.numel() for a, b in zip(chosen, truth)]
    return sum(hits) / len(hits)


def mass_coverage(scores: torch.Tensor, exact: torch.Tensor, keep_ratio: float) -> float:
    """The attention mass the blocks ``scores`` keeps receive, over the most any choice of as many blocks
    (the first and last among them) could receive (mean over the batch). Unlike :func:`block_recall` it
    does not count a swap between blocks of nearly equal mass as a miss."""
    chosen, truth = kept_blocks(scores, keep_ratio), kept_blocks(exact, keep_ratio)
    shares = exact.gather(1, chosen).sum(1) / exact.gather(1, truth).sum(1)
    return float(shares.mean())


# --------------------------------------------------------------------------------------------------------
# In the graph: what the eliminate_tokens pass calls (traced by AOTAutograd like any other function)
# --------------------------------------------------------------------------------------------------------


def pooled_scores(hidden: torch.Tensor, wq: torch.Tensor, bq: torch.Tensor | None, wk: torch.Tensor,
                  bk: torch.Tensor | None, heads: int, kv_heads: int, block_size: int) -> torch.Tensor:
    """(B, blocks): :func:`block_scores` of a sublayer's input ``hidden`` (B, S, H), without gradients,
    through the sublayer's own query and key projections: blocks are mean-pooled before the projections
    (a linear commutes with the mean), and rotary positions are left out."""
    batch = hidden.shape[0]
    pooled = _pooled(hidden.detach(), block_size)
    q = torch.nn.functional.linear(pooled, wq.detach(), None if bq is None else bq.detach())
    k = torch.nn.functional.linear(pooled, wk.detach(), None if bk is None else bk.detach())
    q = q.view(batch, pooled.shape[1], heads, -1).transpose(1, 2)
    k = k.view(batch, pooled.shape[1], kv_heads, -1).transpose(1, 2)
    return _received(q, _grouped(q, k), 1.0 / math.sqrt(q.shape[-1]))


def select_tokens(hidden: torch.Tensor, wq: torch.Tensor, bq: torch.Tensor | None, wk: torch.Tensor,
                  bk: torch.Tensor | None, heads: int, kv_heads: int, block_size: int, keep_ratio: float,
                  ) -> torch.Tensor:
    """(B, K) positions of the tokens a sublayer keeps, by :func:`pooled_scores` (Note [Contextual token
    sparsity]). K is fixed by the length, not the data: ``kept_count`` blocks, the last one partial."""
    scores = pooled_scores(hidden, wq, bq, wk, bk, heads, kv_heads, block_size)
    return kept_positions(kept_blocks(scores, keep_ratio), block_size, hidden.shape[1])


def gather_tokens(x: torch.Tensor, positions: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """``x`` at ``positions`` (B, K) along each of ``dims`` (x's batch dimension 0 is 1 or B)."""
    batch = positions.shape[0]
    x = x.expand(batch, *x.shape[1:])
    for dim in dims:
        shape = [1] * x.dim()
        shape[0], shape[dim] = batch, positions.shape[1]
        index = positions.view(shape).expand(*[positions.shape[1] if d == dim else s for d, s in enumerate(x.shape)])
        x = torch.gather(x, dim, index)
    return x


def scatter_tokens(residual: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``residual`` (B, S, H) with ``rows`` (B, K, H) added at ``positions``; the other tokens unchanged."""
    return residual.scatter_add(1, positions[..., None].expand(-1, -1, residual.shape[2]), rows)
