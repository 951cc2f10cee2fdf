"""eliminate_tokens (model graph, lossy): late layers' attention runs on the tokens that matter only.

LeMo's token elimination (Note [Contextual token sparsity] in :mod:`memopt.tokens`) as a rewrite of an
unchanged model's graph. In each attention sublayer from ``start_layer`` on (found and followed as Note
[Following the token dimension] in :mod:`memopt.passes.attention` says):

- ``select_tokens`` scores blocks of the sublayer's input, without gradients, and returns the kept
  positions (B, K): K is fixed by the length (a constant, or with a symbolic length an expression in it,
  which ``memopt plan --max-seq`` re-prices), so no new shape depends on the data;
- the input is gathered at those positions before the q/k/v projections, and so are the tokens of the
  rotary ``cos``/``sin`` and of the mask (both of its last dimensions; a plain causal mask becomes
  ``is_causal``, below);
- every ``view``/``reshape``/``expand`` of the sublayer gets K where it had the sequence length, in the
  dimension that holds the tokens (never by matching sizes);
- ``residual + o_proj(...)`` becomes ``scatter_tokens(residual, positions, o_proj(...))``: eliminated
  tokens pass through on the residual stream.

Under ``codegen="triton"`` the input's gather and the residual's scatter-add are memopt's ops
(:mod:`memopt.runtime.token_rows`), which run memopt's Triton kernels; otherwise they are PyTorch's
``gather`` / ``scatter_add``, which Inductor fuses with their neighbours.

The sublayer's saved activations shrink with K / S, and the schedule sees the smaller step. With
``keep_ratio=1`` every token is kept and the values are those of the model (the test holds them to it).
A model whose attention is not recognised is left as it is, with a warning naming what was not found; a
sequence shorter than two blocks is left as it is, with a note in the stats.

When the mask is the plain causal one (Note [Recognising the causal mask] in :mod:`memopt.passes.masks`;
``drop_causal_masks`` has usually made it ``is_causal`` already), the rewritten sublayer attends with
``is_causal`` instead: the kept tokens are in order, so that is the same mask, and nothing is gathered
or saved for it. A padding mask is gathered.

Stats: ``sublayers``, ``eliminated``, ``kept_tokens``, ``tokens``, ``causal_masks``, ``missed`` /
``skipped``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.fx

from memopt.cost_model.bytes import hint_int
from memopt.errors import MemoptConfigError, MemoptUnsupportedError
from memopt.passes.attention import Sublayer, find_sublayers
from memopt.passes.base import Pass, PassContext, PassResult
from memopt.passes.masks import is_plain_causal
from memopt.passes.rewrite import fake_result, same_size
import memopt.runtime.token_rows  # noqa: F401 - registers memopt::gather_rows and memopt::scatter_add_rows
from memopt.tokens import gather_tokens, kept_count, scatter_tokens, select_tokens

_SHAPED = ("view", "reshape", "expand")


def _shape(node: torch.fx.Node) -> tuple[Any, ...]:
    """Sizes: ints, or SymInts where the sequence length is symbolic (compared by :func:`same_size`)."""
    return tuple(node.meta["example_value"].shape)


def _size(graph: torch.fx.Graph, node: torch.fx.Node, dim: int) -> Any:
    """``node``'s size ``dim`` as a view's argument: the int, or a node that reads it when symbolic."""
    size = _shape(node)[dim]
    return _call(graph, torch.ops.aten.sym_size.int, (node, dim), node) if isinstance(size, torch.SymInt) \
        else int(size)


def _heads(sublayer: Sublayer) -> tuple[int, int]:
    """Query and key heads, from the shapes the attention call reads: (B, heads, S, head_dim)."""
    q, k = sublayer.attention.args[0], sublayer.projections[1]
    assert isinstance(q, torch.fx.Node)
    heads, head_dim = _shape(q)[1], _shape(q)[3]
    return heads, _shape(k)[-1] // head_dim


def _call(graph: torch.fx.Graph, target: Any, args: tuple[Any, ...], like: torch.fx.Node) -> torch.fx.Node:
    node = graph.call_function(target, args)
    node.meta.update({k: v for k, v in like.meta.items() if k not in ("example_value", "val")})
    node.meta["example_value"] = fake_result(node, "example_value")
    return node


def _with_kept(node: torch.fx.Node, dim: int, seq: Any, kept: Any) -> None:
    """Put ``kept`` for ``seq`` in the size argument of a view/reshape/expand at the token dimension (an
    int, or with a symbolic length the graph's node of that size)."""
    sizes = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
    sizes = list(sizes)
    size = sizes[dim].meta.get("example_value") if isinstance(sizes[dim], torch.fx.Node) else sizes[dim]
    if same_size(size, seq):
        sizes[dim] = kept
    node.args = (node.args[0], tuple(sizes)) if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) \
        else (node.args[0], *sizes)


def _hoist(node: Any, before: torch.fx.Node) -> None:
    """Move ``node``, and what it reads, before ``before`` when it comes later: a weight the token selector
    reads that the sublayer makes itself (QLoRA's NF4 weights are dequantized right before their linear)."""
    if not isinstance(node, torch.fx.Node) or node.op == "placeholder":
        return
    for later in before.graph.nodes:            # is ``node`` after ``before``?
        if later is node:
            return
        if later is before:
            break
    for source in node.all_input_nodes:
        _hoist(source, before)
    before.prepend(node)


def _gathered_inputs(gm: torch.fx.GraphModule, sublayer: Sublayer, ratio: float, block: int,
                     causal: set[torch.fx.Node], kernels: bool) -> tuple[torch.fx.Node, dict[torch.fx.Node, Any]]:
    """The kept positions, and what each of the sublayer's token-holding inputs becomes: gathered at
    them, or None for a causal mask (the attention call then takes ``is_causal``)."""
    graph, hidden, (q, k, _) = gm.graph, sublayer.hidden, sublayer.projections
    heads, kv_heads = _heads(sublayer)
    bias = lambda linear: linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")  # noqa: E731
    for weight in (q.args[1], bias(q), k.args[1], bias(k)):
        _hoist(weight, sublayer.region[0])
    with graph.inserting_before(sublayer.region[0]):
        positions = _call(graph, select_tokens, (hidden, q.args[1], bias(q), k.args[1], bias(k), heads, kv_heads,
                                                 block, ratio), hidden)
        gathered = _call(graph, torch.ops.memopt.gather_rows.default, (hidden, positions), hidden) if kernels \
            else _call(graph, gather_tokens, (hidden, positions, (1,)), hidden)
        replaced: dict[torch.fx.Node, Any] = {hidden: gathered}
    mask = sublayer.attention.kwargs.get("attn_mask")
    if isinstance(mask, torch.fx.Node) and mask in causal:
        # Kept tokens stay in order, so the causal mask among them is causal: no mask to gather or save.
        sublayer.attention.kwargs = {**sublayer.attention.kwargs, "attn_mask": None, "is_causal": True}
        replaced[mask] = None
    for node, dims in sublayer.outside.items():
        if node not in replaced:
            # Right before its first reader in the sublayer: after the positions and after the node itself.
            with graph.inserting_before(next(n for n in sublayer.region if node in n.all_input_nodes)):
                replaced[node] = _call(graph, gather_tokens, (node, positions, dims), hidden)
    return positions, replaced


def _eliminate(gm: torch.fx.GraphModule, sublayer: Sublayer, ratio: float, block: int,
               causal: set[torch.fx.Node], kernels: bool) -> int:
    """Rewrite one sublayer to run on the kept tokens (through memopt's kernels if ``kernels``);
    returns how many it keeps."""
    seq = _shape(sublayer.hidden)[1]
    positions, replaced = _gathered_inputs(gm, sublayer, ratio, block, causal, kernels)
    with gm.graph.inserting_after(positions):
        kept = _size(gm.graph, positions, 1)
    for node in sublayer.region:
        node.args = torch.fx.node.map_arg(node.args, lambda a: replaced.get(a, a))
        node.kwargs = torch.fx.node.map_arg(node.kwargs, lambda a: replaced.get(a, a))
        if node.op == "call_method" and node.target in _SHAPED and node in sublayer.dims:
            _with_kept(node, sublayer.dims[node], seq, kept)
        node.meta["example_value"] = fake_result(node, "example_value")
    add = sublayer.residual_add
    residual = next(a for a in add.args if a is not sublayer.output)
    assert isinstance(residual, torch.fx.Node)
    with gm.graph.inserting_before(add):
        scattered = _call(gm.graph, torch.ops.memopt.scatter_add_rows.default,
                          (residual, positions, sublayer.output, _size(gm.graph, residual, 1)), add) if kernels \
            else _call(gm.graph, scatter_tokens, (residual, positions, sublayer.output), add)
    add.replace_all_uses_with(scattered)
    gm.graph.erase_node(add)
    return hint_int(_shape(positions)[1])


def run(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    config = ctx.config.token_elimination
    assert config is not None
    sublayers, missed = find_sublayers(gm)
    if not sublayers:
        message = ("token_elimination: no attention sublayer recognised in this graph, so nothing is eliminated"
                   + (f" ({'; '.join(missed)})" if missed else " (no attention call)"))
        if ctx.config.strict:
            raise MemoptUnsupportedError(message)
        warnings.warn(message, stacklevel=2)
        return PassResult(gm, False, {"sublayers": 0, "missed": missed})
    start = config.start_layer if config.start_layer is not None else len(sublayers) // 2
    if start >= len(sublayers):
        raise MemoptConfigError(
            f"option 'token_elimination.start_layer': got {start}, but this graph has {len(sublayers)} attention "
            f"layers (0 to {len(sublayers) - 1}); give a smaller index, or None for half the layers")
    # The example's length decides (a hint, no guard on a symbolic length: ``memopt plan --max-seq``
    # captures three blocks at least, and asks only lengths the capture's guards admit).
    seq = hint_int(_shape(sublayers[0].hidden)[1])
    blocks = -(-seq // config.block_size)
    stats: dict[str, Any] = {"sublayers": len(sublayers), "tokens": seq, "missed": missed}
    if blocks < 2:
        stats["skipped"] = f"{seq} tokens are fewer than two blocks of {config.block_size}"
        return PassResult(gm, False, stats)
    chosen = sublayers[start:]
    masks = {m for s in chosen if isinstance(m := s.attention.kwargs.get("attn_mask"), torch.fx.Node)
             and m in s.outside}
    causal = {m for m in masks if is_plain_causal(gm, m)}
    stats["causal_masks"] = sum(s.attention.kwargs.get("attn_mask") in causal for s in chosen)
    kernels = ctx.config.codegen == "triton"
    for sublayer in chosen:
        stats["kept_tokens"] = _eliminate(gm, sublayer, config.keep_ratio, config.block_size, causal, kernels)
    stats["eliminated"] = len(chosen)
    stats["kept_blocks"] = kept_count(blocks, config.keep_ratio)
    gm.graph.lint()
    gm.recompile()
    return PassResult(gm, bool(chosen), stats)


ELIMINATE_TOKENS = Pass("eliminate_tokens", "model", run, lossy=True,
                        wanted=lambda config: config.token_elimination is not None)
