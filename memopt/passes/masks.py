"""Whether an attention mask in a model graph is the plain causal one.

Note [Recognising the causal mask]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Under ``torch.compile`` (torch < 2.14), Hugging Face always builds the attention mask as a tensor, even
when it is plain causal and SDPA's ``is_causal`` would do: a boolean ``S x S`` tensor that the backward
keeps (at 64K tokens, 4 GiB; at 342K, 109 GiB). A mask is plain causal when it is computed from no graph
input (so it is the same at every call) and equals ``tril``. Deciding the second computes the mask at
compile time, which is cheap up to 16K tokens (:data:`_DIRECT_ELEMENTS`). Past that, the mask's subgraph
is computed again at two small sizes, every integer constant equal to the sequence length replaced by
the small size; it is plain causal if both results equal ``tril`` and the subgraph holds no other integer
constant beyond the batch size and 2 in magnitude (a sliding window's width, say 4096, would be such a
constant, and at a small size a window that does not bite looks causal).

With a symbolic sequence length (``dynamic=True``, and ``memopt plan``, which plans every length from one
capture) the mask's subgraph reads the length as a graph input; it is always decided at the small sizes,
the length's input standing for each size (and no guard is installed on the length).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

from memopt.passes.rewrite import same_size

__all__ = ["is_plain_causal"]

_DIRECT_ELEMENTS = 1 << 28          # 16K x 16K: computed as it is; beyond, at small sizes
_SMALL_SIZES = (48, 80)


def _shape(node: torch.fx.Node) -> tuple[Any, ...]:
    return tuple(node.meta["example_value"].shape)


def _is_length(node: torch.fx.Node, seq: Any) -> bool:
    """Whether ``node`` is the graph input that holds the symbolic sequence length ``seq``."""
    value = node.meta.get("example_value")
    return node.op == "placeholder" and isinstance(seq, torch.SymInt) and isinstance(value, torch.SymInt) \
        and same_size(value, seq)


def _subgraph(mask: torch.fx.Node, seq: Any) -> list[torch.fx.Node] | None:
    """The nodes ``mask`` is computed from, in graph order (the symbolic length's input included); None
    if it reads any other graph input or an attribute."""
    order = {n: i for i, n in enumerate(mask.graph.nodes)}
    found: set[torch.fx.Node] = set()
    stack = [mask]
    while stack:
        node = stack.pop()
        if node in found:
            continue
        if node.op not in ("call_function", "call_method") and not _is_length(node, seq):
            return None                   # a placeholder (a padding mask) or a module attribute
        found.add(node)
        stack.extend(node.all_input_nodes)
    return sorted(found, key=order.__getitem__)


def _ints(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (tuple, list)):
        return [i for v in value for i in _ints(v)]
    if isinstance(value, slice):
        return _ints([value.start, value.stop, value.step])
    if isinstance(value, dict):
        return _ints(list(value.values()))
    return []


def _resized(value: Any, seq: Any, size: int) -> Any:
    """``value`` with the integer ``seq`` replaced by ``size`` (nothing to replace when ``seq`` is symbolic:
    the length's graph input stands for it)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return size if isinstance(seq, int) and value == seq else value
    if isinstance(value, (tuple, list)):
        return type(value)(_resized(v, seq, size) for v in value)
    if isinstance(value, slice):
        return slice(*(_resized(v, seq, size) for v in (value.start, value.stop, value.step)))
    if isinstance(value, dict):
        return {k: _resized(v, seq, size) for k, v in value.items()}
    return value


def _computed(gm: torch.fx.GraphModule, nodes: list[torch.fx.Node], seq: Any, size: int) -> Any:
    graph = torch.fx.Graph()
    copied: dict[torch.fx.Node, Any] = {}
    for node in nodes:
        if node.op == "placeholder":          # the symbolic length (_subgraph admits no other input)
            copied[node] = size
            continue
        copied[node] = graph.node_copy(node, lambda n: copied[n])
        copied[node].args = _resized(copied[node].args, seq, size)
        copied[node].kwargs = _resized(copied[node].kwargs, seq, size)
    graph.output(copied[nodes[-1]])
    return torch.fx.GraphModule(gm, graph)()


def _is_tril(value: Any, size: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == torch.bool and value.dim() >= 2 \
        and value.shape[-2:] == (size, size) \
        and bool((value == torch.ones(size, size, dtype=torch.bool, device=value.device).tril()).all())


def is_plain_causal(gm: torch.fx.GraphModule, mask: torch.fx.Node) -> bool:
    """Whether ``mask`` is the plain causal mask (Note [Recognising the causal mask])."""
    shape = _shape(mask)
    if len(shape) < 2 or not same_size(shape[-1], shape[-2]):
        return False
    seq = shape[-1]
    nodes = _subgraph(mask, seq)
    if nodes is None:
        return False
    symbolic = isinstance(seq, torch.SymInt)
    try:
        if not symbolic and seq * seq <= _DIRECT_ELEMENTS:
            return _is_tril(_computed(gm, nodes, seq, seq), seq)
        allowed = {*range(-2, 3), *(d for d in shape[:-2] if isinstance(d, int))} | ({seq} if not symbolic else set())
        if any(i not in allowed for n in nodes for i in _ints([n.args, n.kwargs])):
            return False
        return all(_is_tril(_computed(gm, nodes, seq, size), size) for size in _SMALL_SIZES)
    except Exception:  # noqa: BLE001 - a mask that cannot be computed alone is not known to be causal
        return False
