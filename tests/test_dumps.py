"""Dumps: with ``dump_dir`` (or ``MEMOPT_DUMP_DIR``) every compiled graph gets a folder of readable,
runnable, shape-annotated graph code and stats, one per stage, that is byte-identical between identical
runs apart from ``timings.json`` and holds no absolute path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest
import torch

from memopt.compiler.backend import MemoptBackend
from memopt.compiler.runner import MemoptPassWarning
from memopt.passes.base import Pass, PassContext, PassResult
from tests.models import SmallCNN
from tests.test_runner import Counting, relu_as_mask, rewrite_relu_as_mask, rewrite_then_raise, train_step_matches_eager

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("fresh_dynamo")    # tests/conftest.py


def noop_model(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
    return PassResult(gm, False, {"looked_at": len(gm.graph.nodes)})


def dump_passes() -> tuple[Pass, ...]:
    """One pass of each outcome: a model pass that changes nothing, a joint pass that rewrites, one that
    is disabled (with ``disable_passes=["off"]``) and one that fails."""
    return (
        Pass("noop_model", "model", noop_model),
        Pass("relu_as_mask", "joint", relu_as_mask),
        Pass("off", "joint", Counting()),
        Pass("explode", "joint", rewrite_then_raise(rewrite_relu_as_mask)),
    )


DUMP_OPTIONS = {"codegen": "eager", "disable_passes": ["off"]}

EXPECTED_FILES = [
    "00_captured.json", "00_captured.py",
    "01_noop_model.json", "01_noop_model.py",
    "02_joint.json", "02_joint.py",
    "03_relu_as_mask.json", "03_relu_as_mask.py",
    "04_forward.json", "04_forward.py",
    "05_backward.json", "05_backward.py",
    "index.json", "memory_timeline.json", "timings.json",
]

# Compiles SmallCNN once through the dump pipeline into argv[1]; run twice in fresh interpreters.
SCRIPT = """\
import sys, warnings
import torch
from memopt.compiler.backend import MemoptBackend
from tests.test_dumps import DUMP_OPTIONS, dump_passes
from tests.test_runner import cnn_case

warnings.simplefilter("ignore")
model, x, y = cnn_case()
backend = MemoptBackend({**DUMP_OPTIONS, "dump_dir": sys.argv[1]}, passes=dump_passes())
loss, _ = torch.compile(model, backend=backend)(x, y)
loss.backward()
print(backend.reports[0].graph_id)
"""


def graph_folder(root: Path) -> Path:
    (folder,) = [p for p in root.iterdir()]
    assert folder.is_dir() and folder.name.startswith("graph_"), folder
    return folder


def forbidden_paths(*dirs: Path) -> list[str]:
    """Absolute-path fragments that must not appear in any dump file."""
    paths = {str(d) for d in dirs} | {str(d.resolve()) for d in dirs}
    paths |= {str(REPO), "/work/", "/tmp/", tempfile.gettempdir() + "/", sys.prefix, sys.base_prefix,
              sysconfig.get_paths()["purelib"], os.path.dirname(torch.__file__)}
    home = str(Path.home())
    if len(home) > 1:
        paths.add(home + "/")
    return sorted(paths)


def assert_no_absolute_paths(folder: Path, *dirs: Path) -> None:
    for file in sorted(folder.rglob("*")):
        text = file.read_text()
        for path in forbidden_paths(*dirs):
            assert path not in text, f"{file.name} contains the absolute path {path!r}"


def compile_with_dumps(dump_root: Path) -> MemoptBackend:
    backend = MemoptBackend({**DUMP_OPTIONS, "dump_dir": str(dump_root)}, passes=dump_passes())
    with pytest.warns(MemoptPassWarning, match="'explode'"):
        train_step_matches_eager(backend)
    return backend


def test_layout_index_and_stats(tmp_path: Path) -> None:
    backend = compile_with_dumps(tmp_path / "dumps")
    (report,) = backend.reports
    folder = graph_folder(tmp_path / "dumps")
    assert folder.name == report.graph_id
    assert sorted(p.name for p in folder.iterdir()) == EXPECTED_FILES

    index = json.loads((folder / "index.json").read_text())
    assert index["graph"] == report.graph_id
    assert index["codegen"] == "eager"
    assert index["options"]["disable_passes"] == ["off"] and "dump_dir" not in index["options"]
    stages = [(s["name"], s["kind"], s["status"], s.get("code"), s.get("stats")) for s in index["stages"]]
    assert stages == [
        ("captured", "model", "captured", "00_captured.py", "00_captured.json"),
        ("noop_model", "model", "unchanged", "01_noop_model.py", "01_noop_model.json"),
        ("joint", "joint", "captured", "02_joint.py", "02_joint.json"),
        ("relu_as_mask", "joint", "changed", "03_relu_as_mask.py", "03_relu_as_mask.json"),
        ("off", "joint", "disabled", None, None),
        ("explode", "joint", "failed", None, None),
        ("forward", "partition", "partitioned", "04_forward.py", "04_forward.json"),
        ("backward", "partition", "partitioned", "05_backward.py", "05_backward.json"),
    ]
    reasons = {s["name"]: s.get("reason") for s in index["stages"]}
    assert reasons["off"] == "disabled by name"
    assert reasons["explode"] == "Boom: synthetic failure after rewriting"

    # Each pass's JSON holds the runner's stats: node counts and predicted memory before and after.
    records = {r.name: r for r in report.passes}
    stats = json.loads((folder / "03_relu_as_mask.json").read_text())
    assert stats == {"stage": "relu_as_mask", "kind": "joint", **records["relu_as_mask"].stats}
    assert (stats["nodes_added"], stats["nodes_removed"]) == (8, 4)
    for key in ("predicted_before", "predicted_after"):
        assert set(stats[key]) == {"saved_activation_bytes", "peak_bytes"}
        assert all(isinstance(v, int) and v > 0 for v in stats[key].values())
    model_stats = json.loads((folder / "01_noop_model.json").read_text())
    assert model_stats["pass_stats"] == {"looked_at": model_stats["nodes_before"]}
    assert model_stats["nodes_added"] == model_stats["nodes_removed"] == 0

    # The pass's code says which pass made it, and marks the nodes it made.
    code = (folder / "03_relu_as_mask.py").read_text()
    assert code.splitlines()[0] == "# memopt dump: relu_as_mask (joint, changed)"
    assert "memopt_pass: relu_as_mask" in code
    assert "aten.relu.default" in (folder / "02_joint.py").read_text()
    assert "aten.relu.default" not in code

    # Measured times live in timings.json only, one per pass that ran.
    timings = json.loads((folder / "timings.json").read_text())
    assert {"01_noop_model", "03_relu_as_mask", "explode"} <= set(timings)
    assert all(isinstance(v, (int, float)) and v >= 0 for v in timings.values())
    for file in folder.iterdir():
        if file.name != "timings.json":
            assert "seconds" not in file.read_text(), file.name

    assert_no_absolute_paths(folder, tmp_path)


def test_every_dumped_graph_runs_on_its_own(tmp_path: Path) -> None:
    compile_with_dumps(tmp_path / "dumps")
    folder = graph_folder(tmp_path / "dumps")
    scripts = sorted(folder.glob("*.py"))
    assert [p.name for p in scripts] == [n for n in EXPECTED_FILES if n.endswith(".py")]
    for script in scripts:
        assert '"f32[' in script.read_text(), f"{script.name} has no shape/dtype annotations"
    # Fresh interpreters, outside the repository: the files depend on nothing but torch.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    procs = {s.name: subprocess.Popen([sys.executable, str(s)], cwd=tmp_path, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE) for s in scripts}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name} failed:\n{err}"
        assert out.strip(), f"{name} printed no outputs"


def test_identical_runs_write_identical_dumps(tmp_path: Path) -> None:
    script = tmp_path / "compile_once.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MEMOPT_DUMP_DIR", None)
    roots = [tmp_path / "run_a" / "dumps", tmp_path / "elsewhere" / "run_b"]
    procs = [subprocess.Popen([sys.executable, str(script), str(root)], cwd=REPO, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for root in roots]
    graph_ids = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        graph_ids.append(out.strip())
    a, b = (graph_folder(root) for root in roots)
    assert a.name == b.name == graph_ids[0] == graph_ids[1]
    names = sorted(p.name for p in a.iterdir())
    assert names == EXPECTED_FILES and sorted(p.name for p in b.iterdir()) == names
    for name in names:
        if name == "timings.json":
            assert json.loads((a / name).read_text()).keys() == json.loads((b / name).read_text()).keys()
        else:
            assert (a / name).read_bytes() == (b / name).read_bytes(), f"{name} differs between runs"
    for folder in (a, b):
        assert_no_absolute_paths(folder, tmp_path, *roots)


@pytest.mark.parametrize("how", ["backend_object", "backend_name"])
def test_dump_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    root = tmp_path / "from_env"
    monkeypatch.setenv("MEMOPT_DUMP_DIR", str(root))
    torch.manual_seed(0)
    model, x, y = SmallCNN(), torch.randn(2, 3, 8, 8), torch.randint(0, 10, (2,))
    if how == "backend_object":
        compiled = torch.compile(model, backend=MemoptBackend({"codegen": "eager"}, passes=()))
    else:
        compiled = torch.compile(model, backend="memopt", options={"codegen": "eager"})
    loss, _ = compiled(x, y)
    loss.backward()
    folder = graph_folder(root)
    # The default pipeline's drop_causal_masks, prune_backprop, split_dropout and fuse_cross_entropy run on
    # every graph (the CNN's loss is a cross-entropy; it has no attention and no dropout); its passes that
    # were not requested are listed without files; passes=() has none.
    ran_model = ["drop_causal_masks"] if how == "backend_name" else []
    ran = ["prune_backprop", "split_dropout", "fuse_cross_entropy"] if how == "backend_name" else []
    stages = ["captured", *ran_model, "joint", *ran, "forward", "backward"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [f"{i:02d}_{name}.{ext}" for i, name in enumerate(stages) for ext in ("json", "py")]
        + ["index.json", "memory_timeline.json", "timings.json"])
    index = json.loads((folder / "index.json").read_text())
    model_passes, joint_passes = (["inject_adapters", "drop_causal_masks", "eliminate_tokens", "chunk_sequence"], [
        "prune_backprop", "split_dropout", "fuse_cross_entropy", "fuse_dequant"]) if how == "backend_name" else ([], [])
    unrequested = ["inject_adapters", "eliminate_tokens", "chunk_sequence", "fuse_dequant"] \
        if how == "backend_name" else []
    assert [s["name"] for s in index["stages"]] == ["captured", *model_passes, "joint", *joint_passes,
                                                    "forward", "backward"]
    assert all(s["status"] == "not requested" for s in index["stages"] if s["name"] in unrequested)
    assert "dump_dir" not in index["options"]
    assert_no_absolute_paths(folder, tmp_path)


def test_no_dump_dir_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEMOPT_DUMP_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    backend = MemoptBackend({"codegen": "eager"}, passes=(Pass("relu_as_mask", "joint", relu_as_mask),))
    train_step_matches_eager(backend)
    assert backend.config.dump_dir is None
    assert list(tmp_path.iterdir()) == []
