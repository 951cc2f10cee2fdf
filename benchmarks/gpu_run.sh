#!/usr/bin/env bash
# Two halves of running benchmarks/gpu_check.py on the lent GPU machine (no network; its python3 is 3.12
# with torch 2.11, Triton 3.6, transformers, peft, numpy, pandas; not ortools).
#
#   bash benchmarks/gpu_run.sh wheels    # here, with network: ortools and what it needs that the GPU
#                                        # machine lacks, as cp312 x86-64 wheels, into .wheels/ (~30 MB;
#                                        # ignored by git, carried: run(..., carry=[".wheels"]))
#   bash benchmarks/gpu_run.sh check     # there: install those wheels and memopt (no dependencies pulled),
#                                        # then the check, its JSON and Markdown into $OUT (or results/gpu)
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
wheels)
    python3 -m pip download ortools immutabledict "protobuf>=6.33.1,<6.34" --no-deps --only-binary :all: \
        --python-version 3.12 --platform manylinux_2_27_x86_64 -d .wheels
    ;;
check)
    python3 -m pip install -q --no-index --find-links .wheels ortools
    python3 -m pip install -q --no-deps --no-build-isolation -e .
    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out "${OUT:-benchmarks/results/gpu}" "${@:2}"
    ;;
*)
    echo "usage: bash benchmarks/gpu_run.sh wheels|check [gpu_check options]" >&2
    exit 2
    ;;
esac
