"""What a graph's inputs and nodes are in the model: qualified parameter names and repeated layers.

Passes and the schedule both ask "which parameter is this input?" and "which layer is this node in?";
this module answers for both, from what Dynamo and AOTAutograd record:

- A Dynamo graph's placeholder carries its ``grapharg.source``, e.g.
  ``L['self']._modules['model']._modules['layers']._modules['3']._parameters['weight']``, which
  :func:`qualified_name` reads as ``model.layers.3.weight`` (the name ``model.named_parameters()`` gives).
- A joint graph's placeholder carries AOTAutograd's descriptor (``meta["desc"]``): ``PlainAOTInput(idx)``
  is the Dynamo graph's input ``idx``, whatever AOTAutograd added (effect tokens, synthetic bases) or
  removed (duplicates) around it. The joint graph's output node lists, per output, ``GradAOTOutput``
  naming the input a gradient belongs to.
- A repeated layer is the module path up to its first integer segment (``model.layers.3``), from a
  qualified name (:func:`layer_of_name`) or a node's module stack (:func:`layer_of`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx

__all__ = ["GraphInput", "gradient_outputs", "joint_graph_inputs", "layer_of", "layer_of_name", "qualified_name"]


@dataclasses.dataclass(frozen=True)
class GraphInput:
    """One input of a graph, as the model knows it."""

    kind: str                    # "parameter" | "buffer" | "input" | "symint" | "token"
    name: str | None = None      # qualified name of a parameter or buffer, e.g. "model.layers.3.mlp.up_proj.weight"

    @property
    def layer(self) -> str | None:
        return layer_of_name(self.name) if self.name is not None else None


# --------------------------------------------------------------------------------------------------------
# Qualified names
# --------------------------------------------------------------------------------------------------------

_ROOT = re.compile(r"^[A-Z]\['[^']*'\]")
_STEP = re.compile(r"\._(?:modules|parameters|buffers)\['([^']*)'\]|\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]|\['([^']*)'\]")


def qualified_name(source: str) -> str | None:
    """``model.layers.3.weight`` from a Dynamo source name such as
    ``L['self']._modules['model']._modules['layers']._modules['3']._parameters['weight']`` (or the
    attribute form ``L['self'].model.layers[3].weight``); None when the source is not under a local."""
    root = _ROOT.match(source)
    if root is None:
        return None
    parts: list[str] = []
    first_module_step: int | None = None
    at = root.end()
    while at < len(source):
        step = _STEP.match(source, at)
        if step is None:
            return None
        if step.group(1) is not None and first_module_step is None:
            first_module_step = len(parts)
        parts.append(next(g for g in step.groups() if g is not None))
        at = step.end()
    # The path to the root module itself (``L['args'][0]`` when a wrapper passes it on) is not part of
    # the name: it starts at the first ``_modules`` / ``_parameters`` / ``_buffers`` step.
    return ".".join(parts[first_module_step or 0:]) or None


def _source_name(node: torch.fx.Node) -> str:
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    if source is None:
        return ""
    name = source.name
    return str(name() if callable(name) else name)


def dynamo_inputs(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> tuple[GraphInput, ...]:
    """Kind and qualified name of each input of a Dynamo graph."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    out = []
    for index, value in enumerate(example_inputs):
        source = _source_name(placeholders[index]) if index < len(placeholders) else ""
        if isinstance(value, (torch.SymInt, int)):
            out.append(GraphInput("symint"))
        elif isinstance(value, torch.nn.Parameter):
            out.append(GraphInput("parameter", qualified_name(source)))
        elif "_buffers[" in source or ".buffers" in source:
            out.append(GraphInput("buffer", qualified_name(source)))
        else:
            out.append(GraphInput("input"))
    return tuple(out)


# --------------------------------------------------------------------------------------------------------
# The joint graph's inputs and gradients (AOTAutograd's descriptors)
# --------------------------------------------------------------------------------------------------------


def _resolve(desc: Any, model_inputs: Sequence[GraphInput]) -> GraphInput:
    """The model-graph input an AOTAutograd input descriptor stands for."""
    kind = type(desc).__name__
    if kind == "PlainAOTInput" and 0 <= int(desc.idx) < len(model_inputs):
        return model_inputs[int(desc.idx)]
    if kind in ("ParamAOTInput", "BufferAOTInput"):
        return GraphInput("parameter" if kind == "ParamAOTInput" else "buffer", str(desc.target))
    if kind == "SubclassGetAttrAOTInput":          # an inner tensor of a tensor subclass: its base's
        return _resolve(desc.base, model_inputs)
    if "Token" in kind:
        return GraphInput("token")
    return GraphInput("input")


def joint_graph_inputs(joint_gm: torch.fx.GraphModule, model_inputs: Sequence[GraphInput],
                 primals: Sequence[object] = ()) -> tuple[GraphInput, ...]:
    """Per forward input (``primals_*``) of a joint graph, the model input it is. Without AOTAutograd's
    descriptors (torch before 2.9) the inputs are taken in order when the counts agree, and otherwise
    classified by whether they require a gradient."""
    placeholders = [n for n in joint_gm.graph.nodes if n.op == "placeholder" and not n.name.startswith("tangents")]
    if placeholders and all("desc" in n.meta for n in placeholders):
        return tuple(_resolve(n.meta["desc"], model_inputs) for n in placeholders)
    if len(placeholders) == len(model_inputs):
        return tuple(model_inputs)
    return tuple(GraphInput("parameter" if isinstance(p, torch.Tensor) and p.requires_grad else "input")
                 for p in primals)


def gradient_outputs(joint_gm: torch.fx.GraphModule) -> dict[int, int]:
    """Output position -> index of the forward input (among the ``primals_*``) it is the gradient of,
    from AOTAutograd's output descriptors; empty when the graph has none."""
    output = joint_gm.graph.output_node()
    descs = output.meta.get("desc")
    if not isinstance(descs, (list, tuple)):
        return {}
    placeholders = [n for n in joint_gm.graph.nodes if n.op == "placeholder" and not n.name.startswith("tangents")]
    position = {repr(n.meta.get("desc")): i for i, n in enumerate(placeholders)}
    out = {}
    for index, desc in enumerate(descs):
        if type(desc).__name__ == "GradAOTOutput" and repr(desc.grad_of) in position:
            out[index] = position[repr(desc.grad_of)]
    return out


# --------------------------------------------------------------------------------------------------------
# Repeated layers
# --------------------------------------------------------------------------------------------------------

_LAYER = re.compile(r"^(.*?\.)(\d+)(?=\.|$)")
# Dynamo's name for the compiled root module (``L['self'].``, ``L['args'][0].``): not part of a layer's name.
_SOURCE_ROOT = re.compile(r"^[LG](?:\[[^\]]*\])+\.")


def layer_of_name(path: str) -> str | None:
    """The repeated layer a module path or qualified name is in: up to its first integer segment
    (``model.layers.3.mlp.up_proj.weight`` -> ``model.layers.3``); None outside repeated layers."""
    match = _LAYER.match(path)
    return match.group(1) + match.group(2) if match else None


def layer_of(node: torch.fx.Node) -> tuple[str | None, str]:
    """(layer id, path with the layer index stripped) from a node's module stack: the first path
    segment that is an integer marks a repeated layer (``model.layers.3.mlp`` -> ``model.layers.3``)."""
    stack = node.meta.get("nn_module_stack") or node.meta.get("fwd_nn_module_stack") or {}
    paths = [str(v[0]) for v in stack.values() if isinstance(v, tuple) and v]
    if not paths:
        return None, ""
    innermost = _SOURCE_ROOT.sub("", paths[-1])
    match = _LAYER.match(innermost)
    if match is None:
        return None, innermost
    return match.group(1) + match.group(2), match.group(1) + "*" + innermost[match.end():]
