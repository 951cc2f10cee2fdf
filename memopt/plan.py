"""``memopt plan``: will this model and configuration fit, and how long will a step take?

The model is built on fake tensors (``FakeTensorMode``: shapes, dtypes and strides, no storage), then
goes through the real capture and pipeline — Dynamo, the model-graph passes, AOTAutograd, the joint
passes, cost annotation, partition — and the step is simulated. Nothing is allocated for the model, so a
70B plan runs on a laptop.

Note [Fake CPU tensors, not the meta device]
On the meta device ``scaled_dot_product_attention`` always takes the math kernel, which materialises and
saves every (seq x seq) attention matrix: a GPU plan built that way would charge gigabytes that flash
attention never allocates. Fake tensors that claim the CPU device take the flash kernel for CPU, whose
saved tensors (output and log-sum-exp) match the CUDA flash kernel's, so the plan sees what a GPU run saves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import time
import types
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from memopt.config import MemoptConfig, MemoryBudget, closest, parse_options
from memopt.errors import (
    MemoptConfigError,
    MemoptError,
    MemoptInfeasibleBudget,
    MemoptUnsupportedError,
    memopt_cause,
)
from memopt.units import format_bytes

# Hugging Face configs of well-known models (public config.json values), so `memopt plan` needs no
# download. Each is (model_type, config kwargs).
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-2-7b": ("llama", dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)),
    "llama-2-13b": ("llama", dict(
        hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
        num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)),
    "llama-3.1-8b": ("llama", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5,
        rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 8192})),
    "mistral-7b": ("mistral", dict(   # v0.3: no sliding window
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=32768, max_position_embeddings=32768, rms_norm_eps=1e-5,
        rope_theta=1000000.0, sliding_window=None)),
    "gpt2": ("gpt2", dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024)),
    # A model small enough to train on a CPU in seconds; the demo and the tests use its shape.
    "llama-tiny": ("llama", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=512)),
}

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}

# Optimizer states per trainable parameter, in units of the parameter's own bytes (torch keeps them in
# the parameter's dtype), and the extra temporaries of torch's foreach implementation of one step.
OPTIMIZERS: dict[str, tuple[float, float]] = {
    "adamw": (2.0, 1.0),          # exp_avg, exp_avg_sq; the step makes one sqrt(exp_avg_sq) list
    "adam": (2.0, 1.0),
    "sgd-momentum": (1.0, 0.0),   # momentum buffer; updates in place
    "sgd": (0.0, 0.0),
    "none": (0.0, 0.0),           # forward and backward only
}


@dataclasses.dataclass
class PlanReport:
    """The answer of ``memopt plan``; ``to_json`` is what ``--json`` prints."""

    model: str
    batch: int
    seq: int
    dtype: str
    optimizer: str
    device: str
    device_memory_bytes: int
    parameters: int                         # count
    trainable_parameters: int               # count
    peak_bytes: int
    breakdown: dict[str, int]               # bytes at the peak, by category; sums to peak_bytes
    peak_at: str
    forward_backward_peak_bytes: int         # the peak of forward+backward alone (before the update)
    totals: dict[str, int]                  # whole-step totals: weights, gradients, optimizer states, saved
    budget_bytes: int | None
    fits_device: bool
    fits_budget: bool | None
    step_time_s: float                      # predicted on the device profile
    step_time_parts: dict[str, float]
    graphs: int
    stage_seconds: dict[str, float]
    planner_peak_rss_bytes: int              # this process's peak resident memory (what planning cost)
    notes: list[str]
    schedule: dict[str, Any] | None = None  # with a budget: the plan per block, the solver's figures
    sparse_auto: dict[str, Any] | None = None  # sparse_backprop "auto": the choice and what it weighed
    host_peak_bytes: int = 0                # the most the offload host pool holds (not device memory)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["peak"] = self.peak_bytes
        return out

    def render(self) -> str:
        lines = [
            f"memopt plan: {self.model}, batch {self.batch} x {self.seq} tokens, {self.dtype}, "
            f"optimizer {self.optimizer}, device {self.device}",
            f"  parameters: {self.parameters / 1e9:.2f} B ({self.trainable_parameters / 1e9:.2f} B trainable)",
            f"  peak memory: {format_bytes(self.peak_bytes)} (at {self.peak_at}); forward+backward "
            f"alone peaks at {format_bytes(self.forward_backward_peak_bytes)}",
        ]
        width = max(len(k) for k in self.breakdown) if self.breakdown else 0
        for name, nbytes in self.breakdown.items():
            share = 100.0 * nbytes / self.peak_bytes if self.peak_bytes else 0.0
            lines.append(f"    {name.replace('_', ' '):<{width}}  {format_bytes(nbytes):>11}  {share:5.1f}%")
        lines.append("  whole step: " + ", ".join(
            f"{k.replace('_', ' ')} {format_bytes(v)}" for k, v in self.totals.items()))
        verdict = "fits" if self.fits_device else "does NOT fit"
        lines.append(f"  device {self.device}: {format_bytes(self.device_memory_bytes)} -> {verdict}")
        if self.host_peak_bytes:
            lines.append(f"  host memory for offloaded activations: {format_bytes(self.host_peak_bytes)} at most")
        if self.budget_bytes is not None:
            lines.append(f"  budget {format_bytes(self.budget_bytes)} -> "
                         + ("met" if self.fits_budget else "NOT met"))
        parts = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in self.step_time_parts.items())
        lines.append(f"  estimated step time: {self.step_time_s * 1e3:.1f} ms ({parts})")
        lines.append(f"  planned in {self.stage_seconds.get('total', 0.0):.1f} s, "
                     f"{format_bytes(self.planner_peak_rss_bytes)} peak process memory")
        if self.schedule is not None:
            solver = self.schedule.get("solver") or {}
            lines.append(f"  schedule ({self.schedule['method']}; CP-SAT {solver.get('status', 'did not run')}"
                         + (f", gap {solver['gap']:.1%}" if solver.get("gap") is not None else "")
                         + f"), predicted added time {self.schedule['added_time_s'] * 1e3:.2f} ms "
                         "(recompute, the partitioner's own included, and exposed transfers):")
            lines.append(f"    {'block':<28} {'kept':>11} {'recomputed':>11} {'offloaded':>11}")
            for row in self.schedule["blocks"]:
                lines.append(f"    {row['block'][-28:]:<28} {format_bytes(row['keep']):>11} "
                             f"{format_bytes(row['recompute']):>11} {format_bytes(row['offload']):>11}")
        if self.sparse_auto is not None:
            lines += _auto_table(self.sparse_auto)
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def _auto_table(choice: Mapping[str, Any]) -> list[str]:
    """The candidates ``sparse_backprop: "auto"`` measured, the chosen one marked."""
    chosen = choice["chosen"]
    lines = [f"  sparse_backprop auto over the last blocks of {choice['stack']} (score: blocks x sqrt(share "
             f"of columns)), budget {format_bytes(choice['budget_bytes'])}:",
             f"    {'blocks':>6} {'columns':>8} {'trained':>12} {'step peak':>11} {'score':>6}"]
    for row in choice["candidates"]:
        mark = "  <- chosen" if (row["depth"], row["ratio"]) == (chosen["depth"], chosen["ratio"]) else (
            "" if row["peak_bytes"] <= choice["budget_bytes"] else "  over")
        lines.append(f"    {row['depth']:>6} {row['ratio']:>8g} {row['trainable']:>12,} "
                     f"{format_bytes(row['peak_bytes']):>11} {row['score']:>6.2f}{mark}")
    return lines


def load_hf_config(model: str) -> tuple[str, Any]:
    """A preset name or a path to a Hugging Face ``config.json``; returns (display name, config)."""
    try:
        from transformers import AutoConfig
    except ImportError as err:  # pragma: no cover - transformers is a test and plan dependency
        raise MemoptUnsupportedError(
            "memopt plan builds Hugging Face models: pip install transformers") from err
    if model in PRESETS:
        model_type, kwargs = PRESETS[model]
        return model, AutoConfig.for_model(model_type, **kwargs)
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise MemoptConfigError(
            f"unknown model {model!r}: not a preset and not a config file.{closest(model, list(PRESETS))} "
            f"Presets: {', '.join(PRESETS)}; or give the path of a Hugging Face config.json")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise MemoptConfigError(f"cannot read the model config {str(path)!r}: {err}") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise MemoptConfigError(
            f"{str(path)!r} is not a Hugging Face model config: it needs a 'model_type' key (e.g. 'llama')")
    kwargs = {k: v for k, v in data.items() if k not in ("model_type", "transformers_version")}
    try:
        config = AutoConfig.for_model(data["model_type"], **kwargs)
    except (ValueError, KeyError, TypeError) as err:
        raise MemoptConfigError(f"{str(path)!r}: transformers cannot build this config: {err}") from None
    return path.stem if path.name != "config.json" else path.parent.name, config


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def fake_causal_lm(config: Any, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    """Build a ``AutoModelForCausalLM`` from ``config`` on fake tensors; returns (model, fake mode)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    from transformers import AutoModelForCausalLM

    config._attn_implementation = "sdpa"
    mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv())
    with _default_dtype(dtype), mode, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config)
    if getattr(model, "loss_type", "") is None:
        # transformers logs a warning inside forward when it cannot infer the loss type from the class
        # name (GPT2LMHeadModel), which breaks the Dynamo graph in two.
        model.loss_type = "ForCausalLM"
    return model, mode


def _trace(model: nn.Module, backend: Any, example_inputs: Mapping[str, Any]) -> None:
    """Run ``model`` once, compiled with ``backend``, and leave no compiled code behind.

    Dynamo keeps compiled graphs on the code object it starts from, and counts them against
    ``recompile_limit``. Compiling the model itself would leave each plan's graph on the model's
    ``forward``, where a real compile of the same class later finds them (``sparse_backprop: "auto"``
    plans many fake copies). So the trace starts from a function made for this plan, whose code object,
    and the graphs on it, go when it does; code compiled at graph breaks is dropped the same way.
    """
    from torch._dynamo import convert_frame
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list, reset_code

    def compiled_codes() -> dict[int, Any]:
        return {id(code): code for ref in convert_frame.input_codes.seen
                if (code := ref()) is not None and _debug_get_cache_entry_list(code)}

    def step(model: nn.Module, inputs: Mapping[str, Any]) -> Any:
        return model(**inputs)

    own = types.FunctionType(step.__code__.replace(co_name=f"memopt_plan_{next(_TRACES)}"), step.__globals__)
    before = compiled_codes()
    try:
        with warnings.catch_warnings():
            # The step is only traced; autograd's warnings about fake-tensor kernels do not concern a plan.
            warnings.simplefilter("ignore")
            torch.compile(own, backend=backend, fullgraph=False)(model, example_inputs)
    except Exception as err:  # Dynamo wraps memopt's errors: give the user memopt's own
        cause = memopt_cause(err, MemoptError)
        if cause is None:
            raise
        raise cause from None
    finally:
        for key, code in compiled_codes().items():
            if key not in before:
                reset_code(code)


_TRACES = itertools.count()


def _parameter_bytes(model: nn.Module) -> tuple[int, int, int, int]:
    """(parameters, trainable parameters, weight bytes, trainable bytes); a quantized linear's weight
    counts as its ``out x in`` parameters and its stored (quantized) bytes."""
    from memopt.runtime.qlinear import QuantizedLinear

    total = trainable = total_bytes = trainable_bytes = 0
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            total += module.in_features * module.out_features
            total_bytes += module.quantized_bytes()
    for p in model.parameters():
        nbytes = p.numel() * p.element_size()
        total += p.numel()
        total_bytes += nbytes
        if p.requires_grad:
            trainable += p.numel()
            trainable_bytes += nbytes
    return total, trainable, total_bytes, trainable_bytes


@dataclasses.dataclass
class CapturedStep:
    """One captured step, ready to be simulated (and, from a symbolic length, planned at any length)."""

    name: str
    profile: Any
    config: MemoptConfig                 # the options, with the graphs' share of the budget
    budget: MemoryBudget | None          # the user's budget (the whole step's)
    backend: Any
    batch: int
    seq: int
    dtype: str
    optimizer: str
    count: int
    trainable: int
    param_bytes: int
    trainable_bytes: int
    state_bytes: int
    update_temp: int
    notes: list[str]
    seconds: dict[str, float]
    started: float
    sparse_auto: dict[str, Any] | None

    @property
    def reports(self) -> list[Any]:
        return [r for r in self.backend.reports if r.memory is not None]


def plan(model_or_config: nn.Module | str | Any, example_inputs: Mapping[str, Any] | None = None,
         options: Mapping[str, Any] | MemoptConfig | None = None, *, device: str | None = None,
         batch: int = 1, seq: int = 2048, dtype: str = "bf16", optimizer: str = "adamw",
         loss_chunks: int | None = None, progress: Callable[[str], None] | None = None) -> PlanReport:
    """Plan one training step without running it (the same as ``memopt plan``).

    ``model_or_config``: a preset name, a config.json path, a transformers config, or an ``nn.Module``
    built on fake tensors (see :func:`fake_causal_lm`). ``example_inputs``: keyword inputs of the model
    (default: ``input_ids`` and ``labels`` of ``batch x seq`` tokens). ``device``: the cost profile to
    plan for (overrides ``options['cost_profile']``). ``loss_chunks``: plan the step with
    :func:`memopt.losses.chunked_causal_lm_loss` in that many slices (Note [Chunked cross-entropy])
    instead of the model's own loss.
    """
    captured = capture_step(model_or_config, example_inputs, options, device=device, batch=batch, seq=seq,
                            dtype=dtype, optimizer=optimizer, loss_chunks=loss_chunks, progress=progress)
    return step_report(captured, progress=progress)


def capture_step(model_or_config: nn.Module | str | Any, example_inputs: Mapping[str, Any] | None = None,
                 options: Mapping[str, Any] | MemoptConfig | None = None, *, device: str | None = None,
                 batch: int = 1, seq: int = 2048, dtype: str = "bf16", optimizer: str = "adamw",
                 loss_chunks: int | None = None, progress: Callable[[str], None] | None = None,
                 symbolic_length: bool = False) -> CapturedStep:
    """Build, prepare and capture the step that :func:`plan` plans (its stages 1 and 2). With
    ``symbolic_length``, the sequence length is captured as a symbol (Note [Planning every length from
    one capture])."""
    say = progress or (lambda message: None)
    started = time.perf_counter()
    notes: list[str] = []
    seconds: dict[str, float] = {}
    if dtype not in DTYPES:
        raise MemoptConfigError(f"dtype {dtype!r} is not supported.{closest(dtype, list(DTYPES))} "
                                f"Choose one of {', '.join(DTYPES)}")
    if optimizer not in OPTIMIZERS:
        raise MemoptConfigError(f"optimizer {optimizer!r} is not known.{closest(optimizer, list(OPTIMIZERS))} "
                                f"Choose one of {', '.join(OPTIMIZERS)}")
    if batch <= 0 or seq <= 0:
        raise MemoptConfigError(f"batch and seq must be positive, got batch={batch}, seq={seq}")
    config = parse_options(options)
    if device is not None:
        config = dataclasses.replace(config, cost_profile=device)
    # Planning never runs the step: the eager code generator compiles nothing heavy. The costs are for
    # the code generator the user named (Note [Fused costs]).
    fused_costs = config.codegen != "eager"
    config = dataclasses.replace(config, codegen="eager")

    from memopt.compiler.backend import MemoptBackend
    from memopt.cost_model.profile import check_measured_on, load_profile

    profile = load_profile(config.cost_profile)
    # Planning is for the profile's own device: only its cost-model version must match.
    check_measured_on(profile, None, force=config.force_profile)
    model, name, mode = _build(model_or_config, dtype, seq, say, seconds)
    model.train()
    if config.adapters is not None:
        _prepare_adapters(model, config, mode)
    if example_inputs is None:
        if mode is None:
            raise MemoptConfigError("plan() needs example_inputs when given a module")
        with mode:
            ids = torch.zeros(batch, seq, dtype=torch.long)
        if symbolic_length:
            torch._dynamo.maybe_mark_dynamic(ids, 1)
        example_inputs = {"input_ids": ids, "labels": ids, "use_cache": False}
    sparse_auto = None
    if config.sparse_backprop is not None:
        sparse_auto = _prepare_sparse(model, config, mode, example_inputs, optimizer, say, notes)
    if loss_chunks is not None:
        from memopt.losses import ChunkedLossLM

        if loss_chunks < 1:
            raise MemoptConfigError(f"loss_chunks must be at least 1; got {loss_chunks}")
        model = ChunkedLossLM(model, loss_chunks)
        notes.append(f"loss: chunked cross-entropy in {loss_chunks} slices (memopt.losses)")
    count, trainable, param_bytes, trainable_bytes = _parameter_bytes(model)
    if trainable == 0:
        raise MemoptUnsupportedError(
            f"{name} has no trainable parameters, so there is no training step to plan; unfreeze some "
            "parameters or give adapter options")
    state_factor, step_temp_factor = OPTIMIZERS[optimizer]
    state_bytes = int(state_factor * trainable_bytes)
    update_temp = int(step_temp_factor * trainable_bytes)
    budget = config.memory_budget
    graph_budget = _graph_budget(name, budget, optimizer, param_bytes, trainable_bytes, state_bytes, update_temp)

    say(f"[2/4] capturing with Dynamo and AOTAutograd ({count / 1e9:.2f} B parameters)"
        + (f", scheduling for a budget of {format_bytes(budget.nbytes)}" if budget is not None and
           budget.nbytes is not None else f", scheduling for {budget}" if budget is not None else ""))
    stage_started = time.perf_counter()
    graph_config = dataclasses.replace(config, memory_budget=graph_budget)
    backend = MemoptBackend(graph_config, progress=lambda message: say(f"      {message}"), fused_costs=fused_costs)
    _trace(model, backend, example_inputs)
    seconds["capture_and_pipeline"] = time.perf_counter() - stage_started
    captured = CapturedStep(name, profile, graph_config, budget, backend, batch, seq, dtype, optimizer, count,
                        trainable, param_bytes, trainable_bytes, state_bytes, update_temp, notes, seconds,
                        started, sparse_auto)
    if not captured.reports:
        raise MemoptUnsupportedError(f"{name}: Dynamo captured no graph to plan")
    if len(captured.reports) > 1:
        notes.append(f"{len(captured.reports)} graphs (graph breaks): the peak is the largest single graph's; "
                     "graphs run one after another")
    return captured


def _build(model_or_config: nn.Module | str | Any, dtype: str, seq: int, say: Callable[[str], None],
           seconds: dict[str, float]) -> tuple[nn.Module, str, Any]:
    """(model, display name, fake mode or None) from a module, a preset, a config path or a config."""
    if isinstance(model_or_config, nn.Module):
        return model_or_config, type(model_or_config).__name__, None
    if isinstance(model_or_config, str):
        name, hf_config = load_hf_config(model_or_config)
    else:
        name, hf_config = type(model_or_config).__name__, model_or_config
    say(f"[1/4] building {name} on fake tensors ({dtype}; nothing is allocated)")
    start = time.perf_counter()
    model, mode = fake_causal_lm(hf_config, DTYPES[dtype])
    seconds["build"] = time.perf_counter() - start
    max_pos = max_positions(hf_config)
    if max_pos is not None and seq > max_pos:
        raise MemoptConfigError(
            f"seq {seq} is longer than {name}'s max_position_embeddings ({max_pos}); for a model whose "
            f"context was extended, pass its config.json (with its max_position_embeddings and "
            f"rope_scaling) as the model")
    return model, name, mode


def max_positions(hf_config: Any) -> int | None:
    """The longest sequence a Hugging Face config's position table allows (None: no limit given)."""
    return getattr(hf_config, "max_position_embeddings", getattr(hf_config, "n_positions", None))


def _prepare_adapters(model: nn.Module, config: MemoptConfig, mode: Any) -> None:
    from memopt.prepare import prepare, prepared_adapters

    assert config.adapters is not None
    if prepared_adapters(model) is None:
        # The adapters of the options, made as the model's weights were (fake on a fake model).
        prepared: dict[str, Any] = {"adapters": dataclasses.asdict(config.adapters)}
        if config.quantize is not None:
            # Quantized storage of the targets' weights (empty on a fake model: only sizes matter).
            prepared["quantize"] = dataclasses.asdict(config.quantize)
        with mode if mode is not None else contextlib.nullcontext():
            prepare(model, prepared)


def _graph_budget(name: str, budget: MemoryBudget | None, optimizer: str, param_bytes: int, trainable_bytes: int,
                  state_bytes: int, update_temp: int) -> MemoryBudget | None:
    """The compiled graphs' share of the step's budget (Note [Budgets in a plan])."""
    if budget is None or budget.nbytes is None:
        return budget
    # Note [Budgets in a plan]: the budget covers the whole step. Optimizer states live outside
    # the compiled graphs for all of it, so the graphs get the budget minus the states; the
    # optimizer update needs weights, gradients, states and its temporaries at once, whatever
    # the activation schedule, so a budget below that is refused before any capture.
    fixed = param_bytes + trainable_bytes + state_bytes + update_temp
    if fixed > budget.nbytes:
        raise MemoptInfeasibleBudget(
            f"{name} cannot be trained in {format_bytes(budget.nbytes)}: weights "
            f"{format_bytes(param_bytes)}, gradients {format_bytes(trainable_bytes)} and {optimizer} "
            f"states {format_bytes(state_bytes)} (plus {format_bytes(update_temp)} of update "
            f"temporaries) need {format_bytes(fixed)} at the optimizer step alone, before any "
            "activation. No activation schedule can fit; train adapters instead of every weight, "
            "quantize the frozen weights, use an optimizer with less state, or a larger budget.",
            min_peak_bytes=fixed, breakdown={"parameters": param_bytes, "gradients": trainable_bytes,
                                             "optimizer_states": state_bytes,
                                             "temporaries": update_temp})
    return MemoryBudget(nbytes=budget.nbytes - state_bytes)


def step_report(captured: CapturedStep, *, progress: Callable[[str], None] | None = None) -> PlanReport:
    """Stages 3 and 4 of :func:`plan`: the step simulated with the optimizer's states and update, its
    time estimated, on the captured graphs as they were last planned."""
    say = progress or (lambda message: None)
    c, seconds = captured, dict(captured.seconds)
    reports, profile = c.reports, c.profile
    say("[3/4] simulating the step with optimizer states and the optimizer update")
    start = time.perf_counter()
    timelines = [r.simulate({"optimizer_states": c.state_bytes}) for r in reports]
    main = max(timelines, key=lambda t: t.peak_bytes)
    # The optimizer update runs after the backward with every gradient alive, plus its temporaries.
    # main.resident_bytes holds the weights, buffers, inputs and optimizer states.
    grads_bytes = c.trainable_bytes
    update_peak = main.resident_bytes + grads_bytes + c.update_temp
    breakdown = _public_breakdown(main.breakdown)
    peak_at = f"{main.peak_phase}:{main.peak_node}"
    peak = main.peak_bytes
    if update_peak > peak:
        peak, peak_at = update_peak, "optimizer step"
        breakdown = {"weights": c.param_bytes, "gradients": grads_bytes, "optimizer_states": c.state_bytes,
                     "inputs": main.resident_bytes - c.param_bytes - c.state_bytes, "temporaries": c.update_temp}
    seconds["simulate"] = time.perf_counter() - start

    say(f"[4/4] estimating the step time on {profile.name}")
    fw_bw = sum(r.predicted_time_s or 0.0 for r in reports)
    # The update reads and writes parameters and states and reads gradients, all bandwidth-bound.
    state_factor = OPTIMIZERS[c.optimizer][0]
    touched = c.trainable_bytes * (2 + 1 + 2 * state_factor)
    update = touched / profile.memory_bandwidth + (profile.launch_overhead_s if state_factor else 0.0)
    budget, notes = c.budget, list(c.notes)
    budget_bytes = None
    fits_budget = None
    if budget is not None:
        scheduled = [r.budget_bytes for r in reports if r.budget_bytes is not None]
        budget_bytes = budget.nbytes if budget.nbytes is not None else (
            max(scheduled) + c.state_bytes if scheduled else None)
        # Bytes cover the whole step; a fraction of the activations covers forward + backward (the
        # optimizer update holds no activations), whose peak is then what it is checked against.
        checked = peak if budget.nbytes is not None else main.peak_bytes
        fits_budget = None if budget_bytes is None else checked <= budget_bytes
        if budget.nbytes is None and update_peak > main.peak_bytes:
            notes.append(f"the budget ({budget}) applies to forward + backward; the optimizer update "
                         f"peaks higher, at {format_bytes(update_peak)}")
    seconds["total"] = time.perf_counter() - c.started
    return PlanReport(
        model=c.name, batch=c.batch, seq=c.seq, dtype=c.dtype, optimizer=c.optimizer, device=profile.name,
        device_memory_bytes=profile.memory_bytes, parameters=c.count, trainable_parameters=c.trainable,
        peak_bytes=peak, breakdown=breakdown, peak_at=peak_at, forward_backward_peak_bytes=main.peak_bytes,
        totals={"weights": c.param_bytes, "gradients": grads_bytes, "optimizer_states": c.state_bytes,
                "saved_activations": main.saved_activation_bytes},
        budget_bytes=budget_bytes, fits_device=peak <= profile.memory_bytes, fits_budget=fits_budget,
        step_time_s=fw_bw + update, step_time_parts={"forward+backward": fw_bw, "optimizer": update},
        graphs=len(reports), stage_seconds={k: round(v, 3) for k, v in seconds.items()},
        planner_peak_rss_bytes=peak_rss_bytes(), notes=notes, schedule=_schedule_summary(reports),
        sparse_auto=c.sparse_auto, host_peak_bytes=max(t.host_peak_bytes for t in timelines))


def _prepare_sparse(model: nn.Module, config: MemoptConfig, mode: Any, example_inputs: Mapping[str, Any],
                    optimizer: str, say: Callable[[str], None], notes: list[str]) -> dict[str, Any] | None:
    """Prepare the (fake) model with the sparse_backprop policy, choosing it first under "auto"; notes
    what trains. Returns the auto choice, as JSON."""
    from memopt.sparse import prepare_sparse, sparse_decisions
    from memopt.sparse_auto import prepare_auto

    if config.sparse_backprop is not None and config.sparse_backprop.auto:
        # The search plans fake copies of the model itself; outside the fake mode, as any plan.
        prepare_auto(model, config, example_inputs, optimizer=optimizer,
                     progress=lambda message: say(f"      {message}"))
    elif sparse_decisions(model) is None:
        # On a fake model the slices are the first channels: their sizes are what the plan needs.
        with mode if mode is not None else contextlib.nullcontext():
            prepare_sparse(model, config)
    plan_of = sparse_decisions(model)
    assert plan_of is not None
    kinds = [d.kind for d in plan_of.decisions.values()]
    notes.append("sparse_backprop: " + ", ".join(f"{kinds.count(k)} {k}" for k in
                                                 ("full", "columns", "rows", "frozen") if k in kinds)
                 + " parameters (memopt.sparse)")
    if plan_of.auto is None:
        return None
    notes.append(plan_of.auto.summary())
    return cast(dict[str, Any], plan_of.auto.to_json())


def _schedule_summary(reports: Sequence[Any]) -> dict[str, Any] | None:
    """Per block (repeated layer, or "other"): bytes the chosen plan keeps, recomputes and offloads."""
    from memopt.names import layer_of

    scheduled = [r for r in reports if r.schedule is not None and r.joint is not None]
    if not scheduled:
        return None
    blocks: dict[str, dict[str, int]] = {}
    for report in scheduled:
        nodes = {n.name: n for n in report.joint.graph.nodes}
        for row in report.schedule.decisions():
            node = nodes.get(row["name"])
            block = (layer_of(node)[0] if node is not None else None) or "other"
            entry = blocks.setdefault(block, {"keep": 0, "recompute": 0, "offload": 0})
            entry[row["choice"]] += row["bytes"]
    first = scheduled[0].schedule
    return {"method": first.method, "solver": first.solver, "attempts": first.attempts,
            "added_time_s": sum(r.schedule.chosen.added_time_s for r in scheduled),
            "blocks": [{"block": name, **blocks[name]} for name in sorted(blocks, key=_natural)]}


def _natural(name: str) -> tuple[Any, ...]:
    """``layers.2`` before ``layers.10``; "other" last."""
    import re

    return (name == "other", tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)))


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far, in bytes (0 where the OS does not say)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Windows
        return 0
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024   # Linux reports KiB


def _public_breakdown(breakdown: Mapping[str, int]) -> dict[str, int]:
    """The simulator's categories under the names ``plan --json`` documents."""
    names = {"parameters": "weights", "buffers": "weights", "saved_activations": "activations",
             "inputs": "inputs", "gradients": "gradients", "optimizer_states": "optimizer_states",
             "outputs": "outputs", "temporaries": "temporaries"}
    out: dict[str, int] = {}
    for key, value in breakdown.items():
        out[names.get(key, key)] = out.get(names.get(key, key), 0) + value
    return out
