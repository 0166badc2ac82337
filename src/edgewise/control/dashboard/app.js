// Fleet dashboard: polls the REST API every 2 s and redraws the table. No build step, no network
// beyond this server. Device-provided strings are inserted with textContent only (never as HTML).
//
// Authentication: a session cookie (HttpOnly, SameSite=Strict) from the sign-in form; changes send the
// X-CSRF-Token header read from the edgewise_csrf cookie. For wall displays, a (viewer) API token may be given
// once in the URL fragment, /#token=ewu_..., which never reaches the server's logs: it is kept in
// sessionStorage and removed from the address bar at once.
"use strict";

const API = "/api/v1";
const TOKEN_KEY = "edgewise.token";
let me = null;

(function takeTokenFromFragment() {
  const m = /(?:^#|&)token=([^&]+)/.exec(location.hash);
  if (m) {
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
})();

function authHeaders(extra) {
  const h = Object.assign({ Accept: "application/json" }, extra || {});
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) h.Authorization = `Bearer ${token}`;
  const csrf = /(?:^|; )edgewise_csrf=([^;]+)/.exec(document.cookie);
  if (csrf) h["X-CSRF-Token"] = decodeURIComponent(csrf[1]);
  return h;
}

class Unauthorized extends Error {}
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
  const r = await fetch(API + path, { headers: authHeaders(), cache: "no-store", credentials: "same-origin" });
  if (r.status === 401) throw new Unauthorized(path);
  if (!r.ok) throw new Error(`${path}: HTTP ${r.status}`);
  return r.json();
}

function showLogin(message) {
  me = null;
  sessionStorage.removeItem(TOKEN_KEY);
  document.getElementById("main").hidden = true;
  document.getElementById("whoami").hidden = true;
  document.getElementById("login").hidden = false;
  document.getElementById("summary").textContent = "sign in to see the fleet";
  const err = document.getElementById("login-error");
  err.textContent = message || "";
  err.hidden = !message;
}

async function whoami() {
  me = await getJSON("/auth/me");
  if (me.kind !== "user") throw new Unauthorized("/auth/me");
  document.getElementById("login").hidden = true;
  document.getElementById("main").hidden = false;
  document.getElementById("whoami").hidden = false;
  document.getElementById("whoami-name").textContent = `${me.name} (${me.role})`;
  document.getElementById("logout").hidden = me.via !== "cookie";
}

function auditRow(e) {
  const tr = el("tr");
  tr.appendChild(el("td", "", new Date(e.at).toLocaleString()));
  tr.appendChild(el("td", "", e.actor));
  tr.appendChild(el("td", "", e.role || "—"));
  tr.appendChild(el("td", "", e.action));
  tr.appendChild(el("td", "", e.target));
  tr.appendChild(el("td", "num", e.status));
  tr.appendChild(el("td", "", e.remote || "—"));
  tr.appendChild(el("td", "detail", Object.keys(e.detail || {}).length ? JSON.stringify(e.detail) : ""));
  return tr;
}

async function refreshAudit() {
  const section = document.getElementById("audit");
  if (!me || (me.role !== "operator" && me.role !== "admin")) {
    section.hidden = true;
    return;
  }
  const entries = await getJSON("/audit?limit=50");
  document.getElementById("audit-body").replaceChildren(...entries.map(auditRow));
  section.hidden = false;
}

// -- drift: per-device scores, peer outliers (a broken device) and fleet-wide shift (the world changed) --

const DRIFT_LABEL = { peer_outlier: "peer outlier", drifted: "drifted with fleet", ok: "ok", insufficient_data: "too few samples" };
const FLEET_LABEL = { fleet_shift: "fleet-wide shift", ok: "fleet ok", no_reference: "no reference statistics", insufficient_data: "too few samples" };

function fmtScore(d) {
  return d ? d.score.toFixed(2) : "—";
}

function driftRow(report, d) {
  const tr = el("tr", `drift-${d.status}`);
  tr.dataset.device = d.device_id;
  tr.appendChild(el("td", "device", d.device_id));
  tr.appendChild(el("td", "", version(report.model, report.version)));
  tr.appendChild(el("td", `drift-status drift-status-${d.status}`, DRIFT_LABEL[d.status] || d.status));
  tr.appendChild(el("td", "num", fmtScore(d.reference)));
  tr.appendChild(el("td", "num", fmtScore(d.peers)));
  tr.appendChild(el("td", "num", d.peer_z != null ? d.peer_z.toFixed(1) : "—"));
  const worst = d.status === "peer_outlier" ? d.peers : d.reference;
  tr.appendChild(el("td", "", worst && worst.worst ? worst.worst : "—"));
  tr.appendChild(el("td", "num", d.n));
  return tr;
}

async function refreshDrift() {
  const section = document.getElementById("drift");
  const overview = await getJSON("/drift");
  if (overview.length === 0) {
    section.hidden = true;
    return;
  }
  const reports = await Promise.all(overview.map((o) =>
    getJSON(`/drift/${encodeURIComponent(o.model)}/${encodeURIComponent(o.version)}`)));
  const alerts = await getJSON("/alerts?status=open&kind=drift.&limit=50");
  const fleetItems = reports.map((r) => {
    const li = el("li", `drift-fleet-${r.status}`,
      `${version(r.model, r.version)}: ${FLEET_LABEL[r.status] || r.status}` +
      (r.pooled ? ` (pooled score ${r.pooled.score.toFixed(2)}${r.pooled.worst ? ", worst " + r.pooled.worst : ""})` : "") +
      ` · ${r.devices.length} devices · peer outliers: ${r.outliers.length ? r.outliers.join(", ") : "none"}`);
    return li;
  });
  document.getElementById("drift-fleet").replaceChildren(...fleetItems);
  const rows = [];
  for (const r of reports) for (const d of r.devices) rows.push(driftRow(r, d));
  document.getElementById("drift-body").replaceChildren(...rows);
  const items = alerts.map((a) => el("li", `alert alert-${a.kind.replace(".", "-")}`,
    `${new Date(a.opened_at).toLocaleString()} · ${a.kind} · ${a.message}`));
  if (items.length === 0) items.push(el("li", "muted", "none"));
  document.getElementById("drift-alerts").replaceChildren(...items);
  section.hidden = false;
}

async function refresh() {
  const errorEl = document.getElementById("error");
  try {
    if (!me) await whoami();
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
    await refreshAudit();
    await refreshDrift();
    errorEl.hidden = true;
  } catch (e) {
    if (e instanceof Unauthorized) {
      if (document.getElementById("login").hidden) showLogin(me ? "your session ended; sign in again" : "");
      return;
    }
    errorEl.textContent = `Cannot reach the control plane (${e.message}); retrying…`;
    errorEl.hidden = false;
  }
}

document.getElementById("login-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const body = JSON.stringify({
    username: document.getElementById("login-username").value,
    password: document.getElementById("login-password").value,
  });
  const r = await fetch(API + "/auth/login", {
    method: "POST", body, credentials: "same-origin",
    headers: { "Content-Type": "application/json", Accept: "application/json" },
  });
  if (!r.ok) {
    showLogin(r.status === 401 ? "wrong username or password" : `sign-in failed: HTTP ${r.status}`);
    return;
  }
  document.getElementById("login-password").value = "";
  me = null;
  refresh();
});

document.getElementById("logout").addEventListener("click", async () => {
  await fetch(API + "/auth/logout", { method: "POST", headers: authHeaders(), credentials: "same-origin" });
  showLogin("signed out");
});

refresh();
setInterval(() => { if (me) refresh(); }, REFRESH_MS);
