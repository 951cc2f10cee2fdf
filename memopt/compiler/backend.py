"""The ``torch.compile`` backend.

``torch.compile(model, backend="memopt", options={...})`` resolves ``"memopt"`` through the
``torch_dynamo_backends`` entry point to :func:`memopt`, which Dynamo calls once per captured graph. For
reports and custom pass lists, build a :class:`MemoptBackend` and pass the object as the backend.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.fx

from memopt.compiler.capture import GraphReport, JointStage, compile_joint
from memopt.compiler.dump import Dumper, graph_id
from memopt.compiler.pipeline import PIPELINE
from memopt.compiler.runner import check_order, run_passes
from memopt.config import MemoptConfig, parse_options
from memopt.cost_model.profile import DeviceProfile, check_measured_on, load_profile, profile_origin
from memopt.errors import MemoptConfigError
from memopt.names import GraphInput, dynamo_inputs
from memopt.passes.base import Pass, PassContext
from memopt.passes.inject_adapters import is_adapter_node
from memopt.schedule.budget import StepLedger

if TYPE_CHECKING:
    from memopt.sparse_auto import AutoChoice


def _check_prepared(config: MemoptConfig, gm: torch.fx.GraphModule, inputs: Sequence[GraphInput],
                    example_inputs: Sequence[Any]) -> AutoChoice | None:
    """A training graph holds what the options need memopt.prepare to have made; returns the choice of
    ``sparse_backprop: "auto"``."""
    adapters = any(is_adapter_node(n) for n in gm.graph.nodes)
    if config.adapters is not None and not adapters:
        raise MemoptConfigError(
            "options['adapters'] is set, but this graph trains parameters and holds no memopt adapter: "
            "call memopt.prepare(model, options) before torch.compile (it freezes the base weights and "
            "creates the adapters, so that the optimizer can be built on them), or drop 'adapters' "
            "from the options to train the model as it is")
    if config.quantize is not None and adapters and not any("dequantize_" in str(n.target) for n in gm.graph.nodes):
        raise MemoptConfigError(
            "options['quantize'] is set, but this graph's adapters sit on full-precision weights: the "
            "model was prepared without 'quantize'. Call memopt.prepare on a fresh model with the same "
            "options you compile with, or drop 'quantize' from the options")
    return _check_sparse_prepared(config, inputs, example_inputs) if config.sparse_backprop is not None else None


def _check_sparse_prepared(config: MemoptConfig, inputs: Sequence[GraphInput], example_inputs: Sequence[Any],
                           ) -> AutoChoice | None:
    """Refuses a policy the model was not prepared with; returns the choice of ``"auto"``."""
    from memopt.sparse import unprepared_slices
    from memopt.sparse_auto import choice_of

    assert config.sparse_backprop is not None
    if config.sparse_backprop.auto:
        choice = choice_of(example_inputs)
        if choice is None:
            raise MemoptConfigError(
                "options['sparse_backprop'] is 'auto', but the model was not prepared with it: call "
                "memopt.prepare(model, options, example_inputs=batch) before torch.compile (it chooses what "
                "trains within the memory budget and makes the slices)")
        return choice
    missing = unprepared_slices([i.name for i in inputs if i.kind == "parameter" and i.name], config.sparse_backprop)
    if missing:
        raise MemoptConfigError(
            f"options['sparse_backprop'] trains slices of {len(missing)} weights ({', '.join(missing[:3])}"
            f"{' ...' if len(missing) > 3 else ''}), but the model was not prepared: call memopt.prepare(model, "
            "options) before torch.compile (it makes each slice a small parameter for the optimizer)")
    return None


def _compile_id() -> str:
    compile_id = torch._guards.CompileContext.current_compile_id()
    if compile_id is None:
        return "0_0"
    return str(compile_id).replace("/", "_").replace(" ", "")


class MemoptBackend:
    """A memopt backend object: ``torch.compile(model, backend=MemoptBackend(options))``.

    ``reports`` holds one :class:`GraphReport` per graph it compiled (the partitioned graphs, the pass
    records and the simulated memory), in compile order. ``passes`` replaces the pipeline (tests register
    passes of their own this way). ``fused_costs`` says whether the graphs will run through a fusing code
    generator, for the cost model (Note [Fused costs]); by default, whether ``codegen`` is not "eager".
    ``memopt plan`` captures with the eager code generator but costs for the one the user named.
    """

    def __init__(self, options: Mapping[str, Any] | MemoptConfig | None = None, *,
                 passes: Sequence[Pass] | None = None,
                 progress: Callable[[str], None] | None = None, fused_costs: bool | None = None) -> None:
        self.config = parse_options(options)
        self.fused_costs = self.config.codegen != "eager" if fused_costs is None else fused_costs
        self.progress: Callable[[str], None] = progress or (lambda message: None)
        self.passes: tuple[Pass, ...] = PIPELINE if passes is None else tuple(passes)
        check_order(self.passes)
        self.reports: list[GraphReport] = []
        self.ledger = StepLedger()
        self._profile: DeviceProfile | None = None
        self.__name__ = "memopt"

    @property
    def profile(self) -> DeviceProfile:
        if self._profile is None:
            self._profile = load_profile(self.config.cost_profile)
        return self._profile

    def _check_profile(self, example_inputs: Sequence[Any]) -> None:
        """A tuned profile must be from this device and cost model (Note [Measured profiles are keyed])."""
        if self.profile.measured_on is None:
            return
        from memopt.cost_model.tune import device_name

        device = next((x.device for x in example_inputs if isinstance(x, torch.Tensor)), torch.device("cpu"))
        check_measured_on(self.profile, device_name(device), force=self.config.force_profile)

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any,
                 ) -> Callable[..., Any]:
        if kwargs:
            raise MemoptConfigError(
                f"memopt takes its settings through options=..., not {sorted(kwargs)}; e.g. "
                "torch.compile(model, backend='memopt', options={'memory_budget': '12GiB'})")
        config = self.config
        self._check_profile(example_inputs)
        inputs = dynamo_inputs(gm, example_inputs)
        training = torch.is_grad_enabled() and any(
            isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs)
        if config.memory_budget is not None and torch.is_grad_enabled():
            _warn_untraced_checkpoint()
            if not training:
                _warn_budget_without_backward()
        choice = _check_prepared(config, gm, inputs, example_inputs) if training else None
        report = GraphReport(graph_id=graph_id(_compile_id(), gm), codegen=config.codegen, inputs=inputs)
        self.reports.append(report)
        frame, parameters = _compile_id().split("_")[0], _parameter_bytes(inputs, example_inputs)
        if config.memory_budget is not None and config.memory_budget.nbytes is not None:
            report.held_outside_bytes = self.ledger.held_outside(frame)
            self.ledger.warn_once(frame)
        dumper = Dumper(config.dump_dir, report.graph_id)
        dumper.meta = {"options": {k: v for k, v in config.to_dict().items() if k != "dump_dir"},
                       "codegen": config.codegen, "profile": self.profile.name,
                       "profile_origin": profile_origin(self.profile, config.cost_profile),
                       "input_kinds": list(report.input_kinds),
                       "input_names": [i.name for i in inputs]}
        dumper.stage("captured", gm, kind="model", status="captured", stats={"nodes": len(gm.graph.nodes)})
        reference = copy.deepcopy(gm) if config.verify and training else None
        if choice is not None:
            dumper.meta["sparse_backprop_auto"] = choice.summary()
            dumper.write_json("sparse_auto.json", choice.to_json())
        ctx = PassContext(config=config, stage="model", profile=self.profile, inputs=inputs)
        self.progress(f"model-graph passes on {report.graph_id} ({len(gm.graph.nodes)} nodes)")
        start = time.perf_counter()
        gm, records = run_passes(gm, self.passes, ctx, dumper)
        report.passes.extend(records)
        report.seconds["model_passes"] = time.perf_counter() - start
        stage = JointStage(config, self.profile, self.passes, report, dumper, self.progress,
                           fused_costs=self.fused_costs)
        self.progress("AOTAutograd: tracing the joint forward+backward graph")
        if not training and config.codegen != "eager":
            # Inductor compiles an inference graph without a partition hook: record what we know.
            dumper.stage("inference", None, kind="partition",
                         status="compiled by Inductor without a joint graph")
            dumper.finish()
        if stage.reusable:
            _register_runtime_ops()
        compiled = compile_joint(gm, example_inputs, stage)
        if training and report.forward is None and config.codegen != "eager":
            report.plan_cache = "compiled step"      # AOTAutograd's cache skipped the joint stage
        self.ledger.record(frame, parameters + (report.memory.saved_activation_bytes if report.memory else 0))
        return compiled if reference is None else _verifying(compiled, reference, report, config)


def _register_runtime_ops() -> None:
    """memopt's custom ops, which a compiled step that AOTAutograd's cache hands back may call before
    any pass has imported them (Note [Inductor's caches and the joint stage] in memopt/compiler/capture.py)."""
    import memopt.runtime.compress
    import memopt.runtime.cross_entropy
    import memopt.runtime.linear_cross_entropy
    import memopt.runtime.offload
    import memopt.runtime.qlinear
    import memopt.runtime.token_rows  # noqa: F401


def _verifying(compiled: Callable[..., Any], reference: torch.fx.GraphModule, report: GraphReport,
               config: MemoptConfig) -> Callable[..., Any]:
    """The ``verify`` option (Note [Verifying against eager] in memopt/runtime/verify.py)."""
    from memopt.runtime.verify import verifying
    from memopt.schedule.problem import draws_random

    if config.codegen != "eager" and report.forward is not None and any(
            draws_random(n) for n in report.forward.graph.nodes):
        warnings.warn(f"memopt verify: graph {report.graph_id} draws random numbers, which {config.codegen} "
                      "code draws from another generator than eager PyTorch; it is not verified (verify with "
                      "codegen='eager' to check it)", UserWarning, stacklevel=3)
        return compiled
    return verifying(compiled, reference, report.inputs, config.verify, report.graph_id)


def _parameter_bytes(inputs: Sequence[GraphInput], example_inputs: Sequence[Any]) -> int:
    return sum(x.numel() * x.element_size() for i, x in zip(inputs, example_inputs)
               if i.kind == "parameter" and isinstance(x, torch.Tensor))


# Note [Graphs a budget does not reach]: a budget is planned on what a graph saves for its backward.
# A graph none of whose inputs requires a gradient saves nothing (under Hugging Face's gradient
# checkpointing the step splits into several graphs, and the rotary tables' has no trainable input): it is
# compiled as it is, with a warning, since a model with no trainable parameter at all lands here too. A
# user's torch.utils.checkpoint that Dynamo traces is honoured inside the graph: its regions are
# recomputed as tagged and the schedule plans the rest (memopt/schedule/problem.py never chooses a node
# the user tagged). One Dynamo cannot trace (a graph break inside it) leaves the checkpointed layers
# uncompiled, in eager PyTorch, out of the budget's reach: Dynamo records why among its graph breaks, and
# memopt says so, once per process, with the two ways to give it those layers.
_WARNED_CHECKPOINT: list[bool] = []


def _warn_untraced_checkpoint() -> None:
    if _WARNED_CHECKPOINT or not any("torch.utils.checkpoint" in reason
                                     for reason in torch._dynamo.utils.counters["graph_break"]):
        return
    _WARNED_CHECKPOINT.append(True)
    warnings.warn(
        "memopt: Dynamo could not trace the model's torch.utils.checkpoint (a graph break inside it: with "
        "Hugging Face's gradient_checkpointing_enable(), transformers' attention sets a context variable "
        "there), so the checkpointed layers run uncompiled in eager PyTorch and the memory_budget does not "
        "reach them. Either set torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True "
        "(that side effect need not be replayed in the backward): memopt then compiles the layers and "
        "honours the checkpoint; or turn the model's checkpointing off and let the memory_budget decide "
        "what to recompute", UserWarning, stacklevel=3)


def _warn_budget_without_backward() -> None:
    warnings.warn(
        "memopt: a graph with no input that requires a gradient saves nothing for a backward, so the "
        "memory_budget has nothing to plan there and it is compiled as it is. If the whole model should "
        "train, unfreeze its parameters or call memopt.prepare with adapter options; for inference, run "
        "under torch.no_grad()", UserWarning, stacklevel=3)


def memopt(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], options: Mapping[str, Any] | None = None,
           **kwargs: Any) -> Callable[..., Any]:
    """The ``backend="memopt"`` entry point: validates ``options`` and compiles one Dynamo graph."""
    if kwargs.get("mode") is not None:
        raise MemoptConfigError(
            f"memopt does not take mode={kwargs['mode']!r}; its settings go in options=... "
            "(see the README's option table)")
    kwargs.pop("mode", None)
    if kwargs:
        warnings.warn(f"memopt: ignoring unexpected backend arguments {sorted(kwargs)}", stacklevel=2)
    backend = MemoptBackend(options)
    if options is not None:
        backend.ledger = _LEDGERS.setdefault(id(options), (options, backend.ledger))[1]
    return backend(gm, example_inputs)


# One step's ledger per options object, so per torch.compile call (Note [A byte budget is the step's]);
# the options object is kept so that its id is not reused. A ledger is a few numbers per graph.
_LEDGERS: dict[int, tuple[Mapping[str, Any], StepLedger]] = {}
