// Runs: every job, one job as it trains, and runs compared (their curves, and their checkpoints' evaluations).

import { FINAL, aligned, api, cannot, chart, el, facts, may, metricPoints, number, repeat, seconds, show, state, table }
  from "./lib.js";

const CHARTS = [  // the charts of a job page: [title, [metric names]]
  ["loss", ["train_loss", "val_loss"]],
  ["learning rate", ["learning_rate"]],
  ["tokens/s", ["tokens_per_s"]],
];
const JOB_TYPES = ["pretrain", "finetune_classifier", "finetune_instruct", "evaluate"];
const STATUSES = ["queued", "running", "succeeded", "failed", "cancelled"];

export const jobLink = (job) => el("a", { href: `#/jobs/${job.id}` }, job.name || job.id);

export async function runsPage() {
  const filters = { type: "", status: "" };
  const select = (name, values) => el("select", { name, "aria-label": name, onchange: (e) => {
    filters[name] = e.target.value;
    render();
  } }, el("option", { value: "" }, `any ${name}`), values.map((v) => el("option", { value: v }, v)));
  const picked = new Set();
  const compare = el("a", { href: "#/runs", class: "muted" }, "tick runs to compare them");
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
          onchange: (e) => tick(job.id, e.target.checked) }), " ", jobLink(job)),
        el("td", {}, job.type),
        el("td", { class: `status-${job.status}` }, job.status),
        el("td", {}, el("progress", { max: p.total_steps, value: p.step }), ` ${p.step}/${p.total_steps}`),
        el("td", {}, number(p.train_loss)),
        el("td", {}, p.tokens_per_s ? `${Math.round(p.tokens_per_s).toLocaleString()} tok/s` : ""),
        el("td", {}, job.status === "running" ? seconds(p.eta_s) : ""));
    }));
    if (!jobs.length) body.replaceChildren(el("tr", {}, el("td", { colspan: 7, class: "muted" }, "no jobs yet")));
  };
  show(el("h1", {}, "Runs"),
    el("div", { class: "filters" }, select("type", JOB_TYPES), select("status", STATUSES), compare),
    table(["job", "type", "status", "progress", "train loss", "speed", "eta"], body));
  await repeat(render);
}

// -- one job ------------------------------------------------------------------------------------------------------

function settings(spec) {
  // the job's request, one line per setting given (null: the default), nested ones (model, hyperparameters,
  // lora) by dotted names
  return Object.entries(spec).flatMap(([name, value]) => (value && typeof value === "object" && !Array.isArray(value)
    ? Object.entries(value).map(([inner, v]) => [`${name}.${inner}`, v]) : [[name, value]]))
    .filter(([, value]) => value !== null).map(([name, value]) => [name, JSON.stringify(value)]);
}

async function drawMetrics(jobId, known, against) {
  // known: metric name -> the points fetched by the refreshes before this one, so each asks only for new ones
  const names = ["tokens_seen", ...CHARTS.flatMap(([, series]) => series)];
  await Promise.all(names.map(async (name) => { known[name] = await metricPoints(jobId, name, known[name]); }));
  const tokensAt = new Map(known.tokens_seen.map((p) => [p.step, p.value]));
  const xOf = against === "tokens" ? (step) => tokensAt.get(step) : undefined;
  for (const [title, series] of CHARTS) state.charts[title].setData(aligned(series.map((name) => known[name]), xOf));
}

export async function jobPage(jobId) {
  const heading = el("h1", {}, jobId);
  const summary = el("div", { class: "facts" });
  const cancel = el("button", { type: "button", onclick: async () => {
    cancel.disabled = true;
    try { await api(`/v1/jobs/${jobId}/cancel`, { method: "POST" }); } catch (error) { alert(error.message); }
  } }, "Cancel");
  const charts = el("div", { class: "charts" });
  const against = el("select", { "aria-label": "against" },
    el("option", { value: "step" }, "against steps"), el("option", { value: "tokens" }, "against tokens"));
  const known = {};  // metric name -> its points so far
  const drawCharts = () => {
    state.charts = {};
    charts.replaceChildren(...CHARTS.map(([title, names]) => {
      const holder = el("div", { class: "chart", "data-chart": title });
      state.charts[title] = chart(title, names, holder, { x: against.value });
      return holder;
    }));
  };
  against.onchange = () => { drawCharts(); drawMetrics(jobId, known, against.value); };
  drawCharts();
  const events = el("tbody");
  const samples = el("div");
  let shownSamples = [];
  let lastEvent = 0;
  const checkpoints = el("tbody");
  const request = el("div", { class: "facts" });
  show(heading, el("p", {}, cancel), summary, el("h2", {}, "Curves ", against), charts,
    el("h2", {}, "Samples"), samples,
    el("h2", {}, "Checkpoints"), table(["checkpoint", "step", "val loss", "size"], checkpoints),
    el("h2", {}, "Events"), el("table", {}, events), el("h2", {}, "Settings"), request);
  const render = async () => {
    const job = await api(`/v1/jobs/${jobId}`);
    const p = job.progress;
    heading.textContent = `${job.name || job.id} (${job.type})`;
    cancel.disabled = FINAL.has(job.status) || job.cancel_requested || !may("train");
    cancel.title = cannot("train");
    summary.replaceChildren(...facts([["status", job.status], ["step", `${p.step} / ${p.total_steps}`],
      ["tokens seen", p.tokens_seen.toLocaleString()], ["train loss", number(p.train_loss)],
      ["val loss", number(p.val_loss)], ["speed", p.tokens_per_s ? `${Math.round(p.tokens_per_s)} tok/s` : ""],
      ["eta", job.status === "running" ? seconds(p.eta_s) : ""], ["attempts", job.attempts], ["error", job.error || ""]]));
    request.replaceChildren(...facts(settings(job.spec)));
    await drawMetrics(jobId, known, against.value);
    const saved = (await api(`/v1/checkpoints?job_id=${jobId}&limit=100`)).data;
    checkpoints.replaceChildren(...saved.map((c) => el("tr", {}, el("td", {}, c.id), el("td", {}, c.step),
      el("td", {}, number(c.metrics.val_loss)), el("td", {}, (c.size_bytes / 2 ** 20).toFixed(1) + " MiB"))));
    const arrived = (await api(`/v1/jobs/${jobId}/events?after=${lastEvent}&limit=1000`)).data;
    lastEvent = arrived.length ? arrived[arrived.length - 1].id : lastEvent;
    events.prepend(...arrived.slice().reverse().map((e) => el("tr", {}, el("td", { class: "muted" }, e.time.slice(11, 19)),
      el("td", {}, e.type), el("td", {}, e.message))));  // newest first
    while (events.children.length > 50) events.lastChild.remove();
    shownSamples = [...arrived.filter((e) => e.type === "sample" && e.data).reverse().map((e) =>
      el("div", { class: "sample" }, el("span", { class: "muted" }, `step ${e.data.step}`), el("pre", {}, e.data.text))),
    ...shownSamples].slice(0, 5);  // the newest five
    samples.replaceChildren(...(shownSamples.length ? shownSamples : [el("p", { class: "muted" }, "no samples yet")]));
    if (FINAL.has(job.status)) clearInterval(state.timer);
  };
  await repeat(render);
}

// -- runs compared -------------------------------------------------------------------------------------------------

async function evaluationTables(jobs) {
  // the evaluations of the runs' checkpoints, one table per corpus (numbers on one corpus measure one thing),
  // the best value of each score marked
  const names = new Map(jobs.map((job, i) => [job.id, `${i + 1}. ${job.name || job.id}`]));
  const evaluations = (await Promise.all(jobs.map((job) =>
    api(`/v1/evaluations?training_job_id=${job.id}&status=succeeded&limit=100`)))).flatMap((page) => page.data);
  if (!evaluations.length) {
    return [el("p", { class: "muted" }, "no finished evaluation of these runs' checkpoints yet (Data & models: Evaluate)")];
  }
  const byCorpus = Map.groupBy(evaluations, (e) => e.corpus_id);
  return Promise.all([...byCorpus].map(async ([corpusId, group]) => {
    const comparison = await api(`/v1/evaluations/compare?ids=${group.slice(0, 100).map((e) => e.id).join(",")}`);
    const rows = comparison.rows.map((row) => el("tr", {}, el("td", {}, names.get(row.training_job_id) || ""),
      el("td", {}, row.checkpoint_step ?? "deleted"),
      el("td", {}, el("a", { href: `#/evaluations/${row.evaluation_id}` }, row.evaluation_id)),
      comparison.metrics.map((metric) => {
        const best = comparison.best[metric] === row.evaluation_id;
        return el("td", { class: best ? "best" : "", title: best ? "the best of these" : "" },
          number(row.metrics?.[metric]), best ? " ★" : "");
      })));
    return el("div", { class: "comparison", "data-corpus": corpusId }, el("h3", {}, `on corpus ${corpusId}`),
      comparison.notes.map((note) => el("p", { class: "muted" }, note)),
      table(["run", "step", "evaluation", ...comparison.metrics], el("tbody", {}, rows)));
  }));
}

export async function comparePage(jobIds) {
  // one chart per metric, one line per run, against steps; then the evaluations of their checkpoints
  const jobs = await Promise.all(jobIds.map((id) => api(`/v1/jobs/${id}`)));
  const charts = el("div", { class: "charts" });
  const evaluations = el("div", {}, el("p", { class: "muted" }, "loading…"));
  show(el("h1", {}, `${jobs.length} runs compared`),
    el("p", {}, jobs.map((job, i) => el("span", { class: "legend" }, `${i + 1}. `, jobLink(job),
      ` (${job.status}, step ${job.progress.step})  `))), charts, el("h2", {}, "Evaluations"), evaluations);
  state.charts = {};
  for (const name of ["train_loss", "val_loss", "learning_rate", "tokens_per_s"]) {
    const series = await Promise.all(jobIds.map((id) => metricPoints(id, name)));
    const holder = el("div", { class: "chart", "data-chart": name });
    charts.append(holder);
    state.charts[name] = chart(name, jobs.map((job, i) => `${i + 1}. ${job.name || job.id}`), holder,
      { data: aligned(series) });
  }
  evaluations.replaceChildren(...await evaluationTables(jobs));
}
