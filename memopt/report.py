"""``memopt report DUMP_DIR [B_DIR] [--out report.html]``: one self-contained HTML page from dump folders.

Note [One file, drawn in the browser]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
The page holds its data as one JSON block and a small script that draws it: the memory timelines as
inline SVG, the tables (sortable by any column). Nothing is fetched, no server runs, and the file can be
mailed or attached to an issue; links to the dumped graphs and kernels are relative to where the page is
written. Drawing in the page rather than in Python keeps one renderer for one report and for a
comparison of two, and lets a test check in a real browser that what a reader sees was drawn.

What is read (see :mod:`memopt.compiler.dump` for the layout): per graph folder ``index.json`` (required:
the stages), ``timings.json``, each stage's stats JSON, ``schedule.json``, ``memory_timeline.json`` and
``node_times.json`` where they exist; at the top, ``tracked_steps.json`` (``memopt.track_memory(...,
dump_dir=...)``). A folder that holds no graph, a file that is not JSON, a field that is missing or of
the wrong kind, and a dump written by another memopt version are each a MemoptError naming the file and
the field.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any

from memopt.errors import MemoptError
from memopt.jsonfiles import json_field, read_json

__all__ = ["load_dump", "render_report", "write_report"]

_TRACKED = "tracked_steps.json"


_DAMAGED = "The dump is damaged or not a memopt dump: dump again"


def _read(path: Path) -> Any:
    return read_json(path, MemoptError, _DAMAGED, object_only=False)


def _field(path: Path, data: Any, key: str, kind: type | tuple[type, ...]) -> Any:
    return json_field(path, data, key, kind, MemoptError, _DAMAGED)


def load_dump(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Everything the report shows of one dump folder, as plain data."""
    from memopt import __version__

    root = Path(folder)
    if not root.is_dir():
        raise MemoptError(f"dump folder '{root}' does not exist; pass the dump_dir of a run "
                          "(options={'dump_dir': ...} or MEMOPT_DUMP_DIR)")
    indexes = sorted(root.glob("*/index.json"))
    if not indexes:
        raise MemoptError(f"dump folder '{root}' holds no graph (no <graph>/index.json in it): was the run "
                          "made with options={'dump_dir': ...}, and did a step run?")
    graphs = []
    for index_path in indexes:
        index = _read(index_path)
        version = _field(index_path, index, "memopt_version", str)
        if version != __version__:
            raise MemoptError(f"'{index_path}' field 'memopt_version' is {version!r}; this is memopt "
                              f"{__version__}, which reads its own dumps. Report it with memopt {version}, "
                              "or dump again with this one")
        graphs.append(_graph(index_path.parent, index))
    tracked = root / _TRACKED
    steps = _read(tracked) if tracked.exists() else []
    if not isinstance(steps, list):
        raise MemoptError(f"'{tracked}' holds a JSON {type(steps).__name__}; expected a list of tracked steps")
    return {"folder": str(root), "graphs": graphs, "tracked_steps": steps}


def _optional(folder: Path, name: str) -> Any:
    path = folder / name
    return _read(path) if path.exists() else None


def _graph(folder: Path, index: dict[str, Any]) -> dict[str, Any]:
    index_path = folder / "index.json"
    stages = _field(index_path, index, "stages", list)
    timings = _optional(folder, "timings.json") or {}
    stats = {_field(index_path, stage, "name", str): _read(folder / stage["stats"]) for stage in stages
             if isinstance(stage, dict) and isinstance(stage.get("stats"), str)}
    rows = [_stage_row(folder, stage, timings, stats) for stage in stages]
    schedule = _optional(folder, "schedule.json")
    if schedule is not None:
        _field(folder / "schedule.json", schedule, "candidates", list)
    timeline = _optional(folder, "memory_timeline.json")
    if timeline is not None:
        _field(folder / "memory_timeline.json", timeline, "series", dict)
    node_times = _optional(folder, "node_times.json")
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    return {"id": _field(index_path, index, "graph", str), "folder": folder.name, "codegen": index.get("codegen"),
            "profile": index.get("profile_origin") or index.get("profile"), "options": index.get("options", {}),
            "passes": rows, "schedule": schedule, "timeline": timeline, "files": files,
            "predicted": _predicted(stats.get("forward")), "node_times": _slowest(node_times)}


def _stage_row(folder: Path, stage: Any, timings: dict[str, float], stats_by_stage: dict[str, Any],
               ) -> dict[str, Any]:
    name = _field(folder / "index.json", stage, "name", str)
    stats = stats_by_stage.get(name, {})
    after = stats.get("predicted_after") or stats.get("predicted") or {}
    stem = str(stage.get("code", "")).removesuffix(".py")
    return {"name": name, "kind": stage.get("kind"), "status": stage.get("status"),
            "seconds": timings.get(stem, timings.get(name)), "nodes_before": stats.get("nodes_before"),
            "nodes_after": stats.get("nodes_after", stats.get("nodes")), "nodes_added": stats.get("nodes_added"),
            "nodes_removed": stats.get("nodes_removed"), "peak_bytes": after.get("peak_bytes"),
            "saved_bytes": after.get("saved_activation_bytes"), "code": stage.get("code"),
            "reason": stage.get("reason"), "lossy": bool(stage.get("lossy"))}


def _predicted(forward_stats: Any) -> dict[str, Any] | None:
    """The compiled step's predicted peak and time (the forward stage's stats)."""
    if not isinstance(forward_stats, dict):
        return None
    memory = forward_stats.get("memory", {})
    return {"peak_bytes": memory.get("peak_bytes"), "time_s": memory.get("predicted_time_s"),
            "peak_at": memory.get("peak_at")}


def _slowest(node_times: Any, count: int = 25) -> dict[str, Any] | None:
    if not isinstance(node_times, dict) or not isinstance(node_times.get("nodes"), list):
        return None
    nodes = [n for n in node_times["nodes"] if isinstance(n, dict)]
    return {"measured_s": sum(n.get("seconds", 0.0) for n in nodes),
            "predicted_s": sum(n.get("predicted_s", 0.0) for n in nodes), "device": node_times.get("device"),
            "slowest": sorted(nodes, key=lambda n: -n.get("seconds", 0.0))[:count]}


def render_report(dumps: list[dict[str, Any]], links: list[str]) -> str:
    """The page for one dump, or a comparison of two; ``links``: each dump's folder as seen from the page."""
    data = {"dumps": dumps, "links": links, "compare": len(dumps) == 2}
    payload = json.dumps(data, sort_keys=True).replace("</", "<\\/")
    title = "memopt report: " + " vs ".join(html.escape(Path(d["folder"]).name) for d in dumps)
    return _PAGE.replace("__TITLE__", title).replace("__DATA__", payload).replace("__SCRIPT__", _SCRIPT)


def write_report(folders: list[str], out: str | os.PathLike[str]) -> Path:
    """Read the dump folder(s) and write the page to ``out`` (a temporary file, then a rename)."""
    if len(folders) not in (1, 2):
        raise MemoptError(f"memopt report takes one dump folder, or two to compare; got {len(folders)}")
    target = Path(out)
    dumps = [load_dump(f) for f in folders]
    links = [Path(os.path.relpath(Path(f).resolve(), target.resolve().parent)).as_posix() for f in folders]
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.tmp")
    partial.write_text(render_report(dumps, links), encoding="utf-8")
    os.replace(partial, target)
    return target


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; max-width: 1200px; }
h1 { font-size: 20px; } h2 { font-size: 17px; margin-top: 32px; border-bottom: 1px solid #ccc; }
h3 { font-size: 15px; } table { border-collapse: collapse; margin: 8px 0 16px; }
th, td { padding: 3px 8px; border-bottom: 1px solid #eee; text-align: right; } td:not(.t) { white-space: nowrap; }
th { cursor: pointer; background: #f4f4f4; position: sticky; top: 0; } th.sorted { background: #dde8f4; }
td.t, th.t { text-align: left; } .keep { color: #555; } .recompute { color: #b35900; }
.offload { color: #1f5fa8; } .compress { color: #7a3ea8; } .note { color: #666; font-size: 12px; }
.scroll { max-height: 420px; overflow: auto; display: inline-block; } .worse { color: #b00; } .better { color: #070; }
</style></head><body>
<h1>__TITLE__</h1>
<noscript>This report draws its plots and tables with JavaScript; enable it to see them.</noscript>
<div id="report"></div>
<script type="application/json" id="memopt-data">__DATA__</script>
<script>__SCRIPT__</script>
</body></html>
"""

_SCRIPT = r"""
"use strict";
const DATA = JSON.parse(document.getElementById("memopt-data").textContent);
const root = document.getElementById("report");
const COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"];
const SVGNS = "http://www.w3.org/2000/svg";

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}
function svg(tag, attrs) {
  const e = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  return e;
}
function bytes(n) {
  if (n === null || n === undefined) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0, v = Math.abs(n);
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return (n < 0 ? "-" : "") + v.toFixed(i ? 2 : 0) + " " + units[i];
}
function secs(s) {
  if (s === null || s === undefined) return "";
  return s >= 1 ? s.toFixed(3) + " s" : s >= 1e-3 ? (s * 1e3).toFixed(3) + " ms" : (s * 1e6).toFixed(1) + " us";
}

function timeline(tl, title) {
  const W = 900, H = 320, L = 80, R = 20, T = 30, B = 36, pw = W - L - R, ph = H - T - B;
  const series = Object.entries(tl.series);
  const ymax = Math.max(1, tl.budget_bytes || 0, ...series.map(([, s]) => s.peak_bytes));
  const y = v => T + ph * (1 - v / ymax);
  const box = svg("svg", {width: W, height: H, class: "timeline", "font-size": 12, "font-family": "sans-serif"});
  const text = (x, yy, s, extra) => { const t = svg("text", {x, y: yy, ...(extra || {})}); t.textContent = s; box.append(t); };
  text(L, 18, title);
  box.append(svg("line", {x1: L, y1: T + ph, x2: L + pw, y2: T + ph, stroke: "#000"}));
  box.append(svg("line", {x1: L, y1: T, x2: L, y2: T + ph, stroke: "#000"}));
  for (let i = 0; i <= 4; i++) text(L - 6, y(ymax * i / 4) + 4, bytes(ymax * i / 4), {"text-anchor": "end"});
  series.forEach(([name, s], k) => {
    const n = s.live_bytes.length, step = pw / Math.max(n - 1, 1);
    const pts = s.live_bytes.map((v, i) => (L + i * step).toFixed(1) + "," + y(v).toFixed(1)).join(" ");
    box.append(svg("polyline", {fill: "none", stroke: COLOURS[k % COLOURS.length], "stroke-width": 1.4,
                                points: pts, class: "series", "data-name": name}));
    text(L + pw - 4, T + 14 + 15 * k, name + ": peak " + bytes(s.peak_bytes), {"text-anchor": "end", fill: COLOURS[k % COLOURS.length]});
  });
  if (tl.budget_bytes) {
    box.append(svg("line", {x1: L, y1: y(tl.budget_bytes), x2: L + pw, y2: y(tl.budget_bytes), stroke: "#000",
                            "stroke-dasharray": "6,4", class: "budget"}));
    text(L + 4, y(tl.budget_bytes) - 4, "budget " + bytes(tl.budget_bytes));
  }
  text(L + pw / 2, H - 8, "forward, then backward (share of each graph's events)", {"text-anchor": "middle"});
  return box;
}

function table(columns, rows, cls) {
  // columns: [label, key, format, textual]; click a header to sort by it.
  const t = el("table", {class: cls || ""});
  const head = el("tr");
  const body = el("tbody");
  const draw = list => {
    body.replaceChildren(...list.map(r => el("tr", {class: "row"}, ...columns.map(([, key, fmt, textual]) => {
      const td = el("td", {class: textual ? "t" : ""});
      const v = r[key];
      if (fmt === "link") { if (v) td.append(el("a", {href: v[1]}, v[0])); }
      else if (fmt === "choice") { td.append(el("span", {class: v}, v)); }
      else td.append(fmt ? fmt(v) : (v === null || v === undefined ? "" : String(v)));
      return td;
    }))));
  };
  let order = 1, by = null;
  columns.forEach(([label, key, , textual]) => {
    const th = el("th", {class: textual ? "t" : ""}, label);
    th.addEventListener("click", () => {
      order = by === key ? -order : 1; by = key;
      head.querySelectorAll("th").forEach(h => h.classList.remove("sorted")); th.classList.add("sorted");
      const val = r => { const v = r[key]; return Array.isArray(v) ? v[0] : v; };
      draw([...rows].sort((a, b) => (val(a) > val(b) ? 1 : val(a) < val(b) ? -1 : 0) * order));
    });
    head.append(th);
  });
  t.append(el("thead", {}, head), body);
  draw(rows);
  return el("div", {class: "scroll"}, t);
}

function passes(g, link) {
  const rows = g.passes.map(p => ({...p, code: p.code ? [p.code, link + "/" + g.folder + "/" + p.code] : null,
                                  status: p.status + (p.lossy ? " (lossy)" : "") + (p.reason ? ": " + p.reason : "")}));
  return table([["stage", "name", null, true], ["kind", "kind", null, true], ["status", "status", null, true],
                ["time", "seconds", secs], ["nodes before", "nodes_before"], ["nodes after", "nodes_after"],
                ["added", "nodes_added"], ["removed", "nodes_removed"], ["predicted peak", "peak_bytes", bytes],
                ["saved bytes", "saved_bytes", bytes], ["code", "code", "link", true]], rows, "passes");
}

function decisions(s) {
  const rows = s.candidates.map(c => ({...c, layer: c.layer || "(outside layers)", cost:
    c.choice === "offload" ? c.offload_time_s : c.choice === "recompute" ? c.recompute_time_s : 0}));
  rows.sort((a, b) => a.layer < b.layer ? -1 : a.layer > b.layer ? 1 : b.bytes - a.bytes);
  const counts = {};
  rows.forEach(r => { counts[r.choice] = (counts[r.choice] || 0) + 1; });
  const summary = el("p", {}, `budget ${s.budget} (${bytes(s.budget_bytes)}); peak ${bytes(s.baseline_peak_bytes)} ` +
    `unscheduled, ${bytes(s.peak_bytes)} planned (${s.feasible ? "meets" : "MISSES"} the budget) by ${s.method}, ` +
    `predicted added time ${secs(s.added_time_s)}; ` + Object.entries(counts).map(([k, v]) => `${v} ${k}`).join(", ") +
    `; prices from profile ${s.profile_origin ? s.profile_origin.requested : s.profile}`);
  return [summary, table([["layer", "layer", null, true], ["value", "name", null, true], ["bytes", "bytes", bytes],
    ["choice", "choice", "choice", true], ["cost", "cost", secs], ["recompute", "recompute_time_s", secs],
    ["offload", "offload_time_s", secs], ["why", "why", null, true]], rows, "decisions")];
}

function measured(g, dump) {
  const out = [];
  if (g.predicted && dump.tracked_steps.length) {
    const rows = dump.tracked_steps.map((t, i) => ({step: i + 1, tracked: t.peak_bytes, predicted: g.predicted.peak_bytes,
      ratio: g.predicted.peak_bytes ? (t.peak_bytes / g.predicted.peak_bytes).toFixed(3) : "", increase: t.peak_increase_bytes}));
    out.push(el("h3", {}, "Predicted against tracked peak"),
             el("p", {class: "note"}, "tracked: memopt.track_memory(..., dump_dir=...) around a step (the whole block); predicted: this graph's simulated step peak at " + (g.predicted.peak_at || "")),
             table([["tracked step", "step"], ["tracked peak", "tracked", bytes], ["predicted peak", "predicted", bytes],
                    ["tracked / predicted", "ratio"], ["tracked increase", "increase", bytes]], rows, "tracked"));
  }
  if (g.node_times) {
    const nt = g.node_times;
    out.push(el("h3", {}, "Measured node times (dump_node_times)"),
             el("p", {}, `sum of measured nodes ${secs(nt.measured_s)}, predicted ${secs(nt.predicted_s)} on ${nt.device}`),
             table([["graph", "graph", null, true], ["node", "name", null, true], ["op", "target", null, true],
                    ["class", "op_class", null, true], ["measured", "seconds", secs], ["predicted", "predicted_s", secs]],
                   nt.slowest, "node-times"));
  }
  return out;
}

function graphSection(g, dump, link) {
  const sec = el("section", {class: "graph", "data-graph": g.id});
  const prof = g.profile && g.profile.requested ? `${g.profile.requested} (${g.profile.source})` : g.profile;
  sec.append(el("h2", {}, g.id), el("p", {class: "note"}, `codegen ${g.codegen}; cost profile ${prof}`));
  if (g.predicted) sec.append(el("p", {}, `predicted step: peak ${bytes(g.predicted.peak_bytes)} at ${g.predicted.peak_at}, time ${secs(g.predicted.time_s)}`));
  if (g.timeline) sec.append(timeline(g.timeline, "live bytes over one step"));
  sec.append(el("h3", {}, "Passes"), passes(g, link));
  if (g.schedule) sec.append(el("h3", {}, "Schedule decisions, by layer"), ...decisions(g.schedule));
  sec.append(...measured(g, dump));
  const files = el("p", {class: "files"}, "Files: ");
  g.files.forEach(f => files.append(el("a", {href: link + "/" + g.folder + "/" + f}, f), " "));
  sec.append(files);
  return sec;
}

function compare(a, b) {
  const sec = el("section", {class: "compare"}, el("h2", {}, "Comparison"));
  const byId = new Map(b.graphs.map(g => [g.id, g]));
  const rows = [], diffs = [];
  a.graphs.forEach(ga => {
    const gb = byId.get(ga.id);
    if (!gb) { rows.push({graph: ga.id, note: "only in A"}); return; }
    const sa = ga.schedule || {}, sb = gb.schedule || {};
    rows.push({graph: ga.id, peak_a: (ga.predicted || {}).peak_bytes, peak_b: (gb.predicted || {}).peak_bytes,
               time_a: (ga.predicted || {}).time_s, time_b: (gb.predicted || {}).time_s,
               added_a: sa.added_time_s, added_b: sb.added_time_s, note: ""});
    const choices = new Map((sb.candidates || []).map(c => [c.name, c]));
    (sa.candidates || []).forEach(c => {
      const other = choices.get(c.name);
      const cb = other ? other.choice : "(not a candidate)";
      if (cb !== c.choice) diffs.push({graph: ga.id, name: c.name, layer: c.layer || "", bytes: c.bytes, a: c.choice, b: cb});
    });
  });
  b.graphs.filter(g => !a.graphs.some(x => x.id === g.id)).forEach(g => rows.push({graph: g.id, note: "only in B"}));
  sec.append(el("p", {}, `A: ${a.folder}  B: ${b.folder}`),
             table([["graph", "graph", null, true], ["peak A", "peak_a", bytes], ["peak B", "peak_b", bytes],
                    ["time A", "time_a", secs], ["time B", "time_b", secs], ["added A", "added_a", secs],
                    ["added B", "added_b", secs], ["", "note", null, true]], rows, "compare-graphs"),
             el("h3", {}, `Decisions that differ (${diffs.length})`),
             table([["graph", "graph", null, true], ["layer", "layer", null, true], ["value", "name", null, true],
                    ["bytes", "bytes", bytes], ["A", "a", "choice", true], ["B", "b", "choice", true]], diffs, "compare-decisions"));
  return sec;
}

if (DATA.compare) root.append(compare(DATA.dumps[0], DATA.dumps[1]));
DATA.dumps.forEach((dump, i) => {
  const part = el("div", {class: "dump"}, el("h2", {}, (DATA.compare ? (i ? "B: " : "A: ") : "Dump: ") + dump.folder));
  dump.graphs.forEach(g => part.append(graphSection(g, dump, DATA.links[i])));
  root.append(part);
});
document.body.setAttribute("data-drawn", "yes");
"""
