"""The chapters as files: one setup cell, one way to choose the profile, gold claims asserted where the gold is
known, and committed clean (no widget state, no timing, no errors, small). Plus the re-execution command."""

import ast
import copy
import re

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from rlhf_core.errors import CourseError
from rlhf_core.notebooks import (
    MAX_NOTEBOOK_BYTES,
    SETUP_CELL,
    SETUP_MARKDOWN,
    WIDGET_VIEW,
    chapter_paths,
    error_cells,
    execute_chapters,
    install_setup_cell,
    main,
    strip_volatile,
)

CHAPTERS = chapter_paths()


def _code_cells(path):
    return [cell for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "code"]


def test_there_are_chapters_in_order():
    names = [path.name for path in CHAPTERS]
    assert len(names) >= 8 and names == sorted(names) and names[0].startswith("00_")
    assert chapter_paths(["5"]) == chapter_paths(["05"]) == [path for path in CHAPTERS if path.name.startswith("05_")]
    with pytest.raises(CourseError, match="no chapter 99"):
        chapter_paths(["03", "99"])
    assert main(["99"]) == CourseError.exit_status


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda path: path.name[:2])
def test_every_chapter_starts_with_the_one_setup_cell(path):
    cells = nbformat.read(path, as_version=4).cells
    first_code = next(index for index, cell in enumerate(cells) if cell.cell_type == "code")
    assert cells[first_code].source == SETUP_CELL, "run rlhf_core.notebooks.install_setup_cell()"
    assert cells[first_code - 1].source == SETUP_MARKDOWN
    assert cells[first_code].outputs == []  # outside Colab it prints nothing


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda path: path.name[:2])
def test_committed_chapter_is_clean_and_small(path):
    assert path.stat().st_size < MAX_NOTEBOOK_BYTES
    notebook = nbformat.read(path, as_version=4)
    assert error_cells(notebook) == []
    assert "widgets" not in notebook.metadata, "widget state: re-execute with `python -m rlhf_core chapters`"
    assert strip_volatile(copy.deepcopy(notebook)) == notebook, "widget outputs or timing metadata are committed"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda path: path.name[:2])
def test_checked_cells_write_nothing_to_stderr(path):
    # nbval compares stderr too: a library warning there names this machine's site-packages path, which
    # differs on every other machine (CI clones to another folder), so a checked cell must keep it empty.
    for cell in _code_cells(path):
        if "# NBVAL_CHECK_OUTPUT" in cell.source:
            noise = [output.text for output in cell.outputs if output.get("name") == "stderr"]
            assert noise == [], f"a checked cell writes to stderr: {noise[0][:200]!r}\n{cell.source[:200]}"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda path: path.name[:2])
def test_every_chapter_lets_get_profile_choose(path):
    """RLHF_PROFILE if set, else auto (gpt2 on CUDA, tiny elsewhere): no chapter pins a profile of its own."""
    source = "\n".join(cell.source for cell in _code_cells(path))
    assert re.findall(r'"RLHF_PROFILE", "(\w+)"', source) in ([], ["auto"])
    assert not re.search(r'get_profile\(\s*["\']', source), "a hard-coded profile"
    if not path.name.startswith("00_"):  # chapter 00 is gymnasium only
        assert "get_profile(" in source


def _unguarded_gold_asserts(tree) -> list[str]:
    """Asserts that mention the gold and are not under `if <...offline...>` or a loop over
    `... if <...offline or short_run...> else []` (short_run implies an offline profile in chapter 07)."""
    found = []

    def guard(test) -> bool:
        return any(word in ast.unparse(test) for word in ("offline", "short_run"))

    def visit(node, guarded: bool):
        if isinstance(node, ast.Assert):
            if "gold" in ast.unparse(node) and not guarded:
                found.append(ast.unparse(node))
            return
        if isinstance(node, ast.If):
            for child in node.body:
                visit(child, guarded or guard(node.test))
            for child in node.orelse:
                visit(child, guarded)
            return
        if isinstance(node, ast.For) and isinstance(node.iter, ast.IfExp):
            for child in node.body:
                visit(child, guarded or guard(node.iter.test))
            return
        for child in ast.iter_child_nodes(node):
            visit(child, guarded)

    visit(tree, False)
    return found


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda path: path.name[:2])
def test_gold_claims_are_asserted_only_on_offline_profiles(path):
    for cell in _code_cells(path):
        assert _unguarded_gold_asserts(ast.parse(cell.source)) == []


def test_the_guard_check_sees_a_bare_gold_assert():
    bare = ast.parse("assert ppo.gold > sft.gold + 0.15\nif profile.offline:\n    assert x.gold > 0\n")
    assert _unguarded_gold_asserts(bare) == ["assert ppo.gold > sft.gold + 0.15"]
    looped = ast.parse("for name in names if short_run else []:\n    assert row['gold'] < 1\n")
    assert _unguarded_gold_asserts(looped) == []


def _widget_output(text_plain: bool):
    data = {WIDGET_VIEW: {"model_id": "abc123", "version_major": 2, "version_minor": 0}}
    if text_plain:
        data["text/plain"] = "IntProgress(value=3, max=10)"
    return new_output("display_data", data=data)


def test_strip_volatile_drops_widget_state_and_timing_and_keeps_the_rest():
    stream = new_output("stream", name="stdout", text="trained in 3 s\n")
    image = new_output("display_data", data={"image/png": "iVBORw0KGgo=", "text/plain": "<Figure>"})
    code = new_code_cell(
        "train()", execution_count=3, outputs=[stream, _widget_output(True), _widget_output(False), image]
    )
    code.metadata["execution"] = {"iopub.status.busy": "2026-01-01T00:00:00.000001Z"}
    code.metadata["tags"] = ["keep-me"]
    notebook = new_notebook(
        cells=[new_markdown_cell("# title"), code],
        metadata={
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "widgets": {"application/vnd.jupyter.widget-state+json": {"state": {}}},
        },
    )

    stripped = strip_volatile(copy.deepcopy(notebook))

    assert list(stripped.metadata) == ["kernelspec"]
    assert dict(stripped.cells[1].metadata) == {"tags": ["keep-me"]}
    assert stripped.cells[1].execution_count == 3
    expected_outputs = [
        {"output_type": "stream", "name": "stdout", "text": "trained in 3 s\n"},
        {"output_type": "display_data", "data": {"text/plain": "IntProgress(value=3, max=10)"}, "metadata": {}},
        {
            "output_type": "display_data",
            "data": {"image/png": "iVBORw0KGgo=", "text/plain": "<Figure>"},
            "metadata": {},
        },
    ]
    assert [dict(output) for output in stripped.cells[1].outputs] == expected_outputs
    assert stripped.cells[0] == notebook.cells[0]
    assert strip_volatile(copy.deepcopy(stripped)) == stripped  # nothing left to strip
    nbformat.validate(stripped)


def test_install_setup_cell_replaces_the_first_code_cell_only(tmp_path):
    path = tmp_path / "00_x.ipynb"
    old_setup = new_code_cell(
        'import sys\n\nif "google.colab" in sys.modules:\n    pass',
        execution_count=1,
        outputs=[new_output("stream", name="stdout", text="old\n")],
    )
    notebook = new_notebook(
        cells=[new_markdown_cell("# 00"), new_markdown_cell("old words"), old_setup, new_code_cell("x = 1")]
    )
    nbformat.write(notebook, path)

    assert install_setup_cell([path]) == [path]
    cells = nbformat.read(path, as_version=4).cells
    assert [cell.source for cell in cells] == ["# 00", SETUP_MARKDOWN, SETUP_CELL, "x = 1"]
    assert cells[2].outputs == [] and cells[2].execution_count is None
    assert install_setup_cell([path]) == []  # already there: the file is not rewritten

    no_explanation = tmp_path / "01_y.ipynb"
    nbformat.write(new_notebook(cells=[new_code_cell("x = 1")]), no_explanation)
    with pytest.raises(CourseError, match="01_y.ipynb"):
        install_setup_cell([no_explanation])


def test_execute_chapters_runs_in_place_strips_and_sets_the_profile(tmp_path, monkeypatch):
    """A real kernel: the profile reaches it, RLHF_FULL does not, it runs in the notebook's folder, and the
    widget it draws is written back as plain text with no widget state."""
    monkeypatch.setenv("RLHF_PROFILE", "gpt2")
    monkeypatch.setenv("RLHF_FULL", "1")
    path = tmp_path / "03_widget.ipynb"
    cells = [
        new_code_cell('import os\nprint(os.environ["RLHF_PROFILE"], os.environ.get("RLHF_FULL"), os.getcwd())'),
        new_code_cell("import ipywidgets\nipywidgets.IntProgress(value=3, max=10)"),
    ]
    nbformat.write(new_notebook(cells=cells), path)

    assert execute_chapters([path], timeout=60) == [path]

    notebook = nbformat.read(path, as_version=4)
    assert notebook.cells[0].outputs[0].text == f"tiny None {tmp_path}\n"
    widget = notebook.cells[1].outputs[0]
    assert widget.output_type == "execute_result" and list(widget.data) == ["text/plain"]
    assert "widgets" not in notebook.metadata
    assert all("execution" not in cell.metadata for cell in notebook.cells)


def test_a_failing_cell_fails_the_command_and_leaves_the_file(tmp_path):
    path = tmp_path / "04_broken.ipynb"
    nbformat.write(new_notebook(cells=[new_code_cell("x = 1"), new_code_cell("assert x == 2, 'x is not 2'")]), path)
    before = path.read_bytes()
    with pytest.raises(
        CourseError, match=r"04_broken\.ipynb: cell 2 of 2 \(.assert x == 2.*\): AssertionError: x is not 2"
    ):
        execute_chapters([path], timeout=60)
    assert path.read_bytes() == before
