// Serving: the deployments (create one, point one at another checkpoint) and the playground (streamed generation,
// chat, classification).

import {
  api, authorization, cannot, deleteButton, el, field, may, problem, refill, repeat, send, show, table,
} from "./lib.js";

const DTYPES = ["auto", "float32", "bfloat16", "float16"];

// -- deployments --------------------------------------------------------------------------------------------------

function deployForm() {
  const name = el("input", { type: "text", "aria-label": "deployment name", placeholder: "e.g. chat" });
  const checkpoint = el("select", { "aria-label": "checkpoint to deploy" });
  const device = el("input", { type: "text", value: "auto", size: 8, "aria-label": "device" });
  const dtype = el("select", { "aria-label": "dtype" }, DTYPES.map((d) => el("option", { value: d }, d)));
  const preferred = el("input", { type: "checkbox", "aria-label": "default deployment" });
  const status = el("span", { class: "muted" });
  const go = el("button", { type: "button", disabled: !may("deploy"), title: cannot("deploy") }, "Deploy");
  go.onclick = async () => {
    go.disabled = true;
    try {
      const made = await send("/v1/deployments", { name: name.value, checkpoint_id: checkpoint.value,
        device: device.value, dtype: dtype.value, default: preferred.checked });
      status.className = "muted";
      status.textContent = `${made.name} is ${made.state}`;
      name.value = "";
    } catch (error) { status.className = "error"; status.textContent = error.message; }
    go.disabled = !may("deploy");
  };
  const fill = (checkpoints) => refill(checkpoint, checkpoints, (c) => `${c.id} (${c.task}, step ${c.step})`);
  return { form: el("div", { class: "filters" }, field("name", name), field("checkpoint", checkpoint),
    field("device", device), field("dtype", dtype), field("default", preferred), go, status), fill };
}

function adapterCell(deployment, candidates) {
  // the LoRA adapters a deployment serves over its checkpoint (each removable), and a form to add one of the
  // adapter-only checkpoints trained over it
  const change = async (adapters) => {
    try { await send(`/v1/deployments/${deployment.name}`, { adapters }, "PATCH"); } catch (error) { alert(error.message); }
  };
  const served = Object.entries(deployment.adapters).map(([name, id]) => el("div", { "data-adapter": name },
    `${name} → ${id}${deployment.serving_adapters?.[name] === id ? "" : " (loading)"} `, el("button", { type: "button", disabled: !may("deploy"), title: cannot("deploy") || `stop serving ${name}`,
      onclick: () => { const { [name]: _, ...rest } = deployment.adapters; change(rest); } }, "×")));
  const unused = candidates.filter((c) => !Object.values(deployment.adapters).includes(c.id));
  if (!unused.length || deployment.task !== "lm") return el("td", {}, served);
  const pick = el("select", { "aria-label": `adapter for ${deployment.name}` },
    unused.map((c) => el("option", { value: c.id }, `${c.id} (step ${c.step})`)));
  const name = el("input", { type: "text", size: 10, placeholder: "name", "aria-label": `adapter name for ${deployment.name}` });
  const add = el("button", { type: "button", disabled: !may("deploy"), title: cannot("deploy"),
    onclick: () => change({ ...deployment.adapters, [name.value]: pick.value }) }, "Add adapter");
  return el("td", {}, served, pick, " ", name, " ", add);
}

export async function deploymentsPage() {
  const body = el("tbody");
  const chosen = new Map();  // deployment -> the checkpoint picked for it and not yet applied: kept across refreshes
  const create = deployForm();
  const render = async () => {
    const [deployments, checkpoints] = await Promise.all([api("/v1/deployments?limit=100"),
      api("/v1/checkpoints?limit=100")]);
    create.fill(checkpoints.data);
    if (body.contains(document.activeElement) && document.activeElement.tagName === "INPUT") return;  // mid-typing
    body.replaceChildren(...deployments.data.map((d) => {
      const picked = chosen.get(d.name) ?? d.checkpoint_id;
      const choice = el("select", { "aria-label": `checkpoint for ${d.name}`, onchange: (e) => chosen.set(d.name, e.target.value) },
        checkpoints.data.filter((c) => c.task === d.task).map((c) => el("option", { value: c.id, selected: c.id === picked },
          `${c.id} (step ${c.step})`)));
      const repoint = el("button", { type: "button", disabled: !may("deploy"), title: cannot("deploy"), onclick: async () => {
        repoint.disabled = true;
        try {
          await send(`/v1/deployments/${d.name}`, { checkpoint_id: choice.value }, "PATCH");
          chosen.delete(d.name);
        } catch (error) { alert(error.message); }
      } }, "Serve it");
      const removal = deleteButton(`/v1/deployments/${d.name}`, `Stop serving ${d.name} and delete the deployment?`);
      const adapters = adapterCell(d, checkpoints.data.filter((c) => c.adapter_of_id === d.checkpoint_id));
      return el("tr", { "data-deployment": d.name }, el("td", {}, d.name + (d.default ? " (default)" : "")),
        el("td", {}, d.task), el("td", { class: d.state === "failed" ? "status-failed" : "" }, d.state),
        el("td", {}, d.served_device ? `${d.served_device} ${d.served_dtype}` : `${d.device} ${d.dtype}`),
        el("td", {}, d.serving_checkpoint_id || ""), el("td", {}, choice, " ", repoint), adapters, el("td", {}, removal),
        el("td", { class: "error" }, d.error || ""));
    }));
    if (!deployments.data.length) body.replaceChildren(el("tr", {}, el("td", { colspan: 9, class: "muted" }, "nothing deployed yet")));
  };
  show(el("h1", {}, "Deployments"), create.form,
    table(["name", "task", "state", "served on", "serving", "checkpoint", "adapters", "", ""], body));
  await repeat(render);
}

// -- playground ---------------------------------------------------------------------------------------------------

async function* serverEvents(path, body, signal) {
  // the JSON of each server-sent event of a streamed POST (fetch: EventSource cannot POST or send a key)
  const response = await fetch(path, { method: "POST", signal, body: JSON.stringify(body),
    headers: { "Content-Type": "application/json", ...authorization() } });
  if (!response.ok) throw new Error(problem(response.status, await response.json().catch(() => ({})), response.statusText));
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

export async function playgroundPage() {
  const deployments = (await api("/v1/deployments?limit=100")).data.filter((d) => d.state !== "failed");
  const pick = el("select", { "aria-label": "deployment" }, deployments.flatMap((d) => [
    el("option", { value: d.name, "data-task": d.task }, `${d.name} (${d.task})`),
    ...Object.keys(d.adapters).map((a) => el("option", { value: `${d.name}:${a}`, "data-task": d.task }, `${d.name}:${a} (adapter)`)),
  ]));
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
        const result = await send("/classify", { model: pick.value, input: [text.value] });
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
