"""`memopt report`: one self-contained HTML page from a real dump, or comparing two, checked in headless
Chromium (the plots and tables are drawn, with the expected numbers of series and rows), and bad dumps
refused with the file and the field."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import torch

import memopt
from memopt import __version__
from memopt.errors import MemoptError
from memopt.report import load_dump, write_report

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
needs_browser = pytest.mark.skipif(
    CHROMIUM is None, reason="no headless Chromium on this machine: `apt-get install chromium` (Debian) to run "
                             "the report's browser checks; .ci/run installs it")


def _dump(folder: Path, budget: float) -> Path:
    """A real dump: a tiny Llama with LoRA under a budget, node times of two steps, one tracked step."""
    from tests.models import tiny_llama, token_batch

    torch._dynamo.reset()
    torch.manual_seed(0)
    options = {"codegen": "eager", "memory_budget": budget, "dump_dir": str(folder), "dump_node_times": 2,
               "adapters": {"method": "lora", "rank": 4, "targets": "all-linear"}}
    model = memopt.prepare(tiny_llama(), options)
    step = torch.compile(model, backend="memopt", options=options)
    batch = token_batch(2, 32)
    for _ in range(3):
        step(**batch).loss.backward()
    with memopt.track_memory("cpu", dump_dir=folder):
        step(**batch).loss.backward()
    torch._dynamo.reset()
    return folder


@pytest.fixture(scope="module")
def dumps(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("dumps")
    yield _dump(root / "half", 0.5), _dump(root / "most", 0.9)


def _graph_folder(dump: Path) -> Path:
    (index,) = dump.glob("*/index.json")
    return index.parent


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "memopt.cli", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=120)


class _Dom(HTMLParser):
    """Counts what the browser drew: elements by tag and class, rows per table class."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, dict[str, str]]] = []
        self.rows: dict[str, int] = {}
        self._table: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {k: v or "" for k, v in attrs}
        self.found.append((tag, attributes))
        if tag == "table":
            self._table.append(attributes.get("class", ""))
        if tag == "tr" and "row" in attributes.get("class", "").split() and self._table:
            self.rows[self._table[-1]] = self.rows.get(self._table[-1], 0) + 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "table" and self._table:
            self._table.pop()

    def count(self, tag: str, cls: str | None = None) -> int:
        return sum(1 for t, a in self.found if t == tag and (cls is None or cls in a.get("class", "").split()))


def _render_in_browser(page: Path) -> _Dom:
    assert CHROMIUM is not None
    out = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                          page.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    dom = _Dom()
    dom.feed(out.stdout)
    assert 'data-drawn="yes"' in out.stdout, "the page's script did not finish drawing"
    return dom


def test_the_report_is_one_file_that_fetches_nothing(dumps: tuple[Path, Path], tmp_path: Path) -> None:
    out = _cli("report", str(dumps[0]), "--out", str(tmp_path / "report.html"))
    assert out.returncode == 0, out.stderr
    page = (tmp_path / "report.html").read_text()
    assert "<script src" not in page and "<link" not in page and "@import" not in page
    assert set(re.findall(r"https?://[^\s\"'<>]+", page)) <= {"http://www.w3.org/2000/svg"}
    data = json.loads(re.search(r'<script type="application/json" id="memopt-data">(.*?)</script>', page,
                                re.S).group(1).replace("<\\/", "</"))      # type: ignore[union-attr]
    (graph,) = data["dumps"][0]["graphs"]
    assert graph["schedule"]["candidates"] and graph["timeline"]["series"] and graph["node_times"]
    assert data["dumps"][0]["tracked_steps"][0]["peak_bytes"] > 0
    # Links are relative to the page: they work where the page was written.
    link = data["links"][0] + "/" + graph["folder"] + "/schedule.json"
    assert (tmp_path / link).resolve() == (_graph_folder(dumps[0]) / "schedule.json").resolve()


@needs_browser
def test_the_browser_draws_every_series_and_row(dumps: tuple[Path, Path], tmp_path: Path) -> None:
    page = write_report([str(dumps[0])], tmp_path / "report.html")
    dom = _render_in_browser(page)
    folder = _graph_folder(dumps[0])
    series = json.loads((folder / "memory_timeline.json").read_text())["series"]
    schedule = json.loads((folder / "schedule.json").read_text())
    stages = json.loads((folder / "index.json").read_text())["stages"]
    assert dom.count("svg", "timeline") == 1
    assert dom.count("polyline", "series") == len(series) >= 4        # joint before/after, step before/after
    assert dom.count("line", "budget") == 1
    assert dom.rows["decisions"] == len(schedule["candidates"])
    assert dom.rows["passes"] == len(stages)
    assert dom.rows["tracked"] == 1
    assert dom.rows["node-times"] == min(25, len(json.loads((folder / "node_times.json").read_text())["nodes"]))
    links = [a["href"] for t, a in dom.found if t == "a"]
    for name in ("03_joint.py", "schedule.json", "node_times.json"):
        assert any(h.endswith("/" + name) for h in links), name


@needs_browser
def test_comparing_two_dumps_lists_the_decisions_that_differ(dumps: tuple[Path, Path], tmp_path: Path) -> None:
    out = _cli("report", str(dumps[0]), str(dumps[1]), "--out", str(tmp_path / "compare.html"))
    assert out.returncode == 0, out.stderr
    dom = _render_in_browser(tmp_path / "compare.html")
    a, b = (json.loads((_graph_folder(d) / "schedule.json").read_text())["candidates"] for d in dumps)
    choice_b = {c["name"]: c["choice"] for c in b}
    differ = [c for c in a if choice_b.get(c["name"], "(not a candidate)") != c["choice"]]
    assert differ, "a budget of 0.5 and one of 0.9 should decide differently"
    assert dom.rows["compare-decisions"] == len(differ)
    assert dom.rows["compare-graphs"] == 1
    assert dom.count("svg", "timeline") == 2 and dom.count("section", "graph") == 2


def _copy(dump: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(dump, target)
    return target


def _index(dump: Path) -> Path:
    (index,) = dump.glob("*/index.json")
    return index


@pytest.mark.parametrize(("damage", "must_mention"), [
    ("empty", ["holds no graph"]),
    ("missing", ["does not exist"]),
    ("truncated", ["index.json", "cannot be read as JSON"]),
    ("version", ["index.json", "'memopt_version'", "0.0.1"]),
    ("no stages", ["index.json", "'stages'"]),
    ("schedule", ["schedule.json", "'candidates'"]),
])
def test_bad_dumps_name_the_file_and_the_field(dumps: tuple[Path, Path], tmp_path: Path, damage: str,
                                               must_mention: list[str]) -> None:
    dump = _copy(dumps[0], tmp_path)
    index = _index(dump)
    data: dict[str, Any] = json.loads(index.read_text())
    if damage == "empty":
        shutil.rmtree(dump)
        dump.mkdir()
    elif damage == "missing":
        dump = tmp_path / "nowhere"
    elif damage == "truncated":
        index.write_text(index.read_text()[:40])
    elif damage == "version":
        index.write_text(json.dumps({**data, "memopt_version": "0.0.1"}))
    elif damage == "no stages":
        index.write_text(json.dumps({k: v for k, v in data.items() if k != "stages"}))
    elif damage == "schedule":
        (index.parent / "schedule.json").write_text(json.dumps({"budget": "0.5"}))
    with pytest.raises(MemoptError) as info:
        load_dump(dump)
    for fragment in must_mention:
        assert fragment in str(info.value), (fragment, str(info.value))
    out = _cli("report", str(dump), "--out", str(tmp_path / "never.html"))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert not (tmp_path / "never.html").exists()


def test_the_dump_version_is_this_memopts(dumps: tuple[Path, Path]) -> None:
    assert json.loads(_index(dumps[0]).read_text())["memopt_version"] == __version__
