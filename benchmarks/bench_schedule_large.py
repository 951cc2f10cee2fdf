"""PyTorch's knapsack against memopt's scheduler on graphs of 32 layers and more, planned on fake tensors.

    python benchmarks/bench_schedule_large.py     # GPT-2 XL (48 layers), Llama-2-7B (32) at 2048 and 4096
    python benchmarks/bench_schedule_large.py --cases llama-2-7b:1024 --fractions ""

Nothing runs: each model is built on fake tensors (``memopt.plan.fake_causal_lm``), captured once per
variant through Dynamo and AOTAutograd, partitioned and simulated, with the ``h100`` cost profile:

- ``pytorch_knapsack``: memopt's backend without a budget, under
  ``torch._functorch.config.patch(activation_memory_budget=0.5)``. memopt's partition step *is* torch's
  ``min_cut_rematerialization_partition``, which reads that setting, so this is PyTorch's own answer
  (min-cut heuristics, then the dp knapsack), simulated by the same simulator as memopt's.
  memopt's partition step saves what random ops make (torch's knapsack could otherwise re-run a dropout
  in the backward: pytorch/pytorch#190758) and its joint graph is memopt's (``split_dropout``'s and
  ``fuse_cross_entropy``'s rewrites included), so this is the best *valid* answer PyTorch's knapsack
  gives on the graph memopt schedules.
- ``pytorch_knapsack_as_is``: the same without that protection and those rewrites (torch's partitioner
  as it ships), for the record: ``redrawn_random_ops`` counts the dropouts its backward runs again, each drawing a new mask, which
  makes the gradients wrong. Not a plan anyone should use; not compared against.
- ``memopt_recompute`` / ``memopt_offload``: memopt's scheduler with ``memory_budget`` set to the
  knapsack's simulated peak in bytes, with offload off / allowed.
- ``pytorch_knapsack@F`` / ``memopt_offload@F`` (``--fractions``): the knapsack at
  ``activation_memory_budget=F`` beside memopt with offload at ``memory_budget=F``, each reaching what
  its own reading of F gives.

Per variant: the simulated peak of forward + backward (no optimizer states), the recomputed FLOPs, and
the predicted added time: the cost-model time of the forward ops the backward runs again plus the exposed
transfer time of offloads (``memopt.schedule.streams.exposed_transfer_s``), counted the same way for
every variant (bench_schedule.py's Note [Counting recomputation]). Also memopt's scheduling time and the
solver's status and gap, every plan the search verified, its model's added time beside the verified one,
and ``model_bound_s``: the added time no plan of the solver's model goes below (Note [A lower bound on
the added time] in memopt/schedule/bound.py), to tell a weak plan from a target the model cannot reach.
The targets: at the knapsack's peak, memopt with offload predicts at most half of the knapsack's added
time; at a fraction, memopt's plan is its own (not a knapsack cut); and the model agrees with the
verification within 10% (or 0.1 ms) on every plan it priced. Results go to
``<out>/bench_schedule_large.json`` and ``.csv``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch

# bench_memory by the name bench_schedule imports it under (this script's folder is on the path)
from bench_memory import choose_names, fresh_plan_cache

from benchmarks.bench_schedule import recompute_stats
from memopt.compiler.backend import MemoptBackend
from memopt.compiler.pipeline import PIPELINE
from memopt.cost_model.estimate import transfer_time_s
from memopt.cost_model.profile import load_profile
from memopt.passes.base import Pass
from memopt.plan import fake_causal_lm, load_hf_config
from memopt.schedule.bound import added_time_bound_s
from memopt.schedule.problem import draws_random, forward_region
from memopt.schedule.streams import exposed_transfer_s

PROFILE = "h100"
KNAPSACK_BUDGET = 0.5
MODELS = {"llama-2-7b": 2048, "gpt2-xl": 1024}     # model -> default tokens per sequence
CASES = ("gpt2-xl:1024", "llama-2-7b:2048", "llama-2-7b:4096")
FRACTION_CASES = (("llama-2-7b:4096", 0.75),)


def _config(name: str) -> Any:
    if name == "gpt2-xl":
        from transformers import GPT2Config

        return GPT2Config(n_embd=1600, n_layer=48, n_head=25, vocab_size=50257, n_positions=1024)
    return load_hf_config(name)[1]


@contextlib.contextmanager
def _torch_as_it_ships() -> Iterator[tuple[Pass, ...]]:
    """memopt's partition step without its protection of random ops; the pipeline without memopt's
    joint-graph rewrites of torch's own ops (split_dropout, fuse_cross_entropy)."""
    import memopt.compiler.partition as partition

    saved = partition.protect_unrepeatable, partition.redrawn_random
    partition.protect_unrepeatable, partition.redrawn_random = (lambda gm: None), (lambda fw, bw: [])
    try:
        yield tuple(p for p in PIPELINE if p.name not in ("split_dropout", "fuse_cross_entropy"))
    finally:
        partition.protect_unrepeatable, partition.redrawn_random = saved


def _attempt_capture(name: str, seq: int, options: dict[str, Any], log: Any) -> dict[str, Any]:
    try:
        return _capture(name, seq, options, 1.0, log)
    except Exception as err:
        return {"error": f"{type(err).__name__}: {err}"[:2000]}


def _capture(name: str, seq: int, options: dict[str, Any], knapsack: float,
             log: Any, passes: tuple[Pass, ...] | None = None) -> dict[str, Any]:
    model, mode = fake_causal_lm(_config(name), torch.bfloat16)
    model.train()
    with mode:
        ids = torch.zeros(1, seq, dtype=torch.long)
    # Captured with the eager code generator (nothing is compiled), costed for Inductor's fused kernels.
    backend = MemoptBackend({"codegen": "eager", "cost_profile": PROFILE, **options},
                            progress=lambda message: log(f"    {message}"), fused_costs=True, passes=passes)
    torch._dynamo.reset()
    start = time.perf_counter()
    with warnings.catch_warnings(), torch._functorch.config.patch(
            activation_memory_budget=knapsack):
        warnings.simplefilter("ignore")
        torch.compile(model, backend=backend)(input_ids=ids, labels=ids, use_cache=False)
    seconds = time.perf_counter() - start
    report = max((r for r in backend.reports if r.memory is not None), key=lambda r: r.memory.peak_bytes)
    assert report.joint is not None and report.memory is not None and report.backward is not None
    profile = load_profile(PROFILE)
    flops, count, recompute_s = recompute_stats(forward_region(report.joint), report.backward, profile,
                                                fused=backend.fused_costs)
    exposed = exposed_transfer_s(report.forward, report.backward,
                                 lambda nbytes: transfer_time_s(nbytes, profile))
    record: dict[str, Any] = {
        "simulated_peak_bytes": report.memory.peak_bytes, "recomputed_flops": flops,
        "recomputed_nodes": count, "recompute_s": recompute_s, "exposed_transfer_s": exposed,
        "predicted_added_s": recompute_s + exposed, "joint_nodes": len(report.joint.graph.nodes),
        "capture_and_schedule_s": seconds, "schedule_s": report.seconds.get("partition"),
        "redrawn_random_ops": sum(1 for n in report.backward.graph.nodes if draws_random(n)),
    }
    if report.schedule is not None:
        result = report.schedule
        record.update(method=result.method, solver=result.solver, budget_bytes=result.budget_bytes,
                      offloaded=len(result.chosen.offload), feasible=result.feasible,
                      plans=result.attempts)
        if report.realiser is not None:
            problem = report.realiser.problem(result.baseline)
            record["model_bound_s"] = result.baseline.added_time_s + added_time_bound_s(problem, result.budget_bytes)
    return record


def _cases(text: str) -> list[tuple[str, int]]:
    cases = []
    for part in text.split(","):
        name, _, seq = part.strip().partition(":")
        if name not in MODELS:
            raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
        cases.append((name, int(seq) if seq else MODELS[name]))
    return cases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES),
                        help="comma-separated model[:tokens] (models: " + ", ".join(MODELS) + ")")
    parser.add_argument("--fractions", default=",".join(f"{c}@{f}" for c, f in FRACTION_CASES),
                        help="comma-separated model:tokens@fraction: memopt with offload at that fractional "
                             "budget, beside PyTorch's knapsack at the same activation_memory_budget")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    fresh_plan_cache()
    fractions = [(c.partition("@")[0], float(c.partition("@")[2])) for c in args.fractions.split(",") if c]
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {message}", flush=True)

    records = []
    for name, seq in _cases(args.cases):
        log(f"{name}, 1 x {seq} tokens: PyTorch's knapsack (activation_memory_budget={KNAPSACK_BUDGET})")
        knapsack = _capture(name, seq, {}, KNAPSACK_BUDGET, log)
        records.append({"model": name, "seq": seq, "variant": "pytorch_knapsack", **knapsack})
        log(f"{name}: PyTorch's knapsack as it ships (random ops may be recomputed; "
            "no split_dropout or fuse_cross_entropy)")
        with _torch_as_it_ships() as passes:
            as_is = _capture(name, seq, {}, KNAPSACK_BUDGET, log, passes)
        records.append({"model": name, "seq": seq, "variant": "pytorch_knapsack_as_is", **as_is})
        budget = knapsack["simulated_peak_bytes"]
        for variant, offload in (("memopt_recompute", False), ("memopt_offload", "auto")):
            log(f"{name}: {variant} at the knapsack's peak ({budget} B)")
            records.append({"model": name, "seq": seq, "variant": variant,
                            **_attempt_capture(name, seq, {"memory_budget": budget, "offload": offload}, log)})
    for case, fraction in fractions:
        (name, seq), = _cases(case)
        log(f"{name}, 1 x {seq} tokens: PyTorch's knapsack at {fraction} and memopt at memory_budget={fraction}")
        records.append({"model": name, "seq": seq, "variant": f"pytorch_knapsack@{fraction}",
                        **_capture(name, seq, {}, fraction, log)})
        records.append({"model": name, "seq": seq, "variant": f"memopt_offload@{fraction}",
                        **_attempt_capture(name, seq, {"memory_budget": fraction, "offload": "auto"}, log)})

    summary = _report(records)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "torch": torch.__version__,
            "profile": PROFILE, "knapsack_budget": KNAPSACK_BUDGET,
            "total_s": round(time.perf_counter() - started, 1)}
    (args.out / "bench_schedule_large.json").write_text(
        json.dumps({"meta": meta, "summary": summary, "results": records}, indent=1, default=str) + "\n")
    with (args.out / "bench_schedule_large.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "seq", "variant", "metric", "value"])
        for r in records:
            for key, value in r.items():
                if key not in ("model", "seq", "variant") and not isinstance(value, (dict, list)):
                    writer.writerow([r["model"], r["seq"], r["variant"], key, value])
    log(f"results in {args.out}")
    return 0 if all("error" not in r for r in records) else 1


def _report(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Print the variants side by side and every plan memopt verified (its model's added time beside the
    verified one); return the targets' verdicts."""
    print()
    print(f"{'model':<11} {'seq':>5} {'variant':<26} {'peak GiB':>9} {'recompute TFLOP':>15} {'added ms':>9} "
          f"{'vs knapsack':>11} {'schedule s':>10} {'redrawn':>7}")
    summary: dict[str, Any] = {}
    for r in records:
        fraction = r["variant"].partition("@")[2]
        base_name = "pytorch_knapsack" + (f"@{fraction}" if fraction else "")
        base = next(k for k in records if (k["model"], k["seq"], k["variant"]) == (r["model"], r["seq"], base_name))
        if "error" in r:
            print(f"{r['model']:<11} {r['seq']:>5} {r['variant']:<26} error: {r['error'][:80]}")
            continue
        ratio = r["predicted_added_s"] / base["predicted_added_s"] if base["predicted_added_s"] else None
        r["added_vs_knapsack"] = ratio
        print(f"{r['model']:<11} {r['seq']:>5} {r['variant']:<26} {r['simulated_peak_bytes'] / 2**30:9.3f} "
              f"{r['recomputed_flops'] / 1e12:15.3f} {r['predicted_added_s'] * 1e3:9.3f} "
              f"{(f'{ratio:.3f}' if ratio is not None else '-'):>11} "
              f"{(r.get('schedule_s') or 0.0):10.1f} {r['redrawn_random_ops']:7d}")
        key = f"{r['model']}:{r['seq']}"
        if r["variant"] == "memopt_offload" and ratio is not None:
            summary[key] = {"added_vs_knapsack": ratio, "target": "<= 0.5 of the knapsack's added time",
                            "target_met": ratio <= 0.5 and r["simulated_peak_bytes"] <= base["simulated_peak_bytes"]}
            if r.get("model_bound_s") is not None:
                # No plan of the solver's model adds less (Note [A lower bound on the added time]).
                summary[key]["model_bound_vs_knapsack"] = r["model_bound_s"] / base["predicted_added_s"]
        if r["variant"].startswith("memopt_offload@"):
            summary[f"{key}@{fraction}"] = {"method": r.get("method"), "target": "memopt's own plan",
                                            "target_met": not str(r.get("method", "")).startswith("pytorch")}
    print("\nEvery plan memopt verified: the model's added time against the verified one "
          "(target: within 10% or 0.1 ms)")
    agree = True
    for r in records:
        for plan in r.get("plans") or []:
            model_s, verified_s = plan.get("model_added_s"), plan["added_time_s"]
            close = None if model_s is None else abs(model_s - verified_s) <= max(0.1e-3, 0.1 * abs(model_s))
            agree = agree and close is not False
            plan["model_agrees"] = close
            print(f"  {r['model']:<11} {r['seq']:>5} {r['variant']:<26} {plan['method'][:60]:<60} "
                  f"{plan['peak_bytes'] / 2**30:8.3f} GiB {'meets' if plan['meets_budget'] else 'over '} "
                  f"verified {verified_s * 1e3:8.3f} ms, model "
                  + ("       -" if model_s is None else f"{model_s * 1e3:8.3f} ms") + {None: "", True: "", False: "  <- off"}[close])
    summary["model_agrees_with_verification"] = agree
    print("\ntargets:", json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    sys.exit(main())
