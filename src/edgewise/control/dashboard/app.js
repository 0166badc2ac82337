// Fleet dashboard: one page, hash routes (#/, #/device/ID, #/models, #/rollouts, #/rollouts/ID, #/alerts, #/drift,
// #/audit, #/fl, #/fl/ID). Polls the REST API every 2 s and redraws the page on view. No build step, no network beyond this server
// (charts: uPlot, vendored under /dashboard/vendor/). Device-provided strings are inserted with textContent only
// (never as HTML).
//
// Authentication: a session cookie (HttpOnly, SameSite=Strict) from the sign-in form; changes send the
// X-CSRF-Token header read from the edgewise_csrf cookie. For wall displays, a (viewer) API token may be given
// once in the URL fragment, /#token=ewu_... (or /#/alerts&token=ewu_...), which never reaches the server's logs:
// it is kept in sessionStorage and removed from the address bar at once.
"use strict";

const API = "/api/v1";
const TOKEN_KEY = "edgewise.token";
const REFRESH_MS = 2000;
const STALE_S = 60;
let me = null;

function takeTokenFromFragment() {
  const m = /(?:^#|&)token=([^&]+)/.exec(location.hash);
  if (!m) return false;
  sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1]));
  const rest = location.hash.replace(m[0], "").replace(/^#?&/, "#");
  history.replaceState(null, "", location.pathname + location.search + (rest.length > 1 ? rest : ""));
  return true;
}
takeTokenFromFragment();

function authHeaders(extra) {
  const h = Object.assign({ Accept: "application/json" }, extra || {});
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) h.Authorization = `Bearer ${token}`;
  const csrf = /(?:^|; )edgewise_csrf=([^;]+)/.exec(document.cookie);
  if (csrf) h["X-CSRF-Token"] = decodeURIComponent(csrf[1]);
  return h;
}

class Unauthorized extends Error {}
class HttpError extends Error {
  constructor(path, status, detail) {
    super(`${path}: HTTP ${status}${detail ? ` — ${detail}` : ""}`);
    this.status = status;
    this.detail = detail;
  }
}

const $ = (id) => document.getElementById(id);

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}

function td(cls, text) { return el("td", cls, text); }

function emptyRow(cols, text) {
  const tr = el("tr", "empty");
  const c = td("", text);
  c.colSpan = cols;
  tr.appendChild(c);
  return tr;
}

function ago(iso) {
  if (!iso) return { text: "never", stale: true };
  const t = typeof iso === "number" ? iso * 1000 : Date.parse(iso);
  const s = Math.max(0, (Date.now() - t) / 1000);
  let text;
  if (s < 60) text = `${Math.round(s)} s ago`;
  else if (s < 3600) text = `${Math.round(s / 60)} min ago`;
  else if (s < 86400) text = `${Math.round(s / 3600)} h ago`;
  else text = `${Math.round(s / 86400)} d ago`;
  return { text, stale: s > STALE_S };
}

function when(v) {
  if (v === null || v === undefined) return "—";
  return new Date(typeof v === "number" ? v * 1000 : v).toLocaleString();
}

function fmtMs(ms) {
  // Sub-millisecond latencies are common for small models: keep two significant digits.
  return ms >= 10 ? ms.toFixed(0) : ms >= 1 ? ms.toFixed(1) : ms.toPrecision(2);
}

function fmtNum(v) {
  if (v === null || v === undefined) return "—";
  if (typeof v !== "number") return String(v);
  if (Number.isInteger(v)) return String(v);
  return Math.abs(v) >= 1000 ? v.toFixed(0) : String(Number(v.toPrecision(3)));
}

function fmtBytes(n) {
  if (n === null || n === undefined) return "—";
  if (n >= 1 << 20) return `${(n / (1 << 20)).toFixed(1)} MB`;
  if (n >= 1024) return `${(n / 1024).toFixed(1)} kB`;
  return `${n} B`;
}

function version(model, ver) {
  return model ? `${model} ${ver || "?"}` : "—";
}

function figuresText(f) {
  if (!f || typeof f !== "object") return "";
  return Object.entries(f).filter(([, v]) => v !== null && v !== undefined && typeof v !== "object")
    .map(([k, v]) => `${k}=${fmtNum(v)}`).join(" ");
}

function kv(dl, pairs) {
  const items = [];
  for (const [k, v] of pairs) {
    if (v === undefined) continue;
    items.push(el("dt", "", k), el("dd", "", v === null || v === "" ? "—" : v));
  }
  dl.replaceChildren(...items);
}

async function request(method, path, body) {
  const init = { method, headers: authHeaders(body !== undefined ? { "Content-Type": "application/json" } : {}), cache: "no-store", credentials: "same-origin" };
  if (body !== undefined) init.body = JSON.stringify(body);
  const r = await fetch(API + path, init);
  if (r.status === 401) throw new Unauthorized(path);
  if (!r.ok) {
    let detail = "";
    try {
      const j = await r.json();
      detail = typeof j.detail === "string" ? j.detail : JSON.stringify(j.detail);
    } catch (_) { /* not JSON */ }
    throw new HttpError(path, r.status, detail);
  }
  return r.status === 204 ? null : r.json();
}

const getJSON = (path) => request("GET", path);

function isOperator() { return !!me && (me.role === "operator" || me.role === "admin"); }

// -- sign-in ------------------------------------------------------------------------------------------------

function showLogin(message) {
  me = null;
  sessionStorage.removeItem(TOKEN_KEY);
  $("main").hidden = true;
  $("nav").hidden = true;
  $("whoami").hidden = true;
  $("login").hidden = false;
  $("summary").textContent = "sign in to see the fleet";
  const err = $("login-error");
  err.textContent = message || "";
  err.hidden = !message;
}

async function whoami() {
  me = await getJSON("/auth/me");
  if (me.kind !== "user") throw new Unauthorized("/auth/me");
  $("login").hidden = true;
  $("main").hidden = false;
  $("nav").hidden = false;
  $("whoami").hidden = false;
  $("whoami-name").textContent = `${me.name} (${me.role})`;
  $("logout").hidden = me.via !== "cookie";
  $("nav-audit").hidden = !isOperator();
  for (const e of document.querySelectorAll(".operator-only")) e.hidden = !isOperator();
}

// -- routing --------------------------------------------------------------------------------------------------

function currentRoute() {
  const parts = location.hash.replace(/^#\/?/, "").split("&")[0].split("/").filter(Boolean).map(decodeURIComponent);
  const [page, arg] = parts;
  if (!page) return { page: "fleet" };
  if (page === "device" && arg) return { page: "device", id: arg };
  if (page === "rollouts" && arg) return { page: "rollout", id: arg };
  if (page === "fl" && arg) return { page: "fljob", id: arg };
  if (["models", "rollouts", "alerts", "drift", "audit", "fl"].includes(page)) return { page };
  return { page: "fleet" };
}

const SECTIONS = { fleet: "page-fleet", device: "page-device", models: "page-models", rollouts: "page-rollouts",
  rollout: "page-rollout", alerts: "page-alerts", drift: "drift", audit: "audit", fl: "page-fl", fljob: "page-fl-job" };

function showPage(route) {
  for (const [page, id] of Object.entries(SECTIONS)) {
    // drift and audit show themselves once they have something to show (see their refresh functions)
    if (page !== route.page || page === "drift" || page === "audit") $(id).hidden = true;
    else $(id).hidden = false;
  }
  for (const a of document.querySelectorAll("#nav a")) {
    const p = route.page === "device" ? "fleet" : route.page === "rollout" ? "rollouts" : route.page === "fljob" ? "fl" : route.page;
    a.classList.toggle("active", a.dataset.page === p);
  }
}

// -- fleet overview -----------------------------------------------------------------------------------------

function hardwareClass(d) {
  return (d.hardware && (d.hardware.hardware_class || d.hardware.arch)) || "unknown";
}

function health(d) {
  if (d.status === "degraded" || d.status === "offline") return "bad";
  if (d.status === "updating" || !d.in_sync) return "warn";
  if (d.status === "registered") return "unknown";
  return "ok";
}

function deviceLink(id) {
  const a = el("a", "", id);
  a.href = `#/device/${encodeURIComponent(id)}`;
  return a;
}

function row(d) {
  const tr = el("tr");
  tr.dataset.device = d.id;
  if (!d.in_sync) tr.classList.add("out-of-sync");
  const idTd = td("device");
  idTd.appendChild(deviceLink(d.id));
  tr.appendChild(idTd);
  const tags = td("tags");
  for (const t of d.tags || []) tags.appendChild(el("span", "tag", t));
  tr.appendChild(tags);
  tr.appendChild(td("hardware", hardwareClass(d)));
  const desired = d.desired;
  tr.appendChild(td("desired", desired ? `${version(desired.model, desired.version)} (gen ${desired.generation})` : "—"));
  tr.appendChild(td("actual", version(d.model, d.version)));
  tr.appendChild(td(`status status-${d.status}`, d.status));
  const seen = ago(d.last_seen);
  const seenTd = td(seen.stale ? "stale" : "", seen.text);
  if (d.last_seen) seenTd.title = d.last_seen;
  tr.appendChild(seenTd);
  tr.appendChild(td("num", d.inference_rate != null ? d.inference_rate.toFixed(1) : "—"));
  tr.appendChild(td("num", d.latency_p95_ms != null ? `${fmtMs(d.latency_p95_ms)} ms` : "—"));
  return tr;
}

function tile(d) {
  const a = el("a", `tile tile-${health(d)}`);
  a.href = `#/device/${encodeURIComponent(d.id)}`;
  a.dataset.device = d.id;
  a.title = `${d.id}: ${d.status}${d.in_sync ? "" : " (not on the desired version)"}`;
  a.appendChild(el("span", "tile-id", d.id));
  a.appendChild(el("span", "tile-ver", d.version || "—"));
  a.appendChild(el("span", "tile-lat", d.latency_p95_ms != null ? `${fmtMs(d.latency_p95_ms)} ms` : ""));
  return a;
}

function countList(ul, counts, cls) {
  const entries = Object.entries(counts).sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0]));
  const items = entries.map(([k, n]) => {
    const li = el("li", cls ? `${cls}-${k}` : "");
    li.appendChild(el("span", "count-key", k));
    li.appendChild(el("span", "count-n", n));
    return li;
  });
  if (items.length === 0) items.push(el("li", "muted", "none"));
  ul.replaceChildren(...items);
}

function tally(items, key) {
  const out = {};
  for (const i of items) { const k = key(i); out[k] = (out[k] || 0) + 1; }
  return out;
}

async function refreshFleet(devices) {
  const rows = devices.map(row);
  if (rows.length === 0) rows.push(emptyRow(9, "No devices yet. Start an agent or register one: POST /api/v1/devices"));
  $("fleet-body").replaceChildren(...rows);
  $("tiles").replaceChildren(...devices.map(tile));
  countList($("count-status"), tally(devices, (d) => d.status), "status");
  countList($("count-version"), tally(devices, (d) => version(d.model, d.version)));
  countList($("count-hardware"), tally(devices, hardwareClass));
  const fs = await fleetSeries();
  $("fleet-series").hidden = fs === null;
  if (fs) drawCharts("fleet", $("fleet-charts"), FLEET_CHARTS, fs.metrics || {}, [fs.since, fs.until]);
}

// -- one device -----------------------------------------------------------------------------------------------

// Chart groups, with metrics named as GET /devices/{id}/series and GET /fleet/series name them (GET
// /series/metrics lists them); the telemetry fallback below derives the same names from raw samples for a server
// without the series API.
const DEVICE_CHARTS = [
  { title: "Latency (ms)", metrics: ["latency_p50_ms", "latency_p95_ms"] },
  { title: "Inference rate (/s)", metrics: ["inference_rate"] },
  { title: "Error rate", metrics: ["error_rate"] },
  { title: "CPU (%)", metrics: ["cpu_percent"] },
  { title: "Memory (%)", metrics: ["mem_percent"] },
  { title: "Temperature (°C)", metrics: ["temperature_c"] },
  { title: "Drift score", metrics: ["drift_score"] },
  { title: "Shadow agreement", metrics: ["shadow_agreement"] },
  { title: "Outbox depth", metrics: ["outbox_depth", "dropped"] },
  { title: "Link (1 online)", metrics: ["link_state"] },
];
const FLEET_CHARTS = [
  { title: "Fleet inference rate (/s)", metrics: ["inference_rate"] },
  { title: "Fleet latency (ms)", metrics: ["latency_p95_ms", "latency_p95_max_ms"] },
  { title: "Fleet error rate", metrics: ["error_rate"] },
  { title: "Devices", metrics: ["devices_online", "devices_reporting"] },
];
// Series windows: [span in seconds, step] (raw records are kept a day, per-minute rollups a month by default).
const WINDOWS = { "1h": [3600, "raw"], "24h": [86400, "60"], "7d": [7 * 86400, "3600"], "30d": [30 * 86400, "3600"] };
const COLORS = ["#2563eb", "#dc2626", "#059669", "#d97706"];
const chartSets = { device: new Map(), fleet: new Map() }; // chart title -> {plot, key, wrap}
let seriesEndpoint = true; // false once the series API turned out not to exist on this server

function destroyCharts(which) {
  for (const c of chartSets[which].values()) { c.plot.destroy(); c.wrap.remove(); }
  chartSets[which].clear();
}

function fromTelemetry(rows) {
  const m = {};
  const put = (name, t, v) => { if (v !== null && v !== undefined && Number.isFinite(v)) (m[name] = m[name] || []).push([t, v]); };
  let prev = null;
  for (const r of rows) {
    const t = r.corrected_ts || r.ts;
    put("latency_p50_ms", t, r.latency_p50_ms);
    put("latency_p95_ms", t, r.latency_p95_ms);
    put("inference_rate", t, r.inference_rate);
    put("cpu_percent", t, r.cpu_percent);
    put("mem_percent", t, r.mem_percent);
    put("temperature_c", t, r.temperature_c);
    put("drift_score", t, r.drift_score);
    put("outbox_depth", t, r.outbox_pending);
    put("dropped", t, r.dropped);
    if (prev && r.inferences >= prev.inferences) {
      const di = r.inferences - prev.inferences;
      put("error_rate", t, di > 0 ? Math.max(0, r.errors - prev.errors) / di : 0);
    }
    prev = r;
  }
  return m;
}

function seriesQuery(specs, win) {
  const [span, step] = WINDOWS[win] || WINDOWS["1h"];
  const names = [...new Set(specs.flatMap((c) => c.metrics))];
  return { q: `metrics=${names.join(",")}&since=${(Date.now() / 1000 - span).toFixed(0)}`, step };
}

async function deviceSeries(id) {
  const win = $("device-window").value;
  if (seriesEndpoint) {
    const { q, step } = seriesQuery(DEVICE_CHARTS, win);
    try {
      const r = await getJSON(`/devices/${encodeURIComponent(id)}/series?${q}&step=${step}`);
      return { source: `series API, ${step === "raw" ? "every record" : `per ${step} s`}`, metrics: r.metrics || {},
        span: [r.since, r.until] };
    } catch (e) {
      // a missing route says "Not Found"; an unknown device names itself
      if (e instanceof HttpError && e.status === 404 && e.detail === "Not Found") seriesEndpoint = false;
      else throw e;
    }
  }
  const rows = await getJSON(`/devices/${encodeURIComponent(id)}/telemetry?limit=300`);
  return { source: "last 300 telemetry samples", metrics: fromTelemetry(rows), span: null };
}

async function fleetSeries() {
  if (!seriesEndpoint) return null;
  const { q } = seriesQuery(FLEET_CHARTS, $("fleet-window").value);
  const [span] = WINDOWS[$("fleet-window").value] || WINDOWS["1h"];
  try {
    return await getJSON(`/fleet/series?${q}&step=${span > 86400 ? 3600 : 60}`);
  } catch (e) {
    if (e instanceof HttpError && e.status === 404 && e.detail === "Not Found") { seriesEndpoint = false; return null; }
    throw e;
  }
}

// Align several [[t, v], ...] series on one x axis (uPlot wants columns).
function align(series) {
  const xs = [...new Set(series.flatMap((s) => s.map((p) => p[0])))].sort((a, b) => a - b);
  const cols = series.map((s) => {
    const byT = new Map(s.map((p) => [p[0], p[1]]));
    return xs.map((x) => (byT.has(x) ? byT.get(x) : null));
  });
  return [xs, ...cols];
}

function numeric(points) {
  return (points || []).filter((p) => typeof p[1] === "number" || p[1] === null);
}

function xRange(span, min, max) {
  if (!span) return min === max ? [min - 30, max + 30] : [min, max];
  const hi = span[1];
  const lo = Math.min(hi - 60, Math.max(span[0], min == null ? span[0] : min));
  return [lo, hi];
}

// ``span``: [since, until] epoch seconds to show (the whole window, even where there is no data yet), or null (fit).
const chartSpan = { device: null, fleet: null };

function drawCharts(which, box, specs, metrics, span) {
  const charts = chartSets[which];
  chartSpan[which] = span || null;
  const width = Math.max(280, Math.min(560, (box.clientWidth || 900) / 2 - 16));
  for (const spec of specs) {
    const present = spec.metrics.filter((n) => numeric(metrics[n]).some((p) => p[1] !== null));
    const entry = charts.get(spec.title);
    const key = present.join(",");
    if (present.length === 0) {
      if (entry) { entry.plot.destroy(); entry.wrap.remove(); charts.delete(spec.title); }
      continue;
    }
    const data = align(present.map((n) => numeric(metrics[n])));
    if (entry && entry.key === key) {
      entry.plot.setData(data);
      continue;
    }
    if (entry) { entry.plot.destroy(); entry.wrap.remove(); }
    const wrap = el("div", "chart");
    wrap.dataset.chart = spec.title;
    box.appendChild(wrap);
    if (typeof uPlot === "undefined") { // the chart library failed to load: say the latest values
      wrap.textContent = `${spec.title}: ${present.map((n) => `${n} ${fmtNum(data[present.indexOf(n) + 1].at(-1))}`).join(", ")}`;
      charts.set(spec.title, { plot: { destroy() {}, setData() {} }, key, wrap });
      continue;
    }
    const opts = {
      title: spec.title, width, height: 170,
      scales: {
        // from the first point (or the window's start) to the window's end: a young device's data is not squeezed
        // into the right edge of an hour, and an old gap still shows as a gap
        x: { time: true, range: (u, min, max) => xRange(chartSpan[which], min, max) },
        // a flat series (all errors 0) gets a small axis instead of 0..100
        y: { range: (u, min, max) => (min === max ? [Math.min(0, min), max > 0 ? max * 1.25 : max < 0 ? 0 : 1]
          : uPlot.rangeNum(min, max, 0.1, true)) },
      },
      series: [{}, ...present.map((n, i) => ({ label: n, stroke: COLORS[i % COLORS.length], width: 1.5, spanGaps: true }))],
      axes: [{}, { size: 56 }],
    };
    charts.set(spec.title, { plot: new uPlot(opts, data, wrap), key, wrap });
  }
}

function adaptationRow(e) {
  const d = e.detail || {};
  const tr = el("tr", `adapt-${d.result || "unknown"}`);
  tr.appendChild(td("", when(e.corrected_ts || e.ts)));
  tr.appendChild(td(`adapt-result adapt-result-${d.result || "unknown"}`, d.result || e.severity));
  tr.appendChild(td("", d.method || "—"));
  tr.appendChild(td("", d.trigger || "—"));
  tr.appendChild(td("num", d.samples != null ? d.samples : "—"));
  const keys = [...new Set([...Object.keys(d.before || {}), ...Object.keys(d.after || {})])];
  tr.appendChild(td("detail", keys.map((k) => `${k} ${fmtNum((d.before || {})[k])} → ${fmtNum((d.after || {})[k])}`).join("; ") || "—"));
  tr.appendChild(td("detail", d.reason || e.message));
  return tr;
}

function eventRow(e) {
  const tr = el("tr", `event severity-${e.severity}`);
  tr.appendChild(td("", when(e.corrected_ts || e.ts)));
  tr.appendChild(td("kind", e.kind));
  tr.appendChild(td(`severity severity-${e.severity}`, e.severity));
  tr.appendChild(td("message", e.message));
  tr.appendChild(td("detail", Object.keys(e.detail || {}).length ? JSON.stringify(e.detail) : ""));
  return tr;
}

// Placed models (issue 7: several models per device) from GET /devices/{id}/placements: what is wanted, and how the
// agent reports each one (pending, starting, serving, failed + reason); the device's own report as a fallback.
function placementRows(d, placed) {
  const list = placed ? placed.placements : (d.hosted || []);
  const rows = list.map((h) => {
    const tr = el("tr", `hosted hosted-${h.status}`);
    tr.dataset.model = h.model;
    for (const v of [h.model, h.version, h.status]) tr.appendChild(td(v === "failed" ? "status-degraded" : "", v));
    for (const v of [h.threads, h.memory_mb, h.rss_mb]) tr.appendChild(td("num", fmtNum(v)));
    tr.appendChild(td("detail", h.reason || ""));
    return tr;
  });
  if (rows.length === 0) rows.push(emptyRow(7, "only the primary model"));
  return rows;
}

function budgetText(placed) {
  const b = placed && placed.budget;
  if (!b || !b.ram_mb) return "";
  return `RAM ${b.ram_mb} MB: primary model ${fmtNum(b.primary_mb)} MB, placed ${fmtNum(b.placed_mb)} MB, ` +
    `free ${fmtNum(b.free_mb)} MB · threads ${fmtNum(b.threads_used)}` + (b.cores ? ` of ${b.cores} cores` : "");
}

async function optional(path) {
  // A route that a server without that part lacks: null instead of an error.
  try {
    return await getJSON(path);
  } catch (e) {
    if (e instanceof HttpError && e.status === 404 && e.detail === "Not Found") return null;
    throw e;
  }
}

async function refreshDevice(id) {
  const enc = encodeURIComponent(id);
  const [d, events, series, placed] = await Promise.all([
    getJSON(`/devices/${enc}`), getJSON(`/devices/${enc}/events?limit=200`), deviceSeries(id),
    optional(`/devices/${enc}/placements`)]);
  $("device-title").textContent = d.id;
  const st = $("device-status");
  st.textContent = d.status;
  st.className = `status status-${d.status}`;
  const lu = d.last_update;
  kv($("device-slots"), [
    ["Running", version(d.model, d.version)],
    ["Desired", d.desired ? `${version(d.desired.model, d.desired.version)} (gen ${d.desired.generation})${d.desired.rollback ? ", rollback" : ""}` : "nothing desired"],
    ["Variant", d.desired && d.desired.variant ? d.desired.variant : undefined],
    ["In sync", d.in_sync ? "yes" : "no"],
    ["Converged generation", d.generation != null ? String(d.generation) : null],
    ["Last update", lu ? `${lu.status || lu.result || ""} ${version(lu.model, lu.version)} ${lu.error || lu.reason || ""}`.trim() : null],
    ["Agent", d.agent_version],
    ["Tags", (d.tags || []).join(", ")],
    ["Last seen", ago(d.last_seen).text],
  ]);
  const hw = d.hardware || {};
  kv($("device-hardware"), [
    ["Class", hw.hardware_class || null],
    ["Arch", hw.arch || null],
    ["Cores", hw.cores != null ? String(hw.cores) : null],
    ["RAM", hw.ram_mb != null ? `${hw.ram_mb} MB` : null],
    ["Disk", hw.disk_mb ? `${hw.disk_mb} MB` : undefined],
    ["ISA", hw.isa && hw.isa.length ? hw.isa.join(" ") : undefined],
    ["Providers", hw.providers ? hw.providers.join(", ") : null],
    ["Temperature", hw.temperature_c != null ? `${hw.temperature_c} °C` : undefined],
  ]);
  $("device-placements-body").replaceChildren(...placementRows(d, placed));
  $("device-budget").textContent = budgetText(placed);
  $("device-series-source").textContent = `(${series.source})`;
  drawCharts("device", $("device-charts"), DEVICE_CHARTS, series.metrics, series.span);
  const adapts = events.filter((e) => e.kind === "adaptation" || e.kind.startsWith("adapt."));
  $("device-adaptations-body").replaceChildren(...(adapts.length ? adapts.map(adaptationRow) : [emptyRow(7, "none")]));
  $("device-events-body").replaceChildren(...(events.length ? events.map(eventRow) : [emptyRow(5, "no events yet")]));
}

// -- models and variants --------------------------------------------------------------------------------------

const modelDetails = new Map(); // "name/version/variant" -> detail (manifests do not change)

async function versionDetail(name, v) {
  const variant = v.variant || "default";
  const key = `${name}/${v.version}/${variant}`;
  if (v.manifest) return v;
  if (!modelDetails.has(key)) {
    const q = v.variant ? `?variant=${encodeURIComponent(v.variant)}` : "";
    modelDetails.set(key, await getJSON(`/models/${encodeURIComponent(name)}/${encodeURIComponent(v.version)}${q}`));
  }
  return modelDetails.get(key);
}

async function refreshModels() {
  const models = await getJSON("/models");
  const blocks = [];
  for (const m of models) {
    const versions = await getJSON(`/models/${encodeURIComponent(m.name)}`);
    const block = el("div", "model");
    block.dataset.model = m.name;
    block.appendChild(el("h3", "", `${m.name} `)).appendChild(el("span", "muted", `latest ${m.latest} · ${m.versions.length} version(s)`));
    const table = el("table", "small model-versions");
    const head = el("tr");
    for (const h of ["Version", "Variant", "Profile", "Recipe", "Size", "Latency b1 median", "Latency b1 p95", "Peak RSS", "Metric", "Uploaded", "Key"]) head.appendChild(el("th", "", h));
    table.appendChild(el("thead")).appendChild(head);
    const body = el("tbody");
    for (const v of [...versions].reverse()) {
      const detail = await versionDetail(m.name, v);
      const variant = ((detail.manifest || {}).variant) || {};
      const f = variant.figures || {};
      const tr = el("tr");
      tr.dataset.version = v.version;
      tr.dataset.variant = v.variant || variant.name || "default";
      tr.appendChild(td("", v.version));
      tr.appendChild(td("variant", v.variant || variant.name || "default"));
      tr.appendChild(td("", variant.profile || "—"));
      tr.appendChild(td("", variant.recipe || "—"));
      tr.appendChild(td("num", fmtBytes(f.size_bytes != null ? f.size_bytes : v.size)));
      tr.appendChild(td("num", f.latency_b1_median_ms != null ? `${fmtMs(f.latency_b1_median_ms)} ms` : "—"));
      tr.appendChild(td("num", f.latency_b1_p95_ms != null ? `${fmtMs(f.latency_b1_p95_ms)} ms` : "—"));
      tr.appendChild(td("num", f.peak_rss_mb != null ? `${fmtNum(f.peak_rss_mb)} MB` : "—"));
      tr.appendChild(td("", f.metric ? `${f.metric} ${fmtNum(f.metric_value)}${f.drop != null ? ` (drop ${fmtNum(f.drop)})` : ""}` : "—"));
      tr.appendChild(td("", when(v.uploaded_at)));
      tr.appendChild(td("muted", v.key_id));
      body.appendChild(tr);
    }
    table.appendChild(body);
    block.appendChild(table);
    blocks.push(block);
  }
  if (blocks.length === 0) blocks.push(el("p", "muted", "No models yet. Upload a signed bundle: POST /api/v1/models (or `edgewise release`)."));
  $("models-list").replaceChildren(...blocks);
  fillRolloutForm(models);
}

// -- rollouts -------------------------------------------------------------------------------------------------

const WAVES_TEMPLATE = JSON.stringify([
  { name: "canary", percent: 10, min_reporting: 1, soak_s: 60,
    success: "reporting >= 1 and error_rate <= 0.01",
    error: "failed_fraction > 0.2 or error_rate > 0.05 or p95_ratio > 1.5 or crashes > 0" },
  { name: "all", percent: 100, min_reporting: 1, soak_s: 60,
    success: "reporting >= 1 and error_rate <= 0.01",
    error: "failed_fraction > 0.2 or error_rate > 0.05 or p95_ratio > 1.5 or crashes > 0" },
], null, 2);

let modelsForForm = null;

function fillRolloutForm(models) {
  modelsForForm = models;
  const sel = $("rf-model");
  const keep = sel.value;
  sel.replaceChildren(...models.map((m) => { const o = el("option", "", m.name); o.value = m.name; return o; }));
  if (keep && models.some((m) => m.name === keep)) sel.value = keep;
  fillVersions();
}

function fillVersions() {
  const m = (modelsForForm || []).find((x) => x.name === $("rf-model").value);
  const sel = $("rf-version");
  const keep = sel.value;
  const versions = m ? [...m.versions].reverse() : [];
  sel.replaceChildren(...versions.map((v) => { const o = el("option", "", v); o.value = v; return o; }));
  if (keep && versions.includes(keep)) sel.value = keep;
}

function progressOf(r) {
  if (r.devices == null) return "";
  return `${r.updated}/${r.devices} updated` + (r.reverted ? ` · ${r.reverted} returned to the previous version` : "");
}

function targetOf(r) {
  const t = r.target || {};
  return t.kind ? `${t.kind} ${t.value}` : "—";
}

// Where each hardware class (cohort) stands: "canary: rpi4 soaking, jetson halted".
function cohortStand(r) {
  const cs = r.cohorts || [];
  if (cs.length === 0) return "—";
  const byWave = {};
  for (const c of cs) (byWave[c.wave_name] = byWave[c.wave_name] || []).push(`${c.cohort} ${c.phase}`);
  return Object.entries(byWave).map(([w, l]) => `${w}: ${l.join(", ")}`).join("; ");
}

async function refreshRollouts() {
  if (!modelsForForm) fillRolloutForm(await getJSON("/models"));
  const list = await getJSON("/rollouts");
  const rows = [...list].sort((a, b) => b.id - a.id).map((r) => {
    const tr = el("tr", `rollout rollout-${r.state}`);
    tr.dataset.rollout = r.id;
    const idTd = td("");
    const a = el("a", "", `#${r.id}`);
    a.href = `#/rollouts/${r.id}`;
    idTd.appendChild(a);
    tr.appendChild(idTd);
    tr.appendChild(td("", version(r.model, r.version)));
    tr.appendChild(td("", targetOf(r)));
    tr.appendChild(td(`state state-${r.state}`, r.state));
    tr.appendChild(td("detail", cohortStand(r)));
    tr.appendChild(td("", progressOf(r)));
    tr.appendChild(td("", when(r.created_at)));
    return tr;
  });
  $("rollouts-body").replaceChildren(...(rows.length ? rows : [emptyRow(7, "No rollouts yet.")]));
}

const FIGURE_COLUMNS = ["reporting", "failed", "rolled_back", "error_rate", "p95_ms", "p95_ratio", "crashes",
  "confidence_shift", "drift_score", "shadow_compared", "shadow_agreement"];

// The wave's headline: its cohorts' phases, the most urgent first (a wave may be halted on one hardware class and
// passed on the others).
const PHASE_ORDER = ["halted", "aborted", "waiting_approval", "shadow", "installing", "soaking", "start", "approved",
  "not_started", "passed", "completed"];

function wavePhase(w) {
  const phases = [...new Set((w.cohorts || []).map((c) => c.phase))];
  if (phases.length === 0) return { cls: "not_started", label: "not_started" };
  const rank = (p) => (PHASE_ORDER.includes(p) ? PHASE_ORDER.indexOf(p) : 0);
  phases.sort((a, b) => rank(a) - rank(b));
  return { cls: phases[0], label: phases.join(" / ") };
}

function waveBlock(w, i) {
  const phase = wavePhase(w);
  const block = el("div", `wave wave-${phase.cls}`);
  block.dataset.wave = w.name;
  const title = el("h3", "", `Wave ${i + 1}: ${w.name} `);
  title.appendChild(el("span", `state state-${phase.cls}`, phase.label));
  block.appendChild(title);
  const spec = [];
  if (w.percent != null) spec.push(`${w.percent}% of each hardware class`);
  spec.push(`${w.devices} device(s)`);
  spec.push(`min reporting ${w.min_reporting}`);
  spec.push(`soak ${w.soak_s} s`);
  if (w.shadow_s) spec.push(`shadow ${w.shadow_s} s`);
  if (w.approval) spec.push("manual approval");
  block.appendChild(el("p", "muted", spec.join(" · ")));
  const conds = el("p", "conditions");
  if (w.success) conds.appendChild(el("code", "cond-success", `success: ${w.success}`));
  if (w.error) conds.appendChild(el("code", "cond-error", `error: ${w.error}`));
  block.appendChild(conds);
  const cohorts = w.cohorts || [];
  if (cohorts.length) {
    const table = el("table", "small cohorts");
    const head = el("tr");
    for (const h of ["Hardware class", "Phase", "Updated", ...FIGURE_COLUMNS, "Note"]) head.appendChild(el("th", "", h));
    table.appendChild(el("thead")).appendChild(head);
    const body = el("tbody");
    for (const c of cohorts) {
      const f = c.figures || {};
      const tr = el("tr", `cohort cohort-${c.phase}`);
      tr.dataset.cohort = c.cohort;
      tr.appendChild(td("", c.cohort));
      tr.appendChild(td(`state state-${c.phase}`, c.phase));
      const bar = td("progress");
      const meter = el("meter");
      meter.max = c.devices || 1;
      meter.value = c.updated || 0;
      bar.appendChild(meter);
      bar.appendChild(el("span", "", ` ${c.updated}/${c.devices}${c.reverted ? `, ${c.reverted} reverted` : ""}`));
      tr.appendChild(bar);
      for (const k of FIGURE_COLUMNS) tr.appendChild(td("num", fmtNum(f[k])));
      tr.appendChild(td("detail", c.note || ""));
      body.appendChild(tr);
    }
    table.appendChild(body);
    block.appendChild(table);
  }
  return block;
}

function rolloutDeviceRow(d, r) {
  const tr = el("tr", `rollout-device rollout-device-${d.status}`);
  tr.dataset.device = d.device_id;
  const idTd = td("");
  idTd.appendChild(deviceLink(d.device_id));
  tr.appendChild(idTd);
  tr.appendChild(td("", (r.waves[d.wave] || {}).name || d.wave));
  tr.appendChild(td("", d.cohort));
  tr.appendChild(td(`rollout-status rollout-status-${d.status}`, d.status));
  tr.appendChild(td(d.running === r.version ? "running running-candidate" : "running running-other", d.running || "—"));
  tr.appendChild(td("", d.previous_version || "—"));
  return tr;
}

function decisionRow(d) {
  const tr = el("tr", `decision decision-${d.decision}`);
  tr.appendChild(td("", when(d.at)));
  tr.appendChild(td("", d.wave_name || (d.wave != null ? d.wave : "—")));
  tr.appendChild(td("", d.cohort || "—"));
  tr.appendChild(td(`decision-name decision-name-${d.decision}`, d.decision));
  tr.appendChild(td("detail", (d.reason || "") + (d.actor ? ` (${d.actor})` : "")));
  tr.appendChild(td("detail", figuresText(d.figures)));
  return tr;
}

const ACTIONS_BY_STATE = {
  pending: ["pause", "abort"], running: ["pause", "abort"], waiting_approval: ["approve", "pause", "abort"],
  paused: ["resume", "abort"], halted: [], completed: [], aborted: [],
};

async function refreshRollout(id) {
  const r = await getJSON(`/rollouts/${encodeURIComponent(id)}?devices=true`);
  $("rollout-title").textContent = `#${r.id} ${version(r.model, r.version)}`;
  const st = $("rollout-state");
  st.textContent = r.state;
  st.className = `state state-${r.state}`;
  const meta = [targetOf(r)];
  if (r.rate_limit_per_min) meta.push(`rate limit ${r.rate_limit_per_min}/min`);
  if (r.reason) meta.push(r.reason);
  if (r.created_at) meta.push(`created ${when(r.created_at)}`);
  $("rollout-meta").textContent = meta.join(" · ");
  const allowed = ACTIONS_BY_STATE[r.state] || ["pause", "resume", "approve", "abort"];
  for (const b of document.querySelectorAll("#rollout-actions button")) b.disabled = !allowed.includes(b.dataset.action);
  $("rollout-waves").replaceChildren(...(r.waves || []).map(waveBlock));
  const devs = r.device_list || [];
  $("rollout-devices-body").replaceChildren(...(devs.length ? devs.map((d) => rolloutDeviceRow(d, r)) : [emptyRow(6, "—")]));
  const decisions = [...(r.decisions || [])].reverse();
  $("rollout-decisions-body").replaceChildren(...(decisions.length ? decisions.map(decisionRow) : [emptyRow(6, "none yet")]));
}

async function rolloutAction(action) {
  const route = currentRoute();
  const out = $("rollout-action-result");
  try {
    const body = action === "abort" ? { rollback: $("abort-rollback").checked } : {};
    await request("POST", `/rollouts/${encodeURIComponent(route.id)}/${action}`, body);
    out.textContent = `${action}: done`;
    out.className = "muted";
  } catch (e) {
    out.textContent = `${action} refused: ${e.detail || e.message}`;
    out.className = "error";
  }
  refresh();
}

async function createRollout(ev) {
  ev.preventDefault();
  const err = $("rf-error");
  err.hidden = true;
  let waves;
  try {
    waves = JSON.parse($("rf-waves").value);
  } catch (e) {
    err.textContent = `Waves are not valid JSON: ${e.message}`;
    err.hidden = false;
    return;
  }
  const body = { model: $("rf-model").value, version: $("rf-version").value, waves, start_paused: $("rf-paused").checked };
  const kind = $("rf-target-kind").value;
  const target = $("rf-target").value.trim();
  body[kind] = kind === "devices" ? target.split(",").map((s) => s.trim()).filter(Boolean) : target;
  if ($("rf-rate").value) body.rate_limit_per_min = Number($("rf-rate").value);
  try {
    const r = await request("POST", "/rollouts", body);
    $("rollout-create").open = false;
    location.hash = `#/rollouts/${r.id}`;
  } catch (e) {
    err.textContent = `Not started: ${e.detail || e.message}`;
    err.hidden = false;
  }
}

// -- alerts ---------------------------------------------------------------------------------------------------

function alertRow(a) {
  const status = a.status === "open" ? "firing" : a.status;
  const tr = el("tr", `alert-row alert-status-${status}`);
  tr.dataset.alert = a.id;
  tr.appendChild(td("", when(a.opened_at)));
  tr.appendChild(td(`alert-status alert-status-${status}`, status));
  tr.appendChild(td(`severity severity-${a.severity}`, a.severity));
  tr.appendChild(td("", a.kind));
  const dev = td("");
  if (a.device_id) dev.appendChild(deviceLink(a.device_id));
  else dev.textContent = "—";
  tr.appendChild(dev);
  tr.appendChild(td("", a.model ? version(a.model, a.version) : "—"));
  tr.appendChild(td("message", a.message));
  const act = td("actions");
  const button = (cls, label, path) => {
    const b = el("button", cls, label);
    b.type = "button";
    b.addEventListener("click", async () => {
      b.disabled = true;
      try {
        await request("POST", `/alerts/${a.id}/${path}`, {});
      } catch (e) {
        act.appendChild(el("span", "error", ` ${e.detail || e.message}`));
      }
      refresh();
    });
    act.appendChild(b);
  };
  if (status === "acknowledged" && a.acknowledged_by) act.appendChild(el("span", "muted", `by ${a.acknowledged_by} `));
  if (isOperator() && status === "firing") button("ack", "Acknowledge", "ack");
  if (isOperator() && status !== "resolved") button("resolve", "Resolve", "resolve");
  tr.appendChild(act);
  return tr;
}

async function refreshAlerts(all) {
  const want = $("alerts-status").value;
  const norm = (a) => (a.status === "open" ? "firing" : a.status);
  const shown = all.filter((a) => (want === "" ? true : want === "active" ? norm(a) !== "resolved" : norm(a) === want));
  $("alerts-body").replaceChildren(...(shown.length ? shown.map(alertRow) : [emptyRow(8, "No alerts.")]));
}

async function refreshAlertBadge(all) {
  const firing = all.filter((a) => a.status === "firing" || a.status === "open").length;
  const b = $("nav-alerts");
  b.textContent = String(firing);
  b.hidden = firing === 0;
}

// -- audit ----------------------------------------------------------------------------------------------------

function auditRow(e) {
  const tr = el("tr");
  tr.appendChild(td("", new Date(e.at).toLocaleString()));
  tr.appendChild(td("", e.actor));
  tr.appendChild(td("", e.role || "—"));
  tr.appendChild(td("", e.action));
  tr.appendChild(td("", e.target));
  tr.appendChild(td("num", e.status));
  tr.appendChild(td("", e.remote || "—"));
  tr.appendChild(td("detail", Object.keys(e.detail || {}).length ? JSON.stringify(e.detail) : ""));
  return tr;
}

async function refreshAudit() {
  const section = $("audit");
  if (!isOperator()) {
    section.hidden = true;
    $("error").textContent = "The audit log is for operators and admins.";
    $("error").hidden = false;
    return;
  }
  const entries = await getJSON("/audit?limit=200");
  $("audit-body").replaceChildren(...entries.map(auditRow));
  section.hidden = false;
}

// -- drift: per-device scores, peer outliers (a broken device) and fleet-wide shift (the world changed) --------

const DRIFT_LABEL = { peer_outlier: "peer outlier", drifted: "drifted with fleet", ok: "ok", insufficient_data: "too few samples" };
const FLEET_LABEL = { fleet_shift: "fleet-wide shift", ok: "fleet ok", no_reference: "no reference statistics", insufficient_data: "too few samples" };

function fmtScore(d) {
  return d ? d.score.toFixed(2) : "—";
}

function driftRow(report, d) {
  const tr = el("tr", `drift-${d.status}`);
  tr.dataset.device = d.device_id;
  tr.appendChild(td("device", d.device_id));
  tr.appendChild(td("", version(report.model, report.version)));
  tr.appendChild(td(`drift-status drift-status-${d.status}`, DRIFT_LABEL[d.status] || d.status));
  tr.appendChild(td("num", fmtScore(d.reference)));
  tr.appendChild(td("num", fmtScore(d.peers)));
  tr.appendChild(td("num", d.peer_z != null ? d.peer_z.toFixed(1) : "—"));
  const worst = d.status === "peer_outlier" ? d.peers : d.reference;
  tr.appendChild(td("", worst && worst.worst ? worst.worst : "—"));
  tr.appendChild(td("num", d.n));
  return tr;
}

async function refreshDrift() {
  const section = $("drift");
  const overview = await getJSON("/drift");
  $("drift-empty").hidden = overview.length > 0;
  const reports = await Promise.all(overview.map((o) =>
    getJSON(`/drift/${encodeURIComponent(o.model)}/${encodeURIComponent(o.version)}`)));
  // open drift alerts: "firing"/"acknowledged" (issue 7's alerting), "open" before it
  const alerts = (await getJSON("/alerts?kind=drift.&limit=50")).filter((a) => a.status !== "resolved");
  const fleetItems = reports.map((r) => el("li", `drift-fleet-${r.status}`,
    `${version(r.model, r.version)}: ${FLEET_LABEL[r.status] || r.status}` +
    (r.pooled ? ` (pooled score ${r.pooled.score.toFixed(2)}${r.pooled.worst ? ", worst " + r.pooled.worst : ""})` : "") +
    ` · ${r.devices.length} devices · peer outliers: ${r.outliers.length ? r.outliers.join(", ") : "none"}`));
  $("drift-fleet").replaceChildren(...fleetItems);
  const rows = [];
  for (const r of reports) for (const d of r.devices) rows.push(driftRow(r, d));
  $("drift-body").replaceChildren(...rows);
  const items = alerts.map((a) => el("li", `alert alert-${a.kind.replace(".", "-")}`,
    `${new Date(a.opened_at).toLocaleString()} · ${a.kind} · ${a.message}`));
  if (items.length === 0) items.push(el("li", "muted", "none"));
  $("drift-alerts").replaceChildren(...items);
  section.hidden = false;
}

// -- the refresh loop -----------------------------------------------------------------------------------------

let lastPage = null;
// -- federated jobs (issue 8): GET /fl/jobs, /fl/jobs/{id} ---------------------------------------------------

chartSets.fl = new Map();

function fmtAcc(v) { return v === null || v === undefined ? "—" : v.toFixed(3); }

function epsilonText(j, withDelta) {
  if (j.epsilon_budget === null || j.epsilon_budget === undefined) return "no DP";
  const spent = `${j.epsilon === null || j.epsilon === undefined ? "0" : j.epsilon.toFixed(2)} / ${+j.epsilon_budget.toFixed(3)}`;
  return withDelta ? `${spent} (δ ${j.delta})` : spent;
}

async function refreshFLJobs() {
  const jobs = await getJSON("/fl/jobs");
  const rows = [...jobs].sort((a, b) => (a.created_at < b.created_at ? 1 : -1)).map((j) => {
    const tr = el("tr", `fl-job fl-job-${j.state}`);
    tr.dataset.job = j.id;
    const idTd = td("");
    const a = el("a", "", j.id);
    a.href = `#/fl/${encodeURIComponent(j.id)}`;
    idTd.appendChild(a);
    tr.appendChild(idTd);
    tr.appendChild(td("", j.name || "—"));
    tr.appendChild(td("", version(j.model, j.base_version)));
    tr.appendChild(td(`state state-${j.state}`, j.state));
    tr.appendChild(td("num", `${fmtAcc(j.base_accuracy)} → ${fmtAcc(j.accuracy)}`));
    tr.appendChild(td("num fl-epsilon", epsilonText(j)));
    const u = j.updates || {};
    tr.appendChild(td("num", `${u.used || 0} / ${(u.rejected || 0) + (u.stale || 0)}`));
    tr.appendChild(td("", j.result_version ? version(j.model, j.result_version) : "—"));
    tr.appendChild(td("", when(j.created_at)));
    return tr;
  });
  $("fl-body").replaceChildren(...(rows.length ? rows : [emptyRow(9, "No federated jobs yet: edgewise fl start JOB.toml")]));
}

// Per-round charts: x is the round number (not time); ε with its budget as a flat line.
function drawRoundCharts(box, j) {
  const charts = chartSets.fl;
  const closed = (j.rounds || []).filter((r) => r.state === "closed");
  const xs = closed.map((r) => r.number);
  const specs = [{ title: "Accuracy per round", series: [["accuracy", closed.map((r) => r.accuracy)]] }];
  if (j.epsilon_budget !== null && j.epsilon_budget !== undefined) {
    specs.push({ title: "ε spent", series: [["epsilon", closed.map((r) => r.epsilon)], ["budget", closed.map(() => j.epsilon_budget)]] });
  }
  const width = Math.max(280, Math.min(560, (box.clientWidth || 900) / 2 - 16));
  for (const spec of specs) {
    const entry = charts.get(spec.title);
    const data = [xs, ...spec.series.map((s) => s[1])];
    if (xs.length === 0) {
      if (entry) { entry.plot.destroy(); entry.wrap.remove(); charts.delete(spec.title); }
      continue;
    }
    if (entry) { entry.plot.setData(data); continue; }
    const wrap = el("div", "chart");
    wrap.dataset.chart = spec.title;
    box.appendChild(wrap);
    if (typeof uPlot === "undefined") {
      wrap.textContent = `${spec.title}: ${spec.series.map((s) => `${s[0]} ${fmtNum(s[1].at(-1))}`).join(", ")}`;
      charts.set(spec.title, { plot: { destroy() {}, setData() {} }, key: "", wrap });
      continue;
    }
    const opts = {
      title: spec.title, width, height: 170,
      scales: { x: { time: false, range: (u, min, max) => (min === max ? [min - 1, max + 1] : [min, max]) },
        y: { range: (u, min, max) => (min === max ? [Math.min(0, min), max > 0 ? max * 1.25 : 1] : uPlot.rangeNum(min, max, 0.1, true)) } },
      series: [{ label: "round" }, ...spec.series.map((s, i) => ({ label: s[0], stroke: COLORS[i % COLORS.length], width: 1.5,
        dash: s[0] === "budget" ? [6, 4] : undefined, points: { show: true } }))],
      axes: [{ label: "round", incrs: [1, 2, 5, 10, 20, 50, 100] }, { size: 56 }],
    };
    charts.set(spec.title, { plot: new uPlot(opts, data, wrap), key: "", wrap });
  }
}

function flRoundRow(r) {
  const tr = el("tr", `fl-round fl-round-${r.state}`);
  tr.dataset.round = r.number;
  tr.appendChild(td("num", r.number));
  tr.appendChild(td(`state state-${r.state}`, r.state));
  tr.appendChild(td("num", (r.cohort || []).length));
  const p = r.participants || [];
  const pc = td("num", p.length);
  pc.title = p.join(", ");
  tr.appendChild(pc);
  tr.appendChild(td("num", r.used));
  tr.appendChild(td("num", r.late));
  tr.appendChild(td("num", r.rejected));
  tr.appendChild(td("num", r.clipped));
  tr.appendChild(td("num", fmtAcc(r.accuracy)));
  tr.appendChild(td("num fl-round-epsilon", r.epsilon === null || r.epsilon === undefined ? "—" : r.epsilon.toFixed(3)));
  tr.appendChild(td("", r.closed_at ? when(r.closed_at) : (r.state === "open" ? `closes ${when(r.deadline_at)}` : "—")));
  return tr;
}

async function refreshFLJob(id) {
  const j = await getJSON(`/fl/jobs/${encodeURIComponent(id)}`);
  $("fl-job-title").textContent = `${j.name || j.id} (${version(j.model, j.base_version)})`;
  const st = $("fl-job-state");
  st.textContent = j.state;
  st.className = `state state-${j.state}`;
  const meta = [`accuracy ${fmtAcc(j.base_accuracy)} → ${fmtAcc(j.accuracy)}`, `ε ${epsilonText(j, true)}`];
  if (j.noise_multiplier) meta.push(`noise multiplier ${j.noise_multiplier.toFixed(3)}`);
  if (j.result_version) meta.push(`result ${version(j.model, j.result_version)}`);
  if (j.reason) meta.push(j.reason);
  $("fl-job-meta").textContent = meta.join(" · ");
  drawRoundCharts($("fl-job-charts"), j);
  const rounds = [...(j.rounds || [])].reverse();
  $("fl-rounds-body").replaceChildren(...(rounds.length ? rounds.map(flRoundRow) : [emptyRow(11, "no round yet")]));
  const rej = (j.rejected_updates || []).map((u) => {
    const tr = el("tr", "fl-rejected");
    for (const [cls, v] of [["", u.device_id], ["num", u.round], ["", u.status], ["detail", u.reason]]) tr.appendChild(td(cls, v));
    return tr;
  });
  $("fl-rejected-body").replaceChildren(...(rej.length ? rej : [emptyRow(4, "none")]));
}

let refreshing = false;

let again = false;

async function refresh() {
  if (refreshing) { again = true; return; } // a click or a route change during a refresh: run once more after it
  refreshing = true;
  again = false;
  const errorEl = $("error");
  try {
    if (!me) await whoami();
    const route = currentRoute();
    const pageKey = `${route.page}/${route.id || ""}`;
    if (pageKey !== lastPage) {
      if (lastPage && lastPage.startsWith("device/")) destroyCharts("device");
      if (lastPage && lastPage.startsWith("fleet/")) destroyCharts("fleet");
      if (lastPage && lastPage.startsWith("fljob/")) destroyCharts("fl");
      showPage(route);
      lastPage = pageKey;
    }
    errorEl.hidden = true;
    const [devices, stats, health, alerts] = await Promise.all([
      getJSON("/devices"), getJSON("/stats"), getJSON("/health"), getJSON("/alerts?limit=500")]);
    const online = devices.filter((d) => d.status === "online").length;
    const synced = devices.filter((d) => d.in_sync).length;
    const i = stats.ingest;
    $("summary").textContent =
      `${devices.length} devices · ${online} online · ${synced} on desired version · ` +
      `${i.telemetry_rows} samples, ${i.duplicates} duplicates, ${i.bad} bad messages`;
    $("health").textContent =
      `server ${health.status} · broker ${health.mqtt.connected ? "connected" : "DISCONNECTED"} (${health.mqtt.embedded ? "embedded" : "external"})`;
    if (route.page === "fleet") await refreshFleet(devices);
    else if (route.page === "device") await refreshDevice(route.id);
    else if (route.page === "models") await refreshModels();
    else if (route.page === "rollouts") await refreshRollouts();
    else if (route.page === "rollout") await refreshRollout(route.id);
    else if (route.page === "alerts") await refreshAlerts(alerts);
    else if (route.page === "drift") await refreshDrift();
    else if (route.page === "audit") await refreshAudit();
    else if (route.page === "fl") await refreshFLJobs();
    else if (route.page === "fljob") await refreshFLJob(route.id);
    await refreshAlertBadge(alerts);
  } catch (e) {
    if (e instanceof Unauthorized) {
      if ($("login").hidden) showLogin(me ? "your session ended; sign in again" : "");
      return;
    }
    errorEl.textContent = e instanceof HttpError ? `Cannot show this page (${e.message})` : `Cannot reach the control plane (${e.message}); retrying…`;
    errorEl.hidden = false;
  } finally {
    refreshing = false;
    if (again) setTimeout(refresh, 0);
  }
}

$("login-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const body = JSON.stringify({ username: $("login-username").value, password: $("login-password").value });
  const r = await fetch(API + "/auth/login", {
    method: "POST", body, credentials: "same-origin",
    headers: { "Content-Type": "application/json", Accept: "application/json" },
  });
  if (!r.ok) {
    showLogin(r.status === 401 ? "wrong username or password" : `sign-in failed: HTTP ${r.status}`);
    return;
  }
  $("login-password").value = "";
  me = null;
  refresh();
});

$("logout").addEventListener("click", async () => {
  await fetch(API + "/auth/logout", { method: "POST", headers: authHeaders(), credentials: "same-origin" });
  showLogin("signed out");
});

$("rf-waves").value = WAVES_TEMPLATE;
$("rf-model").addEventListener("change", fillVersions);
$("rollout-form").addEventListener("submit", createRollout);
for (const b of document.querySelectorAll("#rollout-actions button")) b.addEventListener("click", () => rolloutAction(b.dataset.action));
$("alerts-status").addEventListener("change", () => refresh());
for (const w of ["device-window", "fleet-window"]) $(w).addEventListener("change", () => refresh());
window.addEventListener("hashchange", () => {
  if (takeTokenFromFragment()) me = null; // a link with another token, opened in this tab: act as its user
  refresh();
});

refresh();
setInterval(() => { if (me) refresh(); }, REFRESH_MS);
