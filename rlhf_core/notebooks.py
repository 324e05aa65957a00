"""The chapters as files: the Colab setup cell they share, and the command that re-executes them.

    python -m rlhf_core chapters [NN ...] [--timeout S]
    python -m rlhf_core.notebooks [NN ...] [--timeout S] [--profile P]     (the same, in another profile)

re-executes the chapters in order (all of them, or those whose file names start with ``NN``), in place,
in the ``tiny`` profile, each in a fresh kernel started in ``chapters/``. What it writes back is what
gets committed, so it is kept small and stable: no widget state (the state of every progress bar
ever drawn), no timing metadata, no error output (a cell that raises fails the command, names the
chapter and the cell, and leaves the file as it was), and each file under ``MAX_NOTEBOOK_BYTES``.
It needs the ``dev`` extra (``nbclient`` and ``ipykernel``).

``SETUP_CELL`` is the first code cell of every chapter, byte for byte (``install_setup_cell`` puts it
there; a test checks it). On Colab it clones the course, installs it and makes ``import rlhf_core``
work in the running kernel; anywhere else it does nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .config import REPO_DIR
from .errors import CourseError

try:  # the dev extra: only the chapters command needs these, and the command line imports this module
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError
except ImportError:  # pragma: no cover
    nbformat = None

CHAPTERS_DIR = REPO_DIR / "chapters"
MAX_NOTEBOOK_BYTES = 1_500_000  # a committed chapter stays under 1.5 MB: figures and samples, not caches
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"  # an output that only a live widget can draw
# The kernel's environment while a chapter is re-executed for the commit: these would change what is written.
UNSET_WHILE_EXECUTING = ("RLHF_FULL", "RLHF_INTERACTIVE", "RLHF_SEED", "RLHF_DEVICE")

SETUP_MARKDOWN = """\
**Setup.** On Colab this cell fetches the course into `rlhf-course/`, installs its package (with the
gymnasium extra of chapter 00) and makes `import rlhf_core` work without restarting the runtime; run it
again and it reuses that copy. Anywhere else it does nothing: install the course as the README says."""

SETUP_CELL = """\
import sys

if "google.colab" in sys.modules:  # on Colab only; anywhere else the course is already installed
    import importlib
    import os
    import subprocess
    from pathlib import Path

    # The course folder: the clone this kernel already runs in (a second run of this cell, or a kernel
    # started inside the clone), else ./rlhf-course, cloned the first time.
    here = Path.cwd()
    clones = [folder for folder in (here, *here.parents)
              if (folder / "rlhf_core").is_dir() and (folder / "pyproject.toml").is_file()]
    course = clones[0] if clones else here / "rlhf-course"
    if not course.exists():
        repo = os.environ.get("RLHF_COURSE_REPO", "https://github.com/rlhf-course/rlhf-course")
        subprocess.run(["git", "clone", "--quiet", "--depth", "1", repo, str(course)], check=True)
    # Editable, with the gymnasium extra; Colab's torch, ipywidgets and the rest already meet the
    # course's lower bounds, so pip upgrades none of them.
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-build-isolation",
                    "--editable", f"{course}[gym]"], check=True)
    # An editable install is found through a .pth file that Python reads only at start-up: put the
    # clone on sys.path so that `import rlhf_core` works in this kernel, without a restart.
    if str(course) not in sys.path:
        sys.path.insert(0, str(course))
    importlib.invalidate_caches()
    os.chdir(course / "chapters")  # relative paths behave as in a local checkout
    from google.colab import output

    output.enable_custom_widget_manager()  # lets Colab draw ipywidgets (chapter 01's labeller)
    print(f"rlhf_core installed from {course}")"""


def _require_dev_extra() -> None:
    if nbformat is None:
        raise CourseError('the chapters command needs nbformat, nbclient and ipykernel: pip install -e ".[dev]"')


def chapter_paths(numbers: Sequence[str] | None = None) -> list[Path]:
    """The chapters in learning order: all of them, or those whose file name starts with one of ``numbers``."""
    paths = sorted(CHAPTERS_DIR.glob("[0-9][0-9]_*.ipynb"))
    if not numbers:
        return paths
    prefixes = [f"{number.zfill(2)}_" for number in numbers]  # "5" and "05" both mean chapter 05
    chosen = [path for path in paths if any(path.name.startswith(prefix) for prefix in prefixes)]
    missing = [n for n, prefix in zip(numbers, prefixes) if not any(path.name.startswith(prefix) for path in paths)]
    if missing:
        raise CourseError(
            f"no chapter {', '.join(missing)} in {CHAPTERS_DIR}: "
            f"the chapters are {', '.join(path.name[:2] for path in paths)}"
        )
    return chosen


def _first_code_cell(notebook) -> int:
    return next(index for index, cell in enumerate(notebook.cells) if cell.cell_type == "code")


def install_setup_cell(paths: Sequence[Path] | None = None) -> list[Path]:
    """Make ``SETUP_CELL`` the first code cell, and ``SETUP_MARKDOWN`` the cell before it, of every chapter
    (the cell before it must already be markdown). Returns the files that changed."""
    _require_dev_extra()
    changed = []
    for path in paths or chapter_paths():
        notebook = nbformat.read(path, as_version=4)
        code = _first_code_cell(notebook)
        setup, explanation = notebook.cells[code], notebook.cells[code - 1] if code else None
        if explanation is None or explanation.cell_type != "markdown":
            raise CourseError(f"{path}: the first code cell needs a markdown cell before it to explain the setup")
        if setup.source == SETUP_CELL and explanation.source == SETUP_MARKDOWN:
            continue
        setup.source, explanation.source = SETUP_CELL, SETUP_MARKDOWN
        setup.outputs, setup.execution_count = [], None  # the cell prints nothing outside Colab
        nbformat.write(notebook, path)
        changed.append(path)
    return changed


def strip_volatile(notebook):
    """``notebook`` as it should be committed (changed in place, and returned): no widget state, widget
    outputs reduced to their plain-text form, no timing metadata. Deterministic outputs are kept."""
    notebook.metadata.pop("widgets", None)  # every progress bar's state: megabytes, redrawn on each run
    for cell in notebook.cells:
        cell.metadata.pop("execution", None)  # when each cell ran, to the microsecond
        cell.metadata.pop("widgets", None)
        if cell.cell_type != "code":
            continue
        kept = []
        for output in cell.outputs:
            data = output.get("data", {})
            if WIDGET_VIEW in data:
                if "text/plain" not in data:
                    continue  # nothing a reader of the file could see
                output.data = nbformat.from_dict({"text/plain": data["text/plain"]})
            kept.append(output)
        cell.outputs = kept
    return notebook


def error_cells(notebook) -> list[str]:
    """Where the notebook holds an error output, one line each: the cell (its position, counted from 1
    over all cells, and its first line) and the error."""
    return [
        f"cell {index + 1} of {len(notebook.cells)} ({(cell.source.strip().splitlines() or [''])[0][:60]!r}): "
        f"{output.get('ename', 'error')}: {output.get('evalue', '')}".strip()
        for index, cell in enumerate(notebook.cells)
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "error"
    ]


def _kernel_environment(profile: str) -> dict[str, str]:
    environment = {key: value for key, value in os.environ.items() if key not in UNSET_WHILE_EXECUTING}
    environment["RLHF_PROFILE"] = profile
    return environment


def execute_chapter(path: Path, timeout: int = 1800, profile: str = "tiny") -> Path:
    """Run one notebook top to bottom in a fresh kernel started in its folder and write it back in place,
    stripped (``strip_volatile``). A cell that raises leaves the file unchanged and raises ``CourseError``."""
    _require_dev_extra()
    path = Path(path)
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=timeout,
        kernel_name="python3",
        record_timing=False,
        resources={"metadata": {"path": str(path.parent)}},
    )
    try:
        client.execute(env=_kernel_environment(profile))
    except CellExecutionError as error:
        failed = error_cells(notebook) or [str(error).strip().splitlines()[-1]]
        raise CourseError(
            f"{path}: {failed[0]}; the file was left as it was: fix the cell, then run this "
            f"chapter again with `python -m rlhf_core chapters {path.name[:2]}`"
        ) from None
    if error_cells(notebook):  # a cell tagged raises-exception raised: its error output is never committed
        raise CourseError(
            f"{path}: {error_cells(notebook)[0]}; the file was left as it was: an error output "
            "is never committed, remove the error or the cell's raises-exception tag"
        )
    nbformat.write(strip_volatile(notebook), path)
    return path


def execute_chapters(paths: Sequence[Path] | None = None, timeout: int = 1800, profile: str = "tiny") -> list[Path]:
    """Re-execute the chapters in order (default: all of them), in place, each in the ``profile`` (``tiny``:
    what is committed), with ``timeout`` seconds per cell. Stops at the first chapter with a failing cell.
    Raises ``CourseError`` naming every file that ends up larger than ``MAX_NOTEBOOK_BYTES``."""
    written = []
    for path in paths or chapter_paths():
        print(f"executing {path} ...", flush=True)
        written.append(execute_chapter(path, timeout=timeout, profile=profile))
        print(f"  wrote {path.stat().st_size / 1e6:.2f} MB", flush=True)
    too_large = [
        f"{path.name} ({path.stat().st_size / 1e6:.2f} MB)"
        for path in written
        if path.stat().st_size >= MAX_NOTEBOOK_BYTES
    ]
    if too_large:
        raise CourseError(
            f"larger than {MAX_NOTEBOOK_BYTES / 1e6:.1f} MB: {', '.join(too_large)}: "
            "draw fewer or smaller figures, or print fewer samples"
        )
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rlhf_core chapters",
        description="Re-execute the chapters in place, in order, in the tiny profile, "
        "and strip widget state and timing metadata.",
    )
    parser.add_argument("numbers", nargs="*", metavar="NN", help="only these chapters, e.g. 03 05 (default: all)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds a cell may run (default: 1800)")
    parser.add_argument("--profile", default="tiny", help="the profile the chapters run in (default: tiny)")
    args = parser.parse_args(argv)
    try:
        execute_chapters(chapter_paths(args.numbers), timeout=args.timeout, profile=args.profile)
    except CourseError as error:
        print(error, file=sys.stderr)
        return error.exit_status
    return 0


if __name__ == "__main__":
    sys.exit(main())
