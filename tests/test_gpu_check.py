"""benchmarks/gpu_check.py's dry run: every section's code path runs on CPU, so that the script does not
first fail on the GPU machine (whose minutes are few)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.slow
def test_dry_run_runs_every_section_and_names_each_skip(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MEMOPT_TRITON_CPU")}
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    sections = result["sections"]
    assert list(sections) == ["environment", "correctness", "kernels", "plan", "versus_pytorch", "tune"]
    assert all(s["status"] in ("passed", "skipped") for s in sections.values()), sections
    assert all(s.get("reason") for s in sections.values() if s["status"] == "skipped")
    tune = sections["tune"]
    assert tune["status"] == "passed" and tune["profile"]["measured_on"]["device"].startswith("cpu")
    assert [r["profile"] for r in tune["rows"]] == ["built-in cpu", "tuned"]
    assert all(r["predicted_step_s"] > 0 and r["measured_step_s"] > 0 for r in tune["rows"])

    runs = sections["correctness"]["runs"]
    assert {(r["dtype"], r["codegen"]) for r in runs} == {(d, c) for d in ("float32", "bfloat16")
                                                          for c in ("inductor", "triton")}
    assert all(r["offloaded"] > 0 and r["worst_grad_error_over_tolerance"] <= 1 for r in runs)
    assert "needs CUDA" in sections["correctness"]["overlap"]
    kernels = {r["kernel"] for r in sections["kernels"]["rows"]}
    assert kernels == {"nf4_matmul", "nf4_matmul_lora", "int8_matmul", "linear_cross_entropy", "compress_int8"}
    plan = sections["plan"]["rows"]
    assert len(plan) == 3 and all(r["planned_peak"] > 0 and r["measured_peak"] > 0 for r in plan)
    # A smaller budget never plans a larger peak.
    assert plan[0]["planned_peak"] >= plan[1]["planned_peak"] >= plan[2]["planned_peak"]
    versus = sections["versus_pytorch"]["rows"]
    assert [r["knapsack_share"] for r in versus] == [0.5, 0.25]
    assert all(r["knapsack_peak"] > 0 for r in versus)
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "| correctness | passed |" in markdown and "## plan" in markdown


def test_a_failing_section_does_not_stop_the_next_and_the_time_guard_skips_late_ones() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    check = gpu_check.Check(dry_run=True, time_limit_s=60)

    def broken(out: dict[str, object]) -> None:
        out["partial"] = 1
        raise RuntimeError("kernel mismatch")

    check.section("broken", broken, needs_s=0)
    check.section("fine", lambda out: out.update(value=2), needs_s=0)
    check.section("late", lambda out: out.update(value=3), needs_s=3600)
    assert check.sections["broken"]["status"] == "failed"
    assert "kernel mismatch" in check.sections["broken"]["error"] and check.sections["broken"]["partial"] == 1
    assert check.sections["fine"] == {"status": "passed", "value": 2, "seconds": check.sections["fine"]["seconds"]}
    assert check.sections["late"]["status"] == "skipped" and "time guard" in check.sections["late"]["reason"]
