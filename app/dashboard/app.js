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
  const picked = new Set();
  const compare = el("a", { href: "#/runs", class: "muted" }, "tick runs to compare them");
  const bar = el("div", { class: "filters" },
    select("type", ["pretrain", "finetune_classifier", "finetune_instruct", "evaluate"]),
    select("status", ["queued", "running", "succeeded", "failed", "cancelled"]), compare);
  const tick = (jobId, on) => {
    if (on) picked.add(jobId); else picked.delete(jobId);
    compare.href = picked.size > 1 ? `#/compare/${[...picked].join(",")}` : "#/runs";
    compare.textContent = picked.size > 1 ? `compare ${picked.size} runs` : "tick runs to compare them";
    compare.className = picked.size > 1 ? "" : "muted";
  };
  const body = el("tbody");
  const render = async () => {
    const query = new URLSearchParams({ limit: "100", ...Object.fromEntries(Object.entries(filters).filter(([, v]) => v)) });
    const jobs = (await api(`/v1/jobs?${query}`)).data;
    body.replaceChildren(...jobs.map((job) => {
      const p = job.progress;
      return el("tr", { "data-job": job.id },
        el("td", {}, el("input", { type: "checkbox", "aria-label": `compare ${job.id}`, checked: picked.has(job.id),
          onchange: (e) => tick(job.id, e.target.checked) }), " ", el("a", { href: `#/jobs/${job.id}` }, job.name || job.id)),
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

async function metricPoints(jobId, name, known = []) {
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

const PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2"];

function chart(title, labels, holder, data = [[], ...labels.map(() => [])]) {
  // a uPlot chart of one line per label against steps
  const series = [{ label: "step" }, ...labels.map((label, i) => ({ label, stroke: PALETTE[i % PALETTE.length],
    spanGaps: true, points: { show: true, size: 3 } }))];
  const axes = [{}, { values: (u, ticks) => ticks.map((v) => Number(v.toPrecision(3)).toString()), size: 60 }];
  return new uPlot({ title, width: 360, height: 220, series, axes, scales: { x: { time: false } } }, data, holder);
}

function aligned(series) {
  // uPlot's data: the steps any series has, then each series' value at each step (null where it has none)
  const steps = [...new Set(series.flatMap((points) => points.map((p) => p.step)))].sort((a, b) => a - b);
  return [steps, ...series.map((points) => {
    const byStep = new Map(points.map((p) => [p.step, p.value]));
    return steps.map((step) => byStep.get(step) ?? null);
  })];
}

async function drawMetrics(jobId, known) {
  // known: metric name -> the points fetched by the refreshes before this one, so each asks only for new ones
  for (const [title, names] of SERIES) {
    const series = await Promise.all(names.map(async (name) => (known[name] = await metricPoints(jobId, name,
      known[name]))));
    state.charts[title].setData(aligned(series));
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
  const known = {};  // metric name -> its points so far
  let lastEvent = 0;
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
    await drawMetrics(jobId, known);
    const saved = (await api(`/v1/checkpoints?job_id=${jobId}&limit=100`)).data;
    checkpoints.replaceChildren(...saved.map((c) => el("tr", {}, el("td", {}, c.id), el("td", {}, `step ${c.step}`),
      el("td", {}, number(c.metrics.val_loss)))));
    const arrived = (await api(`/v1/jobs/${jobId}/events?after=${lastEvent}&limit=1000`)).data;
    lastEvent = arrived.length ? arrived[arrived.length - 1].id : lastEvent;
    events.prepend(...arrived.reverse().map((e) => el("tr", {}, el("td", { class: "muted" }, e.time.slice(11, 19)),
      el("td", {}, e.type), el("td", {}, e.message))));  // newest first
    while (events.children.length > 50) events.lastChild.remove();
    if (FINAL.has(job.status)) clearInterval(state.timer);
  };
  await repeat(render);
}

// -- runs compared -------------------------------------------------------------------------------------------------

async function comparePage(jobIds) {
  // one chart per metric, one line per run, against steps
  const jobs = await Promise.all(jobIds.map((id) => api(`/v1/jobs/${id}`)));
  const charts = el("div", { class: "charts" });
  show(el("h1", {}, `${jobs.length} runs compared`),
    el("p", {}, jobs.map((job, i) => el("span", { class: "legend" }, `${i + 1}. `,
      el("a", { href: `#/jobs/${job.id}` }, job.name || job.id), ` (${job.status}, step ${job.progress.step})  `))), charts);
  state.charts = {};
  for (const name of ["train_loss", "val_loss", "learning_rate"]) {
    const series = await Promise.all(jobIds.map((id) => metricPoints(id, name)));
    const holder = el("div", { class: "chart", "data-chart": name });
    charts.append(holder);
    state.charts[name] = chart(name, jobs.map((job, i) => `${i + 1}. ${job.name || job.id}`), holder, aligned(series));
  }
}

// -- a new run ----------------------------------------------------------------------------------------------------

const CORPUS_KIND = { pretrain: "text", finetune_classifier: "classification", finetune_instruct: "instruction" };
const bytes = (n) => { let v = n; for (const unit of ["B", "KiB", "MiB", "GiB", "TiB"]) { if (v < 1024) return `${v.toFixed(1)} ${unit}`; v /= 1024; } return `${v.toFixed(1)} PiB`; };

async function newRunPage() {
  const [corpora, checkpoints, presets] = await Promise.all([api("/v1/corpora?limit=100"),
    api("/v1/checkpoints?limit=100"), api("/v1/jobs/presets")]);
  const input = (name, attributes) => el("input", { name, "aria-label": name, ...attributes });
  const form = {
    type: el("select", { name: "type", "aria-label": "type" }, Object.keys(CORPUS_KIND).map((t) => el("option", { value: t }, t))),
    name: input("name", { type: "text", placeholder: "optional" }),
    corpus: el("select", { name: "corpus", "aria-label": "corpus" }),
    preset: el("select", { name: "preset", "aria-label": "preset" }, presets.data.map((p) => el("option", { value: p.name },
      `${p.name} (${p.n_layer} layers, ${p.n_embd} wide, context ${p.context_length})`))),
    base: el("select", { name: "base", "aria-label": "base checkpoint" }),
    steps: input("steps", { type: "number", value: 200, min: 1 }),
    batch: input("batch size", { type: "number", value: 8, min: 1 }),
    accumulation: input("grad accum steps", { type: "number", value: 1, min: 1 }),
    learning_rate: input("learning rate", { type: "number", value: 0.0006, step: 0.0001, min: 0 }),
  };
  const cost = el("p", { id: "cost", class: "muted" });
  const submit = el("button", { type: "button", disabled: !may("train") }, "Start");
  const request = () => {
    const type = form.type.value;
    const body = { type, corpus_id: form.corpus.value, name: form.name.value || null,
      hyperparameters: { max_steps: Number(form.steps.value), batch_size: Number(form.batch.value),
        grad_accum_steps: Number(form.accumulation.value), learning_rate: Number(form.learning_rate.value) } };
    if (type === "pretrain") body.model = { preset: form.preset.value };
    else body.base_checkpoint_id = form.base.value;
    return body;
  };
  const choices = () => {  // the corpora and checkpoints the type can use
    const type = form.type.value;
    form.corpus.replaceChildren(...corpora.data.filter((c) => c.kind === CORPUS_KIND[type])
      .map((c) => el("option", { value: c.id }, `${c.name} (${c.n_records} records)`)));
    form.base.replaceChildren(...checkpoints.data.filter((c) => c.task === "lm")
      .map((c) => el("option", { value: c.id }, `${c.id} (step ${c.step})`)));
    form.preset.parentElement.hidden = type !== "pretrain";
    form.base.parentElement.hidden = type === "pretrain";
  };
  let pending = null;
  const estimate = () => {
    clearTimeout(pending);
    pending = setTimeout(async () => {
      try {
        const e = await api("/v1/jobs/estimate", { method: "POST", headers: { "Content-Type": "application/json" },
          body: JSON.stringify(request()) });
        cost.className = e.fits ? "muted" : "error";
        cost.textContent = `${(e.parameters / 1e6).toFixed(2)}M parameters · about ${bytes(e.memory_bytes)} of memory ` +
          `(the limit is ${bytes(e.memory_limit_bytes)}) · ${e.tokens_per_step.toLocaleString()} tokens per step` +
          (e.refusal ? ` · ${e.refusal}` : "");
      } catch (error) { cost.className = "error"; cost.textContent = error.message; }
    }, 300);
  };
  submit.onclick = async () => {
    submit.disabled = true;
    try {
      const job = await api("/v1/jobs", { method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify(request()) });
      location.hash = `#/jobs/${job.id}`;
    } catch (error) { cost.className = "error"; cost.textContent = error.message; submit.disabled = false; }
  };
  for (const control of Object.values(form)) control.addEventListener("input", estimate);
  form.type.addEventListener("change", () => { choices(); estimate(); });
  show(el("h1", {}, "New run"), el("div", { class: "form" }, Object.entries(form).map(([k, control]) => field(k, control))),
    cost, el("p", {}, submit, may("train") ? "" : el("span", { class: "muted" }, " (this key's scope cannot start runs)")));
  choices();
  estimate();
}

// -- deployments --------------------------------------------------------------------------------------------------

async function deploymentsPage() {
  const body = el("tbody");
  const render = async () => {
    const [deployments, checkpoints] = await Promise.all([api("/v1/deployments?limit=100"),
      api("/v1/checkpoints?limit=100")]);
    body.replaceChildren(...deployments.data.map((d) => {
      const choice = el("select", { "aria-label": `checkpoint for ${d.name}` },
        checkpoints.data.filter((c) => c.task === d.task).map((c) => el("option", { value: c.id, selected: c.id === d.checkpoint_id },
          `${c.id} (step ${c.step})`)));
      const repoint = el("button", { type: "button", disabled: !may("deploy"), onclick: async () => {
        repoint.disabled = true;
        try { await api(`/v1/deployments/${d.name}`, { method: "PATCH", headers: { "Content-Type": "application/json" },
          body: JSON.stringify({ checkpoint_id: choice.value }) }); } catch (error) { alert(error.message); }
      } }, "Serve it");
      return el("tr", { "data-deployment": d.name }, el("td", {}, d.name + (d.default ? " (default)" : "")),
        el("td", {}, d.task), el("td", { class: d.state === "failed" ? "status-failed" : "" }, d.state),
        el("td", {}, d.served_device ? `${d.served_device} ${d.served_dtype}` : `${d.device} ${d.dtype}`),
        el("td", {}, d.serving_checkpoint_id || ""), el("td", {}, choice, " ", repoint), el("td", { class: "error" }, d.error || ""));
    }));
  };
  show(el("h1", {}, "Deployments"), el("table", {}, el("thead", {}, el("tr", {},
    ["name", "task", "state", "served on", "serving", "checkpoint", ""].map((h) => el("th", {}, h)))), body));
  await repeat(render);
}

// -- playground ---------------------------------------------------------------------------------------------------

async function* serverEvents(path, body, signal) {
  // the JSON of each server-sent event of a streamed POST (fetch: EventSource cannot POST or send a key)
  const key = localStorage.getItem(KEY);
  const response = await fetch(path, { method: "POST", signal, body: JSON.stringify(body),
    headers: { "Content-Type": "application/json", ...(key ? { Authorization: `Bearer ${key}` } : {}) } });
  if (!response.ok) {
    const error = (await response.json().catch(() => ({}))).error;
    throw new Error(`${response.status}: ${typeof error === "object" && error ? error.message : error}`);
  }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let pending = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    pending += value;
    const events = pending.split("\n\n");
    pending = events.pop();
    for (const event of events) {
      const data = event.split("\n").filter((line) => line.startsWith("data:")).map((line) => line.slice(5)).join("");
      if (data.trim() && data.trim() !== "[DONE]") yield JSON.parse(data);
    }
  }
}

function field(label, input) {
  return el("label", { class: "field" }, el("span", { class: "muted" }, label), input);
}

async function playgroundPage() {
  const deployments = (await api("/v1/deployments?limit=100")).data.filter((d) => d.state !== "failed");
  const pick = el("select", { "aria-label": "deployment" },
    deployments.map((d) => el("option", { value: d.name, "data-task": d.task }, `${d.name} (${d.task})`)));
  const area = el("div");
  const output = el("pre", { id: "output" });
  const controls = {
    max_new_tokens: el("input", { type: "number", value: 60, min: 1, max: 4096, "aria-label": "max new tokens" }),
    temperature: el("input", { type: "number", value: 0.8, min: 0, step: 0.1, "aria-label": "temperature" }),
    top_k: el("input", { type: "number", value: 40, min: 0, "aria-label": "top k" }),
    top_p: el("input", { type: "number", value: 0.95, min: 0, max: 1, step: 0.05, "aria-label": "top p" }),
    seed: el("input", { type: "number", placeholder: "random", "aria-label": "seed" }),
  };
  let running = null;
  const parameters = () => {
    const temperature = Number(controls.temperature.value);
    return { max_new_tokens: Number(controls.max_new_tokens.value), do_sample: temperature > 0,
      ...(temperature > 0 ? { temperature, top_k: Number(controls.top_k.value) || null,
        top_p: Number(controls.top_p.value) < 1 ? Number(controls.top_p.value) : null } : {}),
      ...(controls.seed.value ? { seed: Number(controls.seed.value) } : {}) };
  };
  const stream = async (events, show) => {
    running?.abort();
    running = new AbortController();
    output.textContent = "";
    try { for await (const event of events(running.signal)) show(event); } catch (error) {
      if (error.name !== "AbortError") output.append(el("span", { class: "error" }, `\n${error.message}`));
    }
  };
  const generator = () => {
    const prompt = el("textarea", { rows: 4, cols: 80, "aria-label": "prompt" }, "Every effort moves you");
    const go = el("button", { type: "button", onclick: () => stream(
      (signal) => serverEvents(`/d/${pick.value}/generate_stream`, { inputs: prompt.value, parameters: parameters() }, signal),
      (event) => { if (!event.token.special) output.append(event.token.text); }) }, "Generate");
    return [prompt, el("div", { class: "filters" }, Object.entries(controls).map(([k, input]) => field(k, input))),
      el("p", {}, go, " ", el("button", { type: "button", onclick: () => running?.abort() }, "Stop")), output];
  };
  const chatter = () => {
    const messages = [];
    const log = el("div", { class: "chat" });
    const say = el("input", { type: "text", size: 80, "aria-label": "message", placeholder: "Say something" });
    const send = el("button", { type: "button", onclick: async () => {
      messages.push({ role: "user", content: say.value });
      log.append(el("p", {}, el("b", {}, "you: "), say.value));
      say.value = "";
      const answer = el("span");
      log.append(el("p", {}, el("b", {}, "model: "), answer));
      await stream((signal) => serverEvents("/v1/chat/completions", { model: pick.value, messages, stream: true,
        max_tokens: Number(controls.max_new_tokens.value) }, signal),
      (chunk) => answer.append(chunk.choices?.[0]?.delta?.content || ""));
      messages.push({ role: "assistant", content: answer.textContent });
    } }, "Send");
    return [log, el("p", {}, say, " ", send), output];
  };
  const classifier = () => {
    const text = el("textarea", { rows: 3, cols: 80, "aria-label": "text to classify" }, "Free entry to win a prize!");
    const table = el("tbody");
    const go = el("button", { type: "button", onclick: async () => {
      try {
        const result = await api("/classify", { method: "POST", headers: { "Content-Type": "application/json" },
          body: JSON.stringify({ model: pick.value, input: [text.value] }) });
        const row = result.data[0];
        table.replaceChildren(...Object.entries(row.probabilities).map(([label, p]) => el("tr", { "data-label": label },
          el("td", {}, label === row.label ? el("b", {}, label) : label), el("td", {}, el("progress", { max: 1, value: p })),
          el("td", {}, p.toFixed(3)))));
      } catch (error) { table.replaceChildren(el("tr", {}, el("td", { class: "error" }, error.message))); }
    } }, "Classify");
    return [text, el("p", {}, go), el("table", {}, table)];
  };
  const mode = el("select", { "aria-label": "mode" }, ["generate", "chat"].map((m) => el("option", { value: m }, m)));
  const render = () => {
    const task = pick.selectedOptions[0]?.dataset.task;
    mode.disabled = task !== "lm";
    area.replaceChildren(...(task === "classifier" ? classifier() : mode.value === "chat" ? chatter() : generator()));
  };
  pick.onchange = render;
  mode.onchange = render;
  show(el("h1", {}, "Playground"), deployments.length ? el("p", {}, pick, " ", mode)
    : el("p", { class: "muted" }, "no deployment yet: deploy a checkpoint first"), area);
  if (deployments.length) render();
}

// -- the page -----------------------------------------------------------------------------------------------------

async function route() {
  clearInterval(state.timer);
  const [, page, id] = location.hash.split("/");
  if (page === "jobs" && id) return jobPage(decodeURIComponent(id));
  if (page === "deployments") return deploymentsPage();
  if (page === "compare" && id) {
    return comparePage(decodeURIComponent(id).split(",")).catch((error) => show(el("p", { class: "error" }, error.message)));
  }
  if (page === "new") return newRunPage().catch((error) => show(el("p", { class: "error" }, error.message)));
  if (page === "playground") return playgroundPage().catch((error) => show(el("p", { class: "error" }, error.message)));
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
