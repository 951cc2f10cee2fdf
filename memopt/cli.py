"""The ``memopt`` command line: ``memopt plan``, ``memopt tune`` and ``memopt report``.

``memopt plan --model llama-2-7b --batch 1 --seq 2048 [--dtype bf16] [--device rtx4090] [--budget 24GiB]
[--optimizer adamw] [--options OPTIONS.json] [--max-seq] [--json] [--no-suggest]``. Progress goes to
stderr, the answer to stdout. A step that does not fit comes with what would (:mod:`memopt.suggest`).
Exit status: 0 when the step fits the device (and the budget, if given), 1 when it does not (a budget no
plan can meet included), 2 on an error. With ``--max-seq``, the longest sequence that fits is
searched from ``--seq`` (:mod:`memopt.max_seq`); 0 when one was found, 1 when not even 64 tokens fit.

``memopt tune --out PROFILE.json [--quick] [--from-dump DIR]`` measures this device (or fits the node
times a dump recorded) and writes a profile (:mod:`memopt.cost_model.tune`); 0 when written, 2 on an
error, 130 when interrupted (nothing is written then).

``memopt report DUMP_DIR [B_DIR] [--out report.html]`` writes one HTML page from a dump folder, or
comparing two (:mod:`memopt.report`); 0 when written, 2 on an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from memopt.errors import MemoptConfigError, MemoptError, MemoptInfeasibleBudget


def _parser() -> argparse.ArgumentParser:
    from memopt.plan import DTYPES, OPTIMIZERS, PRESETS

    parser = argparse.ArgumentParser(prog="memopt", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    plan = sub.add_parser(
        "plan", help="will this model fit? (fake tensors: nothing is allocated, no GPU needed)",
        description="Build the model on fake tensors, run memopt's capture and pipeline, and print the "
                    "memory breakdown at the peak, whether it fits the device, and the estimated step time.")
    plan.add_argument("--model", required=True,
                      help=f"a preset ({', '.join(PRESETS)}) or a Hugging Face config.json path")
    plan.add_argument("--batch", type=int, default=1, help="sequences per step (default 1)")
    plan.add_argument("--seq", type=int, default=2048, help="tokens per sequence (default 2048)")
    plan.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="weight dtype (default bf16)")
    plan.add_argument("--device", default=None,
                      help="device profile: a built-in name (cpu, rtx4090, a100-80gb, h100, h200) or a "
                           "profile JSON (default: options' cost_profile, else cpu)")
    plan.add_argument("--budget", default=None, help="memory budget, e.g. 24GiB or 0.5")
    plan.add_argument("--optimizer", default="adamw", choices=list(OPTIMIZERS),
                      help="its states are counted (default adamw)")
    plan.add_argument("--options", default=None, help="a JSON file of memopt options")
    plan.add_argument("--loss-chunks", type=int, default=None, metavar="N",
                      help="compute the cross-entropy in N slices of tokens (memopt.losses, as torchtune's "
                           "chunked loss) instead of Hugging Face's full-vocabulary loss")
    plan.add_argument("--max-seq", action="store_true",
                      help="find the longest sequence (a multiple of 64) whose step fits the device or --budget, "
                           "searching from --seq; the step is captured once and re-priced at each length")
    plan.add_argument("--json", action="store_true", help="print one JSON object (byte counts) instead")
    plan.add_argument("--no-suggest", action="store_true",
                      help="when the step does not fit, do not plan the options that would (a budget with "
                           "offload, adapters, quantization, a shorter sequence)")
    plan.add_argument("--force-profile", action="store_true",
                      help="use a tuned --device profile fitted for another cost-model version")
    _tune_parser(sub)
    report = sub.add_parser(
        "report", help="one self-contained HTML page from a dump folder, or comparing two",
        description="Read dump folders (options dump_dir) and write one HTML page: memory timelines with "
                    "the budget, the passes, the schedule's decisions by layer, measured against predicted; "
                    "with two folders, what differs between them.")
    report.add_argument("dumps", nargs="+", metavar="DUMP_DIR", help="a dump folder, or two to compare")
    report.add_argument("--out", default="report.html", help="the page to write (default report.html)")
    return parser


def _tune_parser(sub: Any) -> None:
    tune = sub.add_parser(
        "tune", help="measure this device and write a cost profile (or fit one from a dump's node times)",
        description="Time matmuls, fused attention, elementwise and reduction ops, host copies and the "
                    "launch overhead on this device (CUDA when present, else CPU), fit peaks and "
                    "efficiency curves, and write a profile that options['cost_profile'] and "
                    "`memopt plan --device` accept.")
    tune.add_argument("--out", required=True, help="where to write the profile JSON")
    tune.add_argument("--quick", action="store_true", help="fewer sizes and shorter timings (under 2 minutes)")
    tune.add_argument("--from-dump", default=None, metavar="DIR",
                      help="fit from the node times a dump recorded (options dump_dir and dump_node_times) "
                           "instead of measuring")
    tune.add_argument("--device", default=None, help="torch device to measure (default: cuda if present, else cpu)")
    tune.add_argument("--base", default=None,
                      help="profile whose figures fill what is not measured (default: the dump's, else cpu)")
    tune.add_argument("--name", default=None, help="the profile's name (default: the output file's stem)")


def _number_or_text(text: str) -> int | float | str:
    """``--budget 0.5`` is a fraction, ``--budget 1000000`` bytes, anything else a size string."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _plan(args: argparse.Namespace) -> int:
    from memopt.config import parse_budget
    from memopt.plan import plan

    options: dict[str, object] = {}
    if args.options:
        try:
            options = json.loads(Path(args.options).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise MemoptConfigError(f"--options {args.options!r}: cannot read it as JSON ({err})") from None
        if not isinstance(options, dict):
            raise MemoptConfigError(f"--options {args.options!r}: expected a JSON object of options")
    if args.force_profile:
        options["force_profile"] = True
    if args.budget is not None:
        budget = _number_or_text(args.budget)
        parse_budget(budget, key="--budget")
        options["memory_budget"] = budget
    started = time.perf_counter()

    def progress(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    if args.max_seq:
        from memopt.max_seq import max_seq

        if args.loss_chunks is not None:
            raise MemoptConfigError("--max-seq plans the model's own loss; instead of --loss-chunks, give "
                                    "options {'chunk_sequence': {'logits': 'drop'}} (the LM head without logits)")
        found = max_seq(args.model, options, device=args.device, batch=args.batch, dtype=args.dtype,
                        optimizer=args.optimizer, start=args.seq, progress=progress)
        print(json.dumps(found.to_json(), indent=1, sort_keys=True) if args.json else found.render())
        return 0 if found.max_seq else 1
    def plan_one(candidate: dict[str, object], seq: int) -> Any:
        return plan(args.model, None, candidate, device=args.device, batch=args.batch, seq=seq,
                    dtype=args.dtype, optimizer=args.optimizer, loss_chunks=args.loss_chunks, progress=progress)

    report = plan_one(options, args.seq)
    fits = report.fits_device and report.fits_budget is not False
    from memopt.suggest import Suggestion, render, suggest

    suggestions: list[Suggestion] = []
    if not fits and not args.no_suggest:
        suggestions = suggest(plan_one, options, args.seq, report.device_memory_bytes, progress)
    if args.json:
        print(json.dumps({**report.to_json(), "suggestions": [dataclasses.asdict(s) for s in suggestions]},
                         indent=1, sort_keys=True))
    else:
        print(report.render() + ("\n" + render(suggestions) if not fits and not args.no_suggest else ""))
    return 0 if fits else 1


def _tune(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from memopt.cost_model.profile import load_profile
    from memopt.cost_model.tune import (curve_summary, device_memory_bytes, device_name, fit, measure,
                                        samples_from_dump, write_profile)

    name = args.name or Path(args.out).stem
    if args.from_dump:
        samples, keys = samples_from_dump(args.from_dump)
        base = load_profile(args.base or _builtin_or_cpu(keys["profile"]))
        device, memory, source = keys["device"], None, f"memopt tune --from-dump: {len(samples)} node times"
    else:
        import torch

        target = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        device = device_name(target)
        print(f"memopt tune: measuring {device}{' (quick)' if args.quick else ''}", file=sys.stderr)
        with tqdm(desc="measuring", unit="kernel", file=sys.stderr) as bar:
            def progress(done: int, total: int, what: str) -> None:
                bar.total = total
                bar.set_postfix_str(what)
                bar.update(done - bar.n)

            samples = measure(target, quick=args.quick, progress=progress)
        base, memory = load_profile(args.base or "cpu"), device_memory_bytes(target)
        source = f"memopt tune{' --quick' if args.quick else ''}: {len(samples)} microbenchmarks"
    profile = fit(samples, base, name=name, device=device, source=source, memory_bytes=memory)
    write_profile(profile, args.out)
    print(curve_summary(profile))
    print(f"wrote {args.out}: use it with options={{'cost_profile': {args.out!r}}} or "
          f"`memopt plan --device {args.out}`")
    return 0


def _builtin_or_cpu(name: str) -> str:
    from memopt.cost_model.profile import builtin_profile_names

    return name if name in builtin_profile_names() else "cpu"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "plan":
            return _plan(args)
        if args.command == "tune":
            return _tune(args)
        if args.command == "report":
            from memopt.report import write_report

            print(f"wrote {write_report(args.dumps, args.out)}")
            return 0
    except MemoptInfeasibleBudget as err:
        # Not a usage error: the answer is "it does not fit", with the numbers.
        print(f"memopt: does NOT fit: {err}", file=sys.stderr)
        return 1
    except MemoptError as err:
        print(f"memopt: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("memopt: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
