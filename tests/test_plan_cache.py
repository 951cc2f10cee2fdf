"""The plan cache (Note [The plan cache] in memopt/compiler/plan_cache.py): a second compile of the same
graph, options, profile and budget realises the cached plan without searching, exactly as the first ran
it; anything that changes a plan misses; a stale, corrupt or unwritable cache never fails a run."""

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch

from memopt.compiler import capture
from memopt.compiler.plan_cache import PlanCache, cache_root
from memopt.config import parse_options
from memopt.cost_model.profile import load_profile
from memopt.errors import MemoptConfigError
from tests.models import compiled_step, tiny_llama, token_batch
from tests.tolerances import assert_close

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

OPTIONS = {"memory_budget": 0.5, "codegen": "eager"}


def _step(cache: Path | bool, options: dict | None = None, model: torch.nn.Module | None = None):
    torch.manual_seed(0)
    model = model or tiny_llama(layers=2, hidden=64)
    loss, backend = compiled_step(model, {**(options or OPTIONS), "plan_cache": cache if isinstance(cache, bool)
                                          else str(cache)}, token_batch(2, 64))
    grads = [p.grad.clone() for p in model.parameters()]
    return loss, grads, backend.reports[-1]


def _entries(cache: Path) -> list[Path]:
    return sorted((cache / "plans").glob("*.json"))


def test_a_second_compile_reuses_the_plan_without_searching(tmp_path, monkeypatch):
    loss, grads, first = _step(tmp_path)
    assert first.plan_cache == "miss" and len(_entries(tmp_path)) == 1
    assert first.schedule.evaluations > 2            # the search verified several plans

    def no_search(*args, **kwargs):
        raise AssertionError("the plan was searched again")

    monkeypatch.setattr(capture, "search_plan", no_search)
    loss2, grads2, second = _step(tmp_path)
    assert second.plan_cache == "hit" and second.schedule.evaluations == 2     # baseline and the plan
    assert second.schedule.chosen.plan == first.schedule.chosen.plan
    assert second.schedule.method == first.schedule.method
    assert second.memory.peak_bytes == first.memory.peak_bytes
    assert second.schedule.attempts == first.schedule.attempts          # the search's record, for dumps
    assert_close(loss2, loss, "loss")
    for a, b in zip(grads2, grads):
        assert_close(a, b, "gradient")


def test_what_changes_a_plan_misses_and_what_does_not_hits(tmp_path):
    _, _, report = _step(tmp_path)
    gm, cpu = report.joint, load_profile("cpu")
    config = parse_options({**OPTIONS, "plan_cache": str(tmp_path)})
    key = PlanCache.key(gm, config, cpu, "budget 100")
    assert PlanCache.key(gm, parse_options({**OPTIONS, "dump_dir": str(tmp_path / "dumps")}), cpu,
                         "budget 100") == key
    changed = copy.deepcopy(gm)
    next(n for n in changed.graph.nodes if n.op == "call_function").meta["val"] = torch.empty(3)
    misses = [
        PlanCache.key(gm, parse_options({**OPTIONS, "memory_budget": 0.4}), cpu, "budget 100"),
        PlanCache.key(gm, parse_options({**OPTIONS, "offload": False}), cpu, "budget 100"),
        PlanCache.key(gm, parse_options({**OPTIONS, "solver_time_limit_s": 3}), cpu, "budget 100"),
        PlanCache.key(gm, config, load_profile("h100"), "budget 100"),
        PlanCache.key(gm, config, cpu, "budget 101"),
        PlanCache.key(changed, config, cpu, "budget 100"),
    ]
    assert key not in misses and len(set(misses)) == len(misses)


def test_a_stale_entry_is_searched_again_and_replaced(tmp_path):
    _, _, first = _step(tmp_path)
    [entry] = _entries(tmp_path)
    data = json.loads(entry.read_text())
    data["peak_bytes"] += 1                  # what a change the key does not see would leave
    entry.write_text(json.dumps(data))
    _, _, second = _step(tmp_path)
    assert second.plan_cache == "stale" and second.schedule.evaluations > 2
    assert json.loads(entry.read_text())["peak_bytes"] == first.schedule.chosen.peak_bytes


def test_a_corrupt_entry_is_a_miss(tmp_path):
    _, _, first = _step(tmp_path)
    [entry] = _entries(tmp_path)
    entry.write_text("{ not json")
    _, _, second = _step(tmp_path)
    assert second.plan_cache == "miss" and second.schedule.chosen.plan == first.schedule.chosen.plan
    assert json.loads(entry.read_text())["method"] == first.schedule.method


def test_an_unwritable_cache_warns_once_and_compiles(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, _, report = _step(blocker)
    said = [str(w.message) for w in caught if "plan cache" in str(w.message)]
    assert len(said) == 1 and "MEMOPT_CACHE_DIR" in said[0]
    assert report.schedule.feasible and report.memory.peak_bytes <= report.budget_bytes


def test_off_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMOPT_CACHE_DIR", str(tmp_path))
    _, _, report = _step(False)
    assert report.plan_cache is None and not _entries(tmp_path) and report.schedule.evaluations > 2


def test_where_the_cache_lives(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMOPT_CACHE_DIR", str(tmp_path / "env"))
    assert cache_root(True) == tmp_path / "env"
    assert cache_root(str(tmp_path / "option")) == tmp_path / "option"
    assert cache_root(False) is None
    monkeypatch.delenv("MEMOPT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root(True) == tmp_path / "xdg" / "memopt"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root(True) == tmp_path / "home" / ".cache" / "memopt"


def test_the_option_is_checked():
    with pytest.raises(MemoptConfigError, match="plan_cache.*True, False or a folder path"):
        parse_options({"plan_cache": 3})
    assert parse_options({"plan_cache": Path("/x")}).plan_cache == "/x"


_PROCESS = """
import json, sys, torch
from memopt.compiler.backend import MemoptBackend
from tests.models import tiny_llama, token_batch
torch.manual_seed(0)
model = tiny_llama(layers=2, hidden=64)
backend = MemoptBackend(json.loads(sys.argv[1]))
torch.compile(model, backend=backend)(**token_batch(2, 64)).loss.backward()
report = backend.reports[-1]
print(json.dumps({"plan_cache": report.plan_cache, "planned": report.memory is not None,
                  "grads": [p.grad.double().sum().item() for p in model.parameters()]}))
"""


def _process(options: dict, cache: Path) -> dict:
    import os
    import subprocess
    import sys

    env = {**os.environ, "MEMOPT_CACHE_DIR": str(cache), "PYTHONPATH": str(Path(__file__).parent.parent)}
    done = subprocess.run([sys.executable, "-c", _PROCESS, json.dumps(options)], env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_second_process_reuses_the_compiled_step_and_trains_the_same(tmp_path):
    """Under Inductor, AOTAutograd's cache hands the second process the whole compiled step (Note
    [Inductor's caches and the joint stage] in memopt/compiler/capture.py): the joint stage is skipped,
    its report says so, and the step computes the same gradients. Asking for dumps runs the stage again,
    which takes its plan from the plan cache."""
    options = {"memory_budget": 0.5}
    first = _process(options, tmp_path)
    second = _process(options, tmp_path)
    assert (first["plan_cache"], first["planned"]) == ("miss", True)
    assert (second["plan_cache"], second["planned"]) == ("compiled step", False)
    assert second["grads"] == first["grads"]
    dumped = _process({**options, "dump_dir": str(tmp_path / "dumps")}, tmp_path)
    assert (dumped["plan_cache"], dumped["planned"]) == ("hit", True) and dumped["grads"] == first["grads"]
    elsewhere = _process(options, tmp_path / "another")           # another cache: planned again
    assert elsewhere["plan_cache"] == "miss"
