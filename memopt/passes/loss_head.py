"""The LM head and its cross-entropy, found in a model graph and replaced by ``memopt::linear_cross_entropy``.

Part of :mod:`memopt.passes.chunk_sequence` (Note [Chunked LM head]). Hugging Face's causal-LM loss, as
Dynamo captures it, is::

    logits = linear(hidden, lm_head.weight)          # (B, S, V): returned to the caller as well
    loss = cross_entropy(logits.float().view(-1, V), shift_labels.view(-1), ignore_index=-100)

A head is a ``cross_entropy`` with no class weights, no label smoothing, a ``mean`` or ``sum`` reduction,
whose input is a ``linear`` by a weight that depends on no token, seen through dtype casts and
reshapes to ``(tokens, V)`` only, and whose target has one entry per token.
"""

from __future__ import annotations

import dataclasses
import inspect
import operator
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F

from memopt.cost_model.bytes import hint_int
from memopt.passes.attention import LINEAR
from memopt.passes.rewrite import fake_result

_CROSS_ENTROPY = inspect.signature(F.cross_entropy)
_PASSING = {"float", "to", "view", "reshape", "contiguous", "half", "bfloat16"}   # methods seen through


@dataclasses.dataclass
class LossHead:
    loss: torch.fx.Node            # the cross_entropy call
    linear: torch.fx.Node          # the head
    chain: list[torch.fx.Node]     # casts and reshapes between them, in graph order
    target: torch.fx.Node
    ignore_index: int
    mean: bool

    @property
    def sequence(self) -> int:
        """The head's input's token dimension (the one before the last), as the MLPs' chunks count it."""
        hidden = _value(self.linear.args[0])
        return hint_int(hidden.shape[-2] if hidden.dim() >= 2 else hidden.shape[0])

    @property
    def rows(self) -> int:
        """Tokens of the loss (every row of the flattened logits), in the example."""
        return hint_int(_value(self.target).shape[0])


def _value(node: Any) -> Any:
    return node.meta.get("example_value") if isinstance(node, torch.fx.Node) else None


def _bound(node: torch.fx.Node) -> dict[str, Any] | None:
    try:
        bound = _CROSS_ENTROPY.bind(*node.args, **node.kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    return dict(bound.arguments)


def find_loss_heads(gm: torch.fx.GraphModule, static: set[torch.fx.Node]) -> list[LossHead]:
    """The LM heads with their cross-entropy in ``gm``."""
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not F.cross_entropy:
            continue
        arguments = _bound(node)
        if arguments is None or arguments["weight"] is not None or arguments["label_smoothing"] != 0.0 \
                or arguments["size_average"] is not None or arguments["reduce"] is not None \
                or arguments["reduction"] not in ("mean", "sum") or not isinstance(arguments["ignore_index"], int):
            continue
        chain: list[torch.fx.Node] = []
        source = arguments["input"]
        while isinstance(source, torch.fx.Node) and source.op == "call_method" and source.target in _PASSING \
                and len(source.users) == 1 and _value(source) is not None \
                and _value(source).device == _value(source.args[0]).device:
            chain.insert(0, source)
            source = source.args[0]
        target, logits = arguments["target"], _value(arguments["input"])
        if not (isinstance(source, torch.fx.Node) and source.target in LINEAR and _is_head(source, static)
                and isinstance(logits, torch.Tensor) and logits.dim() == 2
                and logits.shape[-1] == _value(source).shape[-1]
                and _value(source).numel() == logits.numel() and isinstance(target, torch.fx.Node)
                and isinstance(_value(target), torch.Tensor) and tuple(_value(target).shape) == (logits.shape[0],)):
            continue
        found.append(LossHead(node, source, chain, target, arguments["ignore_index"],
                              arguments["reduction"] == "mean"))
    return found


def _is_head(linear: torch.fx.Node, static: set[torch.fx.Node]) -> bool:
    hidden = linear.args[0]
    rest = [*linear.args[1:], *linear.kwargs.values()]
    return isinstance(hidden, torch.fx.Node) and hidden not in static \
        and all(not isinstance(a, torch.fx.Node) or a in static for a in rest)


def _new(graph: torch.fx.Graph, op: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None,
         ) -> torch.fx.Node:
    node = graph.create_node(op, target, args, kwargs or {})
    node.meta["example_value"] = fake_result(node, "example_value")
    return node


def replace_loss_head(gm: torch.fx.GraphModule, head: LossHead, chunks: int, drop_logits: bool) -> None:
    """Replace the head's loss by ``memopt::linear_cross_entropy`` in ``chunks`` slices or more (and, with
    ``drop_logits``, the logits the graph returns by an empty tensor)."""
    graph, linear = gm.graph, head.linear
    args = linear.args + tuple(linear.kwargs.values())
    hidden, weight, bias = args[0], args[1], (args[2] if len(args) > 2 else None)
    dtype = _value(head.chain[-1] if head.chain else linear).dtype
    with graph.inserting_before(head.loss):
        flat = _new(graph, "call_method", "reshape", (hidden, -1, _value(hidden).shape[-1]))
        fused = _new(graph, "call_function", torch.ops.memopt.linear_cross_entropy.default,
                     (flat, weight, bias, head.target, head.ignore_index, dtype, chunks))
        loss = _new(graph, "call_function", operator.getitem, (fused, 0))
        if head.mean:
            counted = _new(graph, "call_function", operator.ne, (head.target, head.ignore_index))
            count = _new(graph, "call_method", "sum", (counted,))
            loss = _new(graph, "call_function", operator.truediv, (loss, count))
    loss.meta.update({k: v for k, v in head.loss.meta.items() if k in ("nn_module_stack", "stack_trace")})
    head.loss.replace_all_uses_with(loss)
    graph.erase_node(head.loss)
    for node in reversed(head.chain):
        graph.erase_node(node)
    if drop_logits and any(user.op == "output" for user in linear.users):
        value = _value(linear)
        with graph.inserting_after(linear):
            empty = graph.call_function(torch.empty, ((0,),), {"dtype": value.dtype, "device": value.device})
        with value.fake_mode:
            empty.meta["example_value"] = torch.empty((0,), dtype=value.dtype, device=value.device)
        linear.replace_all_uses_with(empty, delete_user_cb=lambda user: user.op == "output")
    if not linear.users:
        graph.erase_node(linear)
