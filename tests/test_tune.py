"""Offline cost-model tuning: profile format 2 (efficiency curves, measurement key), `memopt tune`, node
times recorded in real steps and `memopt tune --from-dump`, and the scheduler pricing with what it is
given."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import memopt
from memopt.compiler.backend import MemoptBackend
from memopt.cost_model.estimate import estimate_node
from memopt.cost_model.profile import (
    COST_MODEL_VERSION,
    DeviceProfile,
    check_measured_on,
    load_profile,
    profile_to_json,
)
from memopt.cost_model.tune import NODE_TIMES, Sample, device_name, fit, measure, samples_from_dump, write_profile
from memopt.errors import MemoptConfigError, MemoptProfileError

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("fresh_dynamo")    # tests/conftest.py


def _measured(profile: DeviceProfile, **key: object) -> DeviceProfile:
    on = {"device": device_name("cpu"), "torch": torch.__version__.split("+")[0],
          "cost_model": COST_MODEL_VERSION, **key}
    return dataclasses.replace(profile, measured_on=on)


def _memopt(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "memopt.cli", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout)


# ---------------------------------------------------------------------------------------------------------
# the format


def test_efficiency_curves_interpolate_in_log_work_and_hold_at_the_ends() -> None:
    curves = {"matmul.float32": [[1e3, 0.1], [1e9, 0.7]], "elementwise": [[4096.0, 0.5]]}
    profile = dataclasses.replace(load_profile("cpu"), efficiency=curves)
    assert profile.efficiency_at("matmul.float32", 10.0) == 0.1
    assert profile.efficiency_at("matmul.float32", 1e6) == pytest.approx(0.4)     # halfway in log(work)
    assert profile.efficiency_at("matmul.float32", 1e12) == 0.7
    assert profile.efficiency_at("matmul.bfloat16", 1e6) == pytest.approx(0.4)    # falls back to fp32's
    assert profile.efficiency_at("attention.float32", 1e6) == pytest.approx(0.4)  # to the matmul's
    assert profile.efficiency_at("elementwise", 1.0) == 0.5
    assert profile.efficiency_at("reduction", 1e6) == 1.0                         # no curve: the peak


def test_a_curve_prices_a_node() -> None:
    from torch.fx.experimental.proxy_tensor import make_fx

    gm = make_fx(lambda a, b: a @ b)(torch.randn(64, 64), torch.randn(64, 64))
    (mm,) = [n for n in gm.graph.nodes if n.target == torch.ops.aten.mm.default]
    peak = load_profile("cpu")
    slow = dataclasses.replace(peak, efficiency={"matmul.float32": [[1.0, 0.25]]})
    flops = 2 * 64 ** 3
    assert estimate_node(mm, slow).time_s == pytest.approx(flops / (0.25 * peak.matmul_flops["float32"])
                                                            + peak.launch_overhead_s)
    assert estimate_node(mm, peak).time_s < estimate_node(mm, slow).time_s


def test_tuned_profile_round_trips_with_one_line_per_point(tmp_path: Path) -> None:
    profile = _measured(dataclasses.replace(load_profile("cpu"), efficiency={
        "attention.float32": [[1e7, 0.3], [1e9, 0.5]], "reduction": [[4096.0, 0.05], [1e7, 1.0]]}))
    write_profile(profile, tmp_path / "p.json")
    text = (tmp_path / "p.json").read_text()
    assert "[10000000.0, 0.3]" in text and text == profile_to_json(profile)
    assert load_profile(tmp_path / "p.json") == profile


def test_a_version_1_file_reads_as_a_datasheet_profile(tmp_path: Path) -> None:
    data = json.loads(profile_to_json(load_profile("rtx4090")))
    del data["efficiency"], data["measured_on"]
    data["format_version"] = 1
    (tmp_path / "v1.json").write_text(json.dumps(data))
    profile = load_profile(tmp_path / "v1.json")
    assert profile == load_profile("rtx4090") and profile.measured_on is None and not profile.efficiency


def _broken(change: Any) -> dict[str, Any]:
    data = json.loads(profile_to_json(_measured(load_profile("cpu"))))
    change(data)
    return data


@pytest.mark.parametrize(("change", "must_mention"), [
    (lambda d: d.update(efficiency={"matmul.float": [[1, 0.5]]}), ["efficiency", "matmul.float"]),
    (lambda d: d.update(efficiency={"elementwise": [[2, 0.5], [1, 0.6]]}), ["efficiency.elementwise", "increasing"]),
    (lambda d: d.update(efficiency={"reduction": [[1, 1.5]]}), ["efficiency.reduction", "(0, 1]"]),
    (lambda d: d.update(efficiency={"reduction": [[-1, 0.5]]}), ["efficiency.reduction", "positive"]),
    (lambda d: d.update(efficiency={"reduction": []}), ["efficiency.reduction", "non-empty"]),
    (lambda d: d.update(efficiency=[1]), ["efficiency", "object"]),
    (lambda d: d.update(measured_on={"device": "x"}), ["measured_on", "cost_model"]),
    (lambda d: d.pop("measured_on"), ["missing", "measured_on"]),
    (lambda d: d.update(launch_overhead_s=-1e-6), ["launch_overhead_s", "positive"]),
])
def test_bad_tuned_profiles_name_the_file_and_the_field(tmp_path: Path, change: Any, must_mention: list[str]) -> None:
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps(_broken(change)))
    with pytest.raises(MemoptProfileError) as info:
        load_profile(path)
    for fragment in [str(path), *must_mention]:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_a_truncated_profile_is_refused(tmp_path: Path) -> None:
    text = profile_to_json(_measured(load_profile("cpu")))
    path = tmp_path / "cut.json"
    path.write_text(text[: len(text) // 2])
    with pytest.raises(MemoptProfileError, match="not valid JSON.*line"):
        load_profile(path)


# ---------------------------------------------------------------------------------------------------------
# the key


def test_another_cost_model_or_device_is_refused_unless_forced() -> None:
    old = _measured(load_profile("cpu"), cost_model=COST_MODEL_VERSION - 1)
    with pytest.raises(MemoptProfileError, match=r"cost-model version 1.*memopt tune --out"):
        check_measured_on(old, None)
    elsewhere = _measured(load_profile("cpu"), device="NVIDIA H100 80GB HBM3")
    check_measured_on(elsewhere, None)              # memopt plan: planning for the profile's device
    with pytest.raises(MemoptProfileError, match="measured on 'NVIDIA H100 80GB HBM3'.*force_profile"):
        check_measured_on(elsewhere, device_name("cpu"))
    with pytest.warns(UserWarning, match="NVIDIA H100"):
        check_measured_on(elsewhere, device_name("cpu"), force=True)
    with pytest.warns(UserWarning, match="torch 2.0.0"):
        check_measured_on(_measured(load_profile("cpu"), torch="2.0.0"), device_name("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_measured_on(_measured(load_profile("cpu")), device_name("cpu"))


def test_the_backend_refuses_a_profile_from_another_device(tmp_path: Path) -> None:
    from tests.models import MLP

    path = tmp_path / "gpu.json"
    write_profile(_measured(load_profile("cpu"), device="NVIDIA H100 80GB HBM3"), path)
    model, x, y = MLP(), torch.randn(8, 64), torch.randint(0, 10, (8,))
    step = torch.compile(model, backend="memopt", options={"cost_profile": str(path), "codegen": "eager"})
    with pytest.raises(Exception, match="measured on 'NVIDIA H100 80GB HBM3'"):
        step(x, y)
    torch._dynamo.reset()
    forced = torch.compile(model, backend="memopt",
                           options={"cost_profile": str(path), "codegen": "eager", "force_profile": True})
    with pytest.warns(UserWarning, match="NVIDIA H100"):
        forced(x, y)[0].backward()


def test_node_times_need_the_eager_code_generator() -> None:
    with pytest.raises(MemoptConfigError, match="codegen='eager'"):
        memopt.config.parse_options({"dump_node_times": 2})
    with pytest.raises(MemoptConfigError, match="dump_node_times"):
        memopt.config.parse_options({"dump_node_times": -1, "codegen": "eager"})


# ---------------------------------------------------------------------------------------------------------
# fitting and measuring


def test_fit_recovers_the_model_that_made_the_samples() -> None:
    launch, peak, bandwidth = 4e-6, 2e11, 5e10
    share = {1e4: 0.1, 1e6: 0.5, 1e9: 1.0}
    samples = [Sample("launch", 0.0, launch)]
    samples += [Sample("matmul.float32", w, launch + w / (peak * e)) for w, e in share.items()]
    samples += [Sample("elementwise", w, launch + w / (bandwidth * e)) for w, e in share.items()]
    samples += [Sample("copy", 1e6, 1e-4), Sample("copy", 1e8, 1e-2 * 2)]
    profile = fit(samples, load_profile("cpu"), name="t", device="here", source="test")
    assert profile.launch_overhead_s == pytest.approx(launch, rel=1e-3)
    assert profile.matmul_flops["float32"] == pytest.approx(peak, rel=1e-3)
    assert profile.memory_bandwidth == pytest.approx(bandwidth, rel=1e-3)
    assert profile.host_device_bandwidth == pytest.approx(5e9, rel=1e-3)      # the largest copy's rate
    for w, e in share.items():
        assert profile.efficiency_at("matmul.float32", w) == pytest.approx(e, rel=1e-3)
        assert profile.efficiency_at("elementwise", w) == pytest.approx(e, rel=1e-3)
    assert profile.matmul_flops["bfloat16"] == load_profile("cpu").matmul_flops["bfloat16"]   # not measured
    assert profile.measured_on == {"device": "here", "torch": torch.__version__.split("+")[0],
                                   "cost_model": COST_MODEL_VERSION}


def test_write_profile_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "p.json"
    write_profile(load_profile("cpu"), path)
    before = path.read_text()

    def interrupted(profile: DeviceProfile) -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr("memopt.cost_model.tune.profile_to_json", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_profile(load_profile("h100"), path)
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.json"]


@pytest.fixture(scope="module")
def tuned_here(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float, subprocess.CompletedProcess[str]]:
    """`memopt tune --quick` run as a user runs it: a command, in its own process."""
    path = tmp_path_factory.mktemp("tuned") / "here.json"
    started = time.perf_counter()
    out = _memopt("tune", "--quick", "--out", str(path))
    return path, time.perf_counter() - started, out


@pytest.mark.serial
def test_memopt_tune_quick_writes_a_profile_for_this_device(
        tuned_here: tuple[Path, float, subprocess.CompletedProcess[str]]) -> None:
    path, seconds, out = tuned_here
    assert out.returncode == 0, out.stderr
    assert seconds < 120, seconds
    assert "measuring" in out.stderr and "wrote" in out.stdout
    profile = load_profile(path)
    assert profile.name == "here"
    assert profile.measured_on is not None and profile.measured_on["device"] == device_name("cpu")
    # Curves for every class this CPU runs, each rising from small work to large.
    assert {"matmul.float32", "attention.float32", "elementwise", "reduction"} <= set(profile.efficiency)
    for op_class in ("matmul.float32", "reduction"):
        curve = profile.efficiency[op_class]
        assert curve[0][1] < curve[-1][1], (op_class, curve)
    assert 1e-7 < profile.launch_overhead_s < 1e-4


def test_measure_reports_progress() -> None:
    seen: list[tuple[int, int]] = []
    samples = measure("cpu", quick=True, progress=lambda done, total, what: seen.append((done, total)))
    assert len(samples) == len(seen) == seen[-1][0] == seen[-1][1]
    assert all(s.seconds > 0 for s in samples)


# ---------------------------------------------------------------------------------------------------------
# from real steps


def _recorded_dump(tmp_path: Path, steps: int = 2) -> tuple[Path, MemoptBackend]:
    from tests.models import tiny_llama, token_batch

    torch.manual_seed(0)
    model = tiny_llama()
    dump = tmp_path / "dump"
    backend = MemoptBackend({"codegen": "eager", "dump_dir": str(dump), "dump_node_times": steps})
    step = torch.compile(model, backend=backend)
    batch = token_batch(2, 32)
    for _ in range(steps + 1):
        step(**batch).loss.backward()
    return dump, backend


def test_node_times_are_recorded_for_every_node_of_both_graphs(tmp_path: Path) -> None:
    dump, backend = _recorded_dump(tmp_path)
    (path,) = dump.glob(f"*/{NODE_TIMES}")
    data = json.loads(path.read_text())
    assert data["cost_model"] == COST_MODEL_VERSION and data["device"] == device_name("cpu")
    assert data["steps"] == 2
    (report,) = backend.reports
    for kind, gm in (("forward", report.forward), ("backward", report.backward)):
        assert gm is not None
        calls = {n.name for n in gm.graph.nodes if n.op == "call_function"}
        recorded = {n["name"] for n in data["nodes"] if n["graph"] == kind}
        assert recorded == calls, kind
    kernels = [n for n in data["nodes"] if n["op_class"] != "none"]
    assert kernels and all(n["seconds"] > 0 and n["work"] > 0 for n in kernels)
    assert {"matmul.float32", "elementwise"} <= {n["op_class"] for n in kernels}


def test_tune_from_dump_fits_a_profile(tmp_path: Path) -> None:
    dump, _ = _recorded_dump(tmp_path)
    out = _memopt("tune", "--from-dump", str(dump), "--out", str(tmp_path / "mine.json"))
    assert out.returncode == 0, out.stderr
    profile = load_profile(tmp_path / "mine.json")
    assert "from-dump" in profile.source and "matmul.float32" in profile.efficiency
    samples, keys = samples_from_dump(dump)
    assert keys == {"device": device_name("cpu"), "profile": "cpu"}
    assert profile == fit(samples, load_profile("cpu"), name="mine", device=keys["device"],
                          source=profile.source)


@pytest.mark.parametrize(("setup", "must_mention"), [
    (lambda d: None, ["no node_times.json"]),
    (lambda d: _node_times(d, {"cost_model": 1, "nodes": []}), ["node_times.json", "'cost_model'", "version"]),
    (lambda d: _node_times(d, {"cost_model": COST_MODEL_VERSION, "nodes": [{"op_class": "elementwise",
                                                                             "work": 8}]}),
     ["node_times.json", "nodes[0].seconds"]),
    (lambda d: _node_times(d, "{\"cost_model\": 2, \"nod"), ["node_times.json", "cannot be read as JSON"]),
])
def test_bad_dumps_name_the_file_and_the_field(tmp_path: Path, setup: Any, must_mention: list[str]) -> None:
    dump = tmp_path / "dump"
    dump.mkdir()
    setup(dump)
    with pytest.raises(MemoptProfileError) as info:
        samples_from_dump(dump)
    for fragment in must_mention:
        assert fragment in str(info.value), (fragment, str(info.value))
    out = _memopt("tune", "--from-dump", str(dump), "--out", str(tmp_path / "never.json"))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert not (tmp_path / "never.json").exists()


def _node_times(dump: Path, data: object) -> None:
    (dump / "graph_0").mkdir()
    (dump / "graph_0" / NODE_TIMES).write_text(data if isinstance(data, str) else json.dumps(data))


# ---------------------------------------------------------------------------------------------------------
# the scheduler prices with it


def _plan_with(profile: DeviceProfile, tmp_path: Path) -> tuple[Any, dict[str, Any]]:
    from tests.models import MLP

    torch.manual_seed(0)
    path = tmp_path / f"{profile.name}.json"
    write_profile(profile, path)
    dump = tmp_path / f"dump_{profile.name}"
    backend = MemoptBackend({"cost_profile": str(path), "memory_budget": 0.75, "codegen": "eager",
                             "dump_dir": str(dump)})
    model = MLP(width=256, depth=4)
    loss, _ = torch.compile(model, backend=backend)(torch.randn(512, 256), torch.randint(0, 10, (512,)))
    loss.backward()
    (schedule_json,) = dump.glob("*/schedule.json")
    torch._dynamo.reset()
    return backend.reports[-1].schedule, json.loads(schedule_json.read_text())


def test_two_profiles_give_two_plans_and_the_dump_names_each(tmp_path: Path) -> None:
    base = load_profile("cpu")
    # Copies nearly free and matmuls dear: offload what recomputing would cost; the reverse: recompute.
    offloading = _measured(dataclasses.replace(base, name="fast_link", host_device_bandwidth=1e15,
                                               matmul_flops={"float32": 1e6}))
    recomputing = _measured(dataclasses.replace(base, name="slow_link", host_device_bandwidth=1e3,
                                                matmul_flops={"float32": 1e15}))
    plans = {}
    for profile in (offloading, recomputing):
        schedule, dumped = _plan_with(profile, tmp_path)
        assert schedule is not None and schedule.feasible
        plans[profile.name] = schedule.chosen
        origin = dumped["profile_origin"]
        assert origin["name"] == profile.name and origin["requested"].endswith(f"{profile.name}.json")
        assert origin["measured_on"] == dict(profile.measured_on)
    assert plans["fast_link"].offload and not plans["slow_link"].offload
    assert plans["slow_link"].recompute
    assert (plans["fast_link"].recompute, plans["fast_link"].offload) != \
        (plans["slow_link"].recompute, plans["slow_link"].offload)


# ---------------------------------------------------------------------------------------------------------
# accuracy


@pytest.mark.serial
def test_a_tuned_profile_predicts_the_eager_step_within_35_percent(
        tmp_path: Path, tuned_here: tuple[Path, float, subprocess.CompletedProcess[str]]) -> None:
    """The demo's Llama (4 layers, hidden 256, 4 x 256 tokens), op by op: the predicted forward +
    backward of `memopt tune --quick`'s profile against the measured median (benchmarks/bench_cost_model.py
    measures within 20%; 35% leaves room for a loaded CI machine). A burst of load from another tenant
    of this shared machine during the 7-second tune can spoil it (once in CI: +40%, where every other run
    was within -2..-18%), so a miss is measured again, tune and step, once, before it fails. The bound
    cannot pass by accident: the same profile with every rate doubled, or halved, misses it."""
    from memopt.cost_model.tune import curve_summary

    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_cost_model as bench

    tuned = load_profile(tuned_here[0])
    run = bench.run_model("llama", tmp_path / "dump", steps=9, log=lambda message: None)
    predicted, _ = bench.predict(run["backend"], tuned)
    error = predicted / run["measured_s"] - 1.0
    if abs(error) >= 0.35:
        again = _memopt("tune", "--quick", "--out", str(tmp_path / "again.json"))
        assert again.returncode == 0, again.stderr
        tuned = load_profile(tmp_path / "again.json")
        run = bench.run_model("llama", tmp_path / "dump_again", steps=9, log=lambda message: None)
        predicted, _ = bench.predict(run["backend"], tuned)
        error = predicted / run["measured_s"] - 1.0
    assert abs(error) < 0.35, (predicted, run["measured_s"], curve_summary(tuned))
    for factor in (2.0, 0.5):
        scaled = dataclasses.replace(
            tuned, matmul_flops={k: v * factor for k, v in tuned.matmul_flops.items()},
            memory_bandwidth=tuned.memory_bandwidth * factor, launch_overhead_s=tuned.launch_overhead_s / factor)
        off = bench.predict(run["backend"], scaled)[0] / run["measured_s"] - 1.0
        assert abs(off) > 0.35, (factor, off)


def test_memopt_plan_takes_a_tuned_profile_and_refuses_a_stale_one(tmp_path: Path) -> None:
    tuned = _measured(dataclasses.replace(load_profile("cpu"), name="tuned"))
    write_profile(tuned, tmp_path / "tuned.json")
    write_profile(_measured(tuned, cost_model=COST_MODEL_VERSION - 1), tmp_path / "stale.json")
    args = ("plan", "--model", "llama-tiny", "--seq", "64", "--json", "--device")
    out = _memopt(*args, str(tmp_path / "tuned.json"))
    assert out.returncode in (0, 1), out.stderr
    assert json.loads(out.stdout)["device"] == "tuned"
    stale = _memopt(*args, str(tmp_path / "stale.json"))
    assert stale.returncode == 2 and "memopt tune --out" in stale.stderr and "Traceback" not in stale.stderr
    forced = _memopt(*args, str(tmp_path / "stale.json"), "--force-profile")
    assert forced.returncode in (0, 1) and "cost-model version" in forced.stderr
