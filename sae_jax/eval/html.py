"""The latent atlas as one self-contained HTML page (no network, no server): the JSONL records are
embedded; `#m=<member>&l=<latent>` opens a latent; the search box takes a latent id."""

from __future__ import annotations

import json
from pathlib import Path

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>sae_jax latent atlas</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 0; display: flex; height: 100vh; }
#side { width: 280px; overflow-y: auto; border-right: 1px solid #ccc; padding: 8px; }
#main { flex: 1; overflow-y: auto; padding: 12px 20px; }
.ctx { font-family: ui-monospace, monospace; white-space: pre-wrap; margin: 4px 0; padding: 4px; border-bottom: 1px solid #eee; }
.tok { border-radius: 2px; }
.tok.hit { outline: 2px solid #d40; }
.lat { cursor: pointer; color: #036; } .lat:hover { text-decoration: underline; }
.bar { display: inline-block; height: 10px; background: #48c; margin-right: 4px; vertical-align: middle; }
h2 { margin: 4px 0; } h3 { margin: 12px 0 4px; }
</style></head>
<body>
<div id="side">
  <select id="member"></select>
  <form id="search"><input id="q" placeholder="latent id" size="10"> <button>go</button></form>
  <div id="list"></div>
</div>
<div id="main"><div id="card">Choose a latent.</div></div>
<script id="atlas-data" type="application/json">__DATA__</script>
<script>
"use strict";
const DATA = JSON.parse(document.getElementById("atlas-data").textContent);
const esc = s => s.replace(/[&<>"]/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]));
function params() { return Object.fromEntries(location.hash.slice(1).split("&").filter(Boolean).map(kv => kv.split("="))); }
function go(m, l) { location.hash = "m=" + m + (l === undefined ? "" : "&l=" + l); }
function example(e, max) {
  const toks = e.tokens.map((t, j) => {
    const a = e.activations[j], alpha = max > 0 ? Math.max(0, a) / max : 0;
    const cls = "tok" + (j === e.index ? " hit" : "");
    return `<span class="${cls}" title="${a.toFixed(3)}" data-act="${a}" style="background: rgba(255,120,0,${alpha.toFixed(3)})">${esc(t)}</span>`;
  }).join("");
  return `<div class="ctx" data-activation="${e.activation}">${e.activation.toFixed(3)} | ${toks}</div>`;
}
function show(m, l) {
  const mem = DATA.members[m], card = document.getElementById("card");
  const r = mem.latents[l];
  if (r === null) { card.innerHTML = `<h2 id="latent-title">Latent ${l} is not on this page</h2><div>(the page holds the most frequent latents; see the JSONL)</div>`; return; }
  if (!r) { card.innerHTML = `<h2 id="latent-title">No latent ${esc(String(l))} in ${esc(mem.name)}</h2>`; return; }
  let h = `<h2 id="latent-title">Latent ${r.latent}</h2><div>${esc(mem.name)}</div>`;
  h += `<div id="stats">fired ${r.count} times (frequency ${r.frequency.toExponential(2)}), max ${r.max_activation.toFixed(3)}, mean ${r.mean_activation.toFixed(3)}</div>`;
  if (r.head_attribution) {
    const mx = Math.max(...r.head_attribution);
    h += "<h3>Decoder norm per attention head</h3>" + r.head_attribution.map((v, j) =>
      `<div class="head">head ${j} <span class="bar" style="width:${(120 * v / mx).toFixed(0)}px"></span>${v.toFixed(3)}</div>`).join("");
  }
  h += `<h3>Top activations</h3><div id="top">` + r.top.map(e => example(e, r.max_activation)).join("") + "</div>";
  r.quantiles.forEach(q => {
    h += `<h3>Random sample, quantile ${q.range[0]}-${q.range[1]}</h3>` + q.examples.map(e => example(e, r.max_activation)).join("");
  });
  card.innerHTML = h;
}
function list(m) {
  const mem = DATA.members[m];
  const ids = mem.latents.filter(r => r && r.count > 0).sort((a, b) => b.count - a.count).slice(0, 500);
  document.getElementById("list").innerHTML = `<div>${mem.latents.length} latents; most frequent:</div>` +
    ids.map(r => `<div class="lat" data-l="${r.latent}">${r.latent} (${r.count})</div>`).join("");
}
function route() {
  const p = params(), m = Math.min(parseInt(p.m || "0", 10) || 0, DATA.members.length - 1);
  document.getElementById("member").value = m;
  list(m);
  if (p.l !== undefined) show(m, parseInt(p.l, 10));
}
DATA.members.forEach((mem, j) => { const o = document.createElement("option"); o.value = j; o.textContent = mem.name; document.getElementById("member").appendChild(o); });
document.getElementById("member").onchange = e => go(e.target.value);
document.getElementById("search").onsubmit = e => { e.preventDefault(); go(document.getElementById("member").value, document.getElementById("q").value.trim()); };
document.getElementById("list").onclick = e => { if (e.target.dataset.l) go(document.getElementById("member").value, e.target.dataset.l); };
window.onhashchange = route;
route();
</script></body></html>
"""


def write_page(out: Path, members: list[str], max_latents: int = 20_000) -> Path:
    """index.html embedding the `<member>.jsonl` files in `out` (written by `build_atlas`).

    A page holds at most `max_latents` latents per member (the most frequently firing; the
    others appear as "not on this page"): wide dictionaries are browsed through their JSONL."""
    data = {"members": []}
    for name in members:
        with open(out / f"{name}.jsonl") as f:
            latents = [json.loads(line) for line in f]
        if len(latents) > max_latents:
            keep = {r["latent"] for r in sorted(latents, key=lambda r: -r["count"])[:max_latents]}
            latents = [r if r["latent"] in keep else None for r in latents]
        data["members"].append({"name": name, "latents": latents})
    blob = json.dumps(data).replace("</", "<\\/")  # a token "</script>" must not end the data block
    page = out / "index.html"
    tmp = page.with_suffix(".html.tmp")
    tmp.write_text(PAGE.replace("__DATA__", blob), encoding="utf-8")
    tmp.rename(page)
    return page
