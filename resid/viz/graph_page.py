"""An attribution graph as one offline HTML page (no CDN, no network): nodes laid out by
layer (rows: tokens at the bottom, logits at the top) and position (columns), edges drawn
with width by |weight| (orange: positive, blue: negative), a node's details and top
activating contexts (from a ``resid harvest`` of the transcoders' features) on click,
and supernodes (groups of nodes) drawn as labelled boxes; new groups can be made on the
page (shift-click nodes, name them) and downloaded as ``supernodes.json``, which
``resid graph --supernodes`` saves into the graph's folder.

>>> html = render(graph.to_json("capital"), contexts=feature_contexts(harvest, data, model))
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from resid.harvest.store import load_stats, read_harvest


def feature_contexts(harvest: str | Path, data: dict, tokenizer=None, k: int = 5) -> dict:
    """Each feature node's top activating contexts from the harvest ``harvest`` of its
    transcoder's ``hook_acts`` site (``blocks.L.{read site}.transcoder.hook_acts``):
    ``{node_id: [[value, [token text, ...], center], ...]}``. Features whose site was not
    harvested get none; a missing or unfinished harvest is a clear error.

    >>> feature_contexts("harvest/", graph.to_json())
    """
    info = read_harvest(harvest)  # HarvestError (a ValueError) names the problem and the fix
    read_site = data["metadata"].get("resid", {}).get("read_site", "ln2.hook_normalized")
    center = int(info.get("window", [12, 4])[0])
    stats: dict[str, dict | None] = {}
    out: dict[str, list] = {}
    for node in data["nodes"]:
        if node["feature_type"] != "cross layer transcoder":
            continue
        layer, feature, _ = node["node_id"].split("_")
        site = f"blocks.{layer}.{read_site}.transcoder.hook_acts"
        if site not in stats:
            stats[site] = load_stats(harvest, site) if site in info["site_info"] else None
        st = stats[site]
        if st is None or int(feature) >= st["top_values"].shape[0]:
            continue
        rows = []
        for j in range(min(k, st["top_values"].shape[1])):
            value = float(st["top_values"][int(feature), j])
            if value != value:  # NaN: fewer contexts than k
                break
            toks = st["top_tokens"][int(feature), j].tolist()
            rows.append([value, [_text(tokenizer, t) for t in toks], center])
        out[node["node_id"]] = rows
    return out


def _text(tokenizer, token: int) -> str:
    if token < 0:
        return ""
    if tokenizer is not None:
        try:
            return tokenizer.decode([token])
        except Exception:  # a tokenizer that cannot show this id: show the id
            pass
    return f"<{token}>"


def render(data: dict, contexts: dict | None = None, title: str = "attribution graph") -> str:
    """The page for circuit-tracer-format graph ``data`` (``Graph.to_json``), with
    ``contexts`` from :func:`feature_contexts`.

    >>> Path("graph/index.html").write_text(render(g.to_json()))
    """
    payload = json.dumps({"graph": data, "contexts": contexts or {}}, allow_nan=False)
    payload = payload.replace("</", "<\\/")  # nothing in the data can close the script
    return _PAGE.replace("__TITLE__", html.escape(title)).replace("__DATA__", payload)


_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body{font:13px system-ui,sans-serif;margin:0;display:flex;height:100vh}
#main{flex:1;overflow:auto}#side{width:340px;border-left:1px solid #ccc;padding:8px;overflow:auto}
svg text{font-size:10px}.node{cursor:pointer}.sel{stroke:#000;stroke-width:3}
.ctx{font-family:monospace;margin:4px 0;padding:3px;background:#f6f6f6}
.hi{background:#fdb863}.t,.hi{border-right:1px solid #ddd}.group{fill:#ffe08a33;stroke:#c90;stroke-dasharray:4}
</style></head><body>
<div id="main"><svg id="svg"></svg></div>
<div id="side"><h3>__TITLE__</h3><p id="prompt"></p>
<p>Click a node for its edges and contexts; shift-click to pick nodes for a supernode.</p>
<p><input id="gname" placeholder="supernode name"> <button id="group">group picked</button>
<button id="save">download supernodes.json</button></p><div id="info"></div></div>
<script>
const D = __DATA__;
const G = D.graph, NS = "http://www.w3.org/2000/svg";
const svg = document.getElementById("svg");
document.getElementById("prompt").textContent = G.metadata.prompt_tokens.join(" | ");
const rowOf = n => n.layer === "E" ? 0 : Number(n.layer) + 1;
const nPos = G.metadata.prompt_tokens.length;
const rows = Math.max(...G.nodes.map(rowOf)) + 1;
const H = 70, byId = {}, slots = {};
for (const n of G.nodes) {
  const key = rowOf(n) + ":" + n.ctx_idx;
  slots[key] = (slots[key] || 0) + 1;
  n._k = slots[key] - 1;
  byId[n.node_id] = n;
}
const W = Math.max(90, 18 * Math.max(...Object.values(slots)) + 30);  // a column per position
for (const n of G.nodes) {
  const many = slots[rowOf(n) + ":" + n.ctx_idx];
  n.x = 40 + n.ctx_idx * W + (many > 1 ? (n._k / (many - 1) - 0.5) * (W - 30) : 0);
  n.y = 30 + (rows - 1 - rowOf(n)) * H;
}
svg.setAttribute("width", 80 + nPos * W);
svg.setAttribute("height", 60 + rows * H);
function el(tag, attrs, parent) {
  const e = document.createElementNS(NS, tag);
  for (const k in attrs) e.setAttribute(k, attrs[k]);
  (parent || svg).appendChild(e);
  return e;
}
const groupLayer = el("g", {}), edgeLayer = el("g", {}), nodeLayer = el("g", {});
const maxW = Math.max(1e-9, ...G.links.map(l => Math.abs(l.weight)));
for (const l of G.links) {
  const s = byId[l.source], t = byId[l.target];
  if (!s || !t) continue;
  l.el = el("line", {x1: s.x, y1: s.y, x2: t.x, y2: t.y,
    stroke: l.weight > 0 ? "#e66101" : "#5e3c99", "stroke-opacity": 0.5,
    "stroke-width": 0.3 + 4 * Math.abs(l.weight) / maxW}, edgeLayer);
}
const colour = {"cross layer transcoder": "#66a61e", "mlp reconstruction error": "#999",
                "embedding": "#1b9e77", "logit": "#d95f02"};
const picked = new Set();
for (const n of G.nodes) {
  const c = el("circle", {cx: n.x, cy: n.y, r: 7, fill: colour[n.feature_type] || "#333",
                          class: "node", "data-id": n.node_id}, nodeLayer);
  const label = n.feature_type === "embedding" || n.feature_type === "logit" ? n.clerp :
    n.feature_type === "mlp reconstruction error" ? "err" : "F" + n.node_id.split("_")[1];
  const t = el("text", {x: n.x + 9, y: n.y + 3}, nodeLayer);
  t.textContent = (label || "").slice(0, 18);
  c.addEventListener("click", ev => ev.shiftKey ? pick(n, c) : show(n, c));
  n.el = c;
}
function pick(n, c) {
  if (picked.has(n.node_id)) { picked.delete(n.node_id); c.classList.remove("sel"); }
  else { picked.add(n.node_id); c.classList.add("sel"); }
}
function esc(s) { const d = document.createElement("div"); d.textContent = s; return d.innerHTML; }
function show(n, c) {
  for (const m of G.nodes) m.el.classList.remove("sel");
  c.classList.add("sel");
  for (const l of G.links) if (l.el) l.el.setAttribute("stroke-opacity",
      l.source === n.node_id || l.target === n.node_id ? 0.95 : 0.08);
  const ins = G.links.filter(l => l.target === n.node_id).sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight));
  const outs = G.links.filter(l => l.source === n.node_id).sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight));
  let h = "<h4>" + esc(n.node_id) + " (" + esc(n.feature_type) + ")</h4>";
  h += "<p>layer " + esc(n.layer) + ", position " + n.ctx_idx +
       (n.activation != null ? ", activation " + n.activation.toFixed(3) : "") +
       (n.influence != null ? ", cumulative influence " + n.influence.toFixed(3) : "") + "</p>";
  h += "<b>inputs</b><br>" + ins.slice(0, 8).map(l => esc(l.source) + ": " + l.weight.toFixed(3)).join("<br>");
  h += "<br><b>outputs</b><br>" + outs.slice(0, 8).map(l => esc(l.target) + ": " + l.weight.toFixed(3)).join("<br>");
  const ctx = D.contexts[n.node_id];
  if (ctx) {
    h += "<h4>top contexts</h4>";
    for (const [v, toks, centre] of ctx)
      h += "<div class=ctx>" + v.toFixed(2) + ": " + toks.map((t, i) =>
        "<span class=" + (i === centre ? "hi" : "t") + ">" + esc(t) + "</span>").join("") + "</div>";
  }
  document.getElementById("info").innerHTML = h;
}
const groups = (G.qParams && G.qParams.supernodes) || [];
function drawGroups() {
  groupLayer.innerHTML = "";
  for (const g of groups) {
    const ms = g.slice(1).map(id => byId[id]).filter(Boolean);
    if (!ms.length) continue;
    const xs = ms.map(m => m.x), ys = ms.map(m => m.y);
    const x = Math.min(...xs) - 14, y = Math.min(...ys) - 14;
    el("rect", {x, y, width: Math.max(...xs) - x + 14, height: Math.max(...ys) - y + 14,
                class: "group", rx: 6}, groupLayer);
    el("text", {x: x + 2, y: y - 2}, groupLayer).textContent = g[0];
  }
}
drawGroups();
document.getElementById("group").onclick = () => {
  if (!picked.size) return;
  groups.push([document.getElementById("gname").value || "group " + (groups.length + 1), ...picked]);
  for (const id of picked) byId[id].el.classList.remove("sel");
  picked.clear();
  drawGroups();
};
document.getElementById("save").onclick = () => {
  const a = document.createElement("a");
  a.href = "data:application/json," + encodeURIComponent(JSON.stringify(groups));
  a.download = "supernodes.json";
  a.click();
};
</script></body></html>
"""
