"""The dataset viewer's page: markup, style sheet and script, all inline (`storage.viewer`
fills in the data). The script builds every element from the data with `textContent`, never
from HTML strings, so no text of the dataset can become markup.

Stable ids for links and tests: `search`, `filter-kind`, `filter-strategy`, `filter-reason`,
`rows` (the table; `tr[data-row]`), `page-info`, `prev`, `next`, `map`, `map-colour`,
`legend`, `row-view` (`row-prompt`, `row-answer` with `span.tok` tokens, `row-duplicate`),
`tip` (the alternatives of the hovered token). `document.body.dataset.ready` is set once the
first page is drawn (`readyMs`: milliseconds since navigation began); `#row=N` in the address opens row N.
"""

from __future__ import annotations

import html

STYLE = """
* { box-sizing: border-box; }
body { font-family: system-ui, sans-serif; margin: 0; color: #1d2330; background: #fafbfc; }
header { padding: .8em 1.2em .4em; background: #fff; border-bottom: 1px solid #dde; }
h1 { font-size: 1.35em; margin: 0 0 .2em; } h2 { font-size: 1.05em; margin: 0 0 .4em; } h3 { font-size: .95em; margin: 1em 0 .3em; }
.muted { color: #667; }
.note { background: #fff4d6; border-left: 4px solid #e0a800; padding: .3em .7em; margin: .3em 0; font-size: .9em; }
#controls { display: flex; flex-wrap: wrap; gap: .5em; align-items: center; padding: .6em 1.2em; background: #fff; border-bottom: 1px solid #dde; position: sticky; top: 0; z-index: 2; }
#controls input[type=search] { width: 22em; padding: .3em .5em; }
select, input, button { font: inherit; font-size: .9em; }
main { display: grid; grid-template-columns: minmax(0, 1fr) 470px; gap: 1em; padding: 1em 1.2em; align-items: start; }
table { border-collapse: collapse; width: 100%; background: #fff; font-size: .86em; }
td, th { border: 1px solid #e3e5ec; padding: .25em .5em; text-align: left; vertical-align: top; }
th { background: #f1f3f7; user-select: none; white-space: nowrap; }
th[data-sort] { cursor: pointer; } th.asc::after { content: " ▲"; } th.desc::after { content: " ▼"; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tbody tr { cursor: pointer; } tbody tr:hover { background: #eef3ff; } tbody tr.open { background: #dfe8ff; }
td.prompt { font-family: ui-monospace, monospace; font-size: .92em; overflow-wrap: anywhere; min-width: 22em; }
.badge { display: inline-block; padding: 0 .4em; border-radius: .6em; font-size: .85em; }
.badge.accepted { background: #dff3e4; color: #185c2b; } .badge.rejected { background: #fbe1e1; color: #8a1f1f; }
#pager { display: flex; gap: .8em; align-items: center; margin: .6em 0; }
#map-view { background: #fff; border: 1px solid #dde; padding: .6em; position: sticky; top: 3.6em; }
#map { width: 440px; height: 440px; border: 1px solid #eee; cursor: crosshair; display: block; }
#legend { font-size: .8em; display: flex; flex-wrap: wrap; gap: .2em .8em; margin-top: .4em; max-height: 8em; overflow: auto; }
.swatch { display: inline-block; width: .8em; height: .8em; border-radius: 50%; margin-right: .3em; vertical-align: middle; }
#row-view { position: fixed; top: 0; right: 0; bottom: 0; width: min(60em, 62vw); background: #fff; border-left: 1px solid #ccd;
  box-shadow: -6px 0 18px rgba(0,0,0,.12); overflow: auto; padding: 1em 1.4em 3em; z-index: 5; }
#close-row { float: right; }
.text { white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: .88em; background: #f7f8fa; border: 1px solid #e6e8ee;
  padding: .5em .7em; overflow-wrap: anywhere; }
.meta td:first-child { color: #556; white-space: nowrap; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: .8em; }
.tok { border-radius: 2px; padding: 0 1px; margin: 0 0 1px; cursor: default; }
.tok.outside { outline: 1px dashed #b00; }
.tok:hover { outline: 2px solid #1d2330; }
#token-legend { font-size: .8em; margin: .2em 0 .4em; }
#token-legend span { padding: 0 .4em; }
#tip { position: fixed; z-index: 10; background: #1d2330; color: #fff; padding: .5em .7em; border-radius: 4px; font-size: .8em;
  pointer-events: none; max-width: 26em; box-shadow: 0 3px 10px rgba(0,0,0,.3); }
#tip table { background: none; font-size: 1em; } #tip td { border: 0; padding: .05em .4em; color: #fff; }
#tip td.t { font-family: ui-monospace, monospace; white-space: pre; } #tip tr.chosen td { color: #ffd966; font-weight: 600; }
#tip .bar { display: inline-block; height: .6em; background: #7fb3ff; }
"""

SCRIPT = r"""
(() => {
"use strict";
const D = JSON.parse(document.getElementById("viewer-data").textContent);
const C = D.columns, N = C.id.length, PAGE = 50;
const TOK = D.tokens;
const PALETTE = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c",
                 "#ccb974", "#64b5cd", "#1b9e77", "#e7298a"];
const $ = id => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "text") node.textContent = value;
    else if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}

// Whitespace a reader cannot see, made visible (as `storage.inspect.visible_whitespace`).
const MARKS = { "\n": "⏎", "\r": "␍", "\t": "→" };
function visible(text, keepNewlines) {
  if (text === null || text === undefined) return "";
  if (text === "") return "∅ (empty)";
  return text.replace(/^ +| +$| {2,}/g, run => "·".repeat(run.length))
    .replace(/[^\S ]|\u200b/g, ch => (MARKS[ch] || "⍽") + (keepNewlines && ch === "\n" ? "\n" : ""));
}
function tokenText(text) {
  if (text === "") return "∅";
  if (/^ +$/.test(text)) return "·".repeat(text.length);
  return text.replace(/[^\S ]|\u200b/g, ch => (MARKS[ch] || "⍽") + (ch === "\n" ? "\n" : ""));
}
const fmt = n => n.toLocaleString("en-US");
const clip = (text, width) => text.length <= width ? text : text.slice(0, width - 1) + "…";
const strategyName = i => C.strategy[i] < 0 ? "" : D.strategies[C.strategy[i]];
const reasonName = i => C.reason[i] < 0 ? "" : D.reasons[C.reason[i]];
const colourOf = (mode, i) => mode === "kind" ? (C.kind[i] === 0 ? "#2e9d4f" : "#d0392b")
  : PALETTE[Math.max(C.strategy[i], 0) % PALETTE.length];

// -- header -------------------------------------------------------------------------------
$("title").textContent = D.name;
$("summary").textContent = `${fmt(D.total.accepted)} accepted rows, ${fmt(D.total.rejected)} rejects in ${D.directory}` +
  (D.note ? "" : `; all ${fmt(N)} rows are shown`);
const notes = [D.note, ...D.warnings, TOK && TOK.missing].filter(Boolean);
$("notes").replaceChildren(...notes.map(text => el("div", { class: "note", text })));
for (const [index, name] of D.strategies.entries()) $("filter-strategy").append(el("option", { value: index, text: name }));
for (const [index, name] of D.reasons.entries()) $("filter-reason").append(el("option", { value: index, text: name }));
$("map-source").textContent = D.map.source + ". Click a point to open its row.";

// -- filter, sort, page -------------------------------------------------------------------
const state = { query: "", kind: "", strategy: "", reason: "", sortKey: null, sortDir: 1, page: 0, open: -1 };
let matches = [], inMatch = new Uint8Array(N), haystack = null;

function applyFilters() {
  const query = state.query.trim().toLowerCase();
  if (query && haystack === null) {
    haystack = new Array(N);
    for (let i = 0; i < N; i++) haystack[i] = [C.id[i], C.prompt[i], C.response[i] || "", C.detail[i] || ""].join("\u0001").toLowerCase();
  }
  const kind = state.kind === "" ? -1 : Number(state.kind);
  const strategy = state.strategy === "" ? -2 : Number(state.strategy);
  const reason = state.reason === "" ? -2 : Number(state.reason);
  matches = [];
  inMatch = new Uint8Array(N);
  for (let i = 0; i < N; i++) {
    if ((kind >= 0 && C.kind[i] !== kind) || (strategy !== -2 && C.strategy[i] !== strategy) ||
        (reason !== -2 && C.reason[i] !== reason) || (query && !haystack[i].includes(query))) continue;
    matches.push(i);
    inMatch[i] = 1;
  }
  sortMatches();
  state.page = 0;
  renderTable();
  drawMap();
}

function sortValue(key, i) {
  if (key === "strategy") return strategyName(i);
  if (key === "reason") return reasonName(i);
  if (key === "response_chars") return C.response[i] === null ? -1 : C.response_chars[i];
  return C[key][i];
}
function sortMatches() {
  const key = state.sortKey, dir = state.sortDir;
  if (!key) return;
  const values = new Map(matches.map(i => [i, sortValue(key, i)]));
  matches.sort((a, b) => {
    const x = values.get(a), y = values.get(b);
    return (x < y ? -1 : x > y ? 1 : 0) * dir || a - b;
  });
}

function duplicateCell(i) {
  if (!C.duplicate_of[i]) return "";
  const target = C.duplicate_row[i];
  if (target < 0) return el("span", { class: "muted", text: clip(C.duplicate_of[i], 14) + " (not shown)" });
  return el("a", { href: `#row=${target}`, class: "dup-link", title: C.duplicate_of[i], text: clip(C.duplicate_of[i], 14) });
}

function renderTable() {
  const pages = Math.max(1, Math.ceil(matches.length / PAGE));
  state.page = Math.min(state.page, pages - 1);
  const start = state.page * PAGE, shown = matches.slice(start, start + PAGE);
  $("rows").tBodies[0].replaceChildren(...shown.map(i => {
    const accepted = C.kind[i] === 0;
    const tr = el("tr", { "data-row": i, class: i === state.open ? "open" : "" },
      el("td", {}, el("span", { class: "badge " + (accepted ? "accepted" : "rejected"), text: accepted ? "accepted" : "rejected" })),
      el("td", { text: strategyName(i) }),
      el("td", { text: reasonName(i) }),
      el("td", { class: "prompt", text: clip(visible(C.prompt[i]), 160) }),
      el("td", { class: "num", text: fmt(C.prompt_chars[i]) }),
      el("td", { class: "num", text: C.response[i] === null ? "—" : fmt(C.response_chars[i]) }),
      el("td", {}, duplicateCell(i)));
    return tr;
  }));
  $("page-info").textContent = matches.length ? `rows ${fmt(start + 1)}–${fmt(start + shown.length)} of ${fmt(matches.length)} matching` +
    (matches.length < N ? ` (of ${fmt(N)})` : "") + `, page ${state.page + 1} of ${pages}` : "no row matches";
  $("prev").disabled = state.page === 0;
  $("next").disabled = state.page >= pages - 1;
}

$("rows").tBodies[0].addEventListener("click", event => {
  if (event.target.closest("a")) return;  // a duplicate-of link opens the row it names
  const tr = event.target.closest("tr[data-row]");
  if (tr) location.hash = `row=${tr.dataset.row}`;
});
for (const th of document.querySelectorAll("th[data-sort]")) {
  th.addEventListener("click", () => {
    state.sortDir = state.sortKey === th.dataset.sort ? -state.sortDir : 1;
    state.sortKey = th.dataset.sort;
    for (const other of document.querySelectorAll("th[data-sort]")) other.classList.remove("asc", "desc");
    th.classList.add(state.sortDir > 0 ? "asc" : "desc");
    sortMatches();
    state.page = 0;
    renderTable();
  });
}
let searchTimer = null;
$("search").addEventListener("input", () => {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(() => { state.query = $("search").value; applyFilters(); }, 120);
});
for (const [id, key] of [["filter-kind", "kind"], ["filter-strategy", "strategy"], ["filter-reason", "reason"]]) {
  $(id).addEventListener("change", () => { state[key] = $(id).value; applyFilters(); });
}
$("prev").addEventListener("click", () => { state.page -= 1; renderTable(); });
$("next").addEventListener("click", () => { state.page += 1; renderTable(); });

// -- the map ------------------------------------------------------------------------------
const canvas = $("map"), MARGIN = 10, DOT = N > 5000 ? 3 : N > 500 ? 4 : 6;  // px
const ratio = window.devicePixelRatio || 1;
canvas.width = 440 * ratio;
canvas.height = 440 * ratio;
const toPixel = (value, size) => MARGIN + value / D.map.scale * (size - 2 * MARGIN);

function drawMap() {
  const context = canvas.getContext("2d"), mode = $("map-colour").value;
  context.setTransform(ratio, 0, 0, ratio, 0, 0);
  context.clearRect(0, 0, 440, 440);
  const filtered = matches.length < N;
  if (filtered) {
    context.fillStyle = "#e2e4ea";
    for (let i = 0; i < N; i++) if (!inMatch[i]) context.fillRect(toPixel(D.map.x[i], 440) - 1, toPixel(D.map.y[i], 440) - 1, 2, 2);
  }
  for (const i of matches) {
    context.fillStyle = colourOf(mode, i);
    context.fillRect(toPixel(D.map.x[i], 440) - DOT / 2, toPixel(D.map.y[i], 440) - DOT / 2, DOT, DOT);
  }
  if (state.open >= 0) {
    context.strokeStyle = "#000";
    context.lineWidth = 2;
    context.beginPath();
    context.arc(toPixel(D.map.x[state.open], 440), toPixel(D.map.y[state.open], 440), 6, 0, 2 * Math.PI);
    context.stroke();
  }
  const entries = mode === "kind" ? [["accepted", "#2e9d4f"], ["rejected", "#d0392b"]]
    : D.strategies.map((name, index) => [name, PALETTE[index % PALETTE.length]]);
  $("legend").replaceChildren(...entries.map(([name, colour]) =>
    el("span", {}, el("span", { class: "swatch", style: `background:${colour}` }), name)));
}
$("map-colour").addEventListener("change", drawMap);
canvas.addEventListener("click", event => {
  const box = canvas.getBoundingClientRect();
  const x = event.clientX - box.left, y = event.clientY - box.top;
  let best = -1, bestDistance = 64;  // within 8 px
  for (const i of matches) {
    const dx = toPixel(D.map.x[i], 440) - x, dy = toPixel(D.map.y[i], 440) - y, distance = dx * dx + dy * dy;
    if (distance < bestDistance) { best = i; bestDistance = distance; }
  }
  if (best >= 0) location.hash = `row=${best}`;
});

// -- the row view -------------------------------------------------------------------------
let duplicatesOf = null;  // row → the rejected rows that duplicate it
function rejectsDuplicating(i) {
  if (duplicatesOf === null) {
    duplicatesOf = new Map();
    for (let j = 0; j < N; j++) {
      const target = C.duplicate_row[j];
      if (target >= 0) duplicatesOf.set(target, [...(duplicatesOf.get(target) || []), j]);
    }
  }
  return duplicatesOf.get(i) || [];
}

function clippedNote(text, chars) {
  return text !== null && chars > text.length ? el("div", { class: "muted", text: `(the first ${fmt(text.length)} of ${fmt(chars)} characters)` }) : null;
}

function colour(permille) {
  if (permille < 0) return "hsl(0, 90%, 78%)";
  const p = permille / 1000;
  return `hsl(${Math.round(120 * p)}, 75%, ${Math.round(80 + 8 * p)}%)`;
}

function renderAnswer(i) {
  const answer = $("row-answer"), tokens = TOK && TOK.rows[String(i)];
  $("token-legend").replaceChildren();
  if (C.response[i] === null) {
    answer.replaceChildren(el("span", { class: "muted", text: "(no answer: rejected before the teacher answered)" }));
    return;
  }
  if (!tokens) {
    answer.textContent = visible(C.response[i], true);
    if (TOK && C.kind[i] === 0) $("token-legend").append(el("span", { class: "muted", text:
      TOK.missing || `tokens are embedded for the first ${fmt(D.limits.token_rows)} accepted rows shown` }));
    return;
  }
  $("token-legend").append("teacher probability of each token (", TOK.note, "): ",
    ...[0, 250, 500, 750, 1000].map(p => el("span", { style: `background:${colour(p)}`, text: (p / 1000).toFixed(2) })),
    el("span", { style: `background:${colour(-1)}`, text: "not in the top-k" }), " — hover a token for the alternatives");
  answer.replaceChildren(...tokens.t.map((vocab, position) =>
    el("span", { class: "tok" + (tokens.p[position] < 0 ? " outside" : ""), "data-pos": position,
                 style: `background:${colour(tokens.p[position])}`, text: tokenText(TOK.vocab[vocab]) })));
}

function metaTable(i) {
  const rows = [["id", C.id[i]], ["status", C.kind[i] === 0 ? "accepted" : "rejected"], ["strategy", strategyName(i)],
    ["reason", reasonName(i)], ["detail", C.detail[i]], ["finish reason", C.finish_reason[i]], ["parent", C.parent_id[i]],
    ["length", `prompt ${fmt(C.prompt_chars[i])} chars` + (C.response[i] === null ? "" : `, answer ${fmt(C.response_chars[i])} chars`)]];
  return el("table", { class: "meta" }, el("tbody", {}, ...rows.filter(([, value]) => value !== null && value !== "")
    .map(([label, value]) => el("tr", {}, el("td", { text: label }), el("td", { text: String(value) })))));
}

function renderDuplicates(i) {
  const box = $("row-duplicate");
  box.replaceChildren();
  if (C.duplicate_of[i]) {
    const target = C.duplicate_row[i];
    box.append(el("h3", { text: `${reasonName(i) || "duplicate"} of ${C.duplicate_of[i]}` }));
    const kept = target < 0 ? el("div", { class: "muted", text: "that row is not among the rows shown" })
      : el("div", {}, el("div", {}, el("a", { href: `#row=${target}`, class: "dup-link", text: "open the row it duplicates" })),
           el("div", { class: "text", text: visible(C.prompt[target], true) }));
    box.append(el("div", { class: "pair" },
      el("div", {}, el("b", { text: "this prompt (rejected)" }), el("div", { class: "text", text: visible(C.prompt[i], true) })),
      el("div", {}, el("b", { text: "the row it duplicates" }), kept)));
  }
  const copies = rejectsDuplicating(i);
  if (copies.length) {
    box.append(el("h3", { text: `${copies.length} rejected ${copies.length === 1 ? "row duplicates" : "rows duplicate"} this one` }),
      el("ul", {}, ...copies.slice(0, 50).map(j => el("li", {}, el("a", { href: `#row=${j}`, class: "dup-link", text: reasonName(j) }),
        " ", el("span", { class: "muted", text: clip(visible(C.prompt[j]), 120) })))));
  }
}

function openRow(i) {
  state.open = i;
  $("row-view").hidden = false;
  $("row-meta").replaceChildren(metaTable(i));
  $("row-prompt").textContent = visible(C.prompt[i], true);
  $("row-prompt-note").replaceChildren(clippedNote(C.prompt[i], C.prompt_chars[i]) || "");
  renderAnswer(i);
  $("row-answer-note").replaceChildren(clippedNote(C.response[i], C.response_chars[i]) || "");
  renderDuplicates(i);
  $("row-view").scrollTop = 0;
  for (const tr of $("rows").tBodies[0].rows) tr.classList.toggle("open", Number(tr.dataset.row) === i);
  drawMap();
}
function closeRow() {
  state.open = -1;
  $("row-view").hidden = true;
  $("tip").hidden = true;
  for (const tr of $("rows").tBodies[0].rows) tr.classList.remove("open");
  drawMap();
}
function route() {
  const found = /^#row=(\d+)$/.exec(location.hash);
  if (found && Number(found[1]) < N) openRow(Number(found[1])); else closeRow();
}
window.addEventListener("hashchange", route);
$("close-row").addEventListener("click", () => { location.hash = ""; });
document.addEventListener("keydown", event => { if (event.key === "Escape" && state.open >= 0) location.hash = ""; });

// The top-k alternatives of the token under the pointer.
$("row-answer").addEventListener("mouseover", event => {
  const span = event.target.closest(".tok"), tokens = TOK && TOK.rows[String(state.open)];
  if (!span || !tokens) return;
  const position = Number(span.dataset.pos), chosen = TOK.vocab[tokens.t[position]], permille = tokens.p[position];
  const options = tokens.a[position], rows = [];
  for (let j = 0; j < options.length; j += 2) {
    const text = TOK.vocab[options[j]], p = options[j + 1];
    rows.push(el("tr", { class: text === chosen ? "chosen" : "" }, el("td", { class: "t", text: JSON.stringify(text) }),
      el("td", { class: "num", text: (p / 1000).toFixed(3) }), el("td", {}, el("span", { class: "bar", style: `width:${Math.max(1, p / 10)}px` }))));
  }
  const tip = $("tip");
  tip.replaceChildren(el("div", { text: `token ${position + 1}: ${JSON.stringify(chosen)}, p = ` +
      (permille < 0 ? "below the top-k" : (permille / 1000).toFixed(3)) }),
    el("div", { class: "muted", text: `top ${options.length / 2} of the teacher:` }), el("table", { class: "alternatives" }, el("tbody", {}, ...rows)));
  const box = span.getBoundingClientRect();
  tip.style.left = Math.min(box.left, window.innerWidth - 330) + "px";
  tip.style.top = (box.bottom + 6) + "px";
  tip.hidden = false;
});
$("row-answer").addEventListener("mouseout", event => {
  if (event.target.closest(".tok") && !(event.relatedTarget && event.relatedTarget.closest && event.relatedTarget.closest(".tok"))) $("tip").hidden = true;
});

applyFilters();
route();
document.body.dataset.readyMs = String(Math.round(performance.now()));  // since navigation started
document.body.dataset.ready = "1";
})();
"""

BODY = """
<header>
<h1 id="title"></h1>
<div id="summary" class="muted"></div>
<div id="notes"></div>
</header>
<div id="controls">
<input id="search" type="search" placeholder="Search prompts, answers, ids, details" aria-label="search">
<select id="filter-kind" aria-label="status"><option value="">accepted and rejected</option><option value="0">accepted</option><option value="1">rejected</option></select>
<select id="filter-strategy" aria-label="strategy"><option value="">every strategy</option></select>
<select id="filter-reason" aria-label="reject reason"><option value="">every reject reason</option></select>
</div>
<main>
<section id="table-view">
<table id="rows"><thead><tr>
<th data-sort="kind">status</th><th data-sort="strategy">strategy</th><th data-sort="reason">reject reason</th>
<th data-sort="prompt">prompt</th><th data-sort="prompt_chars" class="num">prompt chars</th>
<th data-sort="response_chars" class="num">answer chars</th><th>duplicate of</th>
</tr></thead><tbody></tbody></table>
<div id="pager"><button id="prev" type="button">‹ previous</button><span id="page-info"></span><button id="next" type="button">next ›</button></div>
</section>
<section id="map-view">
<h2>Map of the prompts</h2>
<label>colour by <select id="map-colour"><option value="strategy">strategy</option><option value="kind">accepted / rejected</option></select></label>
<canvas id="map"></canvas>
<div id="legend"></div>
<p id="map-source" class="muted"></p>
</section>
</main>
<aside id="row-view" hidden>
<button id="close-row" type="button">close ✕</button>
<div id="row-meta"></div>
<h3>prompt</h3><div id="row-prompt" class="text"></div><div id="row-prompt-note"></div>
<h3>answer</h3><div id="token-legend"></div><div id="row-answer" class="text"></div><div id="row-answer-note"></div>
<div id="row-duplicate"></div>
</aside>
<div id="tip" hidden></div>
"""


def page_html(name: str, data_json: str) -> str:
    """The whole page; `data_json` must already be safe inside a script element
    (`storage.viewer.json_for_script`)."""
    title = html.escape(f"{name}: distillflow dataset viewer", quote=True)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{title}</title>\n<style>{STYLE}</style>\n</head>\n<body>{BODY}"
        f'<script type="application/json" id="viewer-data">{data_json}</script>\n'
        f"<script>{SCRIPT}</script>\n</body>\n</html>\n"
    )
