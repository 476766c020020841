"""The dashboard in a real browser (Debian's chromium driven by Playwright) against a live API and worker: pages
load without console errors, a job's chart draws new points while it trains, and a read key cannot use the
controls that change state. SCRATCHLLM_SCREENSHOT_DIR=docs/screenshots keeps the screenshots for the docs."""

import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tests.helpers import key_in
from tests.integration.test_cli_client import as_json, cli, server  # noqa: F401 (the fixture, asked for by name)

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed")


def browser_page(playwright, url: str, key: str, errors: list[str]):
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.add_init_script(f"localStorage.setItem('scratchllm.key', {key!r})")  # entered once, kept
    page = context.new_page()
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(url)
    return browser, page


def wait_for(page, expression: str, timeout_s: float = 30):
    """The expression's value once truthy (polled from here: the page's CSP forbids what wait_for_function evals)."""
    deadline = time.monotonic() + timeout_s
    while not (value := page.evaluate(expression)):
        assert time.monotonic() < deadline, f"timed out waiting for {expression}"
        time.sleep(0.2)
    return value


def screenshot(page, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=path, full_page=True)
    if directory := os.environ.get("SCRATCHLLM_SCREENSHOT_DIR"):
        shutil.copy(path, Path(directory) / path.name)


def read_key(server) -> str:  # noqa: F811
    return key_in(server["SCRATCHLLM_DATABASE_URL"], "read", "a reader")


def test_a_job_trains_live_in_the_dashboard_and_a_read_key_only_looks(server, shared_data, tmp_path):  # noqa: F811
    from playwright.sync_api import sync_playwright

    assert cli(server, "corpora", "upload", str(shared_data / "the-verdict.txt"), "--kind", "text").returncode == 0
    url = server["SCRATCHLLM_URL"]
    errors: list[str] = []
    with sync_playwright() as playwright:
        browser, page = browser_page(playwright, url + "#/new", server["SCRATCHLLM_API_KEY"], errors)
        page.wait_for_selector("#cost:has-text('parameters')")
        assert "cli tests: deploy" in page.inner_text("#who")
        page.fill("input[name=name]", "verdict-nano")
        families = page.eval_on_selector_all("select[name=preset] optgroup", "groups => groups.map(g => [g.label, "
                                             "[...g.children].map(o => o.value)])")
        assert [label.split()[0] for label, _ in families] == ["GPT-2", "Llama", "Qwen3"]
        assert "nano" in families[0][1] and "llama-mini" in families[1][1] and "qwen3-small" in families[2][1]
        page.select_option("select[name=preset]", "nano")
        page.fill("input[name=steps]", "150")
        page.fill("input[name='batch size']", "4")
        # the cost, before it starts: batch 4 x nano's context of 128 tokens
        wait_for(page, "document.querySelector('#cost').textContent.includes('512 tokens per step')")
        screenshot(page, tmp_path, "new-run")
        page.click("button:has-text('Start')")
        job = wait_for(page, "location.hash.startsWith('#/jobs/') && location.hash.slice(7)")
        points = "window.dashboard.charts.loss ? window.dashboard.charts.loss.data[0].length : 0"
        drawn = wait_for(page, f"({points}) > 2 && ({points})", timeout_s=60)
        wait_for(page, f"({points}) > {drawn}")  # new points while it trains
        assert page.is_enabled("text=Cancel") and page.inner_text("#problem") == ""
        wait_for(page, "window.dashboard.charts['tokens/s'].data[1].some((v) => v > 0)")
        screenshot(page, tmp_path, "job")
        page.select_option("select[aria-label=against]", "tokens")  # each step's x: the tokens seen by its end
        xs = wait_for(page, "window.dashboard.charts.loss.data[0].length > 2 && window.dashboard.charts.loss.data[0]")
        assert xs[:3] == [512, 1024, 1536]

        reader, read_page = browser_page(playwright, f"{url}#/jobs/{job}", read_key(server), errors)
        read_page.wait_for_selector("text=Cancel")
        wait_for(read_page, "document.querySelector('#who').textContent.includes('read')")
        time.sleep(0.5)  # a refresh has set the controls
        assert read_page.is_disabled("text=Cancel") and read_page.inner_text("#problem") == ""  # still running
        reader.close()

        page.click("text=Cancel")
        wait_for(page, "document.querySelector('.facts').textContent.includes('cancelled')")
        browser.close()
    assert errors == [], errors


def test_runs_ticked_on_the_runs_page_are_compared(server, shared_data, tmp_path):  # noqa: F811
    from playwright.sync_api import sync_playwright

    corpus = as_json(cli(server, "corpora", "upload", str(shared_data / "the-verdict.txt"), "--kind", "text",
                         "--json"))["id"]
    for name, learning_rate in (("slow", "0.0006"), ("fast", "0.003")):
        run = cli(server, "jobs", "start", "--corpus", corpus, "--preset", "nano", "--steps", "12", "--batch-size",
                  "4", "--learning-rate", learning_rate, "--name", name, "--follow")
        assert run.returncode == 0, run.stderr
    for checkpoint in as_json(cli(server, "checkpoints", "list", "--json")):  # each run's last checkpoint
        evaluated = cli(server, "evaluate", checkpoint["id"], "--corpus", corpus, "--follow")
        assert evaluated.returncode == 0, evaluated.stderr
    url = server["SCRATCHLLM_URL"]
    errors: list[str] = []
    with sync_playwright() as playwright:
        browser, page = browser_page(playwright, url + "#/runs", server["SCRATCHLLM_API_KEY"], errors)
        for run in as_json(cli(server, "jobs", "list", "--type", "pretrain", "--json")):
            page.check(f"input[aria-label='compare {run['id']}']")  # (the table is redrawn: found each time)
        screenshot(page, tmp_path, "runs")
        page.click("text=compare 2 runs")
        columns = "window.dashboard.charts.train_loss ? window.dashboard.charts.train_loss.data : []"
        wait_for(page, f"({columns}).length === 3 && ({columns}).slice(1).every((c) => c.some((v) => v !== null))")
        page.wait_for_selector(f".comparison[data-corpus='{corpus}'] td.best")
        rows = page.locator(f".comparison[data-corpus='{corpus}'] tbody tr")
        runs = [rows.nth(i).locator("td").first.inner_text() for i in range(rows.count())]  # "1. fast", ...
        assert sorted(run.split(". ", 1)[1] for run in runs) == ["fast", "slow"]
        # the lower perplexity is the better, and only it is marked
        perplexity = page.evaluate(f"""[...document.querySelectorAll(".comparison[data-corpus='{corpus}'] th")]
            .findIndex((th) => th.textContent === 'perplexity')""")
        cells = [rows.nth(i).locator("td").nth(perplexity) for i in range(2)]
        values = [float(cell.inner_text().rstrip(" ★")) for cell in cells]
        assert ["best" in (cell.get_attribute("class") or "") for cell in cells] == [v == min(values) for v in values]
        screenshot(page, tmp_path, "compare")
        browser.close()
    assert errors == [], errors


def test_the_playground_streams_and_classifies_and_deployments_follow_the_scope(server, tmp_path):  # noqa: F811
    from playwright.sync_api import sync_playwright

    from model import GPT, GPTClassifier
    from tests.helpers import TINY_LM, add_adapter, register_model
    from tests.integration.test_faults import settings_of

    settings = settings_of(server)
    torch.manual_seed(0)
    base = GPT(replace(TINY_LM, context_length=1024)).eval()  # room to stream for a while
    lm = register_model(settings, base)
    adapter, _ = add_adapter(settings, lm, base, seed=1, rank=2)
    other_lm = register_model(settings, GPT(TINY_LM).eval())
    spam = register_model(settings, GPTClassifier(TINY_LM, 2).eval(), label_names=["ham", "spam"])
    assert cli(server, "deploy", "tiny", lm).returncode == 0
    url = server["SCRATCHLLM_URL"]
    errors: list[str] = []
    with sync_playwright() as playwright:
        browser, page = browser_page(playwright, url + "#/deployments", server["SCRATCHLLM_API_KEY"], errors)
        page.wait_for_selector("tr[data-deployment='tiny']")
        page.fill("input[aria-label='deployment name']", "spam")
        page.select_option("select[aria-label='checkpoint to deploy']", spam)
        page.click("button:has-text('Deploy')")
        wait_for(page, "document.querySelector(\"tr[data-deployment='spam']\")?.textContent.includes('ready')")
        page.select_option("select[aria-label='checkpoint for tiny']", other_lm)
        time.sleep(2.5)  # a refresh of the table: a choice not applied yet stays
        assert page.input_value("select[aria-label='checkpoint for tiny']") == other_lm
        page.select_option("select[aria-label='adapter for tiny']", adapter)
        page.fill("input[aria-label='adapter name for tiny']", "poet")
        page.click("tr[data-deployment='tiny'] >> text=Add adapter")
        wait_for(page, "document.querySelector(\"tr[data-deployment='tiny'] [data-adapter='poet']\") && "
                       "!document.querySelector(\"tr[data-deployment='tiny']\").textContent.includes('(loading)')")
        page.goto(url + "#/playground")
        page.wait_for_selector("select[aria-label='deployment']")
        page.select_option("select[aria-label='deployment']", "tiny")
        page.wait_for_selector("button:has-text('Generate')")
        page.fill("input[aria-label='max new tokens']", "1000")
        page.fill("input[aria-label='temperature']", "0")
        page.evaluate("""() => {  // the output's length each time the page changed it
            const output = document.getElementById('output');
            window.lengths = [];
            new MutationObserver(() => window.lengths.push(output.textContent.length))
                .observe(output, {childList: true, subtree: true, characterData: true});
        }""")
        page.click("button:has-text('Generate')")
        wait_for(page, "window.lengths.length > 0 && !document.querySelector('#output .error') && "
                       "window.lengths.at(-1) > 2000", timeout_s=60)
        lengths = page.evaluate("window.lengths")
        assert len(set(lengths)) >= 5, lengths  # drawn piece by piece as it streamed, not at the end
        screenshot(page, tmp_path, "playground")
        page.select_option("select[aria-label='deployment']", "tiny:poet")  # the adapter, over the same base
        page.fill("input[aria-label='max new tokens']", "5")
        page.click("button:has-text('Generate')")
        wait_for(page, "document.getElementById('output').textContent.length > 0")
        assert not page.query_selector("#output .error")
        page.select_option("select[aria-label='deployment']", "spam")
        page.click("button:has-text('Classify')")
        page.wait_for_selector("tr[data-label='spam']")
        assert {page.inner_text("tr[data-label='ham'] td"), page.inner_text("tr[data-label='spam'] td")} == {
            "ham", "spam"}
        page.goto(url + "#/deployments")
        page.wait_for_selector("tr[data-deployment='tiny']")
        assert page.is_enabled("tr[data-deployment='tiny'] >> text=Serve it")
        screenshot(page, tmp_path, "deployments")
        browser.close()

        browser, page = browser_page(playwright, url + "#/deployments", read_key(server), errors)
        page.wait_for_selector("tr[data-deployment='tiny']")
        wait_for(page, "document.querySelector('#who').textContent.includes('read')")
        page.evaluate("window.dispatchEvent(new HashChangeEvent('hashchange'))")  # drawn again, knowing the scope
        page.wait_for_selector("tr[data-deployment='tiny']")
        assert page.is_disabled("tr[data-deployment='tiny'] >> text=Serve it")
        browser.close()
    assert errors == [], errors


def test_data_and_models_uploads_evaluates_and_draws_the_confusion_matrix(server, shared_data, tmp_path):  # noqa: F811
    from playwright.sync_api import sync_playwright

    from model import GPT, GPTClassifier
    from tests.helpers import TINY_LM, register_model
    from tests.integration.test_faults import settings_of

    torch.manual_seed(0)
    classifier = register_model(settings_of(server), GPTClassifier(TINY_LM, 2).eval(), label_names=["ham", "spam"])
    base = register_model(settings_of(server), GPT(TINY_LM).eval())
    url = server["SCRATCHLLM_URL"]
    errors: list[str] = []
    with sync_playwright() as playwright:
        browser, page = browser_page(playwright, url + "#/data", server["SCRATCHLLM_API_KEY"], errors)
        page.wait_for_selector(f"tr[data-checkpoint='{classifier}']")
        page.evaluate("""() => {  // every value the upload's progress bar shows
            const bar = document.querySelector("progress[aria-label='upload progress']");
            window.shown = [];
            new MutationObserver(() => window.shown.push(bar.value)).observe(bar, {attributes: true});
        }""")
        page.set_input_files("input[aria-label='corpus file']", str(shared_data / "SMSSpamCollection.tsv"))
        page.select_option("select[aria-label=kind]", "classification")
        page.fill("input[aria-label='corpus name']", "sms")
        page.click("button:has-text('Upload')")
        wait_for(page, "document.querySelector('#upload-status').textContent.startsWith('uploaded sms')")
        assert page.evaluate("Math.max(...window.shown)") == 1
        corpus = page.get_attribute("tr[data-corpus]:has-text('sms')", "data-corpus")
        assert "5,574" in page.inner_text(f"tr[data-corpus='{corpus}']")  # records: the UCI file's messages

        page.select_option("select[aria-label='checkpoint to evaluate']", classifier)
        page.select_option("select[aria-label='corpus to evaluate on']", corpus)
        page.fill("input[aria-label='max examples']", "200")
        page.click("button:has-text('Evaluate')")
        wait_for(page, "location.hash.startsWith('#/evaluations/')")
        page.wait_for_selector("table.confusion", timeout=60_000)
        counts = [int(c.replace(",", "")) for c in page.locator("table.confusion td").all_inner_texts()]
        assert len(counts) == 4 and sum(counts) == 200
        correct = counts[0] + counts[3]  # the diagonal
        assert page.inner_text("tr[data-metric=correct] td:nth-child(2)") == f"{correct:,}"
        assert page.locator("table.examples tbody tr").count() == 10  # the worst examples, by default 10
        screenshot(page, tmp_path, "evaluation")
        page.goto(url + "#/data")
        page.wait_for_selector("tr[data-evaluation] .status-succeeded")
        screenshot(page, tmp_path, "data")

        page.goto(url + "#/new")  # a LoRA finetune of a language model into a classifier, from the form
        page.select_option("select[name=type]", "finetune_classifier")
        page.select_option("select[aria-label='base checkpoint']", base)
        assert page.is_hidden("select[name=preset]") and page.is_hidden("input[name='mask prompt']")
        page.check("input[name=LoRA]")
        page.fill("input[name='LoRA rank']", "4")
        page.fill("input[name=steps]", "3")
        wait_for(page, "document.querySelector('#cost').textContent.includes('parameters')")
        page.click("button:has-text('Start')")
        job = wait_for(page, "location.hash.startsWith('#/jobs/') && location.hash.slice(7)")
        finetune = as_json(cli(server, "jobs", "show", job, "--json"))
        assert (finetune["type"], finetune["corpus_id"], finetune["base_checkpoint_id"]) == (
            "finetune_classifier", corpus, base)
        assert finetune["spec"]["lora"]["rank"] == 4 and finetune["spec"]["hyperparameters"]["max_steps"] == 3
        browser.close()

        browser, page = browser_page(playwright, url + "#/data", read_key(server), errors)
        wait_for(page, "document.querySelector('#who').textContent.includes('read')")
        page.evaluate("window.dispatchEvent(new HashChangeEvent('hashchange'))")  # drawn again, knowing the scope
        page.wait_for_selector(f"tr[data-corpus='{corpus}']")
        for control in ("button:has-text('Upload')", "button:has-text('Evaluate')",
                        f"tr[data-corpus='{corpus}'] >> text=Delete"):
            assert page.is_disabled(control), control
        browser.close()
    assert errors == [], errors
