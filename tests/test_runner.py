"""The pass runner: every model-graph and joint-graph pass goes through one runner that times it, lints the
graph, checks the metadata of the nodes it made, tags them, can disable it by name, and undoes it with a
warning (or raises with ``strict=True``) when it fails.

The passes here are small real rewrites written for the tests; they reach the runner through
``MemoptBackend(passes=...)``, as the pipeline's docstring says. ``tests/test_dumps.py`` reuses them.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.fx

import memopt
from memopt.compiler.backend import MemoptBackend
from memopt.compiler.runner import MemoptPassWarning, check_order
from memopt.errors import MemoptConfigError, MemoptPassError
from memopt.passes.base import Pass, PassContext, PassResult, Stage
from memopt.schedule.simulate import simulate_joint
from tests.errors import raises_memopt
from tests.models import SmallCNN
from tests.tolerances import assert_close

aten = torch.ops.aten


pytestmark = pytest.mark.usefixtures("fresh_dynamo")    # tests/conftest.py


# --------------------------------------------------------------------------------------------------------
# Test passes
# --------------------------------------------------------------------------------------------------------


def _insert(gm: torch.fx.GraphModule, before: torch.fx.Node, target: Any, args: tuple[Any, ...],
            meta_key: str | None) -> torch.fx.Node:
    """Insert ``target(*args)`` before ``before``; compute its value on the fake values of its inputs
    and store it under ``meta_key`` (``None``: leave the metadata out, as a buggy pass would)."""
    with gm.graph.inserting_before(before):
        node = gm.graph.call_function(target, args)
    if meta_key is not None:
        values = [a.meta[meta_key] if isinstance(a, torch.fx.Node) else a for a in args]
        node.meta[meta_key] = target(*values)
    return node


def rewrite_relu_as_mask(gm: torch.fx.GraphModule, *, meta_key: str | None = "val") -> PassResult:
    """Joint graph: ``relu(x)`` -> ``x * (x > 0)`` and ``threshold_backward(g, y, 0)`` -> ``g * (y > 0)``.

    Exact for finite values (a zero mask gives -0.0 for negative x, which compares equal to 0.0); the
    backward rewrite makes the pass leave nodes in the partitioned backward graph too.
    """
    hits = {"relu": 0, "threshold_backward": 0}
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is aten.relu.default:
            (x,) = node.args
            mask = _insert(gm, node, aten.gt.Scalar, (x, 0), meta_key)
            new = _insert(gm, node, aten.mul.Tensor, (x, mask), meta_key)
            hits["relu"] += 1
        elif node.target is aten.threshold_backward.default and node.args[2] == 0:
            grad, out, _ = node.args
            mask = _insert(gm, node, aten.gt.Scalar, (out, 0), meta_key)
            new = _insert(gm, node, aten.mul.Tensor, (grad, mask), meta_key)
            hits["threshold_backward"] += 1
        else:
            continue
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    return PassResult(gm, sum(hits.values()) > 0, hits)


def relu_as_mask(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    assert ctx.stage == "joint"
    return rewrite_relu_as_mask(gm)


def rewrite_relu_as_clamp(gm: torch.fx.GraphModule, *, meta_key: str | None = "example_value") -> PassResult:
    """Model graph (Dynamo's torch-level ops): ``torch.relu(x)`` -> ``torch.clamp_min(x, 0.0)``."""
    hits = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in (torch.relu, torch.nn.functional.relu):
            new = _insert(gm, node, torch.clamp_min, (node.args[0], 0.0), meta_key)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            hits += 1
    return PassResult(gm, hits > 0, {"torch.relu": hits})


def relu_as_clamp(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    assert ctx.stage == "model"
    return rewrite_relu_as_clamp(gm)


class Counting:
    """A pass that records every call and changes nothing."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        self.calls.append(ctx.stage)
        return PassResult(gm, False, {})


class Boom(RuntimeError):
    pass


def rewrite_then_raise(rewrite: Callable[[torch.fx.GraphModule], PassResult]) -> Callable[..., PassResult]:
    """A pass that rewrites the graph in place and then raises: the runner must undo the rewrite."""

    def run(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        rewrite(gm)
        raise Boom("synthetic failure after rewriting")

    return run


# --------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------


def cnn_case() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return SmallCNN(), torch.randn(2, 3, 8, 8), torch.randint(0, 10, (2,))


def train_step_matches_eager(backend: MemoptBackend) -> None:
    """One forward and backward through ``backend``: loss, logits, every gradient and every buffer
    match eager PyTorch."""
    model, x, y = cnn_case()
    ref = copy.deepcopy(model)
    loss, logits = torch.compile(model, backend=backend)(x, y)
    ref_loss, ref_logits = ref(x, y)
    assert_close(loss, ref_loss, "loss")
    assert_close(logits, ref_logits, "logits")
    loss.backward()
    ref_loss.backward()
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert p.grad is not None and q.grad is not None, name
        assert_close(p.grad, q.grad, f"grad of {name}")
    for (name, b), (_, c) in zip(model.named_buffers(), ref.named_buffers()):
        assert_close(b, c, f"buffer {name}")


def targets(gm: torch.fx.GraphModule | None) -> set[Any]:
    assert gm is not None
    return {n.target for n in gm.graph.nodes if n.op == "call_function"}


def tagged(gm: torch.fx.GraphModule | None) -> dict[str, str]:
    assert gm is not None
    return {n.name: n.meta["memopt_pass"] for n in gm.graph.nodes if "memopt_pass" in n.meta}


def record(backend: MemoptBackend, name: str) -> Any:
    (report,) = backend.reports
    matches = [r for r in report.passes if r.name == name]
    assert len(matches) == 1, report.passes
    return matches[0]


# --------------------------------------------------------------------------------------------------------
# Passes that work
# --------------------------------------------------------------------------------------------------------


def test_joint_pass_is_lossless_tagged_and_recorded() -> None:
    backend = MemoptBackend({"codegen": "eager"}, passes=(Pass("relu_as_mask", "joint", relu_as_mask),))
    train_step_matches_eager(backend)
    (report,) = backend.reports
    assert aten.relu.default not in targets(report.joint)
    assert aten.threshold_backward.default not in targets(report.joint)

    # The pass's nodes, and only they, carry its name, in both partitioned graphs.
    for graph, label in ((report.forward, "forward"), (report.backward, "backward")):
        assert graph is not None
        made = [n for n in graph.graph.nodes if n.op == "call_function" and n.target is aten.gt.Scalar]
        assert made, f"no rewritten node reached the {label} graph"
        assert all(n.meta.get("memopt_pass") == "relu_as_mask" for n in made), label
        assert set(tagged(graph).values()) == {"relu_as_mask"}, label
        conv = [n for n in graph.graph.nodes if "convolution" in str(n.target)]
        assert conv and not any("memopt_pass" in n.meta for n in conv), label

    rec = record(backend, "relu_as_mask")
    assert (rec.stage, rec.status, rec.reason) == ("joint", "changed", None)
    assert rec.seconds > 0
    stats = rec.stats
    assert report.joint is not None
    # Two relus and two threshold_backwards, each replaced by two nodes.
    assert stats["pass_stats"] == {"relu": 2, "threshold_backward": 2}
    assert (stats["nodes_added"], stats["nodes_removed"]) == (8, 4)
    assert stats["nodes_after"] - stats["nodes_before"] == 4
    assert stats["nodes_after"] == len(report.joint.graph.nodes)
    # Predicted memory before and after, as the simulator gives it for the joint graph after the pass.
    after = simulate_joint(report.joint)
    assert stats["predicted_after"] == {"saved_activation_bytes": after.saved_activation_bytes,
                                        "peak_bytes": after.peak_bytes}
    before = stats["predicted_before"]
    assert set(before) == {"saved_activation_bytes", "peak_bytes"}
    assert before["saved_activation_bytes"] > 0 and before["peak_bytes"] >= before["saved_activation_bytes"]


def test_predicted_before_is_the_unrewritten_graph() -> None:
    plain = MemoptBackend({"codegen": "eager"}, passes=())
    train_step_matches_eager(plain)
    torch._dynamo.reset()
    rewritten = MemoptBackend({"codegen": "eager"}, passes=(Pass("relu_as_mask", "joint", relu_as_mask),))
    train_step_matches_eager(rewritten)
    joint = plain.reports[0].joint
    assert joint is not None
    timeline = simulate_joint(joint)
    assert record(rewritten, "relu_as_mask").stats["predicted_before"] == {
        "saved_activation_bytes": timeline.saved_activation_bytes, "peak_bytes": timeline.peak_bytes}


def test_predicted_memory_chains_from_pass_to_pass() -> None:
    backend = MemoptBackend({"codegen": "eager"}, passes=(
        Pass("relu_as_mask", "joint", relu_as_mask), Pass("looks_only", "joint", Counting())))
    train_step_matches_eager(backend)
    first, second = record(backend, "relu_as_mask").stats, record(backend, "looks_only").stats
    # The rewrite changes the prediction (a bool mask is saved instead of a float activation) ...
    assert first["predicted_after"] != first["predicted_before"]
    # ... and the next pass starts from the graph the previous one left.
    assert second["predicted_before"] == first["predicted_after"] == second["predicted_after"]


def test_model_pass_rewrites_dynamo_graph() -> None:
    seen: list[torch.fx.GraphModule] = []

    def run(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        # Dynamo's graph: torch-level targets, values under "example_value".
        assert torch.relu in targets(gm)
        assert all("example_value" in n.meta for n in gm.graph.nodes if n.target is torch.relu)
        seen.append(gm)
        return relu_as_clamp(gm, ctx)

    backend = MemoptBackend({"codegen": "eager"}, passes=(Pass("relu_as_clamp", "model", run),))
    train_step_matches_eager(backend)
    (report,) = backend.reports
    # What AOTAutograd traced is the rewritten model graph.
    assert aten.clamp_min.default in targets(report.joint)
    assert aten.relu.default not in targets(report.joint)
    (gm,) = seen
    assert torch.relu not in targets(gm)
    made = [n for n in gm.graph.nodes if n.target is torch.clamp_min]
    assert len(made) == 2 and all(n.meta.get("memopt_pass") == "relu_as_clamp" for n in made)
    assert set(tagged(gm).values()) == {"relu_as_clamp"} and len(tagged(gm)) == 2
    rec = record(backend, "relu_as_clamp")
    assert (rec.stage, rec.status) == ("model", "changed")
    assert rec.stats["pass_stats"] == {"torch.relu": 2}
    assert (rec.stats["nodes_added"], rec.stats["nodes_removed"]) == (2, 2)


def test_model_passes_run_before_joint_passes_in_one_pipeline() -> None:
    order: list[str] = []

    def make(name: str) -> Callable[..., PassResult]:
        def run(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
            order.append(f"{name}:{ctx.stage}")
            return PassResult(gm, False)
        return run

    backend = MemoptBackend({"codegen": "eager"}, passes=(
        Pass("m1", "model", make("m1")), Pass("m2", "model", make("m2")),
        Pass("j1", "joint", make("j1")), Pass("j2", "joint", make("j2"), after=("j1",))))
    train_step_matches_eager(backend)
    assert order == ["m1:model", "m2:model", "j1:joint", "j2:joint"]
    assert [(r.name, r.stage, r.status) for r in backend.reports[0].passes] == [
        ("m1", "model", "unchanged"), ("m2", "model", "unchanged"),
        ("j1", "joint", "unchanged"), ("j2", "joint", "unchanged")]


def test_runner_times_each_pass() -> None:
    def slow(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        time.sleep(0.05)
        return PassResult(gm, False)

    backend = MemoptBackend({"codegen": "eager"}, passes=(
        Pass("slow", "joint", slow), Pass("fast", "joint", Counting())))
    train_step_matches_eager(backend)
    assert record(backend, "slow").seconds >= 0.05
    assert record(backend, "fast").seconds < 0.05


# --------------------------------------------------------------------------------------------------------
# Passes that fail: undone with a warning, or raised in strict mode
# --------------------------------------------------------------------------------------------------------


FAILING = {
    "joint": (lambda gm: rewrite_relu_as_mask(gm), aten.relu.default),
    "model": (lambda gm: rewrite_relu_as_clamp(gm), aten.relu.default),
}


@pytest.mark.parametrize("stage", ["model", "joint"])
def test_raising_pass_is_undone_with_a_warning(stage: Stage) -> None:
    rewrite, kept = FAILING[stage]
    after = Counting()
    backend = MemoptBackend({"codegen": "eager"}, passes=(
        Pass("explode", stage, rewrite_then_raise(rewrite)), Pass("after_explode", stage, after)))
    with pytest.warns(MemoptPassWarning) as caught:
        train_step_matches_eager(backend)
    messages = [str(w.message) for w in caught if issubclass(w.category, MemoptPassWarning)]
    assert len(messages) == 1, messages
    assert "'explode'" in messages[0] and "Boom: synthetic failure after rewriting" in messages[0]
    rec = record(backend, "explode")
    assert (rec.stage, rec.status) == (stage, "failed")
    assert rec.reason == "Boom: synthetic failure after rewriting"
    # The rewrite it made before raising was undone: the graph is the one it was given.
    (report,) = backend.reports
    assert kept in targets(report.joint)
    assert not tagged(report.joint) and not tagged(report.forward) and not tagged(report.backward)
    # The pipeline goes on after the failed pass.
    assert after.calls == [stage]
    assert record(backend, "after_explode").status == "unchanged"


def drop_conv_weight_gradient(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    """Joint graph: the first convolution's weight gradient becomes None (a pruning pass's change)."""
    from memopt.names import gradient_outputs
    from memopt.passes.rewrite import eliminate_dead_code

    weight = next(i for i, g in enumerate(ctx.inputs) if g.name == "conv1.weight")
    position = next(out for out, primal in gradient_outputs(gm).items() if primal == weight)
    removed = eliminate_dead_code(gm, drop_outputs=[position])
    return PassResult(gm, True, {"removed": len(removed)})


def test_a_pass_that_changes_the_graphs_outputs_is_undone() -> None:
    # Undeclared, turning a gradient into None is a failure: the graph is restored with a warning.
    backend = MemoptBackend({"codegen": "eager"}, passes=(Pass("drop", "joint", drop_conv_weight_gradient),))
    with pytest.warns(MemoptPassWarning, match=r"output \d+ was \('gradient', '\(8, 3, 3, 3\)'.* is now None"):
        train_step_matches_eager(backend)
    assert record(backend, "drop").status == "failed"


def test_a_pass_that_declares_it_drops_gradients_may() -> None:
    backend = MemoptBackend({"codegen": "eager"}, passes=(
        Pass("drop", "joint", drop_conv_weight_gradient, drops_gradients=True),))
    model, x, y = cnn_case()
    loss, _ = torch.compile(model, backend=backend)(x, y)
    loss.backward()
    assert record(backend, "drop").status == "changed" and record(backend, "drop").stats["pass_stats"]["removed"] > 0
    assert model.conv1.weight.grad is None and model.conv1.bias.grad is not None


def test_a_pass_that_changes_an_output_shape_is_undone() -> None:
    def widen(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        output = gm.graph.output_node()
        logits = output.args[0][1]
        with gm.graph.inserting_before(output):
            wide = gm.graph.call_function(aten.cat.default, ([logits, logits], 1))
        wide.meta["example_value"] = torch.cat([logits.meta["example_value"]] * 2, 1)
        output.args = ((output.args[0][0], wide),)
        return PassResult(gm, True)

    backend = MemoptBackend({"codegen": "eager"}, passes=(Pass("widen", "model", widen, drops_gradients=True),))
    with pytest.warns(MemoptPassWarning, match=r"output 1 was \('output', '\(2, 10\)'"):
        train_step_matches_eager(backend)


@pytest.mark.parametrize("stage", ["model", "joint"])
def test_new_node_without_metadata_is_a_failure(stage: Stage) -> None:
    key = "example_value" if stage == "model" else "val"

    def careless(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        if stage == "model":
            return rewrite_relu_as_clamp(gm, meta_key=None)
        return rewrite_relu_as_mask(gm, meta_key=None)

    backend = MemoptBackend({"codegen": "eager"}, passes=(Pass("careless", stage, careless),))
    with pytest.warns(MemoptPassWarning, match=rf"pass 'careless' failed.*no meta\['{key}'\]"):
        train_step_matches_eager(backend)
    rec = record(backend, "careless")
    assert rec.status == "failed" and f"meta['{key}']" in (rec.reason or "")
    (report,) = backend.reports
    assert aten.relu.default in targets(report.joint)
    assert not tagged(report.forward) and not tagged(report.backward)


def test_malformed_graph_is_a_failure() -> None:
    def use_before_definition(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        # Move the first relu above its own input: the graph no longer lints.
        relu = next(n for n in gm.graph.nodes if n.target is aten.relu.default)
        next(n for n in gm.graph.nodes if n.op == "placeholder").prepend(relu)
        return PassResult(gm, True)

    backend = MemoptBackend({"codegen": "eager"}, passes=(Pass("reorder", "joint", use_before_definition),))
    with pytest.warns(MemoptPassWarning, match="pass 'reorder' failed"):
        train_step_matches_eager(backend)
    assert record(backend, "reorder").status == "failed"


def test_pass_returning_the_wrong_type_is_a_failure() -> None:
    backend = MemoptBackend({"codegen": "eager"}, passes=(
        Pass("returns_graph", "joint", lambda gm, ctx: gm),))  # type: ignore[arg-type,return-value]
    with pytest.warns(MemoptPassWarning, match="pass 'returns_graph' failed.*expected PassResult"):
        train_step_matches_eager(backend)
    assert record(backend, "returns_graph").status == "failed"


@pytest.mark.parametrize("stage", ["model", "joint"])
def test_strict_turns_a_failing_pass_into_an_error(stage: Stage) -> None:
    rewrite, _ = FAILING[stage]
    model, x, y = cnn_case()
    backend = MemoptBackend({"codegen": "eager", "strict": True},
                            passes=(Pass("explode", stage, rewrite_then_raise(rewrite)),))
    with raises_memopt(MemoptPassError, r"pass 'explode' failed: Boom: synthetic failure"):
        loss, _ = torch.compile(model, backend=backend)(x, y)
        loss.backward()


def test_strict_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMOPT_STRICT", "1")
    model, x, y = cnn_case()
    backend = MemoptBackend({"codegen": "eager"}, passes=(
        Pass("explode", "joint", rewrite_then_raise(rewrite_relu_as_mask)),))
    with raises_memopt(MemoptPassError, "pass 'explode' failed"):
        loss, _ = torch.compile(model, backend=backend)(x, y)
        loss.backward()


# --------------------------------------------------------------------------------------------------------
# Disabling a pass, and passes the options do not ask for
# --------------------------------------------------------------------------------------------------------


def _two_counted(options: dict[str, Any]) -> tuple[MemoptBackend, Counting, Counting, Counting]:
    model_pass, joint_pass, kept = Counting(), Counting(), Counting()
    backend = MemoptBackend(options, passes=(
        Pass("count_model", "model", model_pass), Pass("count_joint", "joint", joint_pass),
        Pass("kept", "joint", kept)))
    return backend, model_pass, joint_pass, kept


def test_disable_passes_by_option() -> None:
    backend, model_pass, joint_pass, kept = _two_counted(
        {"codegen": "eager", "disable_passes": ["count_model", "count_joint"]})
    train_step_matches_eager(backend)
    assert model_pass.calls == [] and joint_pass.calls == []
    assert kept.calls == ["joint"]
    statuses = {r.name: (r.status, r.reason) for r in backend.reports[0].passes}
    assert statuses == {"count_model": ("disabled", "disabled by name"),
                        "count_joint": ("disabled", "disabled by name"), "kept": ("unchanged", None)}


def test_disable_passes_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMOPT_DISABLE_PASSES", " count_joint , count_model")
    backend, model_pass, joint_pass, kept = _two_counted({"codegen": "eager"})
    train_step_matches_eager(backend)
    assert model_pass.calls == [] and joint_pass.calls == [] and kept.calls == ["joint"]
    assert [r.status for r in backend.reports[0].passes] == ["disabled", "disabled", "unchanged"]


def test_environment_is_read_when_the_backend_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEMOPT_DISABLE_PASSES", raising=False)
    backend, model_pass, joint_pass, _ = _two_counted({"codegen": "eager"})
    monkeypatch.setenv("MEMOPT_DISABLE_PASSES", "count_model,count_joint")
    train_step_matches_eager(backend)
    assert model_pass.calls == ["model"] and joint_pass.calls == ["joint"]


def test_unwanted_pass_is_not_requested() -> None:
    skipped, needs_adapters = Counting(), Counting()
    passes = (Pass("adapters_only", "model", needs_adapters, wanted=lambda cfg: cfg.adapters is not None),
              Pass("never", "joint", skipped, wanted=lambda cfg: False))
    backend = MemoptBackend({"codegen": "eager"}, passes=passes)
    train_step_matches_eager(backend)
    assert skipped.calls == [] and needs_adapters.calls == []
    assert [(r.name, r.status) for r in backend.reports[0].passes] == [
        ("adapters_only", "not requested"), ("never", "not requested")]
    # ``wanted`` reads the options: with adapter options (on a prepared model) the adapter pass runs.
    torch._dynamo.reset()
    options = {"adapters": {"rank": 4, "targets": ["head"]}}
    model, x, y = cnn_case()
    memopt.prepare(model, options)
    backend = MemoptBackend({"codegen": "eager", **options}, passes=passes)
    torch.compile(model, backend=backend)(x, y)[0].backward()
    assert needs_adapters.calls == ["model"] and skipped.calls == []


# --------------------------------------------------------------------------------------------------------
# Ordering checks
# --------------------------------------------------------------------------------------------------------


def _noop(name: str, stage: str = "joint", after: tuple[str, ...] = ()) -> Pass:
    return Pass(name, stage, lambda gm, ctx: PassResult(gm, False), after=after)  # type: ignore[arg-type]


def test_check_order_accepts_a_valid_pipeline() -> None:
    check_order((_noop("a", "model"), _noop("b", "model", after=("a",)), _noop("c"), _noop("d", after=("c", "a")),
                 _noop("e", after=("not_in_this_pipeline",))))


@pytest.mark.parametrize(("passes", "match"), [
    ((_noop("j"), _noop("m", "model")), r"model-graph pass 'm' is listed after a joint-graph pass"),
    ((_noop("late", after=("early",)), _noop("early")), r"pass 'late' must run after 'early'"),
    ((_noop("m", "model", after=("n",)), _noop("n", "model")), r"pass 'm' must run after 'n'"),
    ((_noop("twice"), _noop("other"), _noop("twice")), r"\['twice'\] more than once"),
    ((_noop("odd", "backward"),), r"stage 'backward'"),
    ((Pass("guess", "joint", lambda gm, ctx: PassResult(gm, False), lossy=True),),
     r"pass 'guess' is lossy but runs under the default options"),
], ids=["model-after-joint", "after-violated", "after-violated-model", "duplicate", "bad-stage", "lossy-by-default"])
def test_check_order_rejects(passes: tuple[Pass, ...], match: str) -> None:
    with pytest.raises(MemoptConfigError, match=match):
        check_order(passes)
    # The backend checks the order when it is built, before anything compiles.
    with pytest.raises(MemoptConfigError, match=match):
        MemoptBackend({"codegen": "eager"}, passes=passes)


def test_pipeline_lists_only_real_passes() -> None:
    from memopt.compiler.pipeline import PIPELINE

    check_order(PIPELINE)
    for p in PIPELINE:
        # One pass per file: memopt/passes/<name>.py exposes run(gm, ctx).
        assert isinstance(p, Pass) and p.run.__module__ == f"memopt.passes.{p.name}", p
    assert MemoptBackend({"codegen": "eager"}).passes == PIPELINE
