// The ScratchLLM dashboard: plain modules, no build step. Every call goes to this server's API with the key the
// user gave (kept in localStorage); what a page offers follows the key's scope (GET /v1/me).

import { dataPage, evaluationPage } from "./data.js";
import { KEY, api, failing, state } from "./lib.js";
import { comparePage, jobPage, runsPage } from "./runs.js";
import { deploymentsPage, playgroundPage } from "./serving.js";
import { newRunPage } from "./work.js";

const PAGES = {  // the hash's first part -> the page
  runs: runsPage,
  new: failing(newRunPage),
  data: dataPage,
  deployments: deploymentsPage,
  playground: failing(playgroundPage),
};
const ITEM_PAGES = {  // the hash's first part -> the page of the item the second part names
  jobs: jobPage,
  evaluations: evaluationPage,
  compare: failing((ids) => comparePage(ids.split(","))),
};

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

async function route() {
  clearInterval(state.timer);
  document.getElementById("problem").textContent = "";
  const [, name, id] = location.hash.split("/");
  if (id && ITEM_PAGES[name]) return ITEM_PAGES[name](decodeURIComponent(id));
  return (PAGES[name] || runsPage)();
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
