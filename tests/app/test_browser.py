"""`lmedit app` in a real browser (headless Chromium) on the embedded model.

Needs the ``app`` extra (Gradio), selenium and Debian's ``chromium`` + ``chromium-driver``
(``LMEDIT_WITH_APP=1 bash scripts/install.sh`` installs all of them; CI does). Skipped
without them, unless ``LMEDIT_REQUIRE_BROWSER=1`` (set by CI), where a missing browser fails.
``LMEDIT_SCREENSHOTS=DIR`` keeps a screenshot of every tab (the ones in docs/app/ come from here).
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

from run_folders import runs_root  # noqa: F401  (fixture)

pytestmark = [pytest.mark.embedded, pytest.mark.browser]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
EIFFEL = "The Eiffel Tower is located in the city of"


def _missing() -> str | None:
    for module in ("gradio", "selenium"):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed (LMEDIT_WITH_APP=1 bash scripts/install.sh)"
    if not CHROMIUM or not DRIVER:
        return "chromium and chromium-driver are not installed (LMEDIT_WITH_APP=1 bash scripts/install.sh)"
    return None


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("LMEDIT_SCREENSHOTS") or tmp_path_factory.mktemp("shots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def served(embedded, runs_root):  # noqa: F811
    reason = _missing()
    if reason:
        if os.environ.get("LMEDIT_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    from lmedit.app.ui import launch
    from lmedit.commands.app import make_page

    page = make_page("smollm2-135m", runs_root, loaded=embedded, sessions=2)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    demo, url = launch(page, port=port, block=False)
    yield page, url
    demo.close()


def _driver(url: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1300,1500"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.get(url)
    return driver


@pytest.fixture(scope="module")
def browser(served):
    driver = _driver(served[1])
    yield driver
    driver.quit()


def _wait(driver, condition, seconds: float = 120):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, seconds, poll_frequency=0.25).until(lambda d: condition(d))


def _text(driver, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id).text


def _type(driver, element_id: str, text: str) -> None:
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.CSS_SELECTOR, f"#{element_id} textarea, #{element_id} input")
    box.clear()
    box.send_keys(text)


def _click(driver, element_id: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, element_id).click()


def _tab(driver, name: str) -> None:
    from selenium.webdriver.common.by import By

    next(b for b in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]") if b.text.strip() == name).click()


def _cells(driver, element_id: str) -> list[list[str]]:
    """A Gradio table's visible grid (``role=gridcell`` with data-row / data-col), row by row."""
    from selenium.webdriver.common.by import By

    grid: dict[int, dict[int, str]] = {}
    for cell in driver.find_elements(By.CSS_SELECTOR, f"#{element_id} [role=gridcell]"):
        row, col = int(cell.get_attribute("data-row")), int(cell.get_attribute("data-col"))
        grid.setdefault(row, {})[col] = (cell.get_attribute("textContent") or "").strip()
    return [[cols[c] for c in sorted(cols)] for _, cols in sorted(grid.items())]


def _rows(driver, element_id: str) -> list[list[str]]:
    """The table's rows once it has drawn them (cells fill in a moment after the status line)."""
    _wait(driver, lambda d: all(row and row[0] for row in _cells(d, element_id)), 30)
    return _cells(driver, element_id)


def test_edit_shows_the_new_answer_and_undo_brings_back_the_old(browser, shots):
    from selenium.webdriver.common.by import By

    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#edit-prompt textarea"), 60)
    _type(browser, "edit-prompt", EIFFEL)
    _type(browser, "edit-target", "Rome")
    _type(browser, "edit-unrelated", "The capital of Germany is")
    _click(browser, "edit-apply")
    _wait(browser, lambda d: "edit #1: FT-M" in _text(d, "edit-status"))
    rows = _rows(browser, "edit-answers")
    assert rows[0][0] == "prompt" and rows[0][2].startswith("Paris") and rows[0][3].startswith("Rome"), rows
    assert rows[1][0] == "unrelated" and rows[1][2] == rows[1][3], rows  # the unrelated answer did not move
    assert _rows(browser, "edit-stack")[0][:2] == ["1", "FT-M"]
    browser.save_screenshot(str(shots / "edit.png"))
    _click(browser, "edit-undo")
    _wait(browser, lambda d: "undid edit #1" in _text(d, "edit-status"))
    rows = _rows(browser, "edit-answers")
    assert rows[0][2].startswith("Rome") and rows[0][3].startswith("Paris"), rows
    assert not any(any(row) for row in _cells(browser, "edit-stack"))


def test_two_tabs_editing_at_once_each_keep_their_own_edit(browser, served):
    """A second browser session edits while the first does: both finish, each sees only its own edit."""
    from selenium.webdriver.common.by import By

    other = _driver(served[1])
    try:
        _wait(other, lambda d: d.find_elements(By.CSS_SELECTOR, "#edit-prompt textarea"), 60)
        jobs = {browser: (EIFFEL, "Rome"), other: ("The capital of Germany is", "Vienna")}
        for driver, (prompt, target) in jobs.items():
            _type(driver, "edit-prompt", prompt)
            _type(driver, "edit-target", target)
            _type(driver, "edit-unrelated", "")
        for driver in jobs:  # both clicks before either edit is done
            _click(driver, "edit-apply")
        for driver, (prompt, target) in jobs.items():
            _wait(driver, lambda d: "edit #" in _text(d, "edit-status") and "undid" not in _text(d, "edit-status"))
            rows = _rows(driver, "edit-answers")
            assert rows[0][3].startswith(target), rows
            assert [row[1:4] for row in _rows(driver, "edit-stack")] == [["FT-M", "smollm2-135m", f"{prompt} → {target}"]]
        assert page_sessions(served) == 2
        for driver in jobs:
            _click(driver, "edit-undo")
            _wait(driver, lambda d: "undid" in _text(d, "edit-status"))
    finally:
        other.quit()


def page_sessions(served) -> int:
    return served[0].bench.session_count


def test_compare_runs_the_edit_with_each_method(browser, shots):
    from selenium.webdriver.common.by import By

    _tab(browser, "Compare")
    boxes = browser.find_element(By.ID, "compare-methods")
    next(label for label in boxes.find_elements(By.CSS_SELECTOR, "label") if label.text.strip() == "ROME").click()
    _type(browser, "compare-prompt", EIFFEL)
    _type(browser, "compare-target", "Rome")
    _click(browser, "compare-run")
    _wait(browser, lambda d: "2 methods" in _text(d, "compare-note"))
    rows = {r[0]: r for r in _rows(browser, "compare-table")}
    assert rows["unedited"][1].startswith("Paris") and rows["FT-M"][1].startswith("Rome"), rows
    assert rows["GRACE"][1].startswith("Rome"), rows
    browser.save_screenshot(str(shots / "compare.png"))


def test_trace_draws_the_heatmap_and_names_a_layer(browser, shots):
    from selenium.webdriver.common.by import By

    _tab(browser, "Trace")
    _type(browser, "trace-prompt", EIFFEL)
    _type(browser, "trace-subject", "Eiffel Tower")
    _click(browser, "trace-run")
    _wait(browser, lambda d: "layer" in _text(d, "trace-text"), 300)
    assert "answer" in _text(browser, "trace-text")
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#trace-image img"))
    browser.save_screenshot(str(shots / "trace.png"))


def test_runs_tab_shows_a_run_and_refuses_a_path_outside(browser, shots):
    _tab(browser, "Runs")
    _type(browser, "runs-typed", "runs/grace-t2")
    _click(browser, "runs-show")
    _wait(browser, lambda d: "GRACE" in _text(d, "runs-table"))
    assert "chunks 2 / 2, complete" in _text(browser, "runs-details")
    assert [r[0] for r in _rows(browser, "runs-chunks")] == ["0", "1"]
    browser.save_screenshot(str(shots / "runs.png"))
    _type(browser, "runs-typed", "../")
    _click(browser, "runs-show")
    _wait(browser, lambda d: "outside the runs folder" in d.find_element("tag name", "body").text, 30)
