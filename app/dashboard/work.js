// A new run: pretraining or a finetune from a form, with what it will cost shown before it starts.

import { api, bytes, cannot, el, field, may, send, show } from "./lib.js";

const CORPUS_KIND = { pretrain: "text", finetune_classifier: "classification", finetune_instruct: "instruction",
  finetune_dpo: "preference" };
const FINETUNES = ["finetune_classifier", "finetune_instruct", "finetune_dpo"];
// GET /v1/jobs/presets's families, in the order the form lists them
const PRESET_FAMILIES = { gpt2: "GPT-2", llama: "Llama (RoPE, RMSNorm, SwiGLU, GQA)", qwen3: "Qwen3 (Llama + QK-norm)" };

export async function newRunPage() {
  const [corpora, checkpoints, presets] = await Promise.all([api("/v1/corpora?limit=100"),
    api("/v1/checkpoints?limit=100"), api("/v1/jobs/presets")]);
  const input = (name, attributes) => el("input", { name, "aria-label": name, ...attributes });
  const optional = (name, attributes = {}) => input(name, { type: "number", placeholder: "default", ...attributes });
  // [the control, the job types that use it]; a number left empty is the server's default
  const form = {
    type: [el("select", { name: "type", "aria-label": "type" }, Object.keys(CORPUS_KIND).map((t) => el("option", { value: t }, t)))],
    name: [input("name", { type: "text", placeholder: "optional" })],
    corpus: [el("select", { name: "corpus", "aria-label": "corpus" })],
    preset: [el("select", { name: "preset", "aria-label": "preset" }, Object.entries(PRESET_FAMILIES).map(([family, label]) =>
      el("optgroup", { label }, presets.data.filter((p) => p.family === family).map((p) => el("option", { value: p.name },
        `${p.name} (${p.n_layer} layers, ${p.n_embd} wide, context ${p.context_length})`))))), ["pretrain"]],
    base: [el("select", { name: "base", "aria-label": "base checkpoint" })],
    steps: [input("steps", { type: "number", value: 200, min: 1 })],
    epochs: [optional("epochs", { min: 0, step: 0.5, title: "instead of steps: passes over the training data" })],
    batch: [input("batch size", { type: "number", value: 8, min: 1 })],
    accumulation: [input("grad accum steps", { type: "number", value: 1, min: 1 })],
    learning_rate: [optional("learning rate", { step: 0.0001, min: 0, title: "empty: the server's default for the job type (DPO's is lower)" })],
    warmup_steps: [optional("warmup steps", { min: 0 })],
    eval_interval: [optional("eval interval", { min: 0 })],
    checkpoint_interval: [optional("checkpoint interval", { min: 0 })],
    validation_fraction: [optional("validation fraction", { min: 0.01, max: 0.49, step: 0.01 })],
    devices: [input("devices", { type: "text", placeholder: "1, 2, … or auto", size: 8 })],
    nodes: [optional("nodes", { min: 1, title: "machines training the run together, each with the devices above" })],
    seed: [optional("seed", { min: 0 })],
    keep_checkpoints: [optional("keep checkpoints", { min: 0, title: "the newest N and the best by validation loss; "
      + "0 keeps all" })],
    trainable_blocks: [optional("trainable blocks", { min: 0 }), ["finetune_classifier"]],
    mask_prompt: [input("mask prompt", { type: "checkbox" }), ["finetune_instruct"]],
    lora: [input("LoRA", { type: "checkbox" }), FINETUNES],
    lora_rank: [optional("LoRA rank", { min: 1 }), FINETUNES],
    lora_alpha: [optional("LoRA alpha", { min: 0, step: 1 }), FINETUNES],
    adapter_only: [input("adapter only", { type: "checkbox", title: "checkpoints of LoRA's tensors alone, served per "
      + "request over the base's deployment" }), ["finetune_instruct", "finetune_dpo"]],
    dpo_beta: [optional("DPO beta", { min: 0, step: 0.05 }), ["finetune_dpo"]],
  };
  const value = (key) => form[key][0].value;
  const numbers = (pairs) => Object.fromEntries(pairs.filter(([, key]) => value(key) !== "")
    .map(([name, key]) => [name, Number(value(key))]));
  const cost = el("p", { id: "cost", class: "muted" });
  const submit = el("button", { type: "button", disabled: !may("train"), title: cannot("train") }, "Start");
  const request = () => {
    const type = value("type");
    const devices = value("devices").trim();
    const body = { type, corpus_id: value("corpus"), name: value("name") || null,
      hyperparameters: numbers([[value("epochs") ? "epochs" : "max_steps", value("epochs") ? "epochs" : "steps"],
        ["batch_size", "batch"], ["grad_accum_steps", "accumulation"],
        ["learning_rate", "learning_rate"], ["warmup_steps", "warmup_steps"], ["eval_interval", "eval_interval"],
        ["checkpoint_interval", "checkpoint_interval"]]),
      ...numbers([["validation_fraction", "validation_fraction"], ["seed", "seed"],
        ["keep_checkpoints", "keep_checkpoints"], ["nodes", "nodes"]]),
      ...(devices ? { devices: devices === "auto" ? "auto" : Number(devices) } : {}) };
    if (type === "pretrain" && !value("base")) return { ...body, model: { preset: value("preset") } };
    body.base_checkpoint_id = value("base");
    if (type === "pretrain") return body;  // continued pretraining: the base's model and tokenizer
    if (type === "finetune_classifier") Object.assign(body, numbers([["trainable_blocks", "trainable_blocks"]]));
    if (type === "finetune_instruct") body.mask_prompt = form.mask_prompt[0].checked;
    if (type === "finetune_dpo") Object.assign(body, numbers([["dpo_beta", "dpo_beta"]]));
    if (form.lora[0].checked) body.lora = numbers([["rank", "lora_rank"], ["alpha", "lora_alpha"]]);
    if (["finetune_instruct", "finetune_dpo"].includes(type) && form.lora[0].checked) {
      body.adapter_only = form.adapter_only[0].checked;
    }
    return body;
  };
  const choices = () => {  // the corpora, checkpoints and options the type can use
    const type = value("type");
    form.corpus[0].replaceChildren(...corpora.data.filter((c) => c.kind === CORPUS_KIND[type])
      .map((c) => el("option", { value: c.id }, `${c.name} (${c.n_records} records)`)));
    const was = value("base");
    form.base[0].replaceChildren(...(type === "pretrain" ? [el("option", { value: "" }, "none: a new model")] : []),
      ...checkpoints.data.filter((c) => c.task === "lm" && !(form.adapter_only[0].checked && c.adapter_of_id))
        .map((c) => el("option", { value: c.id, selected: c.id === was }, `${c.id} (step ${c.step})`)));
    form.preset[0].disabled = Boolean(value("base"));
    for (const [control, types] of Object.values(form)) control.parentElement.hidden = types && !types.includes(type);
    for (const key of ["lora_rank", "lora_alpha", "adapter_only"]) form[key][0].disabled = !form.lora[0].checked;
  };
  let pending = null;
  const estimate = () => {
    clearTimeout(pending);
    pending = setTimeout(async () => {
      try {
        const e = await send("/v1/jobs/estimate", request());
        cost.className = e.fits ? "muted" : "error";
        cost.textContent = `${(e.parameters / 1e6).toFixed(2)}M parameters · about ${bytes(e.memory_bytes)} of memory ` +
          `(the limit is ${bytes(e.memory_limit_bytes)}) · ${e.tokens_per_step.toLocaleString()} tokens per step · ` +
          `${e.steps.toLocaleString()} steps${value("epochs") ? " (estimated from the corpus)" : ""}` +
          (e.refusal ? ` · ${e.refusal}` : "");
      } catch (error) { cost.className = "error"; cost.textContent = error.message; }
    }, 300);
  };
  submit.onclick = async () => {
    submit.disabled = true;
    try {
      const job = await send("/v1/jobs", request());
      location.hash = `#/jobs/${job.id}`;
    } catch (error) { cost.className = "error"; cost.textContent = error.message; submit.disabled = false; }
  };
  for (const [control] of Object.values(form)) control.addEventListener("input", estimate);
  form.type[0].addEventListener("change", choices);
  form.lora[0].addEventListener("change", choices);
  form.adapter_only[0].addEventListener("change", choices);
  form.base[0].addEventListener("change", () => { form.preset[0].disabled = Boolean(value("base")); });
  show(el("h1", {}, "New run"),
    el("div", { class: "form" }, Object.values(form).map(([control]) => field(control.getAttribute("aria-label"), control))),
    cost, el("p", {}, submit, may("train") ? "" : el("span", { class: "muted" }, " (this key's scope cannot start runs)")));
  choices();
  estimate();
}
