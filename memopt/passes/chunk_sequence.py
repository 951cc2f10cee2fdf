"""chunk_sequence (model graph, exact): position-wise sublayers run a slice of the sequence at a time.

Note [Chunked position-wise sublayers]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
An MLP treats every token alone, and its intermediates are wider than its input (Llama: gate, up, their
activation and product, each ``tokens x 2.7 hidden``); the backward reads them all, so the whole
sequence's worth is saved at once. Mini-Sequence Transformer runs the MLP over slices of the sequence
and recomputes each slice's intermediates in the backward: what is saved is the MLP's input, and only
one slice's intermediates exist at a time, in the forward and in the backward.

The pass finds the sublayer as a *position-wise region*: from a value ``x`` that a linear reads, the
nodes that depend on ``x`` through ops that act on each token alone (linears, matmuls by a weight,
elementwise ops, dtype casts, memopt's quantized matmuls), whose other operands depend on no token
(weights, scalars), and which keep ``x``'s leading dimensions. The region is chunked when it has one
output, read outside it, at least two matmuls, and an intermediate wider than its input and output:
an MLP, with or without adapters. Not attention's q/k/v projections (three outputs), nor the LM head
(one matmul; Note [Chunked LM head]), nor an output projection with a LoRA adapter (position-wise, but
nothing in it is wider than its ends: nothing to gain).

``x`` is split along its token dimension (the one before the last), the region is copied once per
slice, and the slices' outputs are concatenated. Every copied node is tagged ``MUST_RECOMPUTE`` with one
``ac_graph_id`` per slice (the tags torch's activation checkpointing writes, which AOTAutograd carries
onto the joint graph's nodes and its partitioner honours), so the backward recomputes a slice's
intermediates right before it needs them and saves none. The values are the unchunked graph's: every
op is per token, so each slice computes exactly the rows it would have.

Note [Chunked LM head]
~~~~~~~~~~~~~~~~~~~~~~
The LM head with its cross-entropy is position-wise too, but its region ends in a loss summed over the
tokens, and what it saves is vocabulary-sized: the logits' fp32 copy and log-probabilities, then in the
backward their gradients, ``tokens x 128k`` each. Copying it per slice, as the MLP is, would leave the
sum and the logits the graph returns whole. So the head and its cross-entropy (found by
:mod:`memopt.passes.loss_head`) become one op, ``memopt::linear_cross_entropy`` (Note [Linear
cross-entropy]), which runs slices of at most ``tokens / chunks`` tokens and 256 MiB of fp32 logits and
saves each token's log-sum-exp only. The logits the model returns to its caller are another matter: they
are a graph output, made whole whatever the loss does. By default (``logits: "keep"``) the head's matmul
stays in the forward for them (not saved, made once more than before); ``logits: "drop"`` returns an
empty tensor in their place, for training loops that read only the loss, which is what makes a
six-figure context fit (the logits of 342K tokens at 128k words are 82 GiB in bf16).

Stats: ``regions`` (sublayers chunked), ``heads`` (LM heads fused), ``head_rows`` (tokens per slice of
the head), ``chunks``, ``tokens``, ``skipped`` (why nothing was chunked).
"""

from __future__ import annotations

import itertools
import operator
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy

from memopt.cost_model.bytes import hint_int
from memopt.passes.attention import LINEAR
from memopt.passes.base import Pass, PassContext, PassResult
from memopt.passes.loss_head import find_loss_heads, replace_loss_head
from memopt.passes.rewrite import fake_result
from memopt.runtime.linear_cross_entropy import slice_rows

_MATMUL = {torch.matmul, operator.matmul}
_ELEMENTWISE = {operator.mul, operator.add, operator.sub, operator.truediv, operator.neg, torch.mul, torch.add,
                torch.sub, torch.div, torch.neg, torch.sigmoid, torch.tanh, torch.relu, F.silu, F.gelu, F.relu,
                F.sigmoid, F.tanh}
_METHODS = {"to", "float", "half", "bfloat16", "type_as", "contiguous", "mul", "add", "sub", "div", "neg",
            "sigmoid", "tanh", "relu"}
_QUANTIZED = {"memopt.nf4_mm", "memopt.nf4_mm_lora", "memopt.int8_mm"}


def _value(node: Any) -> Any:
    return node.meta.get("example_value") if isinstance(node, torch.fx.Node) else None


def _is_matmul(node: torch.fx.Node) -> bool:
    """A linear, a matmul, or one of memopt's quantized matmuls (the only custom ops :func:`_rowwise`
    admits)."""
    return node.target in LINEAR or node.target in _MATMUL or isinstance(node.target, torch._ops.OpOverload)


def _rowwise(node: torch.fx.Node) -> bool:
    """Whether ``node``'s op acts on each token (each row of its first operand) alone."""
    if node.op == "call_method":
        return node.target in _METHODS
    if node.op != "call_function":
        return False
    target = node.target
    if target in LINEAR or target in _MATMUL or target in _ELEMENTWISE:
        return True
    return str(target).rsplit(".", 1)[0] in _QUANTIZED if isinstance(target, torch._ops.OpOverload) else False


def _static(gm: torch.fx.GraphModule, ctx: PassContext) -> set[torch.fx.Node]:
    """Nodes that depend on no token: parameters, buffers, module attributes and what is made of them."""
    static: set[torch.fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            static.add(node)
        elif node.op == "placeholder":
            found = ctx.input_of(node)
            if found is not None and found.kind in ("parameter", "buffer"):
                static.add(node)
        elif node.op in ("call_function", "call_method") and node.all_input_nodes \
                and all(n in static for n in node.all_input_nodes):
            static.add(node)
    return static


def _joins(node: torch.fx.Node, inside: set[torch.fx.Node], static: set[torch.fx.Node],
           leading: tuple[int, ...]) -> bool:
    """Whether ``node`` extends the region: a per-token op on region values and token-free operands (for
    an elementwise op, ones with no leading extent to broadcast over the tokens) that keeps the region's
    leading dimensions."""
    reads = node.all_input_nodes
    value = _value(node)
    if not _rowwise(node) or not any(n in inside for n in reads) or not isinstance(value, torch.Tensor) \
            or tuple(value.shape[:-1]) != leading:
        return False
    weights = [n for n in reads if n not in inside]
    if any(n not in static for n in weights):
        return False
    if _is_matmul(node):
        # Tokens must be the rows of the first operand: ``weight @ x`` would mix them.
        return node.args[0] in inside and sum(n in inside for n in reads) == 1
    return all(_value(n) is None or all(d == 1 for d in _value(n).shape[:-1]) for n in weights)


def _region(x: torch.fx.Node, static: set[torch.fx.Node], claimed: set[torch.fx.Node],
            order: dict[torch.fx.Node, int]) -> list[torch.fx.Node]:
    """The position-wise region grown from ``x`` (Note [Chunked position-wise sublayers]), in graph order;
    the walk ends past the last reader of anything in it."""
    leading = tuple(_value(x).shape[:-1])
    inside: set[torch.fx.Node] = {x}
    region: list[torch.fx.Node] = []
    horizon = max((order[u] for u in x.users), default=-1)
    node = x.next
    while node.op != "output" and order[node] <= horizon:
        if node not in claimed and _joins(node, inside, static, leading):
            inside.add(node)
            region.append(node)
            horizon = max([horizon, *(order[u] for u in node.users)])
        node = node.next
    return region


def _worth_chunking(x: torch.fx.Node, region: list[torch.fx.Node]) -> torch.fx.Node | None:
    """The region's one output if chunking it saves memory (Note [Chunked position-wise sublayers])."""
    inside = set(region)
    outputs = [n for n in region if any(u not in inside for u in n.users)]
    matmuls = sum(1 for n in region if _is_matmul(n))
    if len(outputs) != 1 or matmuls < 2:
        return None
    widest = max(_value(n).shape[-1] for n in region)
    return outputs[0] if widest > max(_value(x).shape[-1], _value(outputs[0]).shape[-1]) else None


def _chunk(gm: torch.fx.GraphModule, x: torch.fx.Node, region: list[torch.fx.Node], out: torch.fx.Node,
           chunks: int, ids: itertools.count) -> None:
    """Replace ``region`` by ``chunks`` copies on slices of ``x`` and a concatenation of their outputs."""
    graph, dim = gm.graph, _value(x).dim() - 2
    pieces = []
    with graph.inserting_before(region[-1].next):
        # ``chunks`` slices whatever the length, so a graph with a symbolic sequence length stays symbolic.
        split = graph.call_function(torch.tensor_split, (x, chunks, dim))
        split.meta["example_value"] = fake_result(split, "example_value")
        for k in range(len(split.meta["example_value"])):
            tag = {"recompute": CheckpointPolicy.MUST_RECOMPUTE, "ac_graph_id": next(ids)}
            copies = {x: graph.call_function(operator.getitem, (split, k))}
            for node in [x, *region]:
                if node is not x:
                    copies[node] = graph.node_copy(node, lambda n: copies.get(n, n))
                copies[node].meta.update(tag)
                copies[node].meta["example_value"] = fake_result(copies[node], "example_value")
            pieces.append(copies[out])
        joined = graph.call_function(torch.cat, (pieces, dim))
        joined.meta.update({k: v for k, v in out.meta.items() if k in ("nn_module_stack", "stack_trace")})
        joined.meta["example_value"] = fake_result(joined, "example_value")
    out.replace_all_uses_with(joined)
    for node in reversed(region):
        graph.erase_node(node)


def _find_mlps(gm: torch.fx.GraphModule, static: set[torch.fx.Node],
               ) -> list[tuple[torch.fx.Node, list[torch.fx.Node], torch.fx.Node]]:
    """Each chunkable sublayer as (its input, its region in graph order, its output)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    claimed: set[torch.fx.Node] = set()
    found = []
    for node in list(gm.graph.nodes):
        if node.target not in LINEAR or not isinstance(x := node.args[0], torch.fx.Node) or x in static \
                or x in claimed or not isinstance(_value(x), torch.Tensor) or _value(x).dim() < 2:
            continue
        region = _region(x, static, claimed, order)
        out = _worth_chunking(x, region)
        if out is not None:
            found.append((x, region, out))
            claimed.update(region)
    return found


def run(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    config = ctx.config.chunk_sequence
    assert config is not None
    static = _static(gm, ctx)
    mlps = _find_mlps(gm, static)
    heads = find_loss_heads(gm, static)
    # The example's length decides (a hint, no guard on a symbolic length): chunked values are exact at any.
    tokens = max([*(hint_int(_value(x).shape[-2]) for x, _, _ in mlps), *(h.sequence for h in heads)], default=0)
    stats: dict[str, Any] = {"regions": 0, "heads": 0, "chunks": config.chunks, "tokens": tokens}
    if not mlps and not heads:
        stats["skipped"] = "no position-wise sublayer (an MLP) and no LM head with a cross-entropy found"
        return PassResult(gm, False, stats)
    if tokens < config.min_tokens:
        stats["skipped"] = f"{tokens} tokens are fewer than min_tokens ({config.min_tokens})"
        return PassResult(gm, False, stats)
    ids = itertools.count(1)
    for x, region, out in mlps:
        _chunk(gm, x, region, out, config.chunks, ids)
    for head in heads:
        replace_loss_head(gm, head, config.chunks, drop_logits=config.logits == "drop")
        stats["head_rows"] = slice_rows(head.rows, int(_value(head.linear).shape[-1]), config.chunks)
    stats["regions"], stats["heads"] = len(mlps), len(heads)
    gm.graph.lint()
    gm.recompile()
    return PassResult(gm, True, stats)


CHUNK_SEQUENCE = Pass("chunk_sequence", "model", run, after=("inject_adapters",), empties_outputs=True,
                      wanted=lambda config: config.chunk_sequence is not None)
