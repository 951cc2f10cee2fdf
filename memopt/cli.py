"""The ``memopt`` command line: ``memopt plan``.

``memopt plan --model llama-2-7b --batch 1 --seq 2048 [--dtype bf16] [--device rtx4090] [--budget 24GiB]
[--optimizer adamw] [--options OPTIONS.json] [--max-seq] [--json]``. Progress goes to stderr, the answer to
stdout. Exit status: 0 when the step fits the device (and the budget, if given), 1 when it does not (a
budget no plan can meet included), 2 on an error. With ``--max-seq``, the longest sequence that fits is
searched from ``--seq`` (:mod:`memopt.max_seq`); 0 when one was found, 1 when not even 64 tokens fit.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

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
    return parser


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
    report = plan(args.model, None, options, device=args.device, batch=args.batch, seq=args.seq,
                  dtype=args.dtype, optimizer=args.optimizer, loss_chunks=args.loss_chunks, progress=progress)
    if args.json:
        print(json.dumps(report.to_json(), indent=1, sort_keys=True))
    else:
        print(report.render())
    fits = report.fits_device and report.fits_budget is not False
    return 0 if fits else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "plan":
            return _plan(args)
    except MemoptInfeasibleBudget as err:
        # Not a usage error: the answer is "it does not fit", with the numbers.
        print(f"memopt: does NOT fit: {err}", file=sys.stderr)
        return 1
    except MemoptError as err:
        print(f"memopt: error: {err}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
