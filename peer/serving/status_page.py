"""The agent's status page, ``GET /`` on the local listener: plain HTML and a small script
(``GET /status.js``; its style is ``/status.css``) that reads ``/v1/status`` every
second and shows the peers, the seeded repos, the counters and a progress bar per
running transfer. No build step, no third-party asset.

Strict by construction: the script and style are files of their own (nothing inline, so the
Content-Security-Policy is ``default-src 'self'`` with nothing relaxed); it writes
names from the network (repo ids, peer ids, file paths) with ``textContent`` only. The
page's same-origin ``fetch`` carries no ``Origin`` for a GET, and the local guard would
accept our own origin anyway; any other site's page is still refused by the guard.
"""

from __future__ import annotations

from aiohttp import web

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>hfswarm agent</title>
<link rel="stylesheet" href="/status.css">
<script src="/status.js" defer></script>
</head>
<body>
<h1>hfswarm agent <span id="agent" class="dim"></span></h1>
<p id="error"></p>
<h2>Transfers</h2>
<table id="transfers"><thead><tr><th>repo</th><th>file</th><th>progress</th><th>done</th>
<th>size</th><th>rate</th><th>source</th></tr></thead><tbody></tbody></table>
<p id="no-transfers" class="dim">none running</p>
<h2>Counters</h2>
<table id="counters"><tbody></tbody></table>
<h2>Peers</h2>
<table id="peers"><thead><tr><th>agent</th><th>address</th><th>BitTorrent</th></tr></thead>
<tbody></tbody></table>
<h2>Seeded repos</h2>
<table id="repos"><thead><tr><th>repo</th><th>blobs</th><th>size</th></tr></thead>
<tbody></tbody></table>
</body>
</html>
"""

STYLE = """body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; } h2 { font-size: 1.05em; margin-top: 1.4em; }
table { border-collapse: collapse; } td, th { padding: 2px 10px; text-align: left; }
th { border-bottom: 1px solid #ccc; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
progress { width: 14em; } .dim { color: #888; } #error { color: #b00; }
"""

SCRIPT = """"use strict";
function human(n) {
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return (i ? n.toFixed(1) : String(Math.round(n))) + " " + units[i];
}
function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}
function fill(id, items, render) {
  const body = document.querySelector("#" + id + " tbody");
  body.replaceChildren();
  for (const item of items) render(body.insertRow(), item);
}
function show(s) {
  document.getElementById("agent").textContent = s.agent_id;
  const transfers = s.transfers || [];
  document.getElementById("no-transfers").hidden = transfers.length > 0;
  fill("transfers", transfers, (row, t) => {
    row.dataset.blob = t.blob;
    cell(row, t.repo);
    cell(row, t.file, "file");
    const bar = document.createElement("progress");
    const pct = t.size > 0 ? Math.min(100, (100 * t.done) / t.size) : 100;
    bar.max = 100;
    bar.setAttribute("value", pct.toFixed(1));
    bar.title = pct.toFixed(1) + " %";
    row.insertCell().appendChild(bar);
    cell(row, human(t.done), "n");
    cell(row, human(t.size), "n");
    cell(row, human(t.rate) + "/s", "n");
    cell(row, t.source);
  });
  const counters = [
    ["from peers", human(s.bytes_from_peers)],
    ["from the mirror", human(s.bytes_from_mirror)],
    ["saved from the mirror", human(s.bytes_from_peers)],
    ["uploaded to peers", human(s.bytes_uploaded)],
    ["served to HF_ENDPOINT clients", human(s.bytes_served_clients)],
    ["downloads", String(s.downloads)],
    ["hash failures", String(s.hash_failures)],
    ["peers banned", String(s.bans)],
    ["seeded", s.seeded_blobs + " blobs, " + human(s.seeded_bytes)],
  ];
  fill("counters", counters, (row, c) => { cell(row, c[0]); cell(row, c[1], "n"); });
  fill("peers", s.peers || [], (row, p) => {
    cell(row, p.agent_id.slice(0, 12));
    cell(row, p.host + ":" + p.api_port);
    cell(row, String(p.bt_port), "n");
  });
  fill("repos", s.seeded_repos || [], (row, r) => {
    cell(row, r.repo);
    cell(row, String(r.blobs), "n");
    cell(row, human(r.bytes), "n");
  });
}
async function refresh() {
  const error = document.getElementById("error");
  try {
    const r = await fetch("/v1/status", { cache: "no-store" });
    if (!r.ok) throw new Error("HTTP " + r.status);
    show(await r.json());
    error.textContent = "";
  } catch (e) {
    error.textContent = "cannot read /v1/status: " + e.message;
  }
}
refresh();
setInterval(refresh, 1000);
"""


def add_status_page(app: web.Application) -> None:
    """``/``, ``/status.js``, ``/status.css`` (before the Hub API's catch-all route is mounted)."""

    async def page(_: web.Request) -> web.Response:
        return web.Response(
            text=PAGE, content_type="text/html", charset="utf-8", headers=SECURITY_HEADERS
        )

    async def script(_: web.Request) -> web.Response:
        return web.Response(
            text=SCRIPT, content_type="text/javascript", charset="utf-8", headers=SECURITY_HEADERS
        )

    async def style(_: web.Request) -> web.Response:
        return web.Response(
            text=STYLE, content_type="text/css", charset="utf-8", headers=SECURITY_HEADERS
        )

    app.router.add_get("/", page)
    app.router.add_get("/status.js", script)
    app.router.add_get("/status.css", style)
