"""Attention sublayers in a model graph, and the token dimension through them (for token elimination).

Note [Following the token dimension]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Dynamo's graph of a Hugging Face decoder bakes the sequence length into the sublayer's shapes
(``linear.view((1, 24, -1, 16))``, ``expand(1, 2, 2, 24, 16)``), and the sequence length may equal another
size (a head dimension of 16 at 16 tokens). To run a sublayer on fewer tokens, a rewrite must know, for
every node of the sublayer, which dimension holds the tokens; sizes alone cannot say. So the dimension is
followed from the sublayer's input (``(B, S, H)``, dimension 1) through each op by that op's own rule:
a linear keeps it; ``transpose`` swaps it; a ``view``/``reshape`` keeps the product of the sizes before it
(tokens are never merged with another dimension in attention); indexing with ``None`` or ints shifts it;
an elementwise op aligns its operands from the right, which also says where an operand from outside the
sublayer (rotary ``cos``/``sin``) holds tokens; ``scaled_dot_product_attention`` keeps the query's, and
its mask holds tokens in its last two dimensions. An op without a rule makes the sublayer unrecognised.

A sublayer is recognised from its attention call: the query, key and value each trace back (nearest
first) to a linear, the three reading one tensor (the normed hidden state), and the first add after the
call whose other operand is the residual stream that tensor was normed from closes it; the operand from
the attention side is the sublayer's output (the output projection, with its adapter when there is one).
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.fx

from memopt.passes.rewrite import same_size

__all__ = ["LINEAR", "SDPA", "Sublayer", "find_sublayers", "token_dims"]

# How a linear and an attention call appear in a model graph (the targets Dynamo records).
LINEAR = {torch._C._nn.linear, torch.nn.functional.linear}
SDPA = {torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention}
_ELEMENTWISE = {operator.mul, operator.add, operator.sub, operator.truediv, operator.neg, torch.mul, torch.add,
                torch.sub, torch.neg}
_SAME = {"contiguous", "to", "float", "type_as", "clone", "neg"}


@dataclasses.dataclass
class Sublayer:
    """One attention sublayer of a model graph."""

    hidden: torch.fx.Node                     # the (B, S, H) tensor the q/k/v projections read
    projections: tuple[torch.fx.Node, ...]    # the q, k, v linears
    attention: torch.fx.Node                  # scaled_dot_product_attention
    output: torch.fx.Node                     # the output projection's linear
    residual_add: torch.fx.Node               # residual + output
    region: list[torch.fx.Node]               # from the projections to the output, in graph order
    dims: dict[torch.fx.Node, int]            # the token dimension of each region node
    outside: dict[torch.fx.Node, tuple[int, ...]]   # inputs from outside that hold tokens (rotary, mask)


def _shape(node: Any) -> tuple[Any, ...] | None:
    """The sizes of ``node``'s value: ints, or SymInts for a symbolic length (compared by :func:`same_size`)."""
    value = node.meta.get("example_value", node.meta.get("val")) if isinstance(node, torch.fx.Node) else None
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _is_linear(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target in LINEAR


def _method(node: torch.fx.Node) -> str | None:
    return str(node.target) if node.op == "call_method" else None


def _producers(node: torch.fx.Node) -> list[torch.fx.Node]:
    return [a for a in node.all_input_nodes]


def _first_linear(start: Any) -> torch.fx.Node | None:
    """The nearest linear ``start`` comes from, walking back breadth-first (an adapter's matmuls reach
    further back through the sublayer's input, so the projection itself is met first)."""
    queue, seen = [start], set()
    while queue:
        node = queue.pop(0)
        if not isinstance(node, torch.fx.Node) or node in seen or node.op == "placeholder":
            continue
        seen.add(node)
        if _is_linear(node):
            return node
        queue.extend(_producers(node))
    return None


def _ancestors(node: torch.fx.Node) -> set[torch.fx.Node]:
    out: set[torch.fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n not in out:
            out.add(n)
            stack.extend(_producers(n))
    return out


def _descendants(node: torch.fx.Node) -> set[torch.fx.Node]:
    out: set[torch.fx.Node] = set()
    stack = list(node.users)
    while stack:
        n = stack.pop()
        if n not in out:
            out.add(n)
            stack.extend(n.users)
    return out


def _residual_add(attention: torch.fx.Node, hidden: torch.fx.Node, order: dict[torch.fx.Node, int],
                  ) -> torch.fx.Node | None:
    """The first add after the attention call whose other operand is the residual stream: a tensor the
    sublayer's input was normed from (an adapter on the output projection adds before it)."""
    after, before = _descendants(attention), _ancestors(hidden)
    for node in sorted(after, key=order.__getitem__):
        if node.op == "call_function" and node.target in (operator.add, torch.add) and len(node.args) == 2:
            a, b = node.args
            if (a in after) != (b in after) and (a if b in after else b) in before:
                return node
    return None


def _region(gm: torch.fx.GraphModule, hidden: torch.fx.Node, output: torch.fx.Node) -> list[torch.fx.Node]:
    """Nodes that depend on ``hidden`` and that ``output`` depends on, in graph order."""
    inside = _ancestors(output) & _descendants(hidden)
    return [n for n in gm.graph.nodes if n in inside]


def find_sublayers(gm: torch.fx.GraphModule) -> tuple[list[Sublayer], list[str]]:
    """The attention sublayers of ``gm`` this module recognises, and why each other attention call was
    not recognised."""
    found, missed = [], []
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in SDPA:
            continue
        projections = [_first_linear(a) for a in node.args[:3]]
        inputs = {p.args[0] for p in projections if p is not None}
        if None in projections or len(inputs) != 1:
            missed.append(f"{node.name}: query, key and value do not come from three linears of one input")
            continue
        (hidden,) = inputs
        assert isinstance(hidden, torch.fx.Node)
        add = _residual_add(node, hidden, order)
        if add is None:
            missed.append(f"{node.name}: its output is not added to the residual stream the input was normed from")
            continue
        output = next(a for a in add.args if isinstance(a, torch.fx.Node) and a not in _ancestors(hidden))
        region = _region(gm, hidden, output)
        try:
            dims, outside = token_dims(hidden, 1, region)
        except ValueError as why:
            missed.append(f"{node.name}: {why}")
            continue
        found.append(Sublayer(hidden, tuple(p for p in projections if p is not None), node, output, add, region,
                              dims, outside))
    return found, missed


def _normal(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


def _view_dim(before: Sequence[Any], dim: int, after: Sequence[Any]) -> int:
    """The dimension of ``after`` holding what dimension ``dim`` of ``before`` held (the sizes before it
    multiply to the same; Note [Following the token dimension])."""
    prefix = math.prod(before[:dim])
    for o in range(len(after)):
        if same_size(after[o], before[dim]) and same_size(math.prod(after[:o]), prefix):
            return o
    raise ValueError(f"a view from {tuple(before)} to {tuple(after)} merges the tokens with another dimension")


def _index_dim(index: Any, dim: int) -> int:
    """The token dimension after ``x[index]`` (``None`` adds a dimension, an int removes one)."""
    items = index if isinstance(index, tuple) else (index,)
    if any(i is Ellipsis for i in items) and items.index(Ellipsis) <= dim:
        rest = items[items.index(Ellipsis) + 1:]
        if any(i is None or isinstance(i, int) for i in rest):
            raise ValueError("indexing after an ellipsis that changes dimensions")
        return dim
    out, position = 0, 0
    for item in items:
        if item is None:
            out += 1
            continue
        if position == dim:
            if not isinstance(item, slice) or item != slice(None):
                raise ValueError("indexing that selects tokens")
            return out
        position += 1
        out += 0 if isinstance(item, int) else 1
    return out + (dim - position)


def _rule(node: torch.fx.Node, dims: dict[torch.fx.Node, int], outside: dict[torch.fx.Node, tuple[int, ...]],
          ) -> int:
    """The token dimension of ``node``'s result, recording outside operands that hold tokens."""
    out = _shape(node)
    if out is None:
        raise ValueError(f"{node.name} has no example value")
    sources = [a for a in node.all_input_nodes if a in dims]
    first = sources[0]
    dim, shape = dims[first], _shape(first)
    assert shape is not None
    method = _method(node)
    if (node.op == "call_function" and node.target in LINEAR) or method in _SAME:
        return dim
    if node.op == "call_function" and node.target in (torch.matmul, operator.matmul) and node.args[0] is first \
            and dim < len(shape) - 1 and node.args[1] not in dims:
        return dim + len(out) - len(shape)      # x @ w: the tokens stay in x's leading dimensions
    if method in ("view", "reshape"):
        return _view_dim(shape, dim, out)
    if method == "transpose":
        a, b = (_normal(int(cast(int, x)), len(shape)) for x in node.args[1:3])
        return b if dim == a else a if dim == b else dim
    if method == "unsqueeze":
        at = _normal(int(cast(int, node.args[1])), len(out))
        return dim + 1 if at <= dim else dim
    if method == "expand":
        return dim + len(out) - len(shape)
    if node.op == "call_function" and node.target is operator.getitem:
        return _index_dim(node.args[1], dim)
    if node.op == "call_function" and node.target is torch.cat:
        return dim
    if node.op == "call_function" and node.target in SDPA:
        mask = node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None)
        if isinstance(mask, torch.fx.Node) and mask not in dims:
            rank = len(_shape(mask) or ())
            outside[mask] = tuple(d for d in (rank - 2, rank - 1) if same_size((_shape(mask) or ())[d], out[dim]))
        query = node.args[0]
        return dims[query] if isinstance(query, torch.fx.Node) and query in dims else dim
    if node.op == "call_function" and node.target in _ELEMENTWISE:
        result = dim + len(out) - len(shape)
        for operand in node.all_input_nodes:
            if operand in dims:
                continue
            other = _shape(operand)
            if other is not None and len(other) >= len(out) - result and \
                    same_size(other[result - (len(out) - len(other))], out[result]):
                outside[operand] = (result - (len(out) - len(other)),)
        return result
    raise ValueError(f"no token-dimension rule for {node.op} {node.target} ({node.name})")


def token_dims(start: torch.fx.Node, dim: int, region: Sequence[torch.fx.Node],
               ) -> tuple[dict[torch.fx.Node, int], dict[torch.fx.Node, tuple[int, ...]]]:
    """The token dimension of every node of ``region`` (in graph order) given ``start``'s, and the
    outside inputs that hold tokens, with their token dimensions (Note [Following the token dimension])."""
    dims: dict[torch.fx.Node, int] = {start: dim}
    outside: dict[torch.fx.Node, tuple[int, ...]] = {}
    for node in region:
        dims[node] = _rule(node, dims, outside)
        shape = _shape(node)
        if shape is None or not same_size(shape[dims[node]], (_shape(start) or ())[dim]):
            raise ValueError(f"{node.name}: dimension {dims[node]} of {shape} should hold the tokens")
    del dims[start]
    return dims, outside
