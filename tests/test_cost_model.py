"""Tests of memopt.cost_model: bytes (static and symbolic), FLOPs, device profiles, roofline estimates."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sympy
import torch
import torch.fx
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import (
    DimDynamic,
    ShapeEnv,
    StatelessSymbolicContext,
)
from torch.utils.flop_counter import FlopCounterMode

from memopt.cost_model import (
    COST_META_KEY,
    DeviceProfile,
    NodeCost,
    annotate_costs,
    builtin_profile_names,
    estimate_node,
    graph_time_s,
    hint_int,
    load_profile,
    node_flops,
    profile_to_json,
    storage_nbytes_expr,
    tensor_nbytes_expr,
    transfer_time_s,
    value_nbytes,
)
from memopt.errors import MemoptError, MemoptProfileError, MemoptUnsupportedError

aten = torch.ops.aten


def _nodes(gm: torch.fx.GraphModule, target: object) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.target == target]


def _graph_flops(gm: torch.fx.GraphModule) -> int:
    return sum(node_flops(n) for n in gm.graph.nodes)


def _counted_flops(f: Callable[..., Any], *args: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        f(*args)
    return counter.get_total_flops()


# ---------------------------------------------------------------------------------------------------------
# bytes


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: torch.empty(3, 4), 3 * 4 * 4),
        (lambda: torch.empty(3, 4, dtype=torch.bfloat16), 3 * 4 * 2),
        (lambda: torch.empty((), dtype=torch.float64), 8),
        # a transpose spans the same memory as its base
        (lambda: torch.empty(3, 4).t(), 48),
        # every other column of a 4x6 matrix: elements 0 .. 3*6 + 2*2 = 22 -> 23 elements
        (lambda: torch.empty(4, 6)[:, ::2], 23 * 4),
        # a row slice in the middle of a base spans only its own rows
        (lambda: torch.empty(10, 8)[2:5], 3 * 8 * 4),
        # expand reads one row however many times it is repeated
        (lambda: torch.empty(1, 4).expand(5, 4), 4 * 4),
        (lambda: torch.empty(0, 5), 0),
        (lambda: torch.empty(5, 0).t(), 0),
        (lambda: torch.empty(6, 4)[:, :0], 0),
    ],
)
def test_tensor_nbytes_static(make: Callable[[], torch.Tensor], expected: int) -> None:
    t = make()
    expr = tensor_nbytes_expr(t)
    assert isinstance(expr, sympy.Expr)
    assert expr == sympy.Integer(expected)
    assert value_nbytes(t) == expected


def test_storage_nbytes_counts_the_whole_base() -> None:
    base = torch.empty(10, 8)
    view = base[2:5, 1:3]
    assert storage_nbytes_expr(view) == sympy.Integer(10 * 8 * 4)
    assert tensor_nbytes_expr(view) == sympy.Integer((1 + 2 * 8 + 1) * 4)


def test_value_nbytes_sums_tuples_and_ignores_non_tensors() -> None:
    a, b = torch.empty(2, 3), torch.empty(5, dtype=torch.int64)
    assert value_nbytes((a, None, [b, 7])) == 24 + 40
    assert value_nbytes(None) == 0
    assert value_nbytes(3) == 0


def _symbolic_example() -> tuple[torch.fx.GraphModule, Callable[..., Any]]:
    def f(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = x @ w
        return y, y.t(), y[:, ::2], (y.t() + 1).relu(), y.unsqueeze(0).expand(3, -1, -1)

    gm = make_fx(f, tracing_mode="symbolic")(torch.randn(6, 5), torch.randn(5, 7))
    return gm, f


def test_symbolic_batch_dim_is_a_sympy_expression() -> None:
    gm, f = _symbolic_example()
    x_node, w_node = [n for n in gm.graph.nodes if n.op == "placeholder"]
    x_val = x_node.meta["val"]
    shape_env = x_val.fake_mode.shape_env
    batch = x_val.shape[0].node.expr
    cols = w_node.meta["val"].shape[1].node.expr
    assert isinstance(batch, sympy.Symbol) and isinstance(cols, sympy.Symbol)

    mm = _nodes(gm, aten.mm.default)[0]
    mm_bytes = tensor_nbytes_expr(mm.meta["val"])
    assert sympy.expand(mm_bytes - 4 * batch * cols) == 0
    assert hint_int(mm_bytes, shape_env) == 6 * 7 * 4

    # The expression generalises: at another batch size it gives that size's bytes.
    outs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    real_outs = f(torch.randn(11, 5), torch.randn(5, 7))
    for out_node, real in zip(outs, real_outs, strict=True):
        expr = tensor_nbytes_expr(out_node.meta["val"])
        assert expr.free_symbols, f"{out_node.name}: expected a symbolic byte count, got {expr}"
        at_11 = hint_int(expr.xreplace({batch: sympy.Integer(11)}), shape_env)
        assert at_11 == hint_int(tensor_nbytes_expr(real)), out_node.name

    # value_nbytes takes the ShapeEnv from the fake tensors and agrees with the symbolic formula.
    real_at_hints = f(torch.randn(6, 5), torch.randn(5, 7))
    for out_node, real in zip(outs, real_at_hints, strict=True):
        val = out_node.meta["val"]
        assert value_nbytes(val) == hint_int(tensor_nbytes_expr(val), shape_env)
        assert value_nbytes(val) == value_nbytes(real), out_node.name
    assert hint_int(storage_nbytes_expr(x_val), shape_env) == 6 * 5 * 4


def test_fake_tensor_with_dynamic_dim_through_shape_env() -> None:
    shape_env = ShapeEnv()
    mode = FakeTensorMode(shape_env=shape_env, static_shapes=False)
    context = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC, DimDynamic.STATIC])
    # The real tensor is made outside the mode: from_tensor returns a fake tensor unchanged.
    x = mode.from_tensor(torch.empty(8, 16, dtype=torch.float16), symbolic_context=context)
    assert isinstance(x.shape[0], torch.SymInt)
    expr = tensor_nbytes_expr(x)
    (symbol,) = expr.free_symbols
    assert sympy.expand(expr - 32 * symbol) == 0
    assert hint_int(expr, shape_env) == 8 * 16 * 2
    assert hint_int(x.shape[0]) == 8  # a SymInt brings its own ShapeEnv
    assert value_nbytes((x, x.shape[0])) == 8 * 16 * 2


def test_unbacked_size_that_may_be_zero() -> None:
    # A data-dependent size may be 0, where the strided span formula would overcount.
    shape_env = ShapeEnv()
    with FakeTensorMode(shape_env=shape_env):
        u = shape_env.create_unbacked_symint()
        t = torch.empty(4, u).t()
    expr = tensor_nbytes_expr(t)
    symbol = u.node.expr
    assert expr.xreplace({symbol: sympy.Integer(0)}) == 0
    assert expr.xreplace({symbol: sympy.Integer(3)}) == 3 * 4 * 4
    with pytest.raises(MemoptUnsupportedError, match=str(symbol)):
        value_nbytes(t)


def test_hint_int_names_symbols_without_hints() -> None:
    with pytest.raises(MemoptUnsupportedError, match=r"zz9.*no ShapeEnv"):
        hint_int(sympy.Symbol("zz9", integer=True) * 2)

    shape_env = ShapeEnv()
    unbacked = shape_env.create_unbacked_symint()
    name = str(unbacked.node.expr)
    with pytest.raises(MemoptUnsupportedError, match=rf"{name}.*depend on data"):
        hint_int(unbacked * 4)
    assert hint_int(sympy.Integer(12)) == 12
    assert hint_int(5) == 5


# ---------------------------------------------------------------------------------------------------------
# flops


def _check_flops(f: Callable[..., Any], *args: torch.Tensor, min_nodes: int = 1) -> int:
    expected = _counted_flops(f, *args)
    assert expected > 0
    gm = make_fx(f)(*args)
    counted = [n for n in gm.graph.nodes if node_flops(n) > 0]
    assert len(counted) >= min_nodes
    assert _graph_flops(gm) == expected
    # The same graph traced with symbolic shapes evaluates to the same count at its hints.
    sym = make_fx(f, tracing_mode="symbolic")(*args)
    assert _graph_flops(sym) == expected
    return expected


def test_flops_match_flop_counter_for_matmuls() -> None:
    def f(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
          acc: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (
            torch.mm(a, b),
            torch.addmm(bias, a, b),
            torch.bmm(x, y),
            torch.baddbmm(acc, x, y),
        )

    args = (torch.randn(6, 10), torch.randn(10, 3), torch.randn(3), torch.randn(4, 5, 9),
            torch.randn(4, 9, 2), torch.randn(4, 5, 2))
    expected = _check_flops(f, *args, min_nodes=4)
    assert expected == 2 * (2 * 6 * 10 * 3) + 2 * (2 * 4 * 5 * 9 * 2)


def test_flops_match_flop_counter_for_convolution_forward_and_backward() -> None:
    def f(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = F.conv2d(x, w, stride=2, padding=1)
        return torch.autograd.grad(y.sum(), (x, w))

    x = torch.randn(2, 3, 9, 11, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    gm = make_fx(f)(x, w)
    assert _nodes(gm, aten.convolution.default) and _nodes(gm, aten.convolution_backward.default)
    _check_flops(f, x, w, min_nodes=2)


def test_flops_of_cpu_attention_match_flop_counter_on_its_gpu_twin() -> None:
    # FlopCounterMode does not count the CPU flash kernels; they must count as the CUDA flash kernels
    # (which FlopCounterMode counts, and which run on meta tensors) do for the same shapes.
    q, k, v = (torch.randn(2, 3, 8, 4, requires_grad=True) for _ in range(3))

    def fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = F.scaled_dot_product_attention(q, k, v)
        return torch.autograd.grad(out.sum(), (q, k, v))

    gm = make_fx(fused)(q, k, v)
    (fwd,) = _nodes(gm, aten._scaled_dot_product_flash_attention_for_cpu.default)
    (bwd,) = _nodes(gm, aten._scaled_dot_product_flash_attention_for_cpu_backward.default)

    qm = torch.empty(2, 3, 8, 4, device="meta")
    with FlopCounterMode(display=False) as forward_counter:
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = (
            aten._scaled_dot_product_flash_attention(qm, qm, qm)
        )
    with FlopCounterMode(display=False) as backward_counter:
        aten._scaled_dot_product_flash_attention_backward(
            out, qm, qm, qm, out, lse, cum_q, cum_k, max_q, max_k, 0.0, False, seed, offset
        )
    per_matmul = 2 * 2 * 3 * 8 * 8 * 4
    assert node_flops(fwd) == forward_counter.get_total_flops() == 2 * per_matmul
    # The fused backward recomputes the scores: five matmuls, one more than autograd's math path.
    assert node_flops(bwd) == backward_counter.get_total_flops() == 5 * per_matmul

    # And the forward agrees with what FlopCounterMode counts on the real math path on CPU.
    with torch.no_grad():
        math_forward = _counted_flops(lambda *a: aten._scaled_dot_product_attention_math(*a), q, k, v)
    assert node_flops(fwd) == math_forward


@pytest.mark.parametrize(
    ("op", "extra"),
    [
        (aten._scaled_dot_product_efficient_attention.default, (None, True)),
        (aten._scaled_dot_product_flash_attention.default, ()),
    ],
)
def test_flops_match_flop_counter_for_gpu_attention_forward_and_backward(
    op: torch._ops.OpOverload, extra: tuple[Any, ...]
) -> None:
    # The GPU kernels have meta implementations, so FlopCounterMode runs them on meta tensors.
    q = torch.empty(2, 4, 16, 8, device="meta")
    k = torch.empty(2, 4, 12, 8, device="meta")
    v = torch.empty(2, 4, 12, 8, device="meta")

    def f(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Any:
        return op(q, k, v, *extra)

    with FlopCounterMode(display=False) as counter:
        outs = f(q, k, v)
    gm = make_fx(f, tracing_mode="fake")(q, k, v)
    (node,) = _nodes(gm, op)
    assert node_flops(node) == counter.get_total_flops() == 2 * (2 * 2 * 4 * 16 * 12 * 8)

    if op is aten._scaled_dot_product_efficient_attention.default:
        out, lse, seed, offset = outs
        backward = aten._scaled_dot_product_efficient_attention_backward.default

        def g(*a: torch.Tensor) -> Any:
            q, k, v, out, lse, seed, offset = a
            return backward(out, q, k, v, None, out, lse, seed, offset, 0.0, [True, True, True, False])

        bwd_args = (q, k, v, out, lse, seed, offset)
        with FlopCounterMode(display=False) as counter:
            g(*bwd_args)
        gm = make_fx(g, tracing_mode="fake")(*bwd_args)
        (node,) = _nodes(gm, backward)
        assert node_flops(node) == counter.get_total_flops() == 5 * (2 * 2 * 4 * 16 * 12 * 8)


def test_uncounted_ops_have_zero_flops() -> None:
    gm = make_fx(lambda x: (x + 1).relu().sum())(torch.randn(4, 4))
    assert [node_flops(n) for n in gm.graph.nodes] == [0] * len(gm.graph.nodes)


def test_node_flops_without_metadata_says_what_to_run() -> None:
    graph = torch.fx.Graph()
    a, b = graph.placeholder("a"), graph.placeholder("b")
    graph.output(graph.call_function(aten.mm.default, (a, b)))
    mm = next(n for n in graph.nodes if n.target == aten.mm.default)
    with pytest.raises(MemoptUnsupportedError, match="FakeTensorProp"):
        node_flops(mm)


# ---------------------------------------------------------------------------------------------------------
# profiles


def test_builtin_profile_names() -> None:
    assert builtin_profile_names() == ["a100-80gb", "cpu", "h100", "h200", "rtx4090"]


@pytest.mark.parametrize("name", ["a100-80gb", "cpu", "h100", "h200", "rtx4090"])
def test_builtin_profiles_load_and_round_trip(name: str, tmp_path: Path) -> None:
    profile = load_profile(name)
    assert profile.name == name
    assert profile.source and profile.description
    text = profile_to_json(profile)
    assert json.loads(text)["format_version"] == 2
    assert profile_to_json(profile) == text
    path = tmp_path / f"{name}-copy.json"
    path.write_text(text)
    again = load_profile(path)
    assert again == profile
    assert load_profile(str(path)) == profile
    assert profile_to_json(again) == text
    if name != "cpu":
        # Tensor cores: a 16-bit matmul is never slower than an fp32 one on a GPU.
        assert profile.matmul_flops_for(torch.bfloat16) > profile.matmul_flops_for(torch.float32)


def test_builtin_profile_numbers() -> None:
    h100, h200, a100, rtx = (load_profile(n) for n in ("h100", "h200", "a100-80gb", "rtx4090"))
    assert h100.matmul_flops_for(torch.bfloat16) == pytest.approx(989.4e12)
    assert h200.matmul_flops_for(torch.bfloat16) == h100.matmul_flops_for(torch.bfloat16)
    assert a100.matmul_flops_for(torch.bfloat16) == pytest.approx(312e12)
    assert rtx.matmul_flops_for(torch.float16) == pytest.approx(165.2e12)
    assert [p.memory_bandwidth for p in (h200, h100, a100, rtx)] == [4.8e12, 3.35e12, 2.039e12, 1.008e12]
    assert h200.memory_bytes > h100.memory_bytes > 80 * 10**9 > rtx.memory_bytes > 24 * 10**9
    assert "float8_e4m3fn" not in a100.matmul_flops
    assert load_profile(None) == load_profile("cpu")
    assert load_profile("H100") is load_profile("h100")


def test_matmul_flops_fallbacks() -> None:
    h100 = load_profile("h100")
    assert h100.matmul_flops_for(torch.float32) == h100.matmul_flops["float32"]
    assert h100.matmul_flops_for(torch.float32, allow_tf32=True) == h100.matmul_flops["tf32"]
    assert h100.matmul_flops_for(torch.float64) == h100.matmul_flops["float32"]
    assert h100.matmul_flops_for(torch.float8_e4m3fn) == h100.matmul_flops["float8_e4m3fn"]
    cpu = load_profile("cpu")
    assert cpu.matmul_flops_for(torch.float32, allow_tf32=True) == cpu.matmul_flops["float32"]
    assert cpu.matmul_flops_for(torch.int8) == cpu.matmul_flops["float32"]


def _valid_profile_dict() -> dict[str, Any]:
    return json.loads(profile_to_json(load_profile("rtx4090")))


def _write(tmp_path: Path, data: object | str) -> Path:
    path = tmp_path / "bad.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def _broken(change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    data = _valid_profile_dict()
    change(data)
    return data


@pytest.mark.parametrize(
    ("content", "must_mention"),
    [
        ("{not json", ["not valid JSON", "line 1"]),
        ("[1, 2]", ["JSON list", "format_version"]),
        (_broken(lambda d: d.update(format_version=3)), ["format_version", "3", "formats 1 and 2"]),
        (_broken(lambda d: d.pop("format_version")), ["format_version"]),
        (_broken(lambda d: d.pop("memory_bandwidth")), ["missing", "memory_bandwidth"]),
        (_broken(lambda d: d.update(memory_bandwidth=-1.0)), ["memory_bandwidth", "-1.0", "positive"]),
        (_broken(lambda d: d.update(launch_overhead_s=0)), ["launch_overhead_s", "positive"]),
        (_broken(lambda d: d.update(memory_bytes=1.5)), ["memory_bytes", "integer"]),
        (_broken(lambda d: d.update(vector_flops="fast")), ["vector_flops", "'fast'"]),
        (_broken(lambda d: d.update(memory_bandwdth=1e12)), ["memory_bandwdth", "memory_bandwidth"]),
        (_broken(lambda d: d["matmul_flops"].pop("float32")), ["matmul_flops.float32"]),
        (_broken(lambda d: d["matmul_flops"].update(bfloat=1e14)), ["bfloat", "bfloat16"]),
        (_broken(lambda d: d["matmul_flops"].update(float16=-3)), ["matmul_flops.float16", "-3"]),
        (_broken(lambda d: d.update(name="")), ["name", "non-empty"]),
    ],
)
def test_bad_profile_files_name_the_problem(
    tmp_path: Path, content: object | str, must_mention: list[str]
) -> None:
    path = _write(tmp_path, content)
    with pytest.raises(MemoptProfileError) as info:
        load_profile(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in must_mention:
        assert fragment in message, f"{fragment!r} not in: {message}"


def test_missing_profile_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(MemoptProfileError, match="does not exist"):
        load_profile(missing)
    with pytest.raises(MemoptProfileError, match="does not exist"):
        load_profile(str(missing))


@pytest.mark.parametrize(
    ("name", "closest"), [("h10", "h100"), ("a100", "a100-80gb"), ("rtx-4090", "rtx4090")]
)
def test_unknown_builtin_name_suggests_the_closest(name: str, closest: str) -> None:
    with pytest.raises(MemoptProfileError) as info:
        load_profile(name)
    message = str(info.value)
    assert f"did you mean '{closest}'" in message
    assert "a100-80gb, cpu, h100, h200, rtx4090" in message


def test_device_profile_validates_on_construction() -> None:
    fields = _valid_profile_dict()
    fields.pop("format_version")
    fields["host_device_bandwidth"] = 0.0
    with pytest.raises(MemoptProfileError, match="host_device_bandwidth"):
        DeviceProfile(**fields)
    with pytest.raises(MemoptProfileError, match="cost profile is 3"):
        load_profile(3)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------
# estimates


def _fake_graph(f: Callable[..., Any], *shapes: tuple[int, ...], dtype: torch.dtype) -> torch.fx.GraphModule:
    # Traced on fake tensors: nothing is computed or allocated, however large the shapes.
    args = [torch.empty(s, dtype=dtype, device="meta") for s in shapes]
    return make_fx(f, tracing_mode="fake")(*args)


def test_big_matmul_is_compute_bound() -> None:
    h100 = load_profile("h100")
    n = 8192
    gm = _fake_graph(torch.mm, (n, n), (n, n), dtype=torch.bfloat16)
    (mm,) = _nodes(gm, aten.mm.default)
    cost = estimate_node(mm, h100)
    flops = 2 * n**3
    assert cost.flops == flops
    assert cost.read_bytes == 2 * n * n * 2 and cost.out_bytes == n * n * 2
    expected = flops / 989.4e12 + h100.launch_overhead_s
    assert cost.time_s == pytest.approx(expected, rel=1e-12)
    assert flops / 989.4e12 > (cost.read_bytes + cost.out_bytes) / h100.memory_bandwidth


def test_small_matmul_is_memory_bound() -> None:
    h100 = load_profile("h100")
    gm = _fake_graph(torch.mm, (65536, 16), (16, 16), dtype=torch.bfloat16)
    cost = estimate_node(_nodes(gm, aten.mm.default)[0], h100)
    moved = cost.read_bytes + cost.out_bytes
    assert cost.flops == 2 * 65536 * 16 * 16
    assert cost.time_s == pytest.approx(moved / 3.35e12 + h100.launch_overhead_s, rel=1e-12)


def test_big_add_is_bandwidth_bound() -> None:
    a100 = load_profile("a100-80gb")
    numel = 1 << 26
    gm = _fake_graph(torch.add, (numel,), (numel,), dtype=torch.float32)
    (add,) = _nodes(gm, aten.add.Tensor)
    cost = estimate_node(add, a100)
    assert cost == NodeCost(
        out_bytes=numel * 4,
        read_bytes=2 * numel * 4,
        flops=0,
        time_s=pytest.approx(3 * numel * 4 / 2.039e12 + 5e-6, rel=1e-12),  # type: ignore[arg-type]
    )


def test_views_getitem_placeholders_and_output_cost_nothing() -> None:
    def f(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a, b = x.t().reshape(8, 4).split(4)
        y = torch.matmul(x.reshape(2, 2, 8), w)  # view, mm, _unsafe_view
        return a.detach(), b.expand(2, 4, 4), x.unsqueeze(0), y

    gm = make_fx(f)(torch.randn(4, 8), torch.randn(8, 3))
    assert _nodes(gm, aten._unsafe_view.default) and _nodes(gm, aten.split.Tensor)
    h100 = load_profile("h100")
    fused, op_by_op = annotate_costs(gm, h100, fused=True), annotate_costs(gm, h100)
    free = NodeCost(out_bytes=0, read_bytes=0, flops=0, time_s=0.0)
    for node in gm.graph.nodes:
        cost = fused[node.name]
        if node.target is aten.mm.default:
            assert cost.time_s > 0 and cost.out_bytes == 4 * 3 * 4 and cost.read_bytes == (32 + 24) * 4
        elif node.op == "placeholder":
            assert cost == NodeCost(value_nbytes(node.meta["val"]), 0, 0, 0.0), (node.name, cost)
        else:
            assert cost == free, (node.name, cost)
            # Op by op, a view is still dispatched: it costs a launch, and moves nothing.
            dispatched = isinstance(node.target, torch._ops.OpOverload)
            assert op_by_op[node.name] == (NodeCost(0, 0, 0, h100.launch_overhead_s) if dispatched else free)


def test_repeated_input_is_read_once() -> None:
    gm = make_fx(lambda x: x * x)(torch.randn(100))
    (mul,) = _nodes(gm, aten.mul.Tensor)
    cost = estimate_node(mul, load_profile("cpu"))
    assert cost.read_bytes == 400 and cost.out_bytes == 400


def test_symbolic_graph_costs_at_its_hints() -> None:
    profile = load_profile("rtx4090")
    gm, _ = _symbolic_example()
    static = make_fx(_symbolic_example()[1])(torch.randn(6, 5), torch.randn(5, 7))
    # The symbolic trace keeps a no-op slice the static one drops; compare the nodes that cost something
    # (fused: a view costs nothing then).
    zero = NodeCost(out_bytes=0, read_bytes=0, flops=0, time_s=0.0)
    dynamic_costs = [c for c in annotate_costs(gm, profile, fused=True).values() if c != zero]
    static_costs = [c for c in annotate_costs(static, profile, fused=True).values() if c != zero]
    assert len(static_costs) == 2 + 3  # two placeholders; mm, add, relu
    assert dynamic_costs == static_costs


def test_annotate_costs_and_graph_time() -> None:
    def f(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ w).sum()

    gm = make_fx(f)(torch.randn(32, 16), torch.randn(16, 8))
    profile = load_profile("cpu")
    costs = annotate_costs(gm, profile)
    assert list(costs) == [n.name for n in gm.graph.nodes]
    assert all(n.meta[COST_META_KEY] is costs[n.name] for n in gm.graph.nodes)
    kernels = [c for c in costs.values() if c.time_s > 0]
    assert len(kernels) == 3  # mm, relu, sum
    assert graph_time_s(gm, profile) == pytest.approx(math.fsum(c.time_s for c in costs.values()))
    assert annotate_costs(gm, profile) == costs  # deterministic
    mm_cost = costs[_nodes(gm, aten.mm.default)[0].name]
    assert mm_cost.flops == 2 * 32 * 16 * 8


def test_fused_costs_charge_pointwise_ops_their_reads_only() -> None:
    # Note [Fused costs]: under a fusing code generator an elementwise or reduction op costs the time to
    # read its inputs (no launch, no write); the matmul keeps its full roofline cost.
    def f(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ w).sum()

    gm = make_fx(f)(torch.randn(32, 16), torch.randn(16, 8))
    h100 = load_profile("h100")
    unfused, fused = annotate_costs(gm, h100), annotate_costs(gm, h100, fused=True)
    mm = _nodes(gm, aten.mm.default)[0].name
    relu = _nodes(gm, aten.relu.default)[0].name
    total = _nodes(gm, aten.sum.default)[0].name
    assert fused[mm] == unfused[mm]
    for name in (relu, total):
        assert fused[name].time_s == pytest.approx(fused[name].read_bytes / h100.memory_bandwidth)
        assert fused[name].read_bytes == 32 * 8 * 4
        assert unfused[name].time_s == pytest.approx(
            (unfused[name].read_bytes + unfused[name].out_bytes) / h100.memory_bandwidth + h100.launch_overhead_s)
    # The same bytes and FLOPs either way: only the time is the code generator's.
    assert all(dataclasses.replace(fused[n], time_s=0.0) == dataclasses.replace(unfused[n], time_s=0.0)
               for n in fused)
    assert graph_time_s(gm, h100) > math.fsum(c.time_s for c in fused.values())


def test_transfer_time() -> None:
    h100 = load_profile("h100")
    assert transfer_time_s(10**9, h100) == pytest.approx(10**9 / 5.0e10)
    assert transfer_time_s(0, h100) == 0.0
    with pytest.raises(MemoptError, match="non-negative"):
        transfer_time_s(-1, h100)


def _guard_count(gm: torch.fx.GraphModule) -> int:
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    return len(placeholder.meta["val"].fake_mode.shape_env.guards)


def test_costing_a_symbolic_graph_adds_no_guards() -> None:
    # Comparing distinct symbolic sizes (t.is_contiguous() on a transpose, stride == size, the attention
    # formula's batch/head checks) would install guards and could specialise the user's graph; see
    # Note [Concrete shapes for flop formulas]. Both graphs have such comparisons available to get wrong.
    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v).sum()

    attention_gm = make_fx(attention, tracing_mode="symbolic")(
        torch.randn(2, 3, 8, 4), torch.randn(2, 3, 6, 4), torch.randn(2, 3, 6, 4)
    )
    views_gm, _ = _symbolic_example()
    for gm in (attention_gm, views_gm):
        guards_before = _guard_count(gm)
        annotate_costs(gm, load_profile("h100"))
        for node in gm.graph.nodes:
            if isinstance(node.meta.get("val"), torch.Tensor):
                tensor_nbytes_expr(node.meta["val"])
                storage_nbytes_expr(node.meta["val"])
        assert _guard_count(gm) == guards_before
    (node,) = _nodes(attention_gm, aten._scaled_dot_product_flash_attention_for_cpu.default)
    assert node.meta[COST_META_KEY].flops == 2 * (2 * 2 * 3 * 8 * 6 * 4)


@pytest.mark.parametrize(("queries", "keys"), [(7, 7), (5, 9), (9, 5), (1, 4)])
def test_causal_attention_counts_the_pairs_its_mask_keeps(queries: int, keys: int) -> None:
    # Note [Causal attention FLOPs]: torch's top-left causal mask, counted, against the formula; and a
    # causal node costs the formula's share of the full count.
    from memopt.cost_model.flops import causal_pairs

    kept = int(torch.ones(queries, keys, dtype=torch.bool).tril().sum())
    assert causal_pairs(queries, keys) == kept

    q, k, v = torch.randn(2, 3, queries, 4), torch.randn(2, 3, keys, 4), torch.randn(2, 3, keys, 4)

    def attention_flops(causal: bool) -> int:
        gm = make_fx(lambda *a: F.scaled_dot_product_attention(*a, is_causal=causal))(q, k, v)
        (node,) = _nodes(gm, aten._scaled_dot_product_flash_attention_for_cpu.default)
        return node_flops(node)

    assert attention_flops(True) * queries * keys == attention_flops(False) * kept
