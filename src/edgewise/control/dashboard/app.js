// Fleet dashboard: polls the REST API every 2 s and redraws the table. No build step, no network
// beyond this server. Device-provided strings are inserted with textContent only (never as HTML).
"use strict";

const API = "/api/v1";
const REFRESH_MS = 2000;
const STALE_S = 60;

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}

function ago(iso) {
  if (!iso) return { text: "never", stale: true };
  const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  let text;
  if (s < 60) text = `${Math.round(s)} s ago`;
  else if (s < 3600) text = `${Math.round(s / 60)} min ago`;
  else if (s < 86400) text = `${Math.round(s / 3600)} h ago`;
  else text = `${Math.round(s / 86400)} d ago`;
  return { text, stale: s > STALE_S };
}

function fmtMs(ms) {
  // Sub-millisecond latencies are common for small models: keep two significant digits.
  return ms >= 10 ? ms.toFixed(0) : ms >= 1 ? ms.toFixed(1) : ms.toPrecision(2);
}

function version(model, ver) {
  return model ? `${model} ${ver || "?"}` : "—";
}

function row(d) {
  const tr = el("tr");
  tr.dataset.device = d.id;
  if (!d.in_sync) tr.classList.add("out-of-sync");

  tr.appendChild(el("td", "device", d.id));

  const tags = el("td", "tags");
  for (const t of d.tags || []) tags.appendChild(el("span", "tag", t));
  tr.appendChild(tags);

  const desired = d.desired;
  tr.appendChild(el("td", "desired", desired ? `${version(desired.model, desired.version)} (gen ${desired.generation})` : "—"));
  tr.appendChild(el("td", "actual", version(d.model, d.version)));
  tr.appendChild(el("td", `status status-${d.status}`, d.status));

  const seen = ago(d.last_seen);
  const seenTd = el("td", seen.stale ? "stale" : "", seen.text);
  if (d.last_seen) seenTd.title = d.last_seen;
  tr.appendChild(seenTd);

  tr.appendChild(el("td", "num", d.inference_rate != null ? d.inference_rate.toFixed(1) : "—"));
  tr.appendChild(el("td", "num", d.latency_p95_ms != null ? `${fmtMs(d.latency_p95_ms)} ms` : "—"));
  return tr;
}

async function getJSON(path) {
  const r = await fetch(API + path, { headers: { Accept: "application/json" }, cache: "no-store" });
  if (!r.ok) throw new Error(`${path}: HTTP ${r.status}`);
  return r.json();
}

async function refresh() {
  const errorEl = document.getElementById("error");
  try {
    const [devices, stats, health] = await Promise.all([getJSON("/devices"), getJSON("/stats"), getJSON("/health")]);
    const body = document.getElementById("fleet-body");
    const rows = devices.map(row);
    if (rows.length === 0) {
      const tr = el("tr", "empty");
      const td = el("td", "", "No devices yet. Start an agent or register one: POST /api/v1/devices");
      td.colSpan = 8;
      tr.appendChild(td);
      rows.push(tr);
    }
    body.replaceChildren(...rows);

    const online = devices.filter((d) => d.status === "online").length;
    const synced = devices.filter((d) => d.in_sync).length;
    const i = stats.ingest;
    document.getElementById("summary").textContent =
      `${devices.length} devices · ${online} online · ${synced} on desired version · ` +
      `${i.telemetry_rows} samples, ${i.duplicates} duplicates, ${i.bad} bad messages`;
    document.getElementById("health").textContent =
      `server ${health.status} · broker ${health.mqtt.connected ? "connected" : "DISCONNECTED"} (${health.mqtt.embedded ? "embedded" : "external"})`;
    errorEl.hidden = true;
  } catch (e) {
    errorEl.textContent = `Cannot reach the control plane (${e.message}); retrying…`;
    errorEl.hidden = false;
  }
}

refresh();
setInterval(refresh, REFRESH_MS);
