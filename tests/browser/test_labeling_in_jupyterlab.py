"""Chapter 01's labelling widget in a real JupyterLab, clicked in a real (headless) Chromium.

The test starts ``jupyter lab`` on 127.0.0.1 in a temporary folder holding a small notebook that
builds a ``LabelingSession`` and shows a ``LabelingWidget`` with the same two lines chapter 01 uses,
runs all cells from JupyterLab's Run menu, clicks "B better" on the first pair and checks that the
preference file holds that one record, chosen and rejected the way the page showed them.

Needs Debian's ``chromium`` and ``chromium-driver`` and the ``selenium`` package; skipped, with the
reason, where any of them is missing. Run it alone with ``pytest -m browser tests/browser``.
"""

from __future__ import annotations

import time
from pathlib import Path

import nbformat
import pytest

CHROMIUM_PATH, CHROMEDRIVER_PATH = "/usr/bin/chromium", "/usr/bin/chromedriver"
INSTALL_HINT = (
    "the browser test needs Debian's chromium and chromium-driver (`apt-get install -y chromium chromium-driver`) "
    "and selenium (`pip install selenium`)"
)

pytest.importorskip("selenium", reason=f"selenium is not installed; {INSTALL_HINT}")
pytest.importorskip("jupyterlab", reason='JupyterLab is not installed: pip install -e ".[lab]"')

from lab_harness import browser_console, find_tool, headless_chromium, running_jupyterlab  # noqa: E402
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from rlhf_core.labeling import LabelingSession  # noqa: E402
from rlhf_core.preferences import load_preferences  # noqa: E402

CHROMIUM = find_tool("chromium", CHROMIUM_PATH)
CHROMEDRIVER = find_tool("chromedriver", CHROMEDRIVER_PATH)
if CHROMIUM is None or CHROMEDRIVER is None:
    missing = [name for name, path in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)) if path is None]
    pytest.skip(f"{' and '.join(missing)} not found; {INSTALL_HINT}", allow_module_level=True)

pytestmark = pytest.mark.browser

SEED = 7  # the session's display-order seed, written into the notebook: it shows the first pair swapped
PAIRS = [  # texts with an apostrophe and an ampersand: the widget escapes them, the page must show them as typed
    {
        "prompt": "The film was",
        "first": "a delight from start to finish. It's a gem.",
        "second": "a slog & a bore. I left early.",
        "first_gold": 0.8,
        "second_gold": -0.7,
    },
    {
        "prompt": "This blender is",
        "first": "loud, but it crushes ice well.",
        "second": "broken after a week.",
        "first_gold": 0.3,
        "second_gold": -0.9,
    },
    {
        "prompt": "The hotel room",
        "first": "smelled of smoke.",
        "second": "was spotless and quiet.",
        "first_gold": -0.5,
        "second_gold": 0.6,
    },
]
PROFILE_FOLDER = "browser_test"  # the chapter writes to cache_dir() / profile.name / ...
LABELS_FILE = "chapter01_my_preferences.jsonl"

# Bounded waits, in seconds. The first one covers the kernel's start and `import rlhf_core` (torch).
WIDGET_TIMEOUT_S = 120.0
PAGE_TIMEOUT_S = 60.0
CLICK_TIMEOUT_S = 20.0


def write_notebook(folder: Path) -> Path:
    """The chapter's two lines (session, then widget as the cell's last expression), on known pairs."""
    setup = (
        f"from rlhf_core.config import cache_dir\n"
        f"from rlhf_core.labeling import LabelingSession, LabelingWidget\n\n"
        f"pairs_to_label = {PAIRS!r}\n"
        f"labels_path = cache_dir() / {PROFILE_FOLDER!r} / {LABELS_FILE!r}\n"
        f"SEED = {SEED}"
    )
    chapter_lines = (
        'session = LabelingSession(pairs_to_label, seed=SEED, out_path=labels_path, source="human")\n'
        "LabelingWidget(session)"
    )
    notebook = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell(setup), nbformat.v4.new_code_cell(chapter_lines)]
    )
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    path = folder / "labeling.ipynb"
    nbformat.write(notebook, path)
    return path


def kernel_is_idle(driver) -> bool:
    """The open notebook's kernel has started and waits for work (read from JupyterLab itself)."""
    return bool(
        driver.execute_script(
            "const panel = window.jupyterapp && window.jupyterapp.shell.currentWidget;"
            "const kernel = panel && panel.sessionContext && panel.sessionContext.session"
            "  && panel.sessionContext.session.kernel;"
            "return Boolean(panel && panel.context && panel.context.path === 'labeling.ipynb'"
            "  && kernel && kernel.status === 'idle');"
        )
    )


RUN_MENU = "//li[contains(@class,'lm-MenuBar-item')][normalize-space()='Run']"
RUN_ALL_ITEM = "//li[contains(@class,'lm-Menu-item')][div[contains(@class,'lm-Menu-itemLabel')][.='Run All Cells']]"


def run_all_cells_from_the_menu(driver, lab) -> None:
    """Run > Run All Cells, clicked as a learner would."""
    wait_for(driver, lambda d: d.find_elements(By.XPATH, RUN_MENU), PAGE_TIMEOUT_S, "the Run menu", lab)
    driver.find_element(By.XPATH, RUN_MENU).click()
    wait_for(driver, lambda d: d.find_elements(By.XPATH, RUN_ALL_ITEM), PAGE_TIMEOUT_S, "Run > Run All Cells", lab)
    driver.find_element(By.XPATH, RUN_ALL_ITEM).click()


def shown_response(driver, letter: str) -> str:
    """The text the widget shows in box A or B (``<b>A</b><br>text``), as the learner reads it."""
    box_xpath = f"//div[contains(@class,'widget-html-content')]/div[b[normalize-space()='{letter}']]"
    box = driver.find_element(By.XPATH, box_xpath)
    label, text = box.text.split("\n", 1)
    assert label == letter
    return text


def wait_for(driver, condition, timeout_s: float, what: str, lab) -> None:
    try:
        WebDriverWait(driver, timeout_s, poll_frequency=0.2).until(condition)
    except TimeoutException:
        pytest.fail(
            f"timed out after {timeout_s:.0f} s waiting for {what}.\n--- browser console ---\n"
            f"{browser_console(driver)}\n--- jupyter lab log ---\n{lab.log_tail()}"
        )


def test_a_pair_labelled_by_clicking_lands_in_the_preference_file(tmp_path):
    started = time.monotonic()
    notebook_dir, cache_dir = tmp_path / "notebooks", tmp_path / "cache"
    notebook_dir.mkdir()
    write_notebook(notebook_dir)
    labels_path = cache_dir / PROFILE_FOLDER / LABELS_FILE
    # What the page must show for the first pair, known from the seed without any browser.
    expected_session = LabelingSession(PAIRS, seed=SEED)
    expected_shown = expected_session.current()
    # Swapped: A shows the pair's second response, so the letter clicked and the pair's order differ.
    assert expected_session.swapped[0]

    with (
        running_jupyterlab(notebook_dir, tmp_path / "jupyter", env={"RLHF_CACHE_DIR": str(cache_dir)}) as lab,
        headless_chromium(CHROMIUM, CHROMEDRIVER, tmp_path / "chromium-profile") as driver,
    ):
        driver.get(lab.url("lab/tree/labeling.ipynb"))
        wait_for(driver, kernel_is_idle, WIDGET_TIMEOUT_S, "the notebook to open with an idle kernel", lab)
        run_all_cells_from_the_menu(driver, lab)

        buttons = "//button[normalize-space()='B better' and not(@disabled)]"
        wait_for(
            driver,
            lambda d: d.find_elements(By.XPATH, buttons),
            WIDGET_TIMEOUT_S,
            "the widget's 'B better' button to render",
            lab,
        )
        shown_a, shown_b = shown_response(driver, "A"), shown_response(driver, "B")
        assert driver.find_element(By.XPATH, "//b[normalize-space()='0 / 3 labelled']")
        assert not labels_path.exists()  # nothing is written before the first answer
        assert (shown_a, shown_b) == (expected_shown.response_a, expected_shown.response_b)

        driver.find_element(By.XPATH, buttons).click()
        # The handler ran in the kernel (the autosave is written before the redraw) and the view updated.
        wait_for(
            driver,
            lambda d: d.find_elements(By.XPATH, "//b[normalize-space()='1 / 3 labelled']"),
            CLICK_TIMEOUT_S,
            "the progress line to read '1 / 3 labelled' after the click",
            lab,
        )
        wait_for(driver, lambda d: labels_path.exists(), CLICK_TIMEOUT_S, f"the autosave to {labels_path}", lab)
        # The page now shows the second pair.
        assert PAIRS[1]["first"] in (shown_response(driver, "A"), shown_response(driver, "B"))

    records = load_preferences(labels_path)
    assert len(records) == 1
    record = records[0]
    assert (record["prompt"], record["chosen"], record["rejected"]) == (PAIRS[0]["prompt"], shown_b, shown_a)
    gold = {PAIRS[0]["first"]: PAIRS[0]["first_gold"], PAIRS[0]["second"]: PAIRS[0]["second_gold"]}
    assert (record["chosen_gold"], record["rejected_gold"]) == (gold[shown_b], gold[shown_a])
    assert record["chosen"] == PAIRS[0]["first"]  # "B better" on a swapped pair chose its first response
    assert record["source"] == "human"
    assert lab.process.returncode is not None  # the server (and its kernel) were shut down
    print(f"browser test took {time.monotonic() - started:.1f} s")
