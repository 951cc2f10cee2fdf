"""Sparse backprop: policies, ``memopt.prepare``'s slices, the ``prune_backprop`` pass (golden), exact
gradients against the dense eager gradient, and the saved activation bytes each policy leaves."""

from __future__ import annotations

import copy
import gc
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import memopt
from memopt.compiler.backend import MemoptBackend
from memopt.errors import MemoptConfigError
from memopt.sparse import Decision, sparse_decisions, trained_parameters
from tests.errors import raises_memopt
from tests.models import hf_loss, tiny_gpt2, tiny_llama, token_batch
from tests.tolerances import assert_close


pytestmark = pytest.mark.usefixtures("fresh_dynamo")    # tests/conftest.py


class ReluMLP(nn.Module):
    def __init__(self, width: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(width, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x))))).square().mean()


S2FT = {"*.mlp.down_proj.weight": {"columns": 0.25}, "*": "frozen"}       # S2FT/PaCA-like


def _dense_slice(grad: torch.Tensor, decision: Decision) -> torch.Tensor:
    assert decision.dim is not None
    return grad.index_select(decision.dim, torch.tensor(decision.index))


def _check_gradients(model: nn.Module, dense: nn.Module) -> None:
    """Every trained parameter's gradient is the matching slice of the dense eager gradient."""
    plan = sparse_decisions(model)
    assert plan is not None
    dense_grads = {name: p.grad for name, p in dense.named_parameters()}
    checked = 0
    for decision in plan.decisions.values():
        for parameter in trained_parameters(model, decision):
            if not parameter.requires_grad:
                continue
            assert parameter.grad is not None, decision.name
            expected = dense_grads[decision.name]
            assert expected is not None
            if decision.kind != "full":
                expected = _dense_slice(expected, decision)
            assert_close(parameter.grad, expected, f"gradient of {decision.name} ({decision.kind})")
            checked += 1
    assert checked > 0
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            assert parameter.grad is None, name


def _prepared(build: Callable[[], nn.Module], policy: dict[str, Any]) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    dense = build()
    model = copy.deepcopy(dense)
    memopt.prepare(model, {"sparse_backprop": policy})
    return model, dense


# --------------------------------------------------------------------------------------------------------
# prepare: the slices are small parameters
# --------------------------------------------------------------------------------------------------------


def test_prepare_makes_each_slice_a_small_parameter() -> None:
    model, dense = _prepared(lambda: tiny_llama(), {
        "*.mlp.down_proj.weight": {"columns": 0.25}, "*.mlp.up_proj.weight": {"rows": 8, "select": "random"},
        "*.input_layernorm.weight": {"train": "full", "layers": "last:1"}, "*": "frozen"})
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    out, inner = 64, 128
    assert {n: tuple(p.shape) for n, p in trainable.items()} == {
        **{f"model.layers.{i}.mlp.down_proj.parametrizations.weight.0.values": (out, inner // 4) for i in (0, 1)},
        **{f"model.layers.{i}.mlp.up_proj.parametrizations.weight.0.values": (8, out) for i in (0, 1)},
        "model.layers.1.input_layernorm.weight": (out,)}
    # Columns by largest L2 norm: the chosen columns' norms are the top quarter.
    plan = sparse_decisions(model)
    assert plan is not None
    decision = plan.decisions["model.layers.0.mlp.down_proj.weight"]
    norms = dense.model.layers[0].mlp.down_proj.weight.norm(dim=0)
    assert set(decision.index) == set(norms.topk(inner // 4).indices.tolist())
    # Eager, the prepared model computes what the dense one does (slices start at the weight's values).
    batch = token_batch(2, 8)
    assert_close(hf_loss(model, batch)[0], hf_loss(dense, batch)[0], "loss")
    # The optimizer's state is slice-sized: AdamW's two moments per trained value, nothing else.
    optimizer = torch.optim.AdamW(trainable.values())
    hf_loss(model, batch)[0].backward()
    optimizer.step()
    state = sum(t.numel() for s in optimizer.state.values() for t in s.values() if t.dim() > 0)
    assert state == 2 * sum(p.numel() for p in trainable.values()) == 2 * (2 * 64 * 32 + 2 * 8 * 64 + 64)


def test_merge_writes_the_slices_into_the_weights() -> None:
    model, dense = _prepared(lambda: tiny_llama(), S2FT)
    plan = sparse_decisions(model)
    assert plan is not None
    with torch.no_grad():
        for decision in plan.decisions.values():
            for parameter in trained_parameters(model, decision):
                parameter.add_(1.0)
    memopt.merge_sparse(model)
    assert sparse_decisions(model) is None and not any(p.requires_grad for p in model.parameters())
    for name, weight in dense.named_parameters():
        merged = model.get_parameter(name)
        decision = plan.decisions[name]
        expected = weight.detach().clone()
        if decision.kind == "columns":
            expected[:, list(decision.index)] += 1.0
        torch.testing.assert_close(merged, expected, rtol=0, atol=0, msg=name)


def test_slices_save_and_load_with_their_indices(tmp_path: Any) -> None:
    model, _ = _prepared(lambda: tiny_llama(), {**S2FT, "*.post_attention_layernorm.weight": "full"} |
                         {"*": "frozen"})
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    memopt.save_adapters(model, tmp_path)
    torch.manual_seed(0)
    fresh = memopt.load_adapters(tiny_llama(), tmp_path)
    assert sparse_decisions(fresh) == sparse_decisions(model)
    for (name, p), (_, q) in zip(model.named_parameters(), fresh.named_parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)


# --------------------------------------------------------------------------------------------------------
# The pass, golden: a small graph before and after
# --------------------------------------------------------------------------------------------------------

GOLDEN_AFTER = """\
primals_1 = placeholder  (16, 8)
primals_2 = placeholder  (16,)
primals_3 = placeholder  (3, 8)
primals_4 = placeholder  (4, 16)
primals_5 = placeholder  (2,)
primals_6 = placeholder  (4, 2)
primals_7 = placeholder  (4,)
tangents_1 = placeholder  ()
t = aten.t.default(primals_1)  (8, 16)
addmm = aten.addmm.default(primals_2, primals_3, t)  (3, 16)
relu = aten.relu.default(addmm)  (3, 16)
gt_scalar = aten.gt.Scalar(relu, 0)  (3, 16)
index_copy = aten.index_copy.default(primals_4, 1, primals_5, primals_6)  (4, 16)  recompute
t_1 = aten.t.default(index_copy)  (16, 4)
addmm_1 = aten.addmm.default(primals_7, relu, t_1)  (3, 4)
sum_1 = aten.sum.default(addmm_1)  ()
expand = aten.expand.default(tangents_1, [3, 4])  (3, 4)
t_2 = aten.t.default(t_1)  (4, 16)
mm = aten.mm.default(expand, t_2)  (3, 16)
t_3 = aten.t.default(expand)  (4, 3)
index_select_default = aten.index_select.default(relu, 1, primals_5)  (3, 2)
sum_2 = aten.sum.dim_IntList(expand, [0], True)  (1, 4)
view = aten.view.default(sum_2, [4])  (4,)
mm_default = aten.mm.default(t_3, index_select_default)  (4, 2)
expand_1 = aten.expand.default(mm_default, [4, 2])  (4, 2)
where_scalar_other = aten.where.ScalarOther(gt_scalar, mm, 0.0)  (3, 16)
sum_3 = aten.sum.dim_IntList(where_scalar_other, [0], True)  (1, 16)
view_1 = aten.view.default(sum_3, [16])  (16,)
output = output [sum_1, None, view_1, None, None, None, expand_1, view]"""


class TwoLinears(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x))).sum()


def _golden(gm: torch.fx.GraphModule) -> str:
    lines = []
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        shape = f"  {tuple(val.shape)}" if isinstance(val, torch.Tensor) else ""
        tag = "  recompute" if node.meta.get("recompute") is not None else ""
        if node.op in ("placeholder", "output"):
            args = f" {list(node.args[0])}" if node.op == "output" else ""
            lines.append(f"{node.name} = {node.op}{args}{shape}")
        else:
            args = ", ".join(str(a) for a in node.args)
            lines.append(f"{node.name} = {node.target}({args}){shape}{tag}")
    return "\n".join(lines)


def test_prune_backprop_golden() -> None:
    """fc1 trains its bias only, ReLU, fc2 trains 2 of its 16 input columns and its bias: fc2's weight
    gradient is computed from a copy of those 2 columns of the ReLU output (the partition makes it in the
    forward); the ReLU's backward reads a boolean mask made in the forward; the sliced weight is tagged to
    be re-formed in the backward; the dense (4, 16) gradient and fc1's weight gradient are gone. The
    forward saves the mask and the 2 columns, not the ReLU output."""
    from memopt.passes.prune_backprop import PRUNE_BACKPROP

    torch.manual_seed(0)
    model = TwoLinears()
    memopt.prepare(model, {"sparse_backprop": {"fc2.weight": {"columns": 2}, "*.bias": "full"}})
    backend = MemoptBackend({"codegen": "eager"}, passes=(PRUNE_BACKPROP,))
    torch.compile(model, backend=backend)(torch.randn(3, 8)).backward()
    (report,) = backend.reports
    assert report.joint is not None
    assert _golden(report.joint) == GOLDEN_AFTER
    (record,) = report.passes
    assert record.stats["pass_stats"] == {"frozen_gradients": 0, "slice_of_matmul": 1, "reformed_weights": 1,
                                          "relu_masks": 1, "nodes_removed": 5}
    saved = [n.name for n in report.forward.graph.output_node().args[0][1:]]  # type: ignore[union-attr,index]
    assert "relu" not in saved and {"gt_scalar", "index_select_default"} <= set(saved)


# --------------------------------------------------------------------------------------------------------
# Exactness: every selected gradient is the dense gradient's slice
# --------------------------------------------------------------------------------------------------------

CASES: dict[str, tuple[Callable[[], nn.Module], dict[str, Any], Callable[[nn.Module], torch.Tensor]]] = {
    "mlp": (ReluMLP, {"fc2.weight": "bias", "head.weight": {"columns": 0.5}, "head.bias": "full"},
            lambda m: m(torch.randn(6, 16, generator=torch.Generator().manual_seed(1)))),
    "llama": (tiny_llama, {"*.mlp.down_proj.weight": {"columns": 0.25}, "*.mlp.up_proj.weight": {"rows": 0.25},
                           "*.self_attn.o_proj.weight": {"columns": 8, "layers": "first:1"},
                           "*.post_attention_layernorm.weight": "full"},
              lambda m: hf_loss(m, token_batch(2, 16))[0]),
    "gpt2": (tiny_gpt2, {"*.mlp.c_fc.weight": {"columns": 0.25}, "*.mlp.c_proj.weight": {"rows": 0.25},
                         "*.mlp.c_fc.bias": "full", "*.ln_2.*": "full"},
             lambda m: hf_loss(m, token_batch(2, 16))[0]),
}


@pytest.mark.parametrize(("case", "options"), [
    ("mlp", {"codegen": "eager"}), ("mlp", {"codegen": "inductor"}),
    ("llama", {"codegen": "eager"}), ("llama", {"codegen": "inductor"}),
    ("gpt2", {"codegen": "eager"}),
    pytest.param("llama", {"codegen": "eager", "memory_budget": 0.5}, marks=pytest.mark.slow),
], ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={w}" for k, w in v.items()))
def test_selected_gradients_are_the_dense_gradients_slices(case: str, options: dict[str, Any]) -> None:
    build, policy, loss_of = CASES[case]
    model, dense = _prepared(build, policy)
    for p in dense.parameters():
        p.requires_grad_(True)
    backend = MemoptBackend({"sparse_backprop": policy, **options})
    loss = loss_of(torch.compile(model, backend=backend))
    dense_loss = loss_of(dense)
    assert_close(loss, dense_loss, "loss")
    loss.backward()
    dense_loss.backward()
    _check_gradients(model, dense)
    stats = next(r for r in backend.reports[0].passes if r.name == "prune_backprop").stats["pass_stats"]
    assert stats["slice_of_matmul"] > 0


def test_unselected_parameters_are_bit_identical_after_optimizer_steps() -> None:
    build, policy, loss_of = CASES["llama"]
    model, dense = _prepared(build, policy)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-2, weight_decay=0.1)
    step = torch.compile(model, backend=MemoptBackend({"sparse_backprop": policy, "codegen": "eager"}))
    for _ in range(3):
        loss_of(step).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    plan = sparse_decisions(model)
    assert plan is not None
    # The trained slices did move, and the merged weights differ from the dense ones only in them.
    memopt.merge_sparse(model)
    for decision in plan.decisions.values():
        if decision.kind in ("columns", "rows"):
            merged, start = model.get_parameter(decision.name), dense.get_parameter(decision.name)
            changed = (merged != start).any(dim=1 - decision.dim).nonzero().flatten().tolist()  # type: ignore[operator]
            assert changed and set(changed) <= set(decision.index), decision.name


def test_a_model_compiled_without_prepare_trains_only_what_the_policy_names() -> None:
    """Without memopt.prepare every parameter still requires a gradient; the pass turns the gradients of
    those the policy freezes into None (the optimizer skips them), and AOTAutograd's graph loses their
    computation."""
    torch.manual_seed(0)
    model = ReluMLP()
    dense = copy.deepcopy(model)
    policy = {"head.bias": "full", "fc2.bias": "full"}
    backend = MemoptBackend({"sparse_backprop": policy, "codegen": "eager"})
    x = torch.randn(6, 16)
    torch.compile(model, backend=backend)(x).backward()
    dense(x).backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == {"head.bias", "fc2.bias"}
    for name in ("head.bias", "fc2.bias"):
        assert_close(model.get_parameter(name).grad, dense.get_parameter(name).grad, name)
    stats = next(r for r in backend.reports[0].passes if r.name == "prune_backprop").stats["pass_stats"]
    assert stats["frozen_gradients"] == 4 and stats["relu_masks"] == 1


def test_slices_without_prepare_are_an_error() -> None:
    model = ReluMLP()
    with raises_memopt(MemoptConfigError, r"call memopt.prepare"):
        torch.compile(model, backend="memopt", options={
            "sparse_backprop": {"head.weight": {"columns": 0.5}}, "codegen": "eager"})(torch.randn(2, 16))


# --------------------------------------------------------------------------------------------------------
# Memory: the saved activation bytes each policy leaves, derived and measured
# --------------------------------------------------------------------------------------------------------

TOKENS, HIDDEN, INNER, LAYERS = 2 * 24, 64, 128, 2


def _saved(options: dict[str, Any], build: Callable[[], nn.Module] = tiny_llama,
           batch: Callable[[], Any] = lambda: token_batch(2, 24)) -> tuple[int, int]:
    """(tracked, simulated) bytes the forward leaves for the backward, codegen eager."""
    from memopt.runtime.tracker import track_memory

    torch.manual_seed(0)
    model = build()
    if options:
        memopt.prepare(model, options)
    torch._dynamo.reset()
    backend = MemoptBackend({**options, "codegen": "eager"})
    compiled = torch.compile(model, backend=backend)
    args = batch()
    out = compiled(**args) if isinstance(args, dict) else compiled(args)
    (out.loss if hasattr(out, "loss") else out).backward()            # compiles
    model.zero_grad(set_to_none=True)
    gc.collect()
    with track_memory("cpu") as mem:
        out = compiled(**args) if isinstance(args, dict) else compiled(args)
    tensors = [out.logits, out.loss] if hasattr(out, "loss") else [out]
    outputs = sum(t.untyped_storage().nbytes() for t in tensors)
    (report,) = backend.reports
    assert report.memory is not None
    return mem.end_bytes - mem.baseline_bytes - outputs, report.memory.saved_activation_bytes


def _both(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    return a[0] - b[0], a[1] - b[1]


@pytest.mark.slow
def test_saved_activation_bytes_of_each_policy_are_as_derived() -> None:
    """fp32, B x S = 2 x 24 tokens, hidden 64, MLP 128, 2 layers:
    - columns k of down_proj save k of its input's 128 columns where training it whole saves all 128;
    - rows of up_proj save what training it whole saves (a row's gradient reads the whole input);
    - LoRA r16 on down_proj saves its input and x @ A.T (r columns): (128 + 16 - k) columns more than
      columns k;
    - and the S2FT-like policy saves at least 1.4x fewer bytes than full fine-tuning."""
    full_down = _saved({"sparse_backprop": {"*.mlp.down_proj.weight": "full"}})
    for k in (32, 48):
        cols = _saved({"sparse_backprop": {"*.mlp.down_proj.weight": {"columns": k}}})
        assert _both(full_down, cols) == (LAYERS * TOKENS * (INNER - k) * 4,) * 2, k
    lora = _saved({"adapters": {"method": "lora", "rank": 16, "targets": ["down_proj"]}})
    k = 16 * (HIDDEN + INNER) // HIDDEN                  # as many trained values as LoRA r16: 48 columns
    assert _both(lora, cols) == (LAYERS * TOKENS * (INNER + 16 - k) * 4,) * 2
    assert lora[0] > cols[0] and lora[1] > cols[1]
    rows = _saved({"sparse_backprop": {"*.mlp.up_proj.weight": {"rows": 0.25}}})
    assert rows == _saved({"sparse_backprop": {"*.mlp.up_proj.weight": "full"}})
    full = _saved({})
    s2ft = _saved({"sparse_backprop": S2FT})
    assert full[0] / s2ft[0] >= 1.4 and full[1] / s2ft[1] >= 1.4, (full, s2ft)


def test_a_bias_only_layer_after_relu_saves_a_mask() -> None:
    """head and fc2 train their biases only, fc1 nothing: head's backward needs no input, and the ReLU
    between fc2 and head needs only the mask of its output, 1 byte per element where the output takes
    4; fc1's ReLU output is not needed at all (nothing below fc2 trains). The loss (square, mean) keeps
    the head's output (6 x 4 fp32). The tracked figure is 4 bytes lower: the CPU tracker's reading of the
    0-dim loss it returns."""
    batch = lambda: torch.randn(6, 16, generator=torch.Generator().manual_seed(1))  # noqa: E731
    tracked, simulated = _saved({"sparse_backprop": {"head.weight": "bias", "fc2.weight": "bias"}}, ReluMLP, batch)
    derived = 6 * 32 * 1 + 6 * 4 * 4
    assert simulated == derived and derived - 4 <= tracked <= derived
    tracked, simulated = _saved({"sparse_backprop": {"head.weight": "full", "fc2.weight": "bias"}}, ReluMLP, batch)
    assert simulated == 6 * 32 * 4 + 6 * 4 * 4          # head's weight gradient reads the whole ReLU output


# --------------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("policy", "match"), [
    ({"*.mlp.gate.weight": "full"}, r"pattern '\*\.mlp\.gate\.weight' matches no parameter of this LlamaForCausalLM"),
    ({"*.mlp.up_proj.weight": {"columns": 500}}, r"'model.layers.0.mlp.up_proj.weight' asks for 500 columns, but it has 64"),
    ({"*.input_layernorm.weight": {"columns": 0.5}}, r"columns to 'model.layers.0.input_layernorm.weight', a LlamaRMSNorm"),
    ({"*.q_proj.weight": "bias"}, r"'model.layers.0.self_attn.q_proj.weight', but its Linear has no bias"),
    ({"*.q_proj.weight": {"train": "full", "layers": [7]}}, r"matches 2 parameters, none in the blocks \[7\]"),
], ids=["no-match", "count-too-large", "not-a-linear", "no-bias", "no-such-block"])
def test_bad_policies_are_refused_before_anything_changes(policy: dict[str, Any], match: str) -> None:
    model = tiny_llama()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(MemoptConfigError, match=match):
        memopt.prepare(model, {"sparse_backprop": policy})
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before


# --------------------------------------------------------------------------------------------------------
# LISA: blocks drawn at a time
# --------------------------------------------------------------------------------------------------------


LISA = {"model.layers.*": {"train": "full", "layers": {"sample": 2, "every": 1, "seed": 0}},
        "lm_head.weight": "full"}


def test_lisa_compiled_block_by_block_compiles_a_bounded_number_of_graphs() -> None:
    """Two of six blocks at a time, redrawn every step for 10 steps, compiled with compile_blocks: the
    drawn sets outnumber 4 (a whole-model compile would make a graph per set), yet at most 4 graphs are
    compiled (block trains or not, x input carries a gradient or not); every step's gradients equal the
    eager model's, and only the drawn blocks get any."""
    torch.manual_seed(0)
    model = tiny_llama(layers=6)
    memopt.prepare(model, {"sparse_backprop": LISA})
    reference = copy.deepcopy(model)
    sampler = memopt.LayerSampler(model)
    memopt.compile_blocks(model, {"codegen": "eager"})
    backend = model._memopt_blockwise
    seen = set()
    for step in range(10):
        (active,) = sampler.active.values()
        seen.add(active)
        for p, q in zip(model.parameters(), reference.parameters()):
            q.requires_grad_(p.requires_grad)
        batch = token_batch(1, 8, seed=step)
        hf_loss(model, batch)[0].backward()
        hf_loss(reference, batch)[0].backward()
        graded = {int(n.split(".")[2]) for n, p in model.named_parameters()
                  if p.grad is not None and n.startswith("model.layers.")}
        assert graded == set(active)
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            assert (p.grad is None) == (q.grad is None), name
            if p.grad is not None:
                assert_close(p.grad, q.grad, msg=name)
        model.zero_grad(set_to_none=True)
        reference.zero_grad(set_to_none=True)
        sampler.step()
    assert len(seen) > 4
    assert 2 <= len(backend.reports) <= 4


def test_a_sampler_warns_before_a_whole_model_compile_would_stop_compiling() -> None:
    # config.patch, not monkeypatch: undoing a monkeypatch of a config module deletes the entry.
    with torch._dynamo.config.patch(recompile_limit=2):
        model = tiny_llama(layers=6)
        memopt.prepare(model, {"sparse_backprop": LISA})
        sampler = memopt.LayerSampler(model)
        with pytest.warns(UserWarning, match="compile_blocks"):
            for _ in range(10):
                sampler.step()
        blockwise = tiny_llama(layers=6)
        memopt.prepare(blockwise, {"sparse_backprop": LISA})
        sampler = memopt.LayerSampler(blockwise)
        memopt.compile_blocks(blockwise, {"codegen": "eager"})
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for _ in range(10):
                sampler.step()
    assert torch._dynamo.config.recompile_limit == 8


def test_compile_blocks_refuses_a_budget_in_bytes_and_a_model_without_blocks() -> None:
    with raises_memopt(MemoptConfigError, "give a fraction"):
        memopt.compile_blocks(tiny_llama(), {"memory_budget": "1GiB"})
    with raises_memopt(MemoptConfigError, "no repeated blocks"):
        memopt.compile_blocks(ReluMLP())


def test_a_sampler_needs_a_sampled_rule() -> None:
    model, _ = _prepared(lambda: tiny_llama(), S2FT)
    with pytest.raises(MemoptConfigError, match="needs a model prepared with a sampled sparse_backprop rule"):
        memopt.LayerSampler(model)
