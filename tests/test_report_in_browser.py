"""report.html as a person sees it: opened in headless Chromium, every plot rendered, every table
filled. Needs Debian's chromium (.ci/run installs it) and Playwright for Python (the test extra);
skipped, saying which is missing, where either cannot be had."""

from __future__ import annotations

import shutil

import pytest
from synthetic_runs import standard_run

from attnbench.presenting.report import write_reports
from attnbench.storage.run_folder import load_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Flags for a sandboxed CI box with no network: no first-run UI, no background connections.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def test_the_answer_comes_first_and_every_plot_and_table_renders(tmp_path):
    playwright_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed")
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium)")
    run = load_run(standard_run(tmp_path / "results" / "synthetic" / "run"))
    write_reports(run)
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        failed_requests = []
        page.on("requestfailed", lambda request: failed_requests.append(request.url))
        page.goto((run.path / "report.html").as_uri())
        page.wait_for_load_state("load")
        sizes = page.eval_on_selector_all("img", "imgs => imgs.map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
        tables = page.eval_on_selector_all(
            "table", "ts => ts.map(t => [t.previousElementSibling.textContent, t.tBodies[0].rows.length])"
        )
        answer = page.eval_on_selector("section.answer", "s => [s.querySelector('h2').textContent, "
                                       "s.getBoundingClientRect().bottom, s.innerText]")
        first_table_in_answer = page.eval_on_selector("table", "t => t.closest('section.answer') !== null")
        first_plot_top = page.eval_on_selector("img", "i => i.getBoundingClientRect().top")
        wrapped_figures = page.eval_on_selector_all(
            "span.n", "spans => spans.filter(s => s.getClientRects().length > 1).map(s => s.textContent)")
        page.screenshot(path=str(run.path / "screenshot.png"), full_page=True)
        browser.close()
    title, bottom, text = answer
    assert title == "Answer: which implementation at each N" and first_table_in_answer
    assert bottom < 900 and first_plot_top < 1500  # the answer on the first screen, a plot just below it
    assert "tiled 33.55 ms" in text and "none (closest: linear" in text  # 8192: tiled fastest; 0.3 over 0.1
    assert len(sizes) == 6 and all(complete and width > 300 and height > 200 for complete, width, height in sizes)
    rows_per_table = dict(tables)
    assert rows_per_table["B=1 H=8 D=64 float32 cpu forward"] == 5  # the answer: one line per N
    assert rows_per_table["Declared vs measured complexity"] == 5 * 2  # implementations × (latency, memory)
    assert rows_per_table["Every point (N, then fastest first)"] == len(run.rows)
    assert rows_per_table["Achieved throughput"] == 2 * 5  # the exact ones at every seq_len
    assert wrapped_figures == []  # no figure broken across lines
    assert failed_requests == []
