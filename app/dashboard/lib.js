// What every page of the dashboard uses: the API with the user's key, building the DOM, formatting, the page's
// refresh loop and the charts.

export const KEY = "scratchllm.key";
const SCOPES = ["read", "train", "deploy", "admin"];
export const FINAL = new Set(["succeeded", "failed", "cancelled"]);
const REFRESH_MS = 2000;

export const state = { caller: null, timer: null, charts: {} };
window.dashboard = state;  // for the browser tests: what the charts hold

export function authorization() {
  const key = localStorage.getItem(KEY);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

export function problem(status, body, fallback) {
  // the API's error, named as it names it: {"error": {"message": ...}} or {"error": "..."}
  const error = body && body.error;
  return `${status}: ${typeof error === "object" && error ? error.message : error || fallback}`;
}

export async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...(options.headers || {}), ...authorization() } });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(problem(response.status, body, response.statusText));
  return body;
}

export function send(path, body, method = "POST") {
  return api(path, { method, headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
}

export function upload(path, form, onProgress) {
  // a multipart POST that reports its progress (fetch cannot: its request body has no progress events)
  return new Promise((resolve, reject) => {
    const request = new XMLHttpRequest();
    request.open("POST", path);
    for (const [name, value] of Object.entries(authorization())) request.setRequestHeader(name, value);
    request.upload.onprogress = (e) => { if (e.lengthComputable) onProgress(e.loaded, e.total); };
    request.onload = () => {
      let body = {};
      try { body = JSON.parse(request.responseText); } catch { /* not JSON: the status says enough */ }
      if (request.status >= 200 && request.status < 300) resolve(body);
      else reject(new Error(problem(request.status, body, request.statusText)));
    };
    request.onerror = () => reject(new Error("the upload did not reach the server"));
    request.send(form);
  });
}

export function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name.startsWith("on")) node[name] = value;
    else if (value !== undefined && value !== null && value !== false) node.setAttribute(name, value === true ? "" : value);
  }
  node.append(...children.flat().map((c) => (c instanceof Node ? c : document.createTextNode(c ?? ""))));
  return node;
}

export const number = (value, digits = 4) => (value === null || value === undefined ? ""
  : Number.isInteger(value) ? value.toLocaleString() : Number(value).toPrecision(digits));  // counts stay whole
export const seconds = (s) => (s === null || s === undefined ? "" : s < 90 ? `${Math.round(s)} s` : `${Math.round(s / 60)} min`);
export const bytes = (n) => {
  let v = n;
  for (const unit of ["B", "KiB", "MiB", "GiB", "TiB"]) { if (v < 1024) return `${v.toFixed(unit === "B" ? 0 : 1)} ${unit}`; v /= 1024; }
  return `${v.toFixed(1)} PiB`;
};
export const may = (scope) => state.caller && SCOPES.indexOf(state.caller.scope) >= SCOPES.indexOf(scope);
export const cannot = (scope) => (may(scope) ? "" : `this key's scope cannot do this (it needs ${scope})`);

export function show(...nodes) {
  document.getElementById("main").replaceChildren(...nodes);
}

export function field(label, input) {
  return el("label", { class: "field" }, el("span", { class: "muted" }, label), input);
}

export function deleteButton(path, question) {
  // DELETE path once the user confirms question; the deploy scope's to do
  const button = el("button", { type: "button", disabled: !may("deploy"), title: cannot("deploy") }, "Delete");
  button.onclick = async () => {
    if (!confirm(question)) return;
    button.disabled = true;
    try { await api(path, { method: "DELETE" }); } catch (error) { alert(error.message); button.disabled = false; }
  };
  return button;
}

export function refill(select, items, label) {
  // the select's options, one per item (by its id), keeping what the user picked across refreshes
  const was = select.value;
  select.replaceChildren(...items.map((item) => el("option", { value: item.id, selected: item.id === was }, label(item))));
}

export function table(headings, body) {
  return el("table", {}, el("thead", {}, el("tr", {}, headings.map((h) => el("th", {}, h)))), body);
}

export function facts(pairs) {
  // a two-column grid of names and values
  return pairs.flatMap(([name, value]) => [el("span", { class: "muted" }, name), el("span", {}, value)]);
}

export function repeat(render) {
  // a refresh that fails says why above the page and keeps what it showed; the next one may succeed
  clearInterval(state.timer);
  const notice = document.getElementById("problem");
  const run = () => render().then(() => { notice.textContent = ""; },
    (error) => { notice.textContent = error.message; });
  state.timer = setInterval(run, REFRESH_MS);
  return run();
}

export function failing(page) {
  // a page that cannot be drawn says why in its place
  return (...args) => page(...args).catch((error) => show(el("p", { class: "error" }, error.message)));
}

// -- charts -------------------------------------------------------------------------------------------------------

const PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2"];

export async function metricPoints(jobId, name, known = []) {
  // the metric's points: those known already, then every page after the last of them (a step is recorded once)
  const points = [...known];
  let since = known.length ? known[known.length - 1].step + 1 : 0;
  for (;;) {
    const page = await api(`/v1/jobs/${jobId}/metrics?name=${name}&since_step=${since}&limit=10000`);
    points.push(...page.data);
    if (!page.has_more || !page.data.length) return points;
    since = page.data[page.data.length - 1].step + 1;
  }
}

export function chart(title, labels, holder, { x = "step", data } = {}) {
  // a uPlot chart of one line per label against x
  const series = [{ label: x }, ...labels.map((label, i) => ({ label, stroke: PALETTE[i % PALETTE.length],
    spanGaps: true, points: { show: true, size: 3 } }))];
  const axes = [{}, { values: (u, ticks) => ticks.map((v) => Number(v.toPrecision(3)).toString()), size: 60 }];
  return new uPlot({ title, width: 360, height: 220, series, axes, scales: { x: { time: false } } },
    data || [[], ...labels.map(() => [])], holder);
}

export function aligned(series, xOf = (step) => step) {
  // uPlot's data: the x of every step any series has (xOf: a step's x, undefined to leave the step out), then
  // each series' value there (null where it has none)
  const steps = [...new Set(series.flatMap((points) => points.map((p) => p.step)))]
    .filter((step) => xOf(step) !== undefined).sort((a, b) => a - b);
  return [steps.map(xOf), ...series.map((points) => {
    const byStep = new Map(points.map((p) => [p.step, p.value]));
    return steps.map((step) => byStep.get(step) ?? null);
  })];
}
