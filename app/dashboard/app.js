// The ScratchLLM dashboard: plain modules, no build step. Every call goes to this server's API with the key the
// user gave (kept in localStorage); what a page offers follows the key's scope (GET /v1/me).

const KEY = "scratchllm.key";
const SCOPES = ["read", "train", "deploy", "admin"];
const FINAL = new Set(["succeeded", "failed", "cancelled"]);
const REFRESH_MS = 2000;
const SERIES = [  // the charts of a job page: [title, [metric names]]
  ["loss", ["train_loss", "val_loss"]],
  ["learning rate", ["learning_rate"]],
];

const state = { caller: null, timer: null, charts: {} };
window.dashboard = state;  // for the browser tests: what the charts hold

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  const key = localStorage.getItem(KEY);
  if (key) headers.Authorization = `Bearer ${key}`;
  const response = await fetch(path, { ...options, headers });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = body.error;
    throw new Error(`${response.status}: ${typeof error === "object" && error ? error.message : error || response.statusText}`);
  }
  return body;
}

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "onclick" || name === "onchange") node[name] = value;
    else if (value !== undefined && value !== null && value !== false) node.setAttribute(name, value === true ? "" : value);
  }
  node.append(...children.flat().map((c) => (c instanceof Node ? c : document.createTextNode(c ?? ""))));
  return node;
}

const number = (value, digits = 4) => (value === null || value === undefined ? "" : Number(value).toPrecision(digits));
const seconds = (s) => (s === null || s === undefined ? "" : s < 90 ? `${Math.round(s)} s` : `${Math.round(s / 60)} min`);
const may = (scope) => state.caller && SCOPES.indexOf(state.caller.scope) >= SCOPES.indexOf(scope);

async function identify() {
  const who = document.getElementById("who");
  try {
    state.caller = await api("/v1/me");
    who.textContent = state.caller.open_mode ? "no key needed on this machine"
      : `${state.caller.key_name}: ${state.caller.scope}`;
    who.className = "muted";
  } catch (error) {
    state.caller = null;
    who.textContent = `enter an API key (${error.message})`;
    who.className = "error";
  }
}

function show(...nodes) {
  document.getElementById("main").replaceChildren(...nodes);
}

function repeat(render) {
  // a refresh that fails says why above the page and keeps what it showed; the next one may succeed
  clearInterval(state.timer);
  const problem = document.getElementById("problem");
  const run = () => render().then(() => { problem.textContent = ""; },
    (error) => { problem.textContent = error.message; });
  state.timer = setInterval(run, REFRESH_MS);
  return run();
}

// -- runs ---------------------------------------------------------------------------------------------------------

async function runsPage() {
  const filters = { type: "", status: "" };
  const select = (name, values) => el("select", { name, "aria-label": name, onchange: (e) => {
    filters[name] = e.target.value;
    render();
  } }, el("option", { value: "" }, `any ${name}`), values.map((v) => el("option", { value: v }, v)));
  const bar = el("div", { class: "filters" },
    select("type", ["pretrain", "finetune_classifier", "finetune_instruct", "evaluate"]),
    select("status", ["queued", "running", "succeeded", "failed", "cancelled"]));
  const body = el("tbody");
  const render = async () => {
    const query = new URLSearchParams({ limit: "100", ...Object.fromEntries(Object.entries(filters).filter(([, v]) => v)) });
    const jobs = (await api(`/v1/jobs?${query}`)).data;
    body.replaceChildren(...jobs.map((job) => {
      const p = job.progress;
      return el("tr", { "data-job": job.id },
        el("td", {}, el("a", { href: `#/jobs/${job.id}` }, job.name || job.id)),
        el("td", {}, job.type),
        el("td", { class: `status-${job.status}` }, job.status),
        el("td", {}, el("progress", { max: p.total_steps, value: p.step }), ` ${p.step}/${p.total_steps}`),
        el("td", {}, number(p.train_loss)),
        el("td", {}, p.tokens_per_s ? `${Math.round(p.tokens_per_s).toLocaleString()} tok/s` : ""),
        el("td", {}, job.status === "running" ? seconds(p.eta_s) : ""));
    }));
    if (!jobs.length) body.replaceChildren(el("tr", {}, el("td", { colspan: 7, class: "muted" }, "no jobs yet")));
  };
  show(el("h1", {}, "Runs"), bar,
    el("table", {}, el("thead", {}, el("tr", {}, ["job", "type", "status", "progress", "train loss", "speed", "eta"]
      .map((h) => el("th", {}, h)))), body));
  await repeat(render);
}

// -- one job ------------------------------------------------------------------------------------------------------

async function metricPoints(jobId, name) {
  const points = [];
  let since = 0;
  for (;;) {  // the metrics come in pages
    const page = await api(`/v1/jobs/${jobId}/metrics?name=${name}&since_step=${since}&limit=10000`);
    points.push(...page.data);
    if (!page.has_more || !page.data.length) return points;
    since = page.data[page.data.length - 1].step + 1;
  }
}

function chart(title, names, holder) {
  const series = [{ label: "step" }, ...names.map((name, i) => ({ label: name, stroke: ["#2563eb", "#dc2626"][i % 2],
    spanGaps: true, points: { show: true, size: 3 } }))];
  const axes = [{}, { values: (u, ticks) => ticks.map((v) => Number(v.toPrecision(3)).toString()), size: 60 }];
  const plot = new uPlot({ title, width: 360, height: 220, series, axes, scales: { x: { time: false } } },
    [[], ...names.map(() => [])], holder);
  return plot;
}

async function drawMetrics(jobId) {
  for (const [title, names] of SERIES) {
    const series = await Promise.all(names.map((name) => metricPoints(jobId, name)));
    const steps = [...new Set(series.flatMap((points) => points.map((p) => p.step)))].sort((a, b) => a - b);
    const columns = series.map((points) => {
      const byStep = new Map(points.map((p) => [p.step, p.value]));
      return steps.map((step) => byStep.get(step) ?? null);
    });
    state.charts[title].setData([steps, ...columns]);
  }
}

async function jobPage(jobId) {
  const heading = el("h1", {}, jobId);
  const facts = el("div", { class: "facts" });
  const cancel = el("button", { type: "button", onclick: async () => {
    cancel.disabled = true;
    try { await api(`/v1/jobs/${jobId}/cancel`, { method: "POST" }); } catch (error) { alert(error.message); }
  } }, "Cancel");
  const charts = el("div", { class: "charts" });
  state.charts = {};
  for (const [title, names] of SERIES) {
    const holder = el("div", { class: "chart", "data-chart": title });
    charts.append(holder);
    state.charts[title] = chart(title, names, holder);
  }
  const events = el("tbody");
  const checkpoints = el("tbody");
  const spec = el("pre");
  show(heading, el("p", {}, cancel), facts, el("h2", {}, "Curves"), charts,
    el("h2", {}, "Checkpoints"), el("table", {}, checkpoints),
    el("h2", {}, "Events"), el("table", {}, events), el("h2", {}, "Request"), spec);
  const render = async () => {
    const job = await api(`/v1/jobs/${jobId}`);
    const p = job.progress;
    heading.textContent = `${job.name || job.id} (${job.type})`;
    cancel.disabled = FINAL.has(job.status) || job.cancel_requested || !may("train");
    cancel.title = may("train") ? "" : "this key's scope cannot change anything";
    facts.replaceChildren(...[["status", job.status], ["step", `${p.step} / ${p.total_steps}`],
      ["tokens seen", p.tokens_seen.toLocaleString()], ["train loss", number(p.train_loss)],
      ["val loss", number(p.val_loss)], ["speed", p.tokens_per_s ? `${Math.round(p.tokens_per_s)} tok/s` : ""],
      ["eta", job.status === "running" ? seconds(p.eta_s) : ""], ["error", job.error || ""]]
      .flatMap(([k, v]) => [el("span", { class: "muted" }, k), el("span", {}, v)]));
    spec.textContent = JSON.stringify(job.spec, null, 2);
    await drawMetrics(jobId);
    const saved = (await api(`/v1/checkpoints?job_id=${jobId}&limit=100`)).data;
    checkpoints.replaceChildren(...saved.map((c) => el("tr", {}, el("td", {}, c.id), el("td", {}, `step ${c.step}`),
      el("td", {}, number(c.metrics.val_loss)))));
    const latest = (await api(`/v1/jobs/${jobId}/events?limit=1000`)).data.slice(-50).reverse();
    events.replaceChildren(...latest.map((e) => el("tr", {}, el("td", { class: "muted" }, e.time.slice(11, 19)),
      el("td", {}, e.type), el("td", {}, e.message))));
    if (FINAL.has(job.status)) clearInterval(state.timer);
  };
  await repeat(render);
}

// -- the page -----------------------------------------------------------------------------------------------------

async function route() {
  clearInterval(state.timer);
  const [, page, id] = location.hash.split("/");
  if (page === "jobs" && id) return jobPage(decodeURIComponent(id));
  return runsPage();
}

document.getElementById("key-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const key = document.getElementById("key").value.trim();
  if (key) localStorage.setItem(KEY, key); else localStorage.removeItem(KEY);
  document.getElementById("key").value = "";
  await identify();
  await route();
});
window.addEventListener("hashchange", route);
await identify();
await route();
