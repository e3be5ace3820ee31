"""The latent atlas as a small HTML page that loads each latent's data on demand, from the files
beside it (eval/atlas_files.py; no network, no server: `file://` works, as does any static HTTP
server). A script tag loads a data file (a `file://` page may load scripts, not fetch files).

`#m=<member>&l=<latent>` opens a latent; the search box takes a latent id. A latent's card shows
its statistics, its activation histogram, its logit effects (the promoted and suppressed tokens),
head attribution for `attn.hook_z`, its top activations and the random sample by quantile, each a
token window coloured by the latent's activation.
"""

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
#histogram { display: flex; align-items: flex-end; height: 64px; gap: 1px; }
.hbar { display: inline-block; width: 10px; background: #48c; } .axis { font-size: 11px; color: #666; }
.logit { font-family: ui-monospace, monospace; padding: 0 3px; border-radius: 2px; white-space: pre; }
.logit.up { background: #cde8cd; } .logit.down { background: #f3cccc; }
</style></head>
<body>
<div id="side">
  <select id="member"></select>
  <form id="search"><input id="q" placeholder="latent id" size="10"> <button>go</button></form>
  <div id="list"></div>
</div>
<div id="main"><div id="card">Choose a latent.</div></div>
<script id="atlas-index" type="application/json">__DATA__</script>
<script>
"use strict";
const INDEX = JSON.parse(document.getElementById("atlas-index").textContent);
const LOADED = {}, WAITING = {};
const esc = s => s.replace(/[&<>"]/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]));
function params() { return Object.fromEntries(location.hash.slice(1).split("&").filter(Boolean).map(kv => kv.split("="))); }
function go(m, l) { location.hash = "m=" + m + (l === undefined ? "" : "&l=" + l); }
function loaded(key, value) { LOADED[key] = value; (WAITING[key] || []).forEach(f => f()); delete WAITING[key]; }
function atlasShard(m, s, records) { loaded("d/" + m + "/" + s, records); }
function atlasText(t, spans) { loaded("t/" + t, spans); }
function atlasVocab(vocab) { loaded("v", vocab); }
function load(key, src, f) {
  if (LOADED[key]) return f();
  if (WAITING[key]) { WAITING[key].push(f); return; }
  WAITING[key] = [f];
  const el = document.createElement("script");
  el.src = src;
  el.onerror = () => { document.getElementById("card").innerHTML = `<h2 id="latent-title">Could not load ${esc(el.src)}</h2>`; };
  document.body.appendChild(el);
}
function loadAll(list, f) {  // [[key, src], ...]: f once every one is loaded
  let left = list.length;
  if (!left) return f();
  list.forEach(([key, src]) => load(key, src, () => { if (--left === 0) f(); }));
}
function example(mem, r, e) {
  const [c, pos, act, pairs] = e, [before, after] = mem.window;
  const [start, ids] = LOADED["t/" + Math.floor(c / INDEX.text_per_file)][c];
  const lo = Math.max(start, pos - before), hi = Math.min(start + ids.length, pos + after + 1);
  const level = {};
  for (let j = 0; j < pairs.length; j += 2) level[pairs[j]] = pairs[j + 1];
  const toks = [];
  for (let q = lo; q < hi; q++) {
    const t = ids[q - start], lv = level[q - pos] || 0, a = lv / 255 * r.max_activation;
    const text = mem.kind === "rows" ? `row ${mem.first_row + c}` + (t >= 0 ? ` · token ${t}` : "") : (LOADED.v[t] ?? "");
    const cls = "tok" + (q === pos ? " hit" : "");
    toks.push(`<span class="${cls}" title="${a.toFixed(3)}" data-act="${a.toFixed(4)}" style="background: rgba(255,120,0,${(lv / 255).toFixed(3)})">${esc(text)}</span>`);
  }
  return `<div class="ctx" data-activation="${act}">${act.toFixed(3)} | ${toks.join("")}</div>`;
}
function histogram(counts, edges) {
  const mx = Math.max(1, ...counts);
  return `<div id="histogram">` + counts.map((c, j) =>
    `<span class="hbar" title="${edges.length ? edges[j].toPrecision(3) + "-" + edges[j + 1].toPrecision(3) : ""}: ${c}" style="height:${(60 * c / mx).toFixed(0)}px"></span>`).join("") +
    (edges.length ? `<div class="axis">${edges[0].toPrecision(2)} … ${edges[edges.length - 1].toPrecision(2)} (log scale)</div>` : "") + "</div>";
}
function tokens(list, cls) {
  return list.map(([t, v]) => `<span class="logit ${cls}" title="${v}">${esc(t)} <small>${v.toFixed(2)}</small></span>`).join(" ");
}
function render(m, l) {
  const mem = INDEX.members[m], card = document.getElementById("card");
  const r = LOADED["d/" + m + "/" + Math.floor(l / INDEX.shard)][l % INDEX.shard];
  let h = `<h2 id="latent-title">Latent ${r.latent}</h2><div>${esc(mem.name)}</div>`;
  h += `<div id="stats">fired ${r.count} times (frequency ${r.frequency.toExponential(2)}), max ${r.max_activation.toFixed(3)}, mean ${r.mean_activation.toFixed(3)}</div>`;
  if (r.histogram) h += "<h3>Activations</h3>" + histogram(r.histogram, mem.histogram_edges);
  if (r.logits) h += `<h3>Logit effects</h3><div id="promoted">promoted: ${tokens(r.logits.promoted, "up")}</div><div id="suppressed">suppressed: ${tokens(r.logits.suppressed, "down")}</div>`;
  if (r.head_attribution) {
    const mx = Math.max(...r.head_attribution);
    h += "<h3>Decoder norm per attention head</h3>" + r.head_attribution.map((v, j) =>
      `<div class="head">head ${j} <span class="bar" style="width:${(120 * v / mx).toFixed(0)}px"></span>${v.toFixed(3)}</div>`).join("");
  }
  h += `<h3>Top activations</h3><div id="top">` + r.top.map(e => example(mem, r, e)).join("") + "</div>";
  const n = r.samples.length;  // ascending activation: quartiles of equal count
  for (let b = 0; b < 4 && n; b++) {
    const part = r.samples.slice(Math.round(n * b / 4), Math.round(n * (b + 1) / 4));
    h += `<h3>Random sample, quantile ${b / 4}-${(b + 1) / 4}</h3>` + part.map(e => example(mem, r, e)).join("");
  }
  card.innerHTML = h;
}
function show(m, l) {
  const mem = INDEX.members[m], card = document.getElementById("card");
  if (!Number.isInteger(l) || l < 0 || l >= mem.width) { card.innerHTML = `<h2 id="latent-title">No latent ${esc(String(l))} in ${esc(mem.name)}</h2>`; return; }
  card.innerHTML = `<h2 id="latent-title">Loading latent ${l}…</h2>`;
  const s = Math.floor(l / INDEX.shard);
  load("d/" + m + "/" + s, `data/${m}/${s}.js`, () => {
    const r = LOADED["d/" + m + "/" + s][l % INDEX.shard];
    const files = new Set(r.top.concat(r.samples).map(e => Math.floor(e[0] / INDEX.text_per_file)));
    const need = [...files].map(t => ["t/" + t, `data/text/${t}.js`]).concat([["v", "data/vocab.js"]]);
    loadAll(need, () => render(m, l));
  });
}
function list(m) {
  const mem = INDEX.members[m];
  document.getElementById("list").innerHTML = `<div>${mem.width} latents, ${mem.fired} fired; most frequent:</div>` +
    mem.frequent.map(([l, c]) => `<div class="lat" data-l="${l}">${l} (${c})</div>`).join("");
}
function route() {
  const p = params(), m = Math.min(parseInt(p.m || "0", 10) || 0, INDEX.members.length - 1);
  document.getElementById("member").value = m;
  list(m);
  if (p.l !== undefined) show(m, Number(p.l));
}
INDEX.members.forEach((mem, j) => { const o = document.createElement("option"); o.value = j; o.textContent = mem.name; document.getElementById("member").appendChild(o); });
document.getElementById("member").onchange = e => go(e.target.value);
document.getElementById("search").onsubmit = e => { e.preventDefault(); go(document.getElementById("member").value, document.getElementById("q").value.trim()); };
document.getElementById("list").onclick = e => { if (e.target.dataset.l) go(document.getElementById("member").value, e.target.dataset.l); };
window.onhashchange = route;
route();
</script></body></html>
"""


def write_page(out: Path, index: dict) -> Path:
    """`out/index.html`: the page with the atlas's index (members, their most frequent latents)."""
    blob = json.dumps(index, separators=(",", ":")).replace("</", "<\\/")  # a token "</script>" must not end the data block
    page = out / "index.html"
    tmp = page.with_suffix(".html.tmp")
    tmp.write_text(PAGE.replace("__DATA__", blob), encoding="utf-8")
    tmp.rename(page)
    return page
