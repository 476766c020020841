// Data and models: corpora (upload with progress), checkpoints and where they came from, evaluations (start one;
// one evaluation's numbers, confusion matrix and worst examples).

import {
  FINAL, api, bytes, cannot, deleteButton, el, facts, field, may, number, refill, repeat, send, show, state, table, upload,
} from "./lib.js";
import { jobLink } from "./runs.js";

const CORPUS_KINDS = ["text", "classification", "instruction", "preference"];
const FORMATS = ["", "txt", "csv", "tsv", "jsonl", "json"];
// the numbers an evaluation table shows first, by evaluation kind
const HEADLINE = { lm: ["perplexity", "bits_per_byte"], classifier: ["accuracy", "macro_f1"],
  instruct: ["token_f1", "exact_match", "judge_score"], preference: ["preference_accuracy", "mean_margin"] };

function uploadForm() {
  const file = el("input", { type: "file", name: "file", "aria-label": "corpus file" });
  const kind = el("select", { name: "kind", "aria-label": "kind" }, CORPUS_KINDS.map((k) => el("option", { value: k }, k)));
  const format = el("select", { name: "format", "aria-label": "format" },
    FORMATS.map((f) => el("option", { value: f }, f || "from the file name")));
  const name = el("input", { type: "text", name: "corpus name", "aria-label": "corpus name", placeholder: "the file name" });
  const bar = el("progress", { max: 1, value: 0, hidden: true, "aria-label": "upload progress" });
  const status = el("span", { class: "muted", id: "upload-status" });
  const go = el("button", { type: "button", disabled: !may("train"), title: cannot("train") }, "Upload");
  go.onclick = async () => {
    if (!file.files.length) { status.className = "error"; status.textContent = "choose a file first"; return; }
    const form = new FormData();
    form.append("kind", kind.value);
    if (format.value) form.append("format", format.value);
    if (name.value) form.append("name", name.value);
    form.append("file", file.files[0]);
    go.disabled = true;
    bar.hidden = false;
    status.className = "muted";
    try {
      const corpus = await upload("/v1/corpora", form, (sent, total) => {
        bar.value = sent / total;
        status.textContent = sent < total ? `${bytes(sent)} of ${bytes(total)}` : "checking the file…";
      });
      status.textContent = `uploaded ${corpus.name}: ${corpus.n_records.toLocaleString()} records`;
      file.value = "";
    } catch (error) { status.className = "error"; status.textContent = error.message; }
    go.disabled = false;
    bar.hidden = true;
  };
  return el("div", { class: "filters" }, file, field("kind", kind), field("format", format),
    field("name", name), go, bar, status);
}

function evaluateForm(checkpoints, corpora) {
  const checkpoint = el("select", { "aria-label": "checkpoint to evaluate" });
  const corpus = el("select", { "aria-label": "corpus to evaluate on" });
  const limit = el("input", { type: "number", min: 1, placeholder: "all", "aria-label": "max examples" });
  const status = el("span", { class: "muted" });
  const go = el("button", { type: "button", disabled: !may("train"), title: cannot("train") }, "Evaluate");
  const fill = (saved, texts) => {
    refill(checkpoint, saved, (c) => `${c.id} (${c.task}, step ${c.step})`);
    refill(corpus, texts, (c) => `${c.name} (${c.kind})`);
  };
  fill(checkpoints, corpora);
  go.onclick = async () => {
    go.disabled = true;
    try {
      const evaluation = await send("/v1/evaluations", { checkpoint_id: checkpoint.value, corpus_id: corpus.value,
        ...(limit.value ? { max_examples: Number(limit.value) } : {}) });
      location.hash = `#/evaluations/${evaluation.id}`;
    } catch (error) { status.className = "error"; status.textContent = error.message; go.disabled = false; }
  };
  return { form: el("div", { class: "filters" }, field("checkpoint", checkpoint), field("corpus", corpus),
    field("max examples", limit), go, status), fill };
}

function headline(evaluation) {
  const names = HEADLINE[evaluation.kind] || [];
  return names.filter((n) => evaluation.metrics && n in evaluation.metrics)
    .map((n) => `${n} ${number(evaluation.metrics[n])}`).join(" · ");
}

export async function dataPage() {
  const corpora = el("tbody");
  const checkpoints = el("tbody");
  const evaluations = el("tbody");
  const evaluate = evaluateForm([], []);
  show(el("h1", {}, "Data & models"),
    el("h2", {}, "Corpora"), uploadForm(),
    table(["corpus", "kind", "format", "size", "records", "tokens", "labels", ""], corpora),
    el("h2", {}, "Checkpoints"),
    table(["checkpoint", "task", "step", "val loss", "size", "trained by", "on corpus", "from", ""], checkpoints),
    el("h2", {}, "Evaluations"), evaluate.form,
    table(["evaluation", "status", "checkpoint", "corpus", "kind", "result"], evaluations));
  const render = async () => {
    const [corpusPage, checkpointPage, jobPage, evaluationPage] = await Promise.all([api("/v1/corpora?limit=100"),
      api("/v1/checkpoints?limit=100"), api("/v1/jobs?limit=100"), api("/v1/evaluations?limit=100")]);
    const corpusById = new Map(corpusPage.data.map((c) => [c.id, c]));
    const jobById = new Map(jobPage.data.map((j) => [j.id, j]));
    const corpusName = (id) => corpusById.get(id)?.name || id;
    corpora.replaceChildren(...corpusPage.data.map((c) => el("tr", { "data-corpus": c.id },
      el("td", {}, c.name, el("div", { class: "muted" }, c.id)), el("td", {}, c.kind), el("td", {}, c.format),
      el("td", {}, bytes(c.size_bytes)), el("td", {}, c.n_records.toLocaleString()),
      el("td", {}, c.n_tokens === null ? "" : c.n_tokens.toLocaleString()), el("td", {}, (c.label_names || []).join(", ")),
      el("td", {}, deleteButton(`/v1/corpora/${c.id}`, `Delete corpus ${c.name}? This cannot be undone.`)))));
    checkpoints.replaceChildren(...checkpointPage.data.map((c) => {
      const job = jobById.get(c.job_id);
      return el("tr", { "data-checkpoint": c.id }, el("td", {}, c.id), el("td", {}, c.task), el("td", {}, c.step),
        el("td", {}, number(c.metrics.val_loss)), el("td", {}, bytes(c.size_bytes)),
        el("td", {}, job ? jobLink(job) : c.job_id || (c.source === "import" ? "imported" : "")),
        el("td", {}, job ? corpusName(job.corpus_id) : ""),
        el("td", {}, c.adapter_of_id ? `adapter over ${c.adapter_of_id}` : c.parent_id ? `base ${c.parent_id}` : "scratch"),
        el("td", {}, deleteButton(`/v1/checkpoints/${c.id}`, `Delete checkpoint ${c.id}? This cannot be undone.`)));
    }));
    evaluations.replaceChildren(...evaluationPage.data.map((e) => el("tr", { "data-evaluation": e.id },
      el("td", {}, el("a", { href: `#/evaluations/${e.id}` }, e.id)),
      el("td", { class: `status-${e.status}` }, e.status,
        FINAL.has(e.status) ? "" : el("progress", { max: e.progress.total_steps || 1, value: e.progress.step })),
      el("td", {}, e.checkpoint_id || "deleted"), el("td", {}, corpusName(e.corpus_id)), el("td", {}, e.kind),
      el("td", { class: e.error ? "error" : "" }, e.error || headline(e)))));
    for (const [body, what] of [[corpora, "corpora"], [checkpoints, "checkpoints"], [evaluations, "evaluations"]]) {
      if (!body.children.length) body.replaceChildren(el("tr", {}, el("td", { colspan: 9, class: "muted" }, `no ${what} yet`)));
    }
    evaluate.fill(checkpointPage.data, corpusPage.data);
  };
  await repeat(render);
}

// -- one evaluation -----------------------------------------------------------------------------------------------

function confusionMatrix(labels, counts) {
  // rows: the true class, columns: the predicted one; each cell shaded by its share of its row
  const cells = counts.map((row, t) => {
    const total = row.reduce((a, b) => a + b, 0) || 1;
    return el("tr", {}, el("th", {}, labels[t]), row.map((n, p) => {
      const cell = el("td", { class: t === p ? "hit" : "miss", title: `${labels[t]} predicted as ${labels[p]}` }, n.toLocaleString());
      cell.style.setProperty("--share", (n / total).toFixed(3));  // CSSOM: allowed by the page's CSP
      return cell;
    }));
  });
  return el("table", { class: "confusion" },
    el("thead", {}, el("tr", {}, el("th", { class: "muted" }, "true ↓ predicted →"), labels.map((l) => el("th", {}, l)))),
    el("tbody", {}, cells));
}

const EXAMPLE_COLUMNS = {  // what a worst example shows, by evaluation kind
  classifier: [["text", (x) => x.text], ["label", (x) => x.label], ["predicted", (x) => x.predicted],
    ["p(label)", (x) => number(x.score, 3)]],
  instruct: [["instruction", (x) => [x.instruction, x.input ? el("div", { class: "muted" }, x.input) : ""]],
    ["reference", (x) => x.reference], ["response", (x) => x.response], ["token F1", (x) => number(x.token_f1, 3)],
    ["judge", (x) => x.judge_score ?? ""]],
};

export async function evaluationPage(evaluationId) {
  const heading = el("h1", {}, `Evaluation ${evaluationId}`);
  const summary = el("div", { class: "facts" });
  const results = el("div");
  show(heading, summary, results);
  const render = async () => {
    const e = await api(`/v1/evaluations/${evaluationId}`);
    summary.replaceChildren(...facts([["status", e.status], ["progress", `${e.progress.step} / ${e.progress.total_steps}`],
      ["checkpoint", e.checkpoint_id || "deleted"], ["corpus", e.corpus_id], ["kind", e.kind],
      ["settings", JSON.stringify(e.settings)], ["error", e.error || ""]]));
    const details = e.details || {};
    const sections = [el("h2", {}, "Metrics"), e.metrics
      ? table(["metric", "value"], el("tbody", {}, Object.entries(e.metrics).map(([n, v]) =>
        el("tr", { "data-metric": n }, el("td", {}, n), el("td", {}, number(v, 5))))))
      : el("p", { class: "muted" }, "not finished yet")];
    if (details.confusion_matrix) {
      sections.push(el("h2", {}, "Confusion matrix"), confusionMatrix(details.label_names, details.confusion_matrix),
        el("h2", {}, "Per class"), table(["class", "precision", "recall", "F1", "support"], el("tbody", {},
          Object.entries(details.per_class).map(([name, c]) => el("tr", {}, el("td", {}, name),
            el("td", {}, number(c.precision, 3)), el("td", {}, number(c.recall, 3)), el("td", {}, number(c.f1, 3)),
            el("td", {}, c.support))))));
    }
    const columns = EXAMPLE_COLUMNS[e.kind];
    if (columns && details.worst_examples?.length) {
      sections.push(el("h2", {}, "Worst examples"), el("table", { class: "examples" },
        el("thead", {}, el("tr", {}, el("th", {}, "#"), columns.map(([h]) => el("th", {}, h)))),
        el("tbody", {}, details.worst_examples.map((x) => el("tr", {}, el("td", {}, x.position),
          columns.map(([, cell]) => el("td", {}, cell(x))))))));
    }
    if (details.judge?.error) sections.push(el("p", { class: "error" }, `the judge failed: ${details.judge.error}`));
    results.replaceChildren(...sections);
    if (FINAL.has(e.status)) clearInterval(state.timer);
  };
  await repeat(render);
}
