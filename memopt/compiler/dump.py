"""Per-graph dumps: readable, runnable graph code after every stage, stats beside it, one index.

Layout of ``<dump_dir>/<graph id>/``::

    00_captured.py            the Dynamo graph as memopt received it
    01_<model pass>.py/.json  one pair per model-graph pass that ran
    NN_joint.py/.json         the joint forward+backward graph from AOTAutograd
    NN_<joint pass>.py/.json  one pair per joint-graph pass that ran
    NN_forward.py/.json       the partitioned forward graph, then the backward
    schedule.json             with a memory budget: per candidate its layer, bytes, choice, cost and why
    memory_timeline.svg       with a memory budget: live bytes over the step before and after scheduling
    memory_timeline.json      live bytes over the joint graph before and after its passes, the step before
                              and after scheduling, and as compiled (what `memopt report` plots)
    node_times.json           with dump_node_times: each node's measured seconds in real steps
    kernel_*                  the Triton kernels the graphs call
    index.json                what ran, in order, with each stage's status and file names
    timings.json              measured seconds: the only file that differs between identical runs

Note [Deterministic dumps]
Two identical runs write byte-identical files apart from ``timings.json``: the graph id is Dynamo's
compile id plus a hash of the captured code; JSON is written with sorted keys; source locations in the
code are cut to the path below ``site-packages`` (or the file name), never an absolute path; nothing
records a time, a pid or an address.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch
import torch.fx

from memopt.cost_model.bytes import hint_int, shape_env_of

_FILE_RE = re.compile(r'File: (?P<path>[^\n:]*?[/\\][^\n:]*?):(?P<line>\d+)')
_CLASS_RE = re.compile(r"^class (\w+)\(torch\.nn\.Module\):", re.MULTILINE)


def _short_path(path: str) -> str:
    norm = path.replace("\\", "/")
    for marker in ("site-packages/", "dist-packages/"):
        if marker in norm:
            return norm.split(marker, 1)[1]
    cwd = os.getcwd().replace("\\", "/").rstrip("/") + "/"
    if norm.startswith(cwd):
        return norm[len(cwd):]
    return norm.rsplit("/", 1)[-1]


def strip_paths(code: str) -> str:
    """Replace absolute source paths in stack-trace comments with short relative ones."""
    return _FILE_RE.sub(lambda m: f"File: {_short_path(m.group('path'))}:{m.group('line')}", code)


def _example_input(val: object) -> str:
    """Python source that builds a stand-in for one graph input from its metadata."""
    if isinstance(val, torch.SymInt):
        return str(hint_int(val, shape_env_of(val)))
    if isinstance(val, (int, float, bool)):
        return repr(val)
    if isinstance(val, torch.Tensor):
        shape = [hint_int(s, shape_env_of(val)) for s in val.shape]
        dtype = str(val.dtype)
        if val.dtype.is_floating_point or val.dtype.is_complex:
            return f"torch.randn({shape}, dtype={dtype})"
        # Zeros are valid indices for embeddings and gathers; random ints might not be.
        return f"torch.zeros({shape}, dtype={dtype})"
    return "None"


def graph_source(gm: torch.fx.GraphModule, title: str) -> str:
    """Readable, shape/dtype-annotated graph code that runs on its own with stand-in inputs."""
    graph = gm.graph
    flat = torch.fx.Graph()
    value_map: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in graph.nodes:
        value_map[node] = flat.node_copy(node, lambda n: value_map[n])
    # A plain code generator: the joint graph's pytree signature would not run without its spec.
    view = torch.fx.GraphModule(gm, flat, class_name="DumpedGraph")
    body = view.print_readable(print_output=False, include_stride=False, include_device=False,
                               colored=False, additional_meta=["memopt_pass"])
    body = strip_paths(body)
    match = _CLASS_RE.search(body)
    cls = match.group(1) if match else "DumpedGraph"
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    consts = sorted({str(n.target) for n in graph.nodes if n.op == "get_attr"})
    lines = [
        f"# memopt dump: {title}",
        f"# {sum(1 for n in graph.nodes if n.op == 'call_function')} ops, {len(placeholders)} inputs. "
        "Run this file to execute the graph on stand-in inputs (random floats, zero integers"
        + (", zero constants" if consts else "") + ").",
        "import builtins, math, operator",
        "import torch",
        "from torch import device, inf, nan",
        "import torch.fx._pytree as fx_pytree",
        "import torch.utils._pytree as pytree",
        "",
        body.rstrip(),
        "",
        "",
        'if __name__ == "__main__":',
        "    torch.manual_seed(0)",
        f"    module = {cls}()",
    ]
    for target in consts:
        holder = gm
        for atom in target.split("."):
            holder = getattr(holder, atom, None)  # type: ignore[assignment]
        if isinstance(holder, torch.Tensor):
            shape = [hint_int(s) for s in holder.shape]
            lines.append(f"    setattr(module, {target!r}, torch.zeros({shape}, dtype={holder.dtype}))")
    args = ", ".join(_example_input(n.meta.get("val", n.meta.get("example_value"))) for n in placeholders)
    lines += [
        f"    outputs = module({args})",
        "    for value in pytree.tree_leaves(outputs):",
        "        print(tuple(value.shape) if isinstance(value, torch.Tensor) else value)",
        "",
    ]
    return "\n".join(lines)


def graph_id(compile_id: str, gm: torch.fx.GraphModule) -> str:
    """``<dynamo compile id>-<8 hex of the captured code>``: unique per graph, stable across runs."""
    digest = hashlib.sha256(strip_paths(gm.code).encode()).hexdigest()[:8]
    return f"graph_{compile_id}-{digest}"


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True, default=str) + "\n")


class Dumper:
    """Writes one graph's dump folder. A Dumper with no directory does nothing, cheaply."""

    def __init__(self, root: str | os.PathLike[str] | None, graph: str) -> None:
        self.folder: Path | None = None if root is None else Path(root) / graph
        self.graph = graph
        self._index: list[dict[str, Any]] = []
        self._timings: dict[str, float] = {}
        self._next = 0
        self.meta: dict[str, Any] = {}
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)

    @property
    def enabled(self) -> bool:
        return self.folder is not None

    def stage(self, name: str, gm: torch.fx.GraphModule | None, *, kind: str, status: str,
              stats: dict[str, Any] | None = None, seconds: float | None = None,
              reason: str | None = None, lossy: bool = False) -> None:
        """Record one stage; write its code and stats when it produced a graph. ``lossy``: a pass that
        changes values (the index says so)."""
        entry: dict[str, Any] = {"name": name, "kind": kind, "status": status}
        if lossy:
            entry["lossy"] = True
        if reason is not None:
            entry["reason"] = reason
        if gm is not None and self.folder is not None:
            stem = f"{self._next:02d}_{name}"
            self._next += 1
            (self.folder / f"{stem}.py").write_text(graph_source(gm, f"{name} ({kind}, {status})"))
            if stats is not None:
                _write_json(self.folder / f"{stem}.json", {"stage": name, "kind": kind, **stats})
                entry["stats"] = f"{stem}.json"
            entry["code"] = f"{stem}.py"
            if seconds is not None:
                self._timings[stem] = round(seconds, 6)
        elif seconds is not None:
            self._timings[name] = round(seconds, 6)
        self._index.append(entry)

    def timing(self, name: str, seconds: float) -> None:
        self._timings[name] = round(seconds, 6)

    def write_json(self, name: str, data: Any) -> None:
        if self.folder is not None:
            _write_json(self.folder / name, data)

    def write_text(self, name: str, text: str) -> None:
        if self.folder is not None:
            (self.folder / name).write_text(text)

    def finish(self) -> None:
        if self.folder is None:
            return
        _write_json(self.folder / "index.json", {
            "graph": self.graph,
            "memopt_version": _version(),
            "torch_version": torch.__version__,
            "python": f"{sys.version_info.major}.{sys.version_info.minor}",
            **self.meta,
            "stages": self._index,
        })
        _write_json(self.folder / "timings.json", self._timings)


def _version() -> str:
    from memopt import __version__
    return __version__


def timeline_json(timelines: dict[str, Any], budget_bytes: int | None, points: int = 600) -> dict[str, Any]:
    """Each timeline (events with ``phase`` and ``live_bytes``) as at most ``points`` points: the largest
    value of each run of events, so the peak survives the thinning; ``phase`` where each run starts."""
    series = {}
    for name, events in timelines.items():
        step = max(1, -(-len(events) // points))
        runs = [events[i:i + step] for i in range(0, len(events), step)]
        series[name] = {"phase": [run[0].phase for run in runs],
                        "live_bytes": [max(e.live_bytes for e in run) for run in runs],
                        "events": len(events), "peak_bytes": max((e.live_bytes for e in events), default=0)}
    return {"budget_bytes": budget_bytes, "series": series}


def timeline_svg(series: dict[str, list[tuple[str, int]]], budget_bytes: int | None, title: str,
                 width: int = 900, height: int = 360) -> str:
    """An SVG plot of live bytes over the step, one line per series (e.g. before and after scheduling),
    the budget as a dashed line. Each series is (phase, live bytes) per event; the x axis is the share of
    the step, so series with different node counts line up. Deterministic: no dates, no random ids."""
    from memopt.units import format_bytes

    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    left, right, top, bottom = 80, 20, 40, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    ymax = max([v for points in series.values() for _, v in points] + [budget_bytes or 0, 1])

    def y(value: float) -> float:
        return top + plot_h * (1.0 - value / ymax)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="sans-serif" font-size="12">',
             f'<text x="{left}" y="20" font-size="14">{_xml(title)}</text>',
             f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#000"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#000"/>']
    for tick in range(5):
        value = ymax * tick / 4
        parts.append(f'<text x="{left - 6}" y="{y(value) + 4:.1f}" text-anchor="end">'
                     f'{_xml(format_bytes(value))}</text>')
    for index, (name, points) in enumerate(series.items()):
        if not points:
            continue
        step = plot_w / max(len(points) - 1, 1)
        coords = " ".join(f"{left + i * step:.1f},{y(v):.1f}" for i, (_, v) in enumerate(points))
        colour = colours[index % len(colours)]
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{coords}"/>')
        parts.append(f'<text x="{left + plot_w - 4}" y="{top + 14 + 16 * index}" text-anchor="end" '
                     f'fill="{colour}">{_xml(name)}: peak {_xml(format_bytes(max(v for _, v in points)))}</text>')
        if index == 0:
            phases = [p for p, _ in points]
            if "backward" in phases:
                x = left + phases.index("backward") * step
                parts.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + plot_h}" '
                             'stroke="#888" stroke-dasharray="2,3"/>')
                parts.append(f'<text x="{x + 4:.1f}" y="{top + plot_h - 6}" fill="#888">backward</text>')
    if budget_bytes is not None:
        parts.append(f'<line x1="{left}" y1="{y(budget_bytes):.1f}" x2="{left + plot_w}" '
                     f'y2="{y(budget_bytes):.1f}" stroke="#000" stroke-dasharray="6,4"/>')
        parts.append(f'<text x="{left + 4}" y="{y(budget_bytes) - 4:.1f}">budget '
                     f'{_xml(format_bytes(budget_bytes))}</text>')
    parts.append(f'<text x="{left + plot_w / 2:.0f}" y="{height - 10}" text-anchor="middle">'
                 'forward, then backward (share of the step\'s nodes)</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _xml(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
