"""One self-contained HTML page per run: every intervention's mean effect, with hover CIs, to explore offline.

The numbers are computed here with causal.results.summary (effect, mean, bootstrap_ci) and embedded as JSON;
the page draws them with its own small script as inline SVG. Nothing is fetched from the network (the page's
Content-Security-Policy forbids it), so the file can be mailed or opened from a cluster's disk.
"""
from __future__ import annotations

import html
import itertools
import json
import warnings
from pathlib import Path
from statistics import NormalDist

import numpy as np
import xarray as xr

from causal.files import write_atomically
from causal.methods.kinds import kind_of
from causal.results.bases import trained_statements
from causal.results.plot import SITE_DIMS
from causal.results.summary import bootstrap_ci, effect, mean, standard_error

LEVEL = 0.95
SAMPLES = 1000
MAX_NUMBERS = 20_000_000  # bootstrap samples x examples x sites held at once (160 MB)
BOOTSTRAP_WORK = 300_000_000  # samples x examples x sites: about 2 s


def write_report(dataset: xr.Dataset, path: str | Path) -> Path:
    page = report_html(dataset)
    return write_atomically(Path(path), lambda tmp: tmp.write_text(page, encoding="utf-8"), "report")


def report_html(dataset: xr.Dataset) -> str:
    """Joined, not templated: no text from the dataset is ever scanned for placeholders."""
    title = html.escape(f"causal: {_text(dataset.attrs.get('experiment', 'results'))}")
    return "".join([HEAD, "<title>", title, "</title>\n<style>", STYLE, "</style>\n</head>\n", BODY,
                    '<script type="application/json" id="causal-data">', _script_json(page_data(dataset)),
                    "</script>\n<script>", SCRIPT, "</script>\n</body>\n</html>\n"])


def _script_json(data: dict) -> str:
    """JSON safe inside <script>: `<`, `>` and `&` only occur in strings, where \\u escapes mean the same,
    so a prompt holding `</script>` or `<!--` cannot end the element."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    for char in "<>&\u2028\u2029":
        text = text.replace(char, f"\\u{ord(char):04x}")
    return text


def page_data(dataset: xr.Dataset) -> dict:
    """What the page shows: the provenance, the experiment text, and one entry per intervention variable."""
    attrs = {k: _text(v) for k, v in dataset.attrs.items() if k != "experiment_text"}
    variables = [_variable(dataset, name) for name, v in dataset.data_vars.items()
                 if kind_of(v.attrs).effect]
    return {"attrs": attrs, "experiment_text": _text(dataset.attrs.get("experiment_text", "")), "swept": _swept(dataset),
            "examples": int(dataset.sizes.get("example", 0)), "level": LEVEL, "variables": variables,
            "trained": trained_tables(dataset)}


def trained_tables(dataset: xr.Dataset) -> list[dict]:
    """Per align / reft statement, its best candidates by held-out score (the figure has them all)."""
    tables = []
    for stem, score, label in trained_statements(dataset):
        size = dataset[f"{stem}_size"]
        dims = list(score.dims)
        rows = [[*(_label(v) for v in at), float(score.sel(dict(zip(dims, at)))), int(size.sel(dict(zip(dims, at))))]
                for at in itertools.product(*(score[d].values.tolist() for d in dims))]
        rows.sort(key=lambda row: -np.nan_to_num(row[-2], nan=-1.0))
        tables.append({"name": stem, "statement": _text(score.attrs.get("statement", "")), "label": label,
                       "heldout": int(score.attrs.get("heldout_pairs", 0)), "dims": dims, "total": len(rows),
                       "rows": [[*row[:-2], round(row[-2], 4), row[-1]] for row in rows[:TRAINED_ROWS]]})
    return tables


TRAINED_ROWS = 10  # candidates listed per trained statement


def _swept(dataset: xr.Dataset) -> list[str]:
    """The parameters a merged sweep varies (io.merge_runs' list; causal.load decodes it from the file)."""
    return [str(s) for s in dataset.attrs.get("swept", [])]


def _variable(dataset: xr.Dataset, name: str) -> dict:
    """The mean change and its CI per site. As in plot.py, only examples are averaged: the first two site
    dims are a panel's axes, further site dims one panel per value; the other dims (metric, a merged sweep's
    seed or model) are chosen on the page."""
    attrs = dataset[name].attrs
    change = effect(dataset, name)
    for dim in [d for d in change.dims if d != "example"]:  # a merged Dataset's union of positions, etc.
        change = change.dropna(dim, how="all")
    single = [d for d in change.dims if d != "example" and change.sizes[d] == 1]
    fixed = {d: _label(change[d].values[0]) for d in single}
    change = change.squeeze(single, drop=True)
    dims = [d for d in change.dims if d != "example"]
    sites = [d for d in dims if d in SITE_DIMS]
    selectors = [d for d in dims if d not in SITE_DIMS]
    order = [*selectors, *sites[2:], *sites[:2]]
    change = change.transpose(*order, "example")
    low, high, interval = _interval(change)
    means = mean(change).values
    return {"name": name, "statement": _text(attrs.get("statement", "")), "method": _text(attrs.get("method", "")),
            "prompts": _text(attrs.get("prompts", "")), "source": _text(attrs.get("source", "")),
            "metric": _text(attrs.get("metric", "")), "fixed": fixed, "dims": order,
            "shape": list(change.shape[:-1]), "coords": {d: [_label(v) for v in change[d].values] for d in order},
            "axes": sites[:2], "panels": sites[2:], "selectors": selectors,
            "ordered": len(sites) == 1 and sites[0] in ("layer", "pos") and np.issubdtype(change[sites[0]].dtype,
                                                                                          np.number),
            "interval": interval, "limits": _limits(means, "metric" in selectors), "mean": _numbers(means), "low": _numbers(low),
            "high": _numbers(high), "n": change.notnull().sum("example").values.ravel().tolist(),
            "tokens": _tokens(dataset, change, attrs)}


def _interval(change: xr.DataArray) -> tuple[np.ndarray, np.ndarray, str]:
    """The CI per site: summary.bootstrap_ci (as the plots' bands), a block of sites at a time as it holds
    samples x examples numbers a site; past BOOTSTRAP_WORK (a neuron sweep: tens of seconds) the normal
    interval from summary.standard_error instead, and the page says which."""
    examples = change.sizes["example"]
    flat = change.values.reshape(-1, examples)
    shape = change.shape[:-1]
    with warnings.catch_warnings():  # a site no example has: NaN, as intended
        warnings.simplefilter("ignore", RuntimeWarning)
        if flat.size * SAMPLES > BOOTSTRAP_WORK:
            half = NormalDist().inv_cdf(0.5 + LEVEL / 2) * standard_error(change).values
            centre = mean(change).values
            return centre - half, centre + half, "normal"
        block = max(1, MAX_NUMBERS // (SAMPLES * max(examples, 1)))
        parts = [bootstrap_ci(xr.DataArray(flat[start:start + block], dims=("site", "example")), level=LEVEL,
                              samples=SAMPLES) for start in range(0, len(flat), block)]
    low, high = (np.concatenate([ci[k].values for ci in parts]).reshape(shape) for k in ("low", "high"))
    return low, high, "bootstrap"


def _limits(means: np.ndarray, by_metric: bool) -> list[float]:
    """The colour scale's half-width: one per metric (metrics differ in scale), shared by all panels and
    sweep values, so switching seed does not silently rescale the colours."""
    per = means.reshape(means.shape[0], -1) if by_metric else means.reshape(1, -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        limits = np.nanmax(np.abs(per), axis=1) if per.size else np.zeros(len(per))
    return [float(f"{x:.4g}") if np.isfinite(x) and x > 0 else 1.0 for x in limits]


def _tokens(dataset: xr.Dataset, change: xr.DataArray, attrs: dict) -> dict:
    """Per prompt column, the token at each position of the panel (example 0's), and whether examples differ
    there; the base column first, as its tokens label the axis."""
    if "pos" not in change.dims:
        return {}
    names = sorted((c for c in dataset.coords if c.startswith("token_") and "pos" in dataset[c].dims),
                   key=lambda c: c != f"token_{attrs.get('prompts')}")
    tokens = {}
    for coord in names:
        grid = dataset[coord].sel(pos=change["pos"].values).transpose(..., "pos").values
        grid = grid.reshape(-1, grid.shape[-1])  # examples (and any sweep dim) x positions
        tokens[coord.removeprefix("token_")] = {"first": [_text(t) for t in grid[0]],
                                                "varies": (grid != grid[:1]).any(0).tolist()}
    return tokens


def _numbers(values: np.ndarray) -> list:
    """Four significant digits keep the page small; NaN (a site an example lacks) becomes null."""
    return [float(f"{x:.4g}") if np.isfinite(x) else None for x in np.asarray(values, dtype=float).ravel()]


def _label(value) -> str:
    return str(value.item() if isinstance(value, np.generic) else value)


def _text(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, np.generic):
        return str(value.item())
    return json.dumps(value, default=str) if isinstance(value, (list, tuple, dict, bool)) else str(value)


HEAD = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:">
<meta name="viewport" content="width=device-width, initial-scale=1">
"""

BODY = """<body>
<header>
<div class="about"><h1 id="title"></h1><p id="subtitle"></p><div id="selectors"></div></div>
<section id="experiment"><h2>Experiment file</h2><pre id="experiment-text"></pre></section>
</header>
<main><div id="charts"></div>
<section id="provenance"><h2>Provenance</h2><table id="attrs"></table></section></main>
<div id="tip" hidden></div>
<noscript>This report draws its charts with JavaScript; the numbers are in results.nc.</noscript>
"""

STYLE = """
body{font:14px/1.45 system-ui,"DejaVu Sans",Arial,sans-serif;margin:0;color:#1b1b1b;background:#f6f6f6}
header{display:flex;flex-wrap:wrap;gap:8px 32px;padding:14px 24px;background:#fff;border-bottom:1px solid #ddd}
header .about{flex:1 1 360px}
h1{font-size:22px;margin:0 0 2px}
h2{font-size:17px;margin:0 0 4px}
#subtitle{color:#555;margin:0 0 10px}
#selectors label{margin-right:16px;font-weight:600}
select{font:inherit;margin-left:4px}
#experiment{flex:1 1 460px}
#experiment h2,#provenance h2{font-size:13px;color:#555;text-transform:uppercase;letter-spacing:.04em}
pre{margin:0;max-height:210px;overflow:auto;background:#f4f4f4;border:1px solid #e3e3e3;padding:8px 10px;
 font:12px/1.4 "DejaVu Sans Mono",Menlo,Consolas,monospace;white-space:pre-wrap}
main{padding:4px 24px 32px}
section.variable{background:#fff;border:1px solid #ddd;border-radius:6px;padding:12px 16px;margin:14px 0}
code{font-family:"DejaVu Sans Mono",Menlo,Consolas,monospace;font-size:12px}
code.statement{background:#f1f1f1;padding:1px 5px;border-radius:3px}
p.what{color:#444;margin:6px 0 8px}
.note{color:#8a4b00}
.panels{display:flex;flex-wrap:wrap;gap:10px 24px}
.panel{max-width:100%;overflow-x:auto}
.panel h3{font-size:13px;margin:6px 0 2px}
svg text{font-size:11px;fill:#222}
svg text.title{font-size:12px;font-weight:600}
svg text.value{font-size:11px;pointer-events:none}
svg text.light{fill:#fff}
rect.cell:hover,rect.bar:hover,circle.point:hover{stroke:#000;stroke-width:1.5}
#tip{position:fixed;z-index:9;pointer-events:none;max-width:380px;padding:6px 9px;border-radius:4px;
 background:rgba(25,25,25,.93);color:#fff;font-size:12px;line-height:1.4;white-space:pre-wrap}
#tip[hidden]{display:none}
#tip .head{font-weight:600}
table{border-collapse:collapse;font-size:12px;background:#fff}
th,td{border-bottom:1px solid #eee;padding:3px 12px 3px 4px;text-align:left;vertical-align:top}
td code{white-space:pre-wrap;word-break:break-word}
"""

SCRIPT = r"""
"use strict";
(function () {
const D = JSON.parse(document.getElementById("causal-data").textContent);
const SVGNS = "http://www.w3.org/2000/svg", CHAR = 6.6, MAX_PANELS = 64;
const BLUE = "#3b6fb6", tips = new WeakMap(), state = {};
let gradients = 0;

function el(tag, attrs, text) { return fill(document.createElement(tag), attrs, text); }
function sv(tag, attrs, text) { return fill(document.createElementNS(SVGNS, tag), attrs, text); }
function fill(e, attrs, text) {  // text only ever as textContent: nothing from the data is parsed as markup
  for (const k in attrs || {}) e.setAttribute(k, attrs[k]);
  if (text !== undefined) e.textContent = text;
  return e;
}
function num(x, sign) {
  if (x === null || x === undefined) return "n/a";
  const a = Math.abs(x);
  const body = a === 0 ? "0" : (a >= 1e4 || a < 1e-3) ? a.toExponential(2) : String(Number(a.toPrecision(3)));
  return (x < 0 ? "\u2212" : x > 0 && sign !== false ? "+" : "") + body;
}

const STOPS = ["053061", "2166ac", "4393c3", "92c5de", "d1e5f0", "f7f7f7", "fddbc7", "f4a582", "d6604d",
  "b2182b", "67001f"].map(h => [0, 2, 4].map(i => parseInt(h.slice(i, i + 2), 16)));
function colour(t) {  // RdBu reversed, centred at 0: blue lowers the metric, red raises it
  const p = (Math.max(-1, Math.min(1, t)) + 1) / 2 * (STOPS.length - 1);
  const i = Math.min(Math.floor(p), STOPS.length - 2), f = p - i;
  return "rgb(" + STOPS[i].map((a, k) => Math.round(a + (STOPS[i + 1][k] - a) * f)).join(",") + ")";
}

function index(v, at) {
  let k = 0, stride = 1;
  for (let i = v.dims.length - 1; i >= 0; i--) { k += at[v.dims[i]] * stride; stride *= v.shape[i]; }
  return k;
}
function tick(v, d, i) {
  const label = v.coords[d][i], columns = Object.keys(v.tokens);
  if (d !== "pos" || !columns.length) return label;
  const t = v.tokens[columns[0]], token = t.first[i].trim().slice(0, 24);
  return token ? label + " " + token + (t.varies[i] ? "\u2026" : "") : label;
}
function tipLines(v, at, metric) {
  const lines = [];
  for (const d of v.dims) {
    if (d === "metric") continue;
    lines.push(d + " " + v.coords[d][at[d]]);
    if (d === "pos") for (const c of Object.keys(v.tokens)) {
      const t = v.tokens[c];
      lines.push("  " + c + ": " + JSON.stringify(t.first[at[d]]) + (t.varies[at[d]] ? " (example 0; examples differ)" : ""));
    }
  }
  const k = index(v, at);
  if (v.mean[k] === null) return [...lines, "no value: no example has this site"];
  return [...lines, "mean \u0394 " + metric + ": " + num(v.mean[k]),
    Math.round(D.level * 100) + "% CI [" + num(v.low[k]) + ", " + num(v.high[k]) + "] over " + v.n[k] + " examples ("
    + (v.interval === "bootstrap" ? "bootstrap" : "normal approximation") + ")"];
}
function hover(node, lines) { tips.set(node, lines); return node; }

function header() {
  const a = D.attrs;
  document.getElementById("title").textContent = "experiment " + (a.experiment || "");
  const facts = [a.model && "model " + a.model, D.examples + " examples", a.seed !== undefined && "seed " + a.seed,
    D.swept.length && "a sweep over " + D.swept.join(", "), a.created && "created " + a.created];
  document.getElementById("subtitle").textContent = facts.filter(Boolean).join(" \u00b7 ");
  document.getElementById("experiment-text").textContent = D.experiment_text;
  document.getElementById("experiment").hidden = !D.experiment_text;
  const table = document.getElementById("attrs");
  for (const k of Object.keys(a)) {
    const row = el("tr"), cell = el("td");
    cell.append(el("code", {}, a[k]));
    row.append(el("th", {}, k), cell);
    table.append(row);
  }
}

function selectors() {
  const box = document.getElementById("selectors"), dims = {};
  for (const v of D.variables) for (const d of v.selectors) {
    dims[d] = dims[d] || [];
    for (const c of v.coords[d]) if (!dims[d].includes(c)) dims[d].push(c);
  }
  for (const d of Object.keys(dims).sort((a, b) => (b === "metric") - (a === "metric"))) {  // metric first
    state[d] = dims[d][0];
    const select = el("select", {"data-dim": d});
    for (const c of dims[d]) select.append(el("option", {value: c}, c));
    select.addEventListener("change", () => { state[d] = select.value; render(); });
    const label = el("label", {}, d);
    label.append(select);
    box.append(label);
  }
}

function render() {
  const charts = document.getElementById("charts");
  charts.replaceChildren();
  if (!D.variables.length && !D.trained.length)
    charts.append(el("p", {class: "note"}, "This run has no intervention variables."));
  for (const v of D.variables) charts.append(section(v, charts.clientWidth - 36));
  for (const t of D.trained) charts.append(trainedSection(t));
}

function trainedSection(t) {  // align / reft: the best candidates by held-out score, as a table
  const s = el("section", {class: "variable trained", "data-variable": t.name});
  s.append(el("h2", {}, t.name + ": " + t.label));
  s.append(el("code", {class: "statement"}, t.statement));
  s.append(el("p", {class: "what"}, "The " + t.rows.length + " best of " + t.total + " trained candidates by their score on "
    + t.heldout + " held-out examples (all of them, with the training curves, in plots/" + t.name + ".png); the learned "
    + "bases and parameters are in bases/ beside results.nc."));
  const table = el("table", {class: "candidates"}), head = el("tr");
  for (const h of [...t.dims, t.label, "size"]) head.append(el("th", {}, h));
  table.append(head);
  for (const r of t.rows) {
    const row = el("tr");
    r.forEach((c, i) => row.append(el("td", {}, i === t.dims.length ? num(c, false) : String(c))));
    table.append(row);
  }
  s.append(table);
  return s;
}

function section(v, width) {
  const s = el("section", {class: "variable", "data-variable": v.name});
  const metric = v.selectors.includes("metric") ? state.metric : (v.metric || "metric");
  const fixed = Object.keys(v.fixed).map(d => d + "=" + v.fixed[d]);
  s.append(el("h2", {}, v.name + ": \u0394 " + metric + (fixed.length ? " (" + fixed.join(", ") + ")" : "")));
  s.append(el("code", {class: "statement"}, v.statement));
  s.append(el("p", {class: "what"}, "Mean over " + D.examples + " examples of the metric with this intervention minus "
    + "the unmodified " + v.prompts + " run" + (v.axes.length === 2 ? "; red raises the metric, blue lowers it, grey: no value" : "")
    + (Object.keys(v.tokens).length ? "; a position's token is example 0's (\u2026: examples differ there)" : "")
    + ". Hover for the " + Math.round(D.level * 100) + "% CI over examples (" + (v.interval === "bootstrap" ? "bootstrap"
      : "normal approximation from the standard error: too many sites to bootstrap") + ")."));
  const at = {};
  for (const d of v.selectors) {
    at[d] = v.coords[d].indexOf(state[d]);
    if (at[d] < 0) { s.append(el("p", {class: "note"}, "no values at " + d + "=" + state[d])); return s; }
  }
  if (!v.mean.length) { s.append(el("p", {class: "note"}, "no values: no example has any of these sites")); return s; }
  const limit = v.limits[v.selectors.includes("metric") ? at.metric : 0];
  const combos = product(v.panels.map(d => v.coords[d].length)), shown = combos.slice(0, MAX_PANELS);
  if (v.axes.length === 2) s.append(colourbar(limit, metric));
  if (combos.length > shown.length) s.append(el("p", {class: "note"}, "the first " + shown.length + " of " + combos.length + " panels"));
  const box = el("div", {class: "panels"});
  const each = shown.length > 1 ? Math.max(300, Math.floor(width / Math.min(shown.length, 3)) - 24) : width;
  for (const combo of shown) {
    const where = Object.assign({}, at), panel = el("div", {class: "panel"});
    v.panels.forEach((d, i) => { where[d] = combo[i]; });
    if (v.panels.length) panel.append(el("h3", {}, v.panels.map(d => d + "=" + tick(v, d, where[d])).join(", ")));
    panel.append(v.axes.length === 2 ? heatmap(v, where, each, limit, metric) : chart(v, where, each, metric));
    box.append(panel);
  }
  s.append(box);
  return s;
}

function product(sizes) {
  let out = [[]];
  for (const n of sizes) out = out.flatMap(c => Array.from({length: n}, (_, i) => c.concat([i])));
  return out;
}

function xLabels(svg, labels, x0, step, y, title) {  // every label that fits, upright or at 45 degrees
  const longest = Math.max(...labels.map(t => t.length)) * CHAR, rotate = longest > step - 4;
  const every = Math.max(1, Math.ceil(13 / step));
  labels.forEach((t, i) => {
    if (i % every) return;
    const x = x0 + step * (i + 0.5);
    svg.append(rotate ? sv("text", {x: x, y: y + 8, "text-anchor": "end", transform: "rotate(-45 " + x + " " + (y + 8) + ")"}, t)
      : sv("text", {x: x, y: y + 14, "text-anchor": "middle"}, t));
  });
  const below = y + (rotate ? longest * 0.72 + 22 : 32);
  svg.append(sv("text", {class: "title", x: x0 + step * labels.length / 2, y: below, "text-anchor": "middle"}, title));
  return below + 8;
}

function heatmap(v, where, width, limit, metric) {
  const [rd, cd] = v.axes, R = v.coords[rd].length, C = v.coords[cd].length;
  const rows = v.coords[rd].map((_, i) => tick(v, rd, i)), cols = v.coords[cd].map((_, j) => tick(v, cd, j));
  const left = 34 + CHAR * Math.max(...rows.map(t => t.length)), top = 4;
  const cw = Math.max(3, Math.min(80, Math.floor((width - left - 30) / C))), ch = Math.max(14, Math.min(36, cw));
  const svg = sv("svg", {class: "heatmap"}), annotate = R * C <= 64 && cw >= 38;
  for (let i = 0; i < R; i++) for (let j = 0; j < C; j++) {
    const at = Object.assign({}, where, {[rd]: i, [cd]: j}), m = v.mean[index(v, at)];
    svg.append(hover(sv("rect", {class: m === null ? "cell empty" : "cell", x: left + j * cw, y: top + i * ch,
      width: cw - 1, height: ch - 1, fill: m === null ? "#e4e4e4" : colour(m / limit)}), () => tipLines(v, at, metric)));
    if (annotate && m !== null) svg.append(sv("text", {x: left + (j + 0.5) * cw, y: top + (i + 0.5) * ch + 3.5,
      "text-anchor": "middle", class: Math.abs(m / limit) > 0.6 ? "value light" : "value"}, num(m, false)));
  }
  const every = Math.max(1, Math.ceil(12 / ch));
  rows.forEach((t, i) => { if (!(i % every)) svg.append(sv("text", {x: left - 5, y: top + (i + 0.5) * ch + 4, "text-anchor": "end"}, t)); });
  const mid = top + R * ch / 2;
  svg.append(sv("text", {class: "title", x: 12, y: mid, "text-anchor": "middle", transform: "rotate(-90 12 " + mid + ")"}, rd));
  const height = xLabels(svg, cols, left, cw, top + R * ch, cd);
  return size(svg, left + C * cw + 24, height);
}

function size(svg, w, h) {
  svg.setAttribute("width", Math.ceil(w));
  svg.setAttribute("height", Math.ceil(h));
  return svg;
}

function colourbar(limit, metric) {
  const W = 280, x0 = 30, id = "gradient" + (gradients++), svg = sv("svg", {class: "colourbar", width: W + 380, height: 40});
  const gradient = sv("linearGradient", {id: id});
  for (let i = 0; i <= 10; i++) gradient.append(sv("stop", {offset: i * 10 + "%", "stop-color": colour(i / 5 - 1)}));
  const defs = sv("defs");
  defs.append(gradient);
  svg.append(defs, sv("rect", {x: x0, y: 4, width: W, height: 12, fill: "url(#" + id + ")", stroke: "#999"}));
  for (const f of [-1, -0.5, 0, 0.5, 1]) {
    const x = x0 + (f + 1) / 2 * W;
    svg.append(sv("line", {x1: x, x2: x, y1: 16, y2: 21, stroke: "#666"}), sv("text", {x: x, y: 33, "text-anchor": "middle"}, num(f * limit)));
  }
  svg.append(sv("text", {class: "title", x: x0 + W + 24, y: 14}, "mean \u0394 " + metric));
  return svg;
}

function niceTicks(lo, hi) {
  const raw = (hi - lo) / 6, mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map(f => f * mag).find(s => raw <= s * 1.0000001), out = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) out.push(Math.abs(t) < step * 1e-9 ? 0 : t);
  return out;
}

function chart(v, where, width, metric) {  // one site dim: a line over layers or positions, else bars; none: one bar
  const d = v.axes[0], labels = d ? v.coords[d].map((_, i) => tick(v, d, i)) : ["all examples"];
  const points = labels.map((_, i) => {
    const at = Object.assign({}, where);
    if (d) at[d] = i;
    const k = index(v, at);
    return {at: at, m: v.mean[k], lo: v.low[k], hi: v.high[k]};
  });
  const values = points.flatMap(p => [p.m, p.lo, p.hi]).filter(x => x !== null).concat([0]);
  let lo = Math.min(...values), hi = Math.max(...values);
  if (lo === hi) { lo -= 1; hi += 1; }
  const pad = (hi - lo) * 0.06, left = 64, top = 24, plotH = 220;
  lo -= pad; hi += pad;
  const step = Math.max(14, Math.min(90, Math.floor((Math.min(width, 960) - left - 20) / labels.length)));
  const y = x => top + (hi - x) / (hi - lo) * plotH, xc = i => left + step * (i + 0.5), right = left + step * labels.length;
  const svg = sv("svg", {class: v.ordered ? "line-chart" : "bar-chart"});
  svg.append(sv("text", {class: "title", x: left, y: 12}, "mean \u0394 " + metric + ", with its " + Math.round(D.level * 100) + "% CI"));
  for (const t of niceTicks(lo, hi)) svg.append(sv("line", {x1: left, x2: right, y1: y(t), y2: y(t), stroke: "#ececec"}),
    sv("text", {x: left - 6, y: y(t) + 4, "text-anchor": "end"}, num(t, false)));
  svg.append(sv("line", {x1: left, x2: right, y1: y(0), y2: y(0), stroke: "#888"}));
  if (v.ordered) line(svg, v, points, xc, y, metric);
  else points.forEach((p, i) => {
    if (p.m === null) return;
    svg.append(hover(sv("rect", {class: "bar", x: xc(i) - step * 0.35, width: step * 0.7, y: Math.min(y(p.m), y(0)),
      height: Math.max(1, Math.abs(y(p.m) - y(0))), fill: BLUE}), () => tipLines(v, p.at, metric)));
    if (p.lo !== null) svg.append(sv("line", {x1: xc(i), x2: xc(i), y1: y(p.lo), y2: y(p.hi), stroke: "#222"}));
  });
  const height = d ? xLabels(svg, labels, left, step, top + plotH, d) : top + plotH + 10;
  return size(svg, Math.max(right + 20, left + 330), height);
}

function line(svg, v, points, xc, y, metric) {  // the CI as a band, broken where a site has no value
  let run = [];
  const flush = () => {
    if (run.length) {
      const band = run.map(p => xc(p.i) + "," + y(p.hi)).concat(run.slice().reverse().map(p => xc(p.i) + "," + y(p.lo)));
      svg.append(sv("polygon", {points: band.join(" "), fill: BLUE, "fill-opacity": 0.18}),
        sv("polyline", {points: run.map(p => xc(p.i) + "," + y(p.m)).join(" "), fill: "none", stroke: BLUE, "stroke-width": 2}));
    }
    run = [];
  };
  points.forEach((p, i) => { if (p.m === null || p.lo === null) flush(); else run.push(Object.assign({i: i}, p)); });
  flush();
  points.forEach((p, i) => {
    if (p.m !== null) svg.append(hover(sv("circle", {class: "point", cx: xc(i), cy: y(p.m), r: 4, fill: BLUE}), () => tipLines(v, p.at, metric)));
  });
}

const tip = document.getElementById("tip");
function place(e) {
  const r = tip.getBoundingClientRect();
  const x = e.clientX + 14 + r.width > innerWidth ? e.clientX - r.width - 14 : e.clientX + 14;
  const y = e.clientY + 14 + r.height > innerHeight ? e.clientY - r.height - 14 : e.clientY + 14;
  tip.style.left = Math.max(0, x) + "px";
  tip.style.top = Math.max(0, y) + "px";
}
document.addEventListener("mouseover", e => {
  const lines = tips.get(e.target);
  if (!lines) return;
  tip.replaceChildren(...lines().map((t, i) => el("div", i ? {} : {class: "head"}, t)));
  tip.hidden = false;
  place(e);
});
document.addEventListener("mousemove", e => { if (!tip.hidden) place(e); });
document.addEventListener("mouseout", e => { if (tips.has(e.target)) tip.hidden = true; });
let resized = null;
window.addEventListener("resize", () => { clearTimeout(resized); resized = setTimeout(render, 150); });

header();
selectors();
render();
})();
"""
