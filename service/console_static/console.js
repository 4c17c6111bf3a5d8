// The tinker-jax web console (service/console.py): one page that reads the server's JSON
// routes with the API key the user signs in with. The key lives in sessionStorage (this tab
// only) and travels as the X-API-Key header, never in a URL. Every value shown is set as text
// (never parsed as HTML); curves are plain SVG.
"use strict";

const API = "/api/v1";
const KEY = "tinker-jax-api-key";
const SVG = "http://www.w3.org/2000/svg";
const PAGE = 1000; // items per listing request (the server's largest page)
const LOAD_POLL_MS = 5000; // how often the operator view refreshes
// Curves: the SVG's size in its own units, and the margin kept for the axis labels.
const CHART = { width: 640, height: 220, left: 64, right: 12, top: 12, bottom: 28 };
const KIND_ORDER = ["forward_backward", "forward", "optim_step"];
const MAX_DOTS = 200; // a series this long or shorter also marks each point (with its value)

// `shown` counts the views asked for: a view's answer that comes after a newer one was asked
// for (or after signing out) is dropped.
const state = { admin: false, user: "", timer: null, lastLoad: null, shown: 0 };

class ApiError extends Error {
  constructor(status, detail) {
    super(`${status}: ${detail}`);
    this.status = status;
  }
}

// ------------------------------------------------------------------ plumbing

function apiKey() {
  return sessionStorage.getItem(KEY);
}

// A JSON route of the server, with the key as a header; ApiError for a non-2xx answer.
async function api(path, { method = "GET", body } = {}) {
  const headers = { "X-API-Key": apiKey() || "" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(API + path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    cache: "no-store",
    credentials: "omit",
  });
  const text = await response.text();
  let value = null;
  try {
    value = text ? JSON.parse(text) : null;
  } catch (e) {
    value = null;
  }
  if (!response.ok) {
    throw new ApiError(response.status, (value && value.detail) || text || response.statusText);
  }
  return value;
}

// Every item of a paged listing (`{<field>: [...], cursor: {total_count}}`).
async function listAll(path, field) {
  const items = [];
  for (;;) {
    const sep = path.includes("?") ? "&" : "?";
    const page = await api(`${path}${sep}limit=${PAGE}&offset=${items.length}`);
    items.push(...page[field]);
    if (page[field].length === 0 || items.length >= page.cursor.total_count) return items;
  }
}

// An element with attributes (`on…` ones are listeners) and children (strings become text).
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child !== undefined && child !== null) node.append(child);
  }
  return node;
}

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  for (const child of children) node.append(child);
  return node;
}

// Puts `nodes` in the page; `render` then names the view they make (main's data-view).
function show(...nodes) {
  const main = document.getElementById("main");
  delete main.dataset.view;
  main.replaceChildren(...nodes.filter((node) => node !== null && node !== undefined));
}

function table(headings, rows, attrs = {}) {
  return el(
    "table",
    attrs,
    el("thead", {}, el("tr", {}, headings.map((h) => el("th", {}, h)))),
    el("tbody", {}, rows),
  );
}

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) {
    n /= 1000;
    i += 1;
  }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function duration(seconds) {
  const s = Math.abs(seconds);
  if (s < 90) return `${Math.round(s)} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  if (s < 172800) return `${Math.round(s / 3600)} h`;
  return `${Math.round(s / 86400)} d`;
}

function age(iso) {
  return iso ? `${duration((Date.now() - Date.parse(iso)) / 1000)} ago` : "–";
}

function number(v) {
  if (v === null || v === undefined) return "–";
  const tiny = v !== 0 && Math.abs(v) < 1e-3;
  return Math.abs(v) >= 1e4 || tiny ? v.toExponential(3) : v.toPrecision(4);
}

function runLink(id) {
  return el("a", { href: `#/runs/${encodeURIComponent(id)}`, class: "run-link" }, id);
}

function failure(error) {
  return el("p", { class: "error", role: "alert" }, String(error.message || error));
}

// ------------------------------------------------------------------ sign-in

function signInView(message) {
  state.shown += 1;
  document.getElementById("nav").hidden = true;
  const template = document.getElementById("sign-in-template");
  const form = template.content.firstElementChild.cloneNode(true);
  form.querySelector("#sign-in-error").textContent = message || "";
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = form.querySelector("#api-key").value.trim();
    sessionStorage.setItem(KEY, key);
    try {
      await identify();
    } catch (e) {
      sessionStorage.removeItem(KEY);
      form.querySelector("#sign-in-error").textContent =
        e.status === 401 ? "This key is not valid here." : String(e.message);
      return;
    }
    if (!location.hash || location.hash === "#/" || location.hash === "#") location.hash = "#/runs";
    else route();
  });
  show(form);
  form.querySelector("#api-key").focus();
}

// Who the key belongs to, and whether it may see the operator view (403 for other keys).
async function identify() {
  const me = await api("/auth/apikey/me");
  state.user = me.details.user_details.email;
  try {
    await api("/console/load");
    state.admin = true;
  } catch (e) {
    if (e.status !== 403 && e.status !== 404) throw e;
    state.admin = false;
  }
  document.getElementById("who").textContent = state.user;
  document.getElementById("operator-link").hidden = !state.admin;
  document.getElementById("nav").hidden = false;
}

function signOut(message) {
  clearTimeout(state.timer);
  sessionStorage.removeItem(KEY);
  state.user = "";
  state.admin = false;
  history.replaceState(null, "", "/console");
  signInView(message);
}

// ------------------------------------------------------------------ runs

async function runsView() {
  const runs = await listAll("/training_runs?access_scope=owned", "training_runs");
  const rows = runs.map((r) =>
    el(
      "tr",
      { "data-run": r.training_run_id },
      el("td", {}, runLink(r.training_run_id)),
      el("td", {}, r.base_model),
      el("td", {}, String(r.lora_rank)),
      el("td", {}, age(r.last_request_time)),
      el("td", {}, r.last_checkpoint ? r.last_checkpoint.checkpoint_id : "–"),
    ),
  );
  return [
    el("h1", {}, "Training runs"),
    runs.length
      ? table(["Run", "Base model", "LoRA rank", "Last request", "Last checkpoint"], rows, {
          id: "runs",
        })
      : el("p", {}, "No training runs yet."),
  ];
}

async function runView(runId) {
  const path = `/training_runs/${encodeURIComponent(runId)}`;
  const [run, history, checkpoints] = await Promise.all([
    api(path),
    api(`${path}/metric_history`),
    listAll(`${path}/checkpoints`, "checkpoints"),
  ]);
  const charts = seriesOf(history.points).map(chart);
  return [
    el("h1", {}, "Run ", el("code", {}, run.training_run_id)),
    el(
      "p",
      { class: "facts" },
      `${run.base_model} · LoRA rank ${run.lora_rank} · ` +
        `last request ${age(run.last_request_time)}`,
    ),
    el("h2", {}, "Loss and metrics"),
    charts.length
      ? el("div", { class: "charts" }, charts)
      : el("p", {}, "No forward_backward or optim_step has finished yet."),
    el(
      "p",
      { class: "note" },
      `${history.points.length} points; the newest ${history.max_points} are kept per run.`,
    ),
    el("h2", {}, "Checkpoints"),
    checkpointTable(checkpoints),
  ];
}

// The history's points as one series per (kind, metric), each [{step, value}] in order.
function seriesOf(points) {
  const byKey = new Map();
  for (const p of points) {
    for (const [name, value] of Object.entries(p.metrics)) {
      const key = `${p.kind}\u0000${name}`;
      if (!byKey.has(key)) byKey.set(key, { kind: p.kind, metric: name, points: [] });
      byKey.get(key).points.push({ step: p.step, value });
    }
  }
  const rank = (s) => [KIND_ORDER.indexOf(s.kind), s.metric.startsWith("loss") ? 0 : 1, s.metric];
  return [...byKey.values()].sort((a, b) => {
    const [x, y] = [rank(a), rank(b)];
    return x[0] - y[0] || x[1] - y[1] || x[2].localeCompare(y[2]);
  });
}

// One series as an SVG line chart: x is the step (points of one step spread across it), y the
// value; a null (non-finite) value breaks the line.
function chart(series) {
  const pts = series.points;
  const perStep = new Map();
  for (const p of pts) perStep.set(p.step, (perStep.get(p.step) || 0) + 1);
  const seen = new Map();
  const xs = pts.map((p) => {
    const i = seen.get(p.step) || 0;
    seen.set(p.step, i + 1);
    return p.step + i / perStep.get(p.step);
  });
  const values = pts.map((p) => p.value).filter((v) => v !== null);
  const [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  let [y0, y1] = values.length ? [Math.min(...values), Math.max(...values)] : [0, 1];
  if (y0 === y1) [y0, y1] = [y0 - 1, y1 + 1];
  const c = CHART;
  const across = (x) => (x1 === x0 ? 0.5 : (x - x0) / (x1 - x0));
  const px = (x) => c.left + across(x) * (c.width - c.left - c.right);
  const py = (y) => c.top + (1 - (y - y0) / (y1 - y0)) * (c.height - c.top - c.bottom);
  let d = "";
  let pen = "M";
  const dots = [];
  pts.forEach((p, i) => {
    if (p.value === null) {
      pen = "M";
      return;
    }
    const [x, y] = [px(xs[i]).toFixed(1), py(p.value).toFixed(1)];
    d += `${pen}${x} ${y} `;
    pen = "L";
    if (pts.length <= MAX_DOTS) {
      const title = svg("title", {}, document.createTextNode(`step ${p.step}: ${p.value}`));
      dots.push(svg("circle", { cx: x, cy: y, r: 2.5 }, title));
    }
  });
  const label = (x, y, text, anchor) =>
    svg("text", { x, y, "text-anchor": anchor, class: "axis" }, document.createTextNode(text));
  const bottom = c.height - c.bottom;
  const picture = svg(
    "svg",
    {
      viewBox: `0 0 ${c.width} ${c.height}`,
      class: "chart",
      role: "img",
      "data-kind": series.kind,
      "data-metric": series.metric,
      "data-points": values.length,
    },
    svg("title", {}, document.createTextNode(`${series.metric} (${series.kind})`)),
    svg("line", { x1: c.left, y1: bottom, x2: c.width - c.right, y2: bottom, class: "frame" }),
    svg("line", { x1: c.left, y1: c.top, x2: c.left, y2: bottom, class: "frame" }),
    label(c.left - 6, c.top + 10, number(y1), "end"),
    label(c.left - 6, bottom, number(y0), "end"),
    label(c.left, c.height - 8, `step ${x0}`, "start"),
    label(c.width - c.right, c.height - 8, `step ${Math.floor(x1)}`, "end"),
    svg("path", { d: d.trim(), class: "line" }),
    ...dots,
  );
  const last = values.length ? number(values[values.length - 1]) : "–";
  return el(
    "figure",
    { class: "chart-box" },
    el("figcaption", {}, el("strong", {}, series.metric), ` ${series.kind} · last ${last}`),
    picture,
  );
}

// ------------------------------------------------------------------ checkpoints

async function checkpointsView() {
  const checkpoints = await listAll("/checkpoints", "checkpoints");
  return [el("h1", {}, "Checkpoints"), checkpointTable(checkpoints)];
}

// The checkpoints with their actions, each of which redraws the page once done.
function checkpointTable(checkpoints) {
  if (!checkpoints.length) return el("p", {}, "No checkpoints.");
  const rows = checkpoints.map((c) => {
    const [, run] = c.tinker_path.match(/^tinker:\/\/([^/]+)\//) || [];
    const id = c.checkpoint_id.split("/").map(encodeURIComponent).join("/");
    const base = `/training_runs/${encodeURIComponent(run)}/checkpoints/${id}`;
    const status = el("td", { class: "actions" });
    const act = (label, question, method, path, body) =>
      el(
        "button",
        {
          type: "button",
          class: `action-${label.toLowerCase()}`,
          onclick: () =>
            confirmIn(status, `${question} ${c.tinker_path}?`, label, async () => {
              await api(base + path, { method, body });
              await route();
            }),
        },
        label,
      );
    const ttl = el("input", {
      type: "number",
      min: 1,
      placeholder: "TTL seconds",
      class: "ttl-input",
      "aria-label": `TTL of ${c.tinker_path} in seconds from now (empty: never expires)`,
    });
    status.append(
      c.public
        ? act("Unpublish", "Make private", "DELETE", "/publish")
        : act("Publish", "Let every key load", "POST", "/publish"),
      ttl,
      el(
        "button",
        {
          type: "button",
          class: "action-ttl",
          onclick: async () => {
            const seconds = ttl.value === "" ? null : Number(ttl.value);
            await guarded(status, () =>
              api(base + "/ttl", { method: "PUT", body: { ttl_seconds: seconds } }),
            );
            await route();
          },
        },
        "Set TTL",
      ),
      act("Delete", "Delete", "DELETE", ""),
    );
    if (c.checkpoint_type === "external") {
      status.append(
        el(
          "button",
          { type: "button", class: "action-download", onclick: () => downloads(status, base) },
          "Download",
        ),
      );
    }
    const expires = c.expires_at
      ? `in ${duration((Date.parse(c.expires_at) - Date.now()) / 1000)}`
      : "never";
    return el(
      "tr",
      { "data-path": c.tinker_path },
      el("td", {}, el("code", {}, c.tinker_path)),
      el("td", {}, c.checkpoint_type),
      el("td", {}, bytes(c.size_bytes)),
      el("td", {}, age(c.time)),
      el("td", { class: "expires" }, expires),
      el("td", { class: "public" }, c.public ? "yes" : "no"),
      status,
    );
  });
  return table(["Path", "Type", "Size", "Age", "Expires", "Public", ""], rows, {
    class: "checkpoints",
  });
}

// Asks inside the page (no browser dialog) before `action`; its failure is shown there.
function confirmIn(cell, question, label, action) {
  cell.querySelector(".confirm")?.remove();
  const box = el(
    "div",
    { class: "confirm", role: "alertdialog" },
    el("span", {}, question),
    el(
      "button",
      { type: "button", class: "confirm-yes", onclick: () => guarded(cell, action) },
      label,
    ),
    el("button", { type: "button", class: "confirm-no", onclick: () => box.remove() }, "Cancel"),
  );
  cell.append(box);
}

async function guarded(cell, action) {
  try {
    await action();
  } catch (e) {
    cell.querySelector(".error")?.remove();
    cell.append(failure(e));
  }
}

// An external weights export's files as links (signed URLs, valid for a while, no key).
async function downloads(cell, base) {
  await guarded(cell, async () => {
    const answer = await api(base + "/external_weights_urls");
    cell.querySelector(".downloads")?.remove();
    cell.append(
      el(
        "ul",
        { class: "downloads" },
        Object.entries(answer.urls).map(([file, url]) =>
          el("li", {}, el("a", { href: url, download: file.split("/").pop() }, file)),
        ),
      ),
    );
  });
}

// ------------------------------------------------------------------ sessions

async function sessionsView() {
  const found = await api("/sessions/search", { method: "POST", body: { limit: 100 } });
  const details = await Promise.all(
    found.sessions.map((s) => api(`/sessions/${encodeURIComponent(s.session_id)}`)),
  );
  const samplerIds = [...new Set(details.flatMap((d) => d.sampler_ids))];
  const samplers = new Map(
    await Promise.all(
      samplerIds.map(async (id) => [id, await api(`/samplers/${encodeURIComponent(id)}`)]),
    ),
  );
  const rows = found.sessions.map((s, i) =>
    el(
      "tr",
      { "data-session": s.session_id },
      el("td", {}, el("code", {}, s.session_id), s.display_name ? ` ${s.display_name}` : ""),
      el("td", {}, age(s.created_at)),
      el("td", {}, s.status ? s.status.type : "ended"),
      el(
        "td",
        {},
        details[i].training_run_ids.map((id) => el("div", {}, runLink(id))),
      ),
      el(
        "td",
        {},
        details[i].sampler_ids.map((id) => {
          const sampler = samplers.get(id);
          return el(
            "div",
            { class: "sampler", "data-sampler": id },
            el("code", {}, id),
            ` ${sampler.model_path || sampler.base_model}`,
          );
        }),
      ),
      el("td", {}, `${s.checkpoints_count} (${bytes(s.checkpoint_storage_bytes)})`),
    ),
  );
  return [
    el("h1", {}, "Sessions"),
    rows.length
      ? table(["Session", "Created", "Status", "Runs", "Samplers", "Checkpoints"], rows, {
          id: "sessions",
        })
      : el("p", {}, "No sessions."),
    found.next_cursor ? el("p", { class: "note" }, "The 100 newest sessions are shown.") : null,
  ];
}

// ------------------------------------------------------------------ operator

async function operatorView() {
  const load = await api("/console/load");
  const previous = state.lastLoad;
  state.lastLoad = load;
  const rate = (model, field) => {
    const before = previous && previous.models[model];
    if (!before || load.time <= previous.time) return "–";
    const change = load.models[model][field] - before[field];
    return `${(change / (load.time - previous.time)).toFixed(1)}/s`;
  };
  const models = Object.entries(load.models).map(([name, m]) => {
    const operations = [...new Set([...Object.keys(m.queues), ...Object.keys(m.operations)])];
    operations.sort();
    return el(
      "section",
      { class: "model", "data-model": name },
      el("h2", {}, name),
      el(
        "p",
        { class: "facts" },
        `${m.active_runs} runs loaded · ${m.active_samplers} samplers open · ` +
          `${m.failed_operations} failed operations`,
      ),
      table(
        ["", "Total tokens", "Tokens per second (since last refresh)"],
        ["trained", "sampled"].map((kind) =>
          el(
            "tr",
            {},
            el("td", {}, kind),
            el("td", {}, String(m[`${kind}_tokens`])),
            el("td", {}, rate(name, `${kind}_tokens`)),
          ),
        ),
      ),
      table(
        ["Operation", "Queued or running", "Finished", "Mean seconds"],
        operations.map((op) => {
          const done = m.operations[op] || { finished: 0, seconds: 0 };
          return el(
            "tr",
            { "data-operation": op },
            el("td", {}, op),
            el("td", { class: "queue" }, String(m.queues[op] || 0)),
            el("td", {}, String(done.finished)),
            el("td", {}, done.finished ? (done.seconds / done.finished).toFixed(3) : "–"),
          );
        }),
        { class: "queues" },
      ),
    );
  });
  const devices = Object.entries(load.devices).map(([name, d]) =>
    el(
      "tr",
      {},
      el("td", {}, name),
      el("td", {}, bytes(d.bytes_in_use)),
      el("td", {}, bytes(d.bytes_limit)),
    ),
  );
  return [
    el("h1", {}, "Operator: load"),
    ...models,
    el("h2", {}, "Memory"),
    el("p", { class: "facts" }, `Server process resident memory: ${bytes(load.process_rss_bytes)}`),
    devices.length
      ? table(["Device", "In use", "Limit"], devices, { id: "devices" })
      : el("p", {}, "The devices report no memory (JAX on CPU)."),
    el(
      "p",
      { class: "note" },
      `XLA programs: ${load.compilations.compiled || 0} compiled, ` +
        `${load.compilations.cache || 0} from the cache. Refreshed every ${LOAD_POLL_MS / 1000} s.`,
    ),
  ];
}

// ------------------------------------------------------------------ routing

// Shows what `view` answers (its nodes), unless another view was asked for meanwhile; the
// operator view then refreshes itself every LOAD_POLL_MS.
async function render(view, ...args) {
  state.shown += 1;
  const asked = state.shown;
  let nodes;
  try {
    nodes = await view(...args);
  } catch (e) {
    if (asked !== state.shown) return;
    if (e.status === 401) return signOut("The server no longer takes this key; sign in again.");
    nodes = [failure(e)];
  }
  if (asked !== state.shown) return;
  show(...nodes);
  document.getElementById("main").dataset.view = view.name.replace(/View$/, "");
  if (view === operatorView) state.timer = setTimeout(route, LOAD_POLL_MS);
}

async function route() {
  clearTimeout(state.timer);
  if (!apiKey()) return signInView();
  if (!state.user) {
    try {
      await identify();
    } catch (e) {
      return signOut(e.status === 401 ? "Sign in again." : String(e.message));
    }
  }
  const [, page, id] = location.hash.match(/^#\/([a-z]+)(?:\/(.+))?$/) || [];
  if (page !== "operator") state.lastLoad = null;
  document.querySelectorAll("#nav a").forEach((a) => {
    a.classList.toggle("current", a.getAttribute("href") === `#/${page}`);
  });
  if (page === "runs" && id) return render(runView, decodeURIComponent(id));
  if (page === "checkpoints") return render(checkpointsView);
  if (page === "sessions") return render(sessionsView);
  if (page === "operator" && state.admin) return render(operatorView);
  if (page !== "runs") return void (location.hash = "#/runs");
  return render(runsView);
}

document.getElementById("sign-out").addEventListener("click", () => signOut());
window.addEventListener("hashchange", route);
route();
