"""The eliminate_tokens pass (issue 17, first cut): exact at keep_ratio 1, fewer saved bytes below it, and
models it cannot follow are left alone with a warning."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from memopt.compiler.backend import MemoptBackend
from memopt.errors import MemoptConfigError, MemoptPassError
from tests.errors import raises_memopt
from tests.models import assert_matches_eager, compiled_step, hf_loss, pass_stats, tiny_llama, token_batch
from tests.test_token_sublayers import Odd, _hf
from tests.tolerances import assert_close


def _stats(backend: MemoptBackend) -> dict[str, Any]:
    return pass_stats(backend, "eliminate_tokens")


@pytest.mark.parametrize("extra", [{"codegen": "eager"}, {"codegen": "inductor"},
                                   {"codegen": "eager", "memory_budget": 0.5},
                                   {"codegen": "eager", "disable_passes": ("drop_causal_masks",)}],
                         ids=["eager", "inductor", "budget", "own-causal"])
def test_keeping_every_token_changes_no_value(extra: dict[str, Any]) -> None:
    torch.manual_seed(0)
    model = tiny_llama(layers=2)
    reference = copy.deepcopy(model)
    batch = token_batch(2, 64)
    options = {"token_elimination": {"keep_ratio": 1.0, "block_size": 16, "start_layer": 0}, **extra}
    loss, backend = compiled_step(model, options, batch)
    expected, _ = hf_loss(reference, batch)
    expected.backward()
    assert _stats(backend)["eliminated"] == 2 and _stats(backend)["kept_tokens"] == 64
    # The plain causal mask becomes is_causal: before the pass (drop_causal_masks), or, with that pass
    # off, in the rewritten sublayers themselves.
    dropped = pass_stats(backend, "drop_causal_masks").get("calls", 0)
    own = _stats(backend)["causal_masks"]
    assert (dropped, own) == ((0, 2) if "disable_passes" in extra else (2, 0))
    assert_close(loss, expected, "loss")
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert_close(p.grad, q.grad, name)


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_fewer_tokens_fewer_saved_bytes(kind: str) -> None:
    """Keeping a quarter and a half of 8 blocks: the attention sublayers save less, every parameter still
    gets a gradient, and the loss moves (the pass is lossy) but stays finite."""
    batch = token_batch(2, 128)
    saved = {}
    for ratio in (1.0, 0.5, 0.25):
        torch.manual_seed(0)
        model = _hf(kind)
        options = {"token_elimination": {"keep_ratio": ratio, "block_size": 16, "start_layer": 0}, "codegen": "eager"}
        loss, backend = compiled_step(model, options, batch)
        assert torch.isfinite(loss)
        assert _stats(backend)["kept_tokens"] == int(128 * ratio)
        assert all(p.grad is not None for p in model.parameters())
        memory = backend.reports[-1].memory
        assert memory is not None
        saved[ratio] = memory.saved_activation_bytes
    assert saved[1.0] > saved[0.5] > saved[0.25], saved


def test_a_model_it_cannot_follow_is_left_alone_with_a_warning() -> None:
    model = Odd()
    x, k = torch.randn(1, 8, 16), torch.randn(1, 2, 8, 8)
    torch._dynamo.reset()
    backend = MemoptBackend({"token_elimination": {"block_size": 2}, "codegen": "eager"})
    with pytest.warns(UserWarning, match="no attention sublayer recognised.*three linears of one input"):
        out = torch.compile(model, backend=backend)(x, k)
    torch.testing.assert_close(out, model(x, k))


def test_a_sequence_shorter_than_two_blocks_is_left_alone() -> None:
    torch.manual_seed(0)
    model = tiny_llama(layers=2)
    reference = copy.deepcopy(model)
    batch = token_batch(1, 48)
    options = {"token_elimination": {"keep_ratio": 0.25, "block_size": 64}, "codegen": "eager"}
    loss, backend = compiled_step(model, options, batch)
    assert "fewer than two blocks" in _stats(backend)["skipped"]
    assert_close(loss, hf_loss(reference, batch)[0], "loss")


def test_a_start_layer_past_the_last_is_an_error_and_strict_refuses_an_unfollowed_model() -> None:
    torch._dynamo.reset()
    step = torch.compile(tiny_llama(layers=2), backend=MemoptBackend(
        {"token_elimination": {"start_layer": 2, "block_size": 16}, "codegen": "eager"}))
    with raises_memopt(MemoptConfigError, r"start_layer': got 2, but this graph has 2 attention layers"):
        hf_loss(step, token_batch(1, 64))
    torch._dynamo.reset()
    strict = torch.compile(Odd(), backend=MemoptBackend({"token_elimination": {"block_size": 2}, "strict": True,
                                                         "codegen": "eager"}))
    with raises_memopt(MemoptPassError, "no attention sublayer recognised"):
        strict(torch.randn(1, 8, 16), torch.randn(1, 2, 8, 8))


def _attention_saved_bytes(ratio: float, seq: int, kept: int, batch: int = 2) -> dict[int, int]:
    """Bytes the forward saves inside attention sublayers, by how many dimensions hold tokens (sizes S or
    B*S, flattened; the tiny Llama's other sizes, 64/32/16/4, never equal them)."""
    from memopt.schedule.problem import saved_values

    torch.manual_seed(0)
    options = {"token_elimination": {"keep_ratio": ratio, "block_size": 16, "start_layer": 0}, "codegen": "eager"}
    _, backend = compiled_step(tiny_llama(layers=2), options, token_batch(batch, seq))
    report = backend.reports[-1]
    assert report.forward is not None
    nodes = {n.name: n for n in report.forward.graph.nodes}
    groups: dict[int, int] = {}
    for name in saved_values(report.forward, report.num_user_outputs):
        node = nodes[name]
        paths = [str(v[0]) for v in node.meta.get("nn_module_stack", {}).values()]
        if not paths or "self_attn" not in paths[-1]:
            continue
        value = node.meta["val"]
        tokens = sum(1 for size in value.shape if size in (kept, batch * kept))
        groups[tokens] = groups.get(tokens, 0) + value.numel() * value.element_size()
    return groups


def test_saved_attention_bytes_scale_exactly_with_the_kept_tokens() -> None:
    """192 tokens in 12 blocks of 16; a quarter kept is 3 blocks, 48 tokens. What the attention sublayers
    save with one token dimension (q/k/v, the attention output and its log-sum-exp, the output
    projection's input) is exactly 4x smaller. The model's mask is the plain causal one, so the rewritten
    sublayers attend with is_causal and save no mask at all (without the pass, each layer saves an
    additive S x S one)."""
    dense, kept = _attention_saved_bytes(1.0, 192, 192), _attention_saved_bytes(0.25, 192, 48)
    print("attention sublayers' saved bytes by token dimensions, all kept:", dense, "a quarter kept:", kept)
    assert set(dense) == set(kept) == {1}
    assert dense[1] == 4 * kept[1]


@pytest.mark.parametrize("quantize", [None, {"weights": "nf4"}], ids=["lora", "qlora"])
def test_with_lora_adapters_every_token_kept_changes_no_value_and_fewer_save_less(
        quantize: dict[str, Any] | None) -> None:
    """LeMo's setting: LoRA on every linear. The adapters' matmuls read the same input and add to the same
    projections; the sublayer is still found, keep_ratio 1 equals the eager prepared model (every adapter
    gradient included), and a quarter kept saves less. With NF4 base weights (QLoRA) too: the selector
    reads the query and key weights, dequantized in the sublayer itself, which it must be given first."""
    import memopt

    lora = {"adapters": {"method": "lora", "rank": 4, "alpha": 8, "targets": "all-linear"},
            **({"quantize": quantize} if quantize else {})}
    batch = token_batch(2, 128)
    saved = {}
    for ratio in (1.0, 0.25):
        torch.manual_seed(0)
        model = memopt.prepare(tiny_llama(layers=2), lora)
        for p in model.parameters():          # B starts at zero; give the adapters something to add
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.05)
        reference = copy.deepcopy(model)
        options = {**lora, "token_elimination": {"keep_ratio": ratio, "block_size": 16, "start_layer": 0},
                   "codegen": "eager"}
        loss, backend = compiled_step(model, options, batch)
        assert _stats(backend)["eliminated"] == 2
        memory = backend.reports[-1].memory
        assert memory is not None
        saved[ratio] = memory.saved_activation_bytes
        if ratio == 1.0:
            assert_matches_eager(model, reference, loss, batch)
    assert saved[0.25] < saved[1.0]


def test_a_padding_mask_is_gathered_not_replaced() -> None:
    """With an attention_mask input (left padding) the mask is not the plain causal one: it is gathered
    at the kept positions, and keeping every token still gives the model's own values."""
    torch.manual_seed(0)
    model = tiny_llama(layers=2)
    reference = copy.deepcopy(model)
    batch = token_batch(2, 64)
    mask = torch.ones(2, 64, dtype=torch.long)
    mask[1, :5] = 0
    batch["attention_mask"] = mask
    options = {"token_elimination": {"keep_ratio": 1.0, "block_size": 16, "start_layer": 0}, "codegen": "eager"}
    loss, backend = compiled_step(model, options, batch)
    assert_matches_eager(model, reference, loss, batch)
    assert _stats(backend)["causal_masks"] == 0 and _stats(backend)["eliminated"] == 2


def test_under_triton_codegen_memopts_kernels_move_the_rows(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """codegen="triton" with MEMOPT_TRITON_CPU=1: the gather and the scatter-add run memopt's Triton kernels
    (through the interpreter) in the forward and, as each other's gradients, in the backward. Keeping a
    quarter of the tokens, the loss and every gradient equal the same elimination through PyTorch's ops,
    and the dumps hold the kernels' source."""
    pytest.importorskip("triton")
    from memopt.codegen import token_rows

    batch = token_batch(2, 128)
    options = {"token_elimination": {"keep_ratio": 0.25, "block_size": 16, "start_layer": 1}}
    torch.manual_seed(0)
    model = tiny_llama(layers=2)
    reference = copy.deepcopy(model)
    expected, _ = compiled_step(reference, {**options, "codegen": "eager"}, batch)
    monkeypatch.setenv("MEMOPT_TRITON_CPU", "1")
    calls: list[str] = []
    for name in ("gather_rows", "scatter_add_rows_"):
        real = getattr(token_rows, name)
        monkeypatch.setattr(token_rows, name, lambda *a, _n=name, _f=real: calls.append(_n) or _f(*a))
    loss, backend = compiled_step(model, {**options, "codegen": "triton", "dump_dir": str(tmp_path)}, batch)
    assert _stats(backend)["eliminated"] == 1 and _stats(backend)["kept_tokens"] == 32
    # Forward: a gather and a scatter-add; backward: the scatter's rows gradient is a gather, the gather's
    # input gradient a scatter-add into zeros.
    assert sorted(calls) == ["gather_rows", "gather_rows", "scatter_add_rows_", "scatter_add_rows_"], calls
    assert_close(loss, expected, "loss")
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert_close(p.grad, q.grad, name)
    sources = list(tmp_path.rglob("kernel_token_rows.py"))
    assert sources and "_scatter_add_kernel" in sources[0].read_text()
