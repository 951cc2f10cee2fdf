"""Graph helpers every pass shares: make a node with its metadata and fake value, replace one, and
remove what no output needs.

A node a pass makes must carry its value's fake tensor (``meta["example_value"]`` in Dynamo's graph,
``meta["val"]`` in the joint graph: the runner checks) and its place in the model (module stack, stack
trace, ``seq_nr``: the schedule groups nodes by layer and tells the forward from the backward by them).
:func:`make_node` copies the second from the node the new one stands in for and computes the first once.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import sympy
import torch
import torch.fx

__all__ = ["eliminate_dead_code", "fake_call", "fake_result", "is_transpose", "make_node", "replace_node",
           "same_size", "value_key"]

_aten = torch.ops.aten


def is_transpose(node: Any) -> bool:
    """Whether ``node`` swaps the two dimensions of a matrix (``t``, ``permute [1, 0]``, ``transpose``)."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return False
    if node.target in (_aten.t.default, _aten.numpy_T.default):
        return True
    if node.target is _aten.permute.default:
        return list(node.args[1]) in ([1, 0], [-1, -2], [1, -2], [-1, 0])       # type: ignore[arg-type]
    if node.target is _aten.transpose.int:
        return {int(node.args[1]) % 2, int(node.args[2]) % 2} == {0, 1}          # type: ignore[arg-type]
    return False


def same_size(a: Any, b: Any) -> bool:
    """Whether two sizes are equal, compared without a guard when either is symbolic: equal expressions
    (a symbolic length a pass compares stays symbolic; a guard would tie the graph to one length)."""
    if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt):
        expr = lambda x: x.node.expr if isinstance(x, torch.SymInt) else sympy.Integer(x)  # noqa: E731
        return bool(sympy.expand(expr(a) - expr(b)) == 0)
    return bool(a == b)


def value_key(gm: torch.fx.GraphModule) -> str:
    """Where ``gm``'s nodes keep their fake values: ``"val"`` (AOTAutograd) or ``"example_value"``
    (Dynamo)."""
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            return "val" if "val" in node.meta else "example_value"
    return "val"


def fake_call(op: Any, *args: Any, **kwargs: Any) -> Any:
    """``op`` run on fake values, in their fake mode (None when no argument is a fake tensor)."""
    from torch._subclasses.fake_tensor import FakeTensor

    fakes: list[FakeTensor] = []
    torch.fx.node.map_aggregate((args, kwargs), lambda v: fakes.append(v) if isinstance(v, FakeTensor) else None)
    if not fakes:
        return None
    with fakes[0].fake_mode:
        return op(*args, **kwargs)


def fake_result(node: torch.fx.Node, key: str) -> Any:
    """What ``node`` computes on its inputs' fake values (``meta[key]``): the value a pass gives a node
    it creates."""
    def value(a: Any) -> Any:
        return a.meta[key] if isinstance(a, torch.fx.Node) else a

    args = torch.fx.node.map_aggregate(node.args, value)
    kwargs = torch.fx.node.map_aggregate(node.kwargs, value)
    if node.op == "call_method":
        result = fake_call(lambda self, *a, **k: getattr(self, str(node.target))(*a, **k), *args, **kwargs)
    else:
        result = fake_call(node.target, *args, **kwargs)
    if result is None:
        raise ValueError(f"no fake tensor among the inputs of {node.format_node()}")
    return result


def make_node(graph: torch.fx.Graph, target: Any, args: tuple[Any, ...], *, like: torch.fx.Node,
              key: str = "val", kwargs: dict[str, Any] | None = None) -> torch.fx.Node:
    """``target(*args)`` at the graph's insertion point, with ``like``'s metadata (its place in the
    model) and its own fake value under ``key``."""
    node = graph.call_function(target, args, kwargs)
    node.meta.update({k: v for k, v in like.meta.items() if k not in (key, "tensor_meta")})
    node.meta[key] = fake_result(node, key)
    return node


def replace_node(old: torch.fx.Node, target: Any, args: tuple[Any, ...], *, key: str = "val",
                 kwargs: dict[str, Any] | None = None) -> torch.fx.Node:
    """Put ``target(*args)`` where ``old`` is (its metadata, its readers) and erase ``old``."""
    graph = old.graph
    with graph.inserting_before(old):
        new = make_node(graph, target, args, like=old, key=key, kwargs=kwargs)
    old.replace_all_uses_with(new)
    graph.erase_node(old)
    return new


def eliminate_dead_code(gm: torch.fx.GraphModule, *, drop_outputs: Iterable[int] = ()) -> list[str]:
    """Set the outputs at positions ``drop_outputs`` to None (a joint graph's gradients that are not
    wanted), then remove every node no output needs, impure ops excepted; returns the removed names."""
    graph = gm.graph
    output = graph.output_node()
    drop = set(drop_outputs)
    if drop:
        values = output.args[0]
        assert isinstance(values, (list, tuple)), "a joint graph returns a list"
        output.args = (type(values)(None if i in drop else v for i, v in enumerate(values)),)
    removed = []
    for node in reversed(list(graph.nodes)):
        if node.op in ("placeholder", "output") or node.users or node.is_impure():
            continue
        removed.append(node.name)
        graph.erase_node(node)
    return removed[::-1]
