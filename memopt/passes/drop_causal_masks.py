"""drop_causal_masks (model graph, exact): attention with a plain causal mask takes ``is_causal`` instead.

Each ``scaled_dot_product_attention`` call whose ``attn_mask`` is the plain causal mask (Note
[Recognising the causal mask] in :mod:`memopt.passes.masks`), over as many keys as queries, is given
``attn_mask=None, is_causal=True``: SDPA computes the same values without reading an ``S x S`` mask, and
the mask, no longer read, is removed with what made it, so nothing of it is made or saved for the
backward. This is what Hugging Face itself does outside ``torch.compile``. Any other mask (padding, a
sliding window, a mask the graph is given) is left as it is.

Stats: ``calls`` (attention calls rewritten), ``kept`` (calls with a mask left as it is).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

from memopt.passes.attention import SDPA
from memopt.passes.base import Pass, PassContext, PassResult
from memopt.passes.masks import is_plain_causal

_ARGUMENTS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _named(node: torch.fx.Node) -> dict[str, Any]:
    """The call's arguments after the query, key and value, by name."""
    return {**dict(zip(_ARGUMENTS[3:], node.args[3:])), **node.kwargs}


def _equal_lengths(node: torch.fx.Node) -> bool:
    """Whether the call has as many keys as queries (where ``is_causal`` and a ``tril`` mask agree)."""
    q, k = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("key")
    values = [a.meta.get("example_value") for a in (q, k) if isinstance(a, torch.fx.Node)]
    shapes = [tuple(v.shape) for v in values if isinstance(v, torch.Tensor)]
    return len(shapes) == 2 and shapes[0][-2] == shapes[1][-2]


def run(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in SDPA]
    decided: dict[torch.fx.Node, bool] = {}
    stats: dict[str, Any] = {"calls": 0, "kept": 0}
    for node in calls:
        named = _named(node)
        mask = named.get("attn_mask")
        if not isinstance(mask, torch.fx.Node):
            continue
        if mask not in decided:
            decided[mask] = is_plain_causal(gm, mask)
        if not decided[mask] or not _equal_lengths(node) or named.get("is_causal") is True:
            stats["kept"] += 1
            continue
        node.args = node.args[:3]
        node.kwargs = {**named, "attn_mask": None, "is_causal": True}
        stats["calls"] += 1
    if stats["calls"]:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, bool(stats["calls"]), stats)


DROP_CAUSAL_MASKS = Pass("drop_causal_masks", "model", run)
