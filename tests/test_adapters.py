"""Adapters: memopt.prepare + the inject_adapters pass against Hugging Face PEFT, the reference users know.

Tolerance: fp32 throughout, torch.testing.assert_close's defaults (the adapters are lossless: the same
arithmetic as PEFT, reordered only in DoRA's weight norm, which memopt computes without W + scale*B@A).
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import pytest
import torch
from torch import nn

import memopt
from memopt.compiler.backend import MemoptBackend
from memopt.prepare import adapter_modules
from tests.errors import raises_memopt
from tests.models import tiny_gpt2, tiny_llama, token_batch

peft = pytest.importorskip("peft")

LLAMA_TARGETS = ["q_proj", "v_proj", "gate_proj"]


def _peft_twin(model: nn.Module, method: str, rank: int, alpha: float, targets: Any, *,
               use_rslora: bool = False, dropout: float = 0.0) -> nn.Module:
    """PEFT's model on a copy of ``model``'s base, with B (and DoRA's magnitude) made non-zero so that
    every adapter gradient is exercised."""
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=dropout,
                             use_rslora=use_rslora, use_dora=method == "dora")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twin = peft.get_peft_model(copy.deepcopy(model), config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, module in twin.named_modules():
            if isinstance(module, peft.tuners.lora.LoraLayer) and "default" in module.lora_B:
                b = module.lora_B["default"].weight
                b.copy_(torch.randn(b.shape, generator=generator) * 0.1)
                if method == "dora":
                    m = module.lora_magnitude_vector["default"].weight
                    m.mul_(1 + 0.1 * torch.randn(m.shape, generator=generator))
    return twin


def _copy_from_peft(model: nn.Module, twin: nn.Module) -> None:
    peft_modules = dict(twin.base_model.model.named_modules())
    for name, _, adapter in adapter_modules(model):
        layer = peft_modules[name]
        with torch.no_grad():
            adapter.lora_A.copy_(layer.lora_A["default"].weight)
            adapter.lora_B.copy_(layer.lora_B["default"].weight)
            if adapter.magnitude is not None:
                adapter.magnitude.copy_(layer.lora_magnitude_vector["default"].weight)


def _adapter_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    grads = {}
    for name, _, adapter in adapter_modules(model):
        for key, param in (("lora_A", adapter.lora_A), ("lora_B", adapter.lora_B),
                           ("lora_magnitude_vector", adapter.magnitude)):
            if param is not None:
                assert param.grad is not None, f"{name}.{key} has no gradient"
                grads[f"{name}.{key}"] = param.grad
    return grads


def _peft_grads(twin: nn.Module) -> dict[str, torch.Tensor]:
    grads = {}
    for name, layer in twin.base_model.model.named_modules():
        if isinstance(layer, peft.tuners.lora.LoraLayer) and "default" in layer.lora_A:
            grads[f"{name}.lora_A"] = layer.lora_A["default"].weight.grad
            grads[f"{name}.lora_B"] = layer.lora_B["default"].weight.grad
            if "default" in layer.lora_magnitude_vector:
                grads[f"{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector["default"].weight.grad
    return grads


def _compiled_and_reference(model: nn.Module, reference: nn.Module, batch: dict[str, Any],
                            options: dict[str, Any]) -> MemoptBackend:
    """One forward + backward of ``model`` compiled with memopt and of ``reference`` eagerly; the logits
    match. Returns the backend (its reports)."""
    torch._dynamo.reset()
    backend = MemoptBackend({"codegen": "eager", **options})
    out = torch.compile(model, backend=backend)(**batch)
    out.loss.backward()
    ref = reference(**batch)
    ref.loss.backward()
    torch.testing.assert_close(out.logits, ref.logits)
    return backend


def _assert_same_grads(mine: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert mine and mine.keys() == theirs.keys(), (sorted(mine), sorted(theirs))
    for key, value in mine.items():
        torch.testing.assert_close(value, theirs[key], msg=lambda m, key=key: f"{key}: {m}")


def _prepared(build: Any, method: str, targets: Any, *, rank: int = 4, alpha: float = 8.0,
              use_rslora: bool = False) -> tuple[nn.Module, nn.Module, dict[str, Any]]:
    torch.manual_seed(0)
    base = build()
    options = {"adapters": {"method": method, "rank": rank, "alpha": alpha, "targets": targets,
                            "use_rslora": use_rslora}}
    twin = _peft_twin(base, method, rank, alpha, targets, use_rslora=use_rslora)
    model = memopt.prepare(base, options)
    _copy_from_peft(model, twin)
    return model, twin, options


@pytest.mark.parametrize(("method", "use_rslora"), [("lora", False), ("lora", True), ("dora", False)])
@pytest.mark.parametrize("mode", ["eager", "memopt-eager", "memopt-inductor"])
def test_llama_matches_peft(method: str, use_rslora: bool, mode: str) -> None:
    """Logits and every adapter gradient equal PEFT's eager model (tiny Llama, fp32, dropout 0)."""
    model, twin, options = _prepared(tiny_llama, method, LLAMA_TARGETS, use_rslora=use_rslora)
    batch = token_batch(2, 24)      # 48 tokens: no activation has a weight's shape (64, 128 or 32 wide)
    step = model
    backend = MemoptBackend({**options, "codegen": mode.split("-")[-1]})
    if mode != "eager":
        torch._dynamo.reset()
        step = torch.compile(model, backend=backend)
    out = step(**batch)
    out.loss.backward()
    if mode != "eager":
        (report,) = backend.reports
        (record,) = [r for r in report.passes if r.name == "inject_adapters"]
        assert record.status == "changed", record
        assert record.stats["pass_stats"] == {method: 2 * len(LLAMA_TARGETS)}
        _assert_no_merged_weight(report, model)
    ref = twin(**batch)
    ref.loss.backward()
    torch.testing.assert_close(out.logits, ref.logits)
    mine = _adapter_grads(model)
    assert len(mine) == 2 * len(LLAMA_TARGETS) * (3 if method == "dora" else 2)
    _assert_same_grads(mine, _peft_grads(twin))
    # Only the adapters train.
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".memopt_adapter." in n for n in trainable)


def _assert_no_merged_weight(report: Any, model: nn.Module) -> None:
    """``W + scale * B @ A`` is never formed, DoRA's norm included: no matmul and no addition in the
    joint graph makes a tensor of a targeted weight's shape. (Inductor decomposes DoRA's row norm of
    ``W`` into pow + sum, which it fuses into one reduction; that pow is allowed.)"""
    aten = torch.ops.aten
    forming = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.add.Tensor, aten.sub.Tensor}
    shapes = set()
    for _, linear, _ in adapter_modules(model):
        shapes |= {tuple(linear.weight.shape), tuple(linear.weight.shape[::-1])}
    assert report.joint is not None
    for node in report.joint.graph.nodes:
        val = node.meta.get("val")
        if node.op == "call_function" and isinstance(val, torch.Tensor) and tuple(val.shape) in shapes:
            assert node.target not in forming, node.format_node()


def test_prepare_freezes_the_base_and_names_the_adapters_in_the_state_dict() -> None:
    torch.manual_seed(0)
    model = memopt.prepare(tiny_llama(), {"adapters": {"method": "dora", "rank": 4, "targets": "all-linear"}})
    keys = [k for k in model.state_dict() if "memopt_adapter" in k]
    # all-linear: every linear of both layers but the output head (7 per layer), A, B and magnitude each.
    assert len(keys) == 2 * 7 * 3
    assert not any(k.startswith("lm_head.") for k in keys)
    assert "model.layers.0.self_attn.q_proj.memopt_adapter.magnitude" in keys
    optimizer = torch.optim.AdamW(p for p in model.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == 2 * 7 * 3
    # Preparing again with the same options changes nothing; with others it is an error.
    assert memopt.prepare(model, {"adapters": {"method": "dora", "rank": 4, "targets": "all-linear"}}) is model
    with raises_memopt(memopt.MemoptConfigError, "prepared with adapters"):
        memopt.prepare(model, {"adapters": {"method": "lora", "rank": 8}})


def test_compiling_with_adapter_options_without_prepare_says_to_call_it() -> None:
    torch._dynamo.reset()
    model = tiny_llama()
    compiled = torch.compile(model, backend=MemoptBackend({"codegen": "eager", "adapters": {"rank": 4}}))
    with raises_memopt(memopt.MemoptConfigError, "call memopt.prepare"):
        compiled(**token_batch(2, 16))


def test_initialisation_is_peft_s() -> None:
    """A: Kaiming-uniform with a = sqrt(5), i.e. uniform within 1/sqrt(in); B: zeros (so a fresh adapter
    changes nothing); DoRA's magnitude: the row norms of W; PaCA: zero change to r distinct columns."""
    torch.manual_seed(0)
    plain = tiny_llama(hidden=256)
    batch = token_batch(2, 24)
    with torch.no_grad():
        before = plain(**batch).logits
    model = memopt.prepare(copy.deepcopy(plain), {"adapters": {"method": "dora", "rank": 8, "targets": "all-linear"}})
    for _, linear, adapter in adapter_modules(model):
        bound = 1 / math.sqrt(adapter.in_features)
        a = adapter.lora_A.detach()
        assert a.abs().max() <= bound and abs(a.std().item() - bound / math.sqrt(3)) < 0.1 * bound
        assert not adapter.lora_B.any()
        torch.testing.assert_close(adapter.magnitude, linear.weight.norm(dim=1))
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, before)
    paca = memopt.prepare(copy.deepcopy(plain), {"adapters": {"method": "paca", "rank": 8, "targets": ["q_proj"]}})
    for _, _, adapter in adapter_modules(paca):
        assert not adapter.columns.any() and len(set(adapter.index.tolist())) == 8


def test_targets_by_name_suffix_and_by_regular_expression() -> None:
    by_name = memopt.prepare(tiny_llama(), {"adapters": {"targets": ["self_attn.q_proj", "down_proj"]}})
    assert [n for n, _, _ in adapter_modules(by_name)] == [
        f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "mlp.down_proj")]
    by_regex = memopt.prepare(tiny_llama(), {"adapters": {"targets": r"model\.layers\.1\..*_proj"}})
    assert len(adapter_modules(by_regex)) == 7


def test_targets_that_match_nothing_or_a_non_linear_are_refused() -> None:
    with raises_memopt(memopt.MemoptConfigError, "matches no linear layer.*q_proj"):
        memopt.prepare(tiny_llama(), {"adapters": {"targets": ["query"]}})
    with raises_memopt(memopt.MemoptUnsupportedError, "Embedding"):
        memopt.prepare(tiny_llama(), {"adapters": {"targets": ["embed_tokens"]}})


@pytest.mark.parametrize(("method", "use_rslora"), [("lora", False), ("lora", True), ("dora", False)])
def test_gpt2_conv1d_matches_peft(method: str, use_rslora: bool) -> None:
    """GPT-2's c_attn is a transformers Conv1D (weight stored (in, out)), as PEFT targets it."""
    model, twin, options = _prepared(tiny_gpt2, method, ["c_attn"], use_rslora=use_rslora)
    _compiled_and_reference(model, twin, token_batch(2, 24), options)
    mine = _adapter_grads(model)
    assert len(mine) == 2 * (3 if method == "dora" else 2)
    _assert_same_grads(mine, _peft_grads(twin))


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_saved_adapters_load_in_peft_and_back(method: str, tmp_path: Any) -> None:
    """memopt.save_adapters writes PEFT's files: PeftModel.from_pretrained on the same base gives memopt's
    logits (1e-5); PEFT's own files load into a fresh memopt model with PEFT's logits."""
    model, twin, _ = _prepared(tiny_llama, method, LLAMA_TARGETS)
    with torch.no_grad():                  # trained-looking adapters, not PEFT's initial ones
        for _, _, adapter in adapter_modules(model):
            adapter.lora_A.add_(0.05 * torch.randn_like(adapter.lora_A))
    batch = token_batch(2, 24)
    model.eval()
    with torch.no_grad():
        mine = model(**batch).logits
    memopt.save_adapters(model, tmp_path / "memopt")
    torch.manual_seed(0)
    base = tiny_llama()                    # the same base weights (seed 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(base, tmp_path / "memopt").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, mine, atol=1e-5, rtol=1e-5)

    twin.save_pretrained(tmp_path / "peft")
    torch.manual_seed(0)
    fresh = memopt.load_adapters(tiny_llama(), tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, twin.eval()(**batch).logits, atol=1e-5, rtol=1e-5)


def test_paca_files_round_trip(tmp_path: Any) -> None:
    torch.manual_seed(0)
    model = memopt.prepare(tiny_llama(), {"adapters": {"method": "paca", "rank": 4, "targets": LLAMA_TARGETS,
                                                       "seed": 3}})
    with torch.no_grad():
        for _, _, adapter in adapter_modules(model):
            adapter.columns.normal_()
    batch = token_batch(2, 24)
    with torch.no_grad():
        mine = model.eval()(**batch).logits
    memopt.save_adapters(model, tmp_path)
    torch.manual_seed(0)
    plain = tiny_llama().eval()
    with torch.no_grad():
        assert not torch.allclose(plain(**batch).logits, mine, atol=1e-3)   # the columns change the output
    fresh = memopt.load_adapters(plain, tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, mine)
    for (_, _, a), (_, _, b) in zip(adapter_modules(model), adapter_modules(fresh)):
        assert torch.equal(a.index, b.index)
    with raises_memopt(memopt.MemoptConfigError, "no adapters"):
        memopt.load_adapters(tiny_llama(), tmp_path / "nowhere")


def test_paca_matches_training_the_chosen_columns() -> None:
    """PaCA's gradient is the base weight's gradient at the chosen columns, computed here by hand: a copy
    of the model whose weights hold W with P added at those columns, trained in full."""
    torch.manual_seed(0)
    base = tiny_llama()
    reference = copy.deepcopy(base)
    options = {"adapters": {"method": "paca", "rank": 4, "targets": LLAMA_TARGETS, "seed": 5}}
    model = memopt.prepare(base, options)
    generator = torch.Generator().manual_seed(2)
    ref_modules = dict(reference.named_modules())
    with torch.no_grad():
        for name, _, adapter in adapter_modules(model):
            adapter.columns.copy_(0.1 * torch.randn(adapter.columns.shape, generator=generator))
            ref_modules[name].weight[:, adapter.index] += adapter.columns
    _compiled_and_reference(model, reference, token_batch(2, 24), options)
    for name, _, adapter in adapter_modules(model):
        assert adapter.index.tolist() == sorted(set(adapter.index.tolist())) and len(adapter.index) == 4
        torch.testing.assert_close(adapter.columns.grad, ref_modules[name].weight.grad[:, adapter.index])


def _saved_activation_bytes(method: str) -> tuple[int, int]:
    """(tracked, simulated) bytes the forward leaves for the backward, tiny Llama, codegen eager."""
    import gc

    from memopt.runtime.tracker import track_memory

    torch.manual_seed(0)
    model = tiny_llama()
    options = {"adapters": {"method": method, "rank": 4, "targets": LLAMA_TARGETS}}
    memopt.prepare(model, options)
    torch._dynamo.reset()
    backend = MemoptBackend({**options, "codegen": "eager"})
    compiled = torch.compile(model, backend=backend)
    batch = token_batch(2, 24)
    compiled(**batch).loss.backward()                      # compiles
    model.zero_grad(set_to_none=True)
    gc.collect()
    with track_memory("cpu") as mem:
        out = compiled(**batch)
    outputs = out.logits.untyped_storage().nbytes() + out.loss.untyped_storage().nbytes()
    (report,) = backend.reports
    assert report.memory is not None
    return mem.end_bytes - mem.baseline_bytes - outputs, report.memory.saved_activation_bytes


def test_paca_saves_fewer_activation_bytes_than_lora() -> None:
    """LoRA keeps each distinct input of its targeted linears (n x in) for A's gradient; PaCA keeps only
    its r columns, which LoRA keeps too in x @ A.T (n x r) for B's gradient. With q_proj and v_proj reading
    one normed input and gate_proj another, LoRA keeps 2 more (n x hidden) fp32 tensors per layer."""
    lora_tracked, lora_simulated = _saved_activation_bytes("lora")
    paca_tracked, paca_simulated = _saved_activation_bytes("paca")
    tokens, hidden, layers = 2 * 24, 64, 2
    derived = layers * 2 * tokens * hidden * 4
    assert lora_simulated - paca_simulated == derived
    assert lora_tracked - paca_tracked == derived


def _train(step_model: nn.Module, params: list[nn.Parameter], batches: list[dict[str, Any]]) -> list[float]:
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for batch in batches:
        loss = step_model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_twenty_steps_fullgraph_without_recompiling_match_peft(arch: str, method: str) -> None:
    """20 AdamW steps compiled with fullgraph=True: no graph break, one graph, no recompile (Dynamo's
    counters), and the loss curve of PEFT's eager model from the same start."""
    from torch._dynamo.utils import counters

    model, twin, options = (_prepared(tiny_llama, method, LLAMA_TARGETS) if arch == "llama"
                            else _prepared(tiny_gpt2, method, ["c_attn", "c_fc"]))
    batches = [token_batch(2, 24, seed=s % 2) for s in range(20)]     # two batches, learnt by heart
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend=MemoptBackend({**options, "codegen": "eager"}), fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        mine = _train(compiled, [p for p in model.parameters() if p.requires_grad], batches)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    theirs = _train(twin, [p for p in twin.parameters() if p.requires_grad], batches)
    assert mine[-1] < mine[0] - 0.05                       # it trains
    torch.testing.assert_close(torch.tensor(mine), torch.tensor(theirs), rtol=1e-4, atol=1e-5)


def test_a_peft_model_compiles_and_trains_with_memopt() -> None:
    """A model wrapped by PEFT (its LoRA modules, not memopt's) compiles with memopt, under a memory
    budget too: the passes and the scheduler see through PEFT's modules; gradients equal eager PEFT."""
    torch.manual_seed(0)
    twin = _peft_twin(tiny_llama(), "lora", 4, 8.0, LLAMA_TARGETS)
    compiled_twin = copy.deepcopy(twin)
    backend = _compiled_and_reference(compiled_twin, twin, token_batch(2, 24), {"memory_budget": 0.5})
    _assert_same_grads(_peft_grads(compiled_twin), _peft_grads(twin))
    assert backend.reports[-1].schedule is not None and backend.reports[-1].schedule.feasible


def test_adapters_under_a_memory_budget_and_in_the_dumps(tmp_path: Any) -> None:
    """The scheduler sees the adapters' activations like any other (budget met, gradients exact), and
    the injected nodes are in the dump of the inject_adapters pass."""
    model, twin, options = _prepared(tiny_llama, "dora", LLAMA_TARGETS)
    backend = _compiled_and_reference(model, twin, token_batch(4, 64),
                                      {**options, "memory_budget": 0.5, "dump_dir": str(tmp_path)})
    _assert_same_grads(_adapter_grads(model), _peft_grads(twin))
    (report,) = backend.reports
    assert report.schedule is not None and report.schedule.feasible and report.memory is not None
    assert report.memory.peak_bytes <= report.schedule.budget_bytes < report.schedule.baseline.peak_bytes
    (dump,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    (code,) = dump.glob("*_inject_adapters.py")
    lines = [line for line in code.read_text().splitlines() if not line.strip().startswith("#")]
    assert not any("memopt.adapter_delta" in line for line in lines)
    assert sum("linalg_vector_norm(" in line for line in lines) == 2 * len(LLAMA_TARGETS)   # DoRA row norms


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_dropout_matches_peft_under_the_same_seed_in_eager(method: str) -> None:
    """Eager (uncompiled), the prepared model draws its dropout masks in PEFT's order: same seed, same
    loss and adapter gradients."""
    torch.manual_seed(0)
    base = tiny_llama()
    options = {"adapters": {"method": method, "rank": 4, "alpha": 8.0, "targets": LLAMA_TARGETS, "dropout": 0.3}}
    twin = _peft_twin(base, method, 4, 8.0, LLAMA_TARGETS, dropout=0.3)
    model = memopt.prepare(base, options)
    _copy_from_peft(model, twin)
    model.train()
    twin.train()
    batch = token_batch(2, 24)
    torch.manual_seed(123)
    out = model(**batch)
    out.loss.backward()
    torch.manual_seed(123)
    ref = twin(**batch)
    ref.loss.backward()
    torch.testing.assert_close(out.logits, ref.logits)
    _assert_same_grads(_adapter_grads(model), _peft_grads(twin))


def test_compiled_dropout_has_the_expected_mean_and_variance() -> None:
    """Compiled, the dropout masks come from another random stream than eager's, so the check is
    statistical. One linear with LoRA (p = 0.5): its output is linear in the mask, so over K draws the
    mean is the dropout-free output within 5 standard errors (the variance of each output is
    scale^2 * sum_i x_i^2 (B A)_ji^2 * p / (1 - p)), and the sample variance is that variance within a
    factor of 2 (K = 400: the ratio's spread is ~7%)."""
    torch.manual_seed(0)
    p, k = 0.5, 400
    model = nn.Sequential(nn.Linear(16, 8))
    options = {"adapters": {"method": "lora", "rank": 4, "alpha": 4.0, "targets": ["0"], "dropout": p}}
    memopt.prepare(model, options)
    (_, linear, adapter) = adapter_modules(model)[0]
    with torch.no_grad():
        adapter.lora_B.normal_()
    x = torch.randn(3, 16)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=MemoptBackend({**options, "codegen": "eager"}))
    with torch.no_grad():
        draws = torch.stack([compiled(x) for _ in range(k)])
        plain = x @ linear.weight.t() + linear.bias
        delta = (x @ adapter.lora_A.t()) @ adapter.lora_B.t() * adapter.scale
        ba = adapter.lora_B @ adapter.lora_A
        variance = adapter.scale ** 2 * (x.pow(2) @ ba.pow(2).t()) * p / (1 - p)
    mean, sample_variance = draws.mean(0), draws.var(0)
    assert ((mean - (plain + delta)).abs() <= 5 * (variance / k).sqrt()).all()
    ratio = sample_variance / variance
    assert ((ratio > 0.5) & (ratio < 2.0)).all(), ratio


def test_a_linear_called_with_its_input_by_keyword_gets_its_adapter() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4))
    memopt.prepare(model, {"adapters": {"rank": 2, "targets": ["0"]}})
    (_, linear, adapter) = adapter_modules(model)[0]
    with torch.no_grad():
        adapter.lora_B.normal_()
    x = torch.randn(3, 8)
    expected = x @ linear.weight.t() + linear.bias + (x @ adapter.lora_A.t()) @ adapter.lora_B.t() * adapter.scale
    torch.testing.assert_close(linear(input=x), expected)
    torch.testing.assert_close(linear(x), expected)


def test_without_the_pass_the_op_still_computes_the_adapter() -> None:
    """Note [Adapters as a composite op]: with inject_adapters disabled (or failed), AOTAutograd
    decomposes memopt::adapter_delta into the same computation: still PEFT's logits and gradients."""
    model, twin, options = _prepared(tiny_llama, "dora", LLAMA_TARGETS)
    backend = _compiled_and_reference(model, twin, token_batch(2, 24),
                                      {**options, "disable_passes": ["inject_adapters"]})
    _assert_same_grads(_adapter_grads(model), _peft_grads(twin))
    (record,) = [r for r in backend.reports[0].passes if r.name == "inject_adapters"]
    assert record.status == "disabled"


def test_a_refused_prepare_leaves_the_model_untouched() -> None:
    """PaCA's rank above one target's input columns (down_proj has 128, q_proj 64): refused before any
    parameter is frozen or any adapter made."""
    model = tiny_llama()
    with raises_memopt(memopt.MemoptConfigError, "exceeds the 64 input columns"):
        memopt.prepare(model, {"adapters": {"method": "paca", "rank": 100, "targets": ["down_proj", "q_proj"]}})
    assert all(p.requires_grad for p in model.parameters()) and not adapter_modules(model)
