"""Parameter identity: each graph input's qualified name and layer, in the model graph and, through
AOTAutograd's descriptors, in the joint graph."""

from __future__ import annotations

import pytest
import torch

from memopt.compiler.backend import MemoptBackend
from memopt.names import GraphInput, layer_of, layer_of_name, qualified_name
from memopt.passes.base import Pass, PassContext, PassResult
from tests.models import MLP


@pytest.mark.parametrize(("source", "name"), [
    ("L['self']._modules['model']._modules['layers']._modules['3']._parameters['weight']", "model.layers.3.weight"),
    ("L['self']._modules['bn']._buffers['running_mean']", "bn.running_mean"),
    ("L['args'][0]._modules['model']._modules['embed_tokens']._parameters['weight']", "model.embed_tokens.weight"),
    ("L['self'].model.layers[3].mlp.up_proj.weight", "model.layers.3.mlp.up_proj.weight"),
    ("L['fn']._modules['2']._modules['parametrizations']._modules['weight']._parameters['original']",
     "2.parametrizations.weight.original"),
    ("L['x']", None),
    ("not a source", None),
])
def test_qualified_names_are_read_from_dynamo_sources(source: str, name: str | None) -> None:
    assert qualified_name(source) == name


def test_layers_are_the_path_up_to_the_first_index() -> None:
    assert layer_of_name("model.layers.3.mlp.up_proj.weight") == "model.layers.3"
    assert layer_of_name("body.0.weight") == "body.0"
    assert layer_of_name("lm_head.weight") is None
    assert GraphInput("parameter", "transformer.h.11.attn.c_attn.bias").layer == "transformer.h.11"


@pytest.mark.parametrize("path", ["L['self'].model.layers.3.mlp", "L['args'][0].model.layers.3.mlp",
                                  "L['model'].model.layers.3.mlp", "model.layers.3.mlp"])
def test_a_nodes_layer_is_named_as_the_model_names_it(path: str) -> None:
    """However Dynamo names the compiled root (an argument, ``self``), the layer is the model's own path."""
    graph = torch.fx.Graph()
    node = graph.placeholder("x")
    node.meta["nn_module_stack"] = {"a": (path, object)}
    assert layer_of(node) == ("model.layers.3", "model.layers.*.mlp")


def test_passes_see_each_inputs_name_in_both_stages() -> None:
    torch._dynamo.reset()
    seen: dict[str, tuple[GraphInput, ...]] = {}

    def look(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        seen[ctx.stage] = ctx.inputs
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder" and not n.name.startswith("tangents")]
        assert [ctx.input_of(n) for n in placeholders] == list(ctx.inputs)
        return PassResult(gm, False)

    model = MLP(width=8, depth=2)
    model.body[0].bias.requires_grad_(False)
    backend = MemoptBackend({"codegen": "eager"}, passes=(Pass("look_model", "model", look),
                                                          Pass("look_joint", "joint", look)))
    loss, _ = torch.compile(model, backend=backend)(torch.randn(4, 8), torch.randint(0, 10, (4,)))
    loss.backward()
    expected = {name for name, _ in model.named_parameters()}
    for stage in ("model", "joint"):
        names = {i.name for i in seen[stage] if i.kind == "parameter"}
        assert names == expected, stage
        assert sum(i.kind == "input" for i in seen[stage]) == 2, stage
    assert [i.name for i in seen["joint"]] == [i.name for i in seen["model"]]
    assert {i.layer for i in seen["joint"] if i.kind == "parameter"} == {"body.0", "body.2", None}
