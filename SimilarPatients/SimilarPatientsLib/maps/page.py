"""An :class:`~.embedding_map.EmbeddingMap` as one self-contained HTML page.

The page carries plotly.js and the map's data inline (no server, no network: it opens from a file, offline)
and a little script of its own: switch model and colour field, show nearest-lesion edges, click a point
to open the patient in the IDC viewer, search a patient to highlight it and its nearest patients.
The file is written atomically.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import SimilarPatientsError
from ..references import schema
from ..util import atomic
from ..util.optional import optional_import
from .embedding_map import EmbeddingMap, is_continuous

#: Colours of categorical labels (colour-blind-safe first, then more).
PALETTE = [
    "#4477AA", "#EE6677", "#228833", "#CCBB44", "#66CCEE", "#AA3377", "#BBBBBB", "#000000",
    "#EE8866", "#44BB99", "#FFAABB", "#99DDFF", "#AAAA00", "#77AADD", "#DDDDDD", "#882255",
]  # fmt: skip
_MAX_CATEGORIES = len(PALETTE) - 1  # the rest are drawn as "other"


def check_out(out: Path) -> Path:
    """``out`` if it names an HTML file (the map is a web page), else a clear error."""
    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise SimilarPatientsError(
            f"The map is a web page: name --out .html, not '{out.name}' (--png writes a static figure: .png, .pdf "
            f"or .svg)."
        )
    return out


def write(embedding_map: EmbeddingMap, out: Path) -> Path:
    """Write the page to ``out`` atomically; returns ``out``."""
    get_plotlyjs = optional_import("plotly.offline", "analysis").get_plotlyjs

    out = check_out(out)
    payload = json.dumps(page_data(embedding_map), separators=(",", ":"), allow_nan=False)
    title = f"{embedding_map.reference}: {embedding_map.method.upper()} map of tumor embeddings"
    text = (
        _TEMPLATE.replace("{{title}}", html.escape(title))
        .replace("{{plotly}}", get_plotlyjs())
        .replace("{{data}}", payload.replace("</", "<\\/"))
    )
    with atomic.replacing(out) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return out


def page_data(embedding_map: EmbeddingMap) -> dict:
    """The JSON the page's script reads."""
    points = embedding_map.points
    labels, numeric = {}, {}
    for name in embedding_map.label_fields:
        column = points[name]
        is_number = is_continuous(name, column, _MAX_CATEGORIES)
        numeric[name] = bool(is_number)
        labels[name] = [_json_value(v, is_number) for v in column]
    return {
        "reference": embedding_map.reference,
        "method": embedding_map.method,
        "metric": embedding_map.metric,
        "space": embedding_map.space,
        "colorBy": embedding_map.color_by,
        "fields": embedding_map.label_fields,
        "numeric": numeric,
        "palette": PALETTE,
        "maxCategories": _MAX_CATEGORIES,
        "points": {
            "patient": points[schema.PATIENT].astype(str).tolist(),
            "lesion": points[schema.LESION].astype(str).tolist(),
            "url": [u if isinstance(u, str) else None for u in points["url"]],
            "labels": labels,
        },
        "models": [
            {
                "name": layer.model,
                "rows": layer.rows.tolist(),
                "x": np.round(layer.xy[:, 0], 5).tolist(),
                "y": np.round(layer.xy[:, 1], 5).tolist(),
                "edges": layer.edges.tolist(),
                "neighbours": layer.neighbours,
            }
            for layer in embedding_map.layers
        ],
    }


def _json_value(value, numeric: bool):
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return None
    if numeric:
        return float(value)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{{title}}</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 0; color: #222; }
  header { padding: 8px 14px; border-bottom: 1px solid #ddd; display: flex; flex-wrap: wrap; gap: 14px;
           align-items: center; }
  header h1 { font-size: 15px; margin: 0 10px 0 0; }
  label { font-size: 13px; }
  #status { font-size: 13px; padding: 4px 14px; min-height: 18px; color: #444; }
  #map { width: 100vw; height: calc(100vh - 90px); }
</style>
<script>{{plotly}}</script>
</head>
<body>
<header>
  <h1>{{title}}</h1>
  <label>Model <select id="model"></select></label>
  <label>Colour by <select id="color"></select></label>
  <label><input type="checkbox" id="edges"> nearest-lesion edges</label>
  <label>Patient <input id="search" list="patients" placeholder="PatientID" size="12"></label>
  <button id="find">Highlight</button> <button id="clear">Clear</button>
  <datalist id="patients"></datalist>
</header>
<div id="status">Hover a point for the patient; click it to open the patient in the IDC viewer.</div>
<div id="map"></div>
<script type="application/json" id="map-data">{{data}}</script>
<script>
"use strict";
const data = JSON.parse(document.getElementById("map-data").textContent);
const plot = document.getElementById("map");
const statusLine = document.getElementById("status");
const state = { model: 0, color: data.colorBy, edges: false, highlight: null, searched: null };

function option(select, value, text) {
  const o = document.createElement("option");
  o.value = value; o.textContent = text; select.appendChild(o);
}
data.models.forEach((m, i) => option(document.getElementById("model"), i, m.name));
data.fields.forEach(f => option(document.getElementById("color"), f, f));
if (!data.fields.length) option(document.getElementById("color"), "", "(no labels)");
document.getElementById("color").value = state.color || "";
[...new Set(data.points.patient)].sort().forEach(p => option(document.getElementById("patients"), p, ""));
const hasEdges = data.models.some(m => m.edges.length);
document.getElementById("edges").disabled = !hasEdges;
document.getElementById("edges").checked = state.edges = hasEdges;

function label(row, field) {
  const values = data.points.labels[field];
  return values ? values[row] : null;
}
function hoverText(row) {
  const lines = ["<b>Patient " + data.points.patient[row] + "</b>", "lesion " + data.points.lesion[row]];
  data.fields.forEach(f => { const v = label(row, f); if (v !== null) lines.push(f + ": " + v); });
  return lines.join("<br>");
}
function pointTrace(m, positions, name, marker) {
  return { type: "scatter", mode: "markers", name: name,
           x: positions.map(i => m.x[i]), y: positions.map(i => m.y[i]),
           customdata: positions.map(i => m.rows[i]),
           text: positions.map(i => hoverText(m.rows[i])), hovertemplate: "%{text}<extra></extra>",
           marker: marker };
}
function traces() {
  const m = data.models[state.model];
  const out = [];
  if (state.edges && m.edges.length) {
    const x = [], y = [];
    m.edges.forEach(([a, b]) => { x.push(m.x[a], m.x[b], null); y.push(m.y[a], m.y[b], null); });
    out.push({ type: "scatter", mode: "lines", name: "nearest lesions (" + data.metric + ", " + data.space + ")",
               x: x, y: y,
               hoverinfo: "skip", line: { color: "rgba(90,90,90,0.25)", width: 0.7 } });
  }
  const all = m.rows.map((_, i) => i);
  if (state.color && data.numeric[state.color]) {
    const known = all.filter(i => label(m.rows[i], state.color) !== null);
    const unknown = all.filter(i => label(m.rows[i], state.color) === null);
    if (unknown.length) out.push(pointTrace(m, unknown, "unknown (" + unknown.length + ")",
                                            { color: "#CCCCCC", size: 6 }));
    out.push(pointTrace(m, known, state.color, { size: 7, colorscale: "Viridis", showscale: true,
      color: known.map(i => label(m.rows[i], state.color)), colorbar: { title: { text: state.color } } }));
  } else {
    const groups = new Map();
    all.forEach(i => {
      const v = state.color ? label(m.rows[i], state.color) : null;
      const key = v === null ? "unknown" : v;
      if (!groups.has(key)) groups.set(key, []);
      groups.get(key).push(i);
    });
    let ordered = [...groups.entries()].sort((a, b) => b[1].length - a[1].length);
    if (ordered.length > data.maxCategories) {
      const rest = ordered.slice(data.maxCategories - 1).flatMap(([, v]) => v);
      ordered = ordered.slice(0, data.maxCategories - 1).concat([["other", rest]]);
    }
    ordered.forEach(([key, positions], j) => out.push(pointTrace(m, positions, key + " (" + positions.length + ")",
      { color: key === "unknown" ? "#CCCCCC" : data.palette[j % data.palette.length], size: 7, opacity: 0.85 })));
  }
  if (state.highlight) {
    const h = state.highlight;
    const near = all.filter(i => h.neighbours.includes(data.points.patient[m.rows[i]]));
    const own = all.filter(i => data.points.patient[m.rows[i]] === h.patient);
    out.push(pointTrace(m, near, "nearest patients of " + h.patient,
      { symbol: "circle-open", size: 16, color: "#d62728", line: { width: 2.5 } }));
    out.push(pointTrace(m, own, "patient " + h.patient,
      { symbol: "star", size: 18, color: "#d62728", line: { width: 1, color: "#000" } }));
  }
  return out;
}
function layout() {
  const m = data.models[state.model];
  // beside a colour bar the legend (unknown values, the highlighted patient) goes below the plot, not over it
  const scale = Boolean(state.color && data.numeric[state.color]);
  const legend = scale ? { itemsizing: "constant", orientation: "h", x: 0, y: -0.02, yanchor: "top" }
                       : { itemsizing: "constant" };
  return { title: { text: m.name + " — " + data.method.toUpperCase() + " of " + m.rows.length + " lesions (" +
                            data.space + " space)",
                    font: { size: 14 } },
           hovermode: "closest", margin: { l: 20, r: 20, t: 40, b: 20 }, legend: legend,
           xaxis: { showticklabels: false, zeroline: false, showgrid: false },
           yaxis: { showticklabels: false, zeroline: false, showgrid: false } };
}
function draw() { return Plotly.react(plot, traces(), layout(), { displaylogo: false, responsive: true }); }
function search(patient) {
  patient = patient.trim();
  const m = data.models[state.model];
  if (!patient) return;
  state.searched = patient;
  if (!m.rows.some(r => data.points.patient[r] === patient)) {
    state.highlight = null;
    statusLine.textContent = "No patient " + patient + " in model " + m.name + ".";
  } else {
    const neighbours = m.neighbours[patient] || [];
    state.highlight = { patient: patient, neighbours: neighbours };
    statusLine.textContent = "Patient " + patient + " — nearest patients in " + m.name + " (" + data.metric +
      ", " + data.space + " space): " + (neighbours.join(", ") || "none");
  }
  return draw();
}

document.getElementById("model").addEventListener("change", e => {
  state.model = Number(e.target.value);
  // the status line speaks of the model shown: the patient searched for is looked up again in this one
  if (state.searched) return search(state.searched);
  statusLine.textContent = "";
  return draw();
});
document.getElementById("color").addEventListener("change", e => { state.color = e.target.value; draw(); });
document.getElementById("edges").addEventListener("change", e => { state.edges = e.target.checked; draw(); });
document.getElementById("find").addEventListener("click", () => search(document.getElementById("search").value));
document.getElementById("search").addEventListener("keydown", e => {
  if (e.key === "Enter") search(e.target.value);
});
document.getElementById("clear").addEventListener("click", () => {
  state.highlight = null; state.searched = null; statusLine.textContent = ""; draw();
});
Plotly.newPlot(plot, traces(), layout(), { displaylogo: false, responsive: true }).then(() => {
  plot.on("plotly_click", event => {
    const point = event.points[0];
    if (!point || point.customdata === undefined) return;
    const url = data.points.url[point.customdata];
    const who = "Patient " + data.points.patient[point.customdata];
    if (!url) { statusLine.textContent = who + ": no IDC viewer link (no study UID)."; return; }
    statusLine.textContent = who + ": opening " + url;
    window.open(url, "_blank", "noopener");
  });
  document.body.dataset.ready = "true";
});
</script>
</body>
</html>
"""
