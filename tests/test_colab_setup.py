"""The Colab setup cell, run as Colab runs it: in a fresh Python that has torch but not rlhf_core.

The fresh Python is a new virtual environment that sees this environment's installed packages (torch,
transformers, pip, setuptools, ...) through a folder of links, minus rlhf_core itself, and a stand-in
``google.colab`` module. ``RLHF_COURSE_REPO`` points at a local git repository made from this
working tree, so the test runs offline and tests the files as they are now. pip runs with no index:
whatever the course needs must already be installed, which is also the proof that the cell upgrades
nothing.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import nbformat
import pytest
from packaging.specifiers import SpecifierSet

from rlhf_core.notebooks import SETUP_CELL, chapter_paths

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]

# What the kernel does before the first cell (Colab imports google.colab at start-up), then the cells.
SCRIPT = textwrap.dedent("""\
    import importlib.util, json, sys
    from pathlib import Path

    import google.colab  # the stand-in

    before = importlib.util.find_spec("rlhf_core") is None
    import torch  # preinstalled, as on Colab

    cells = json.loads(Path(sys.argv[1]).read_text())
    exec(cells["setup"], {"__name__": "__main__"})
    reports = [{"rlhf_core_missing_before": before, "torch": torch.__version__}]
    for name, chapter_cells in cells["chapters"].items():  # each chapter's cells up to its imports
        namespace = {"__name__": "__main__"}
        for source in chapter_cells:
            exec(source, namespace)
        import rlhf_core.config

        profile = namespace.get("profile", namespace.get("PROFILE"))
        reports.append({"chapter": name, "rlhf_core": rlhf_core.__file__, "cwd": str(Path.cwd()),
                        "profile": getattr(profile, "name", None), "get_profile": rlhf_core.config.get_profile().name})
    exec(cells["setup"], {"__name__": "__main__"})  # the second run
    import rlhf_core

    reports.append({"second_run_cwd": str(Path.cwd()), "rlhf_core": rlhf_core.__file__,
                    "widget_manager_enabled": google.colab.output.calls})
    print("REPORT " + json.dumps(reports))
""")

STAND_IN = textwrap.dedent("""\
    \"\"\"A stand-in for Colab's module: the setup cell calls output.enable_custom_widget_manager().\"\"\"
    import types

    output = types.SimpleNamespace(calls=0)


    def _enable_custom_widget_manager():
        output.calls += 1


    output.enable_custom_widget_manager = _enable_custom_widget_manager
""")


def _git(*args: str, cwd: Path) -> str:
    settings = ["user.name=course test", "user.email=test@example.invalid", "commit.gpgsign=false", "core.hooksPath="]
    command = ["git", *(part for setting in settings for part in ("-c", setting)), *args]
    return subprocess.run(command, cwd=cwd, check=True, capture_output=True, text=True).stdout


def _repository_of_this_working_tree(destination: Path) -> Path:
    """A git repository holding this working tree's tracked and not-ignored files in one commit (in CI,
    a clean checkout: the same as HEAD; on a workstation, the changes not yet committed too)."""
    files = _git("ls-files", "--cached", "--others", "--exclude-standard", "-z", cwd=REPO).split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, destination / name)
    _git("init", "--quiet", cwd=destination)
    _git("add", "--all", cwd=destination)
    _git("commit", "--quiet", "--message", "the course under test", cwd=destination)
    return destination


def _fresh_python(root: Path) -> Path:
    """A new virtual environment that sees this environment's packages except rlhf_core. A .pth line of the
    new environment adds a folder of links to them; .pth files inside that folder are not processed, so the
    editable finder that `pip install -e` left here is not either, and its links are left out anyway."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True)
    python = root / "venv" / "bin" / "python"
    visible = root / "installed"
    visible.mkdir()
    for site_packages in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        for entry in Path(site_packages).iterdir():
            hidden = entry.suffix == ".pth" or "rlhf_core" in entry.name or (visible / entry.name).exists()
            if not hidden:
                (visible / entry.name).symlink_to(entry)
    fresh_site_packages = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(fresh_site_packages, "preinstalled.pth").write_text(f"{visible}\n")
    return python


def _cells_to_run() -> dict:
    """The setup cell, and for every chapter its code cells after the setup cell up to the one that imports
    rlhf_core (parameters and imports), read from the chapter files."""
    chapters = {}
    for path in chapter_paths():
        code = [cell.source for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "code"]
        assert code[0] == SETUP_CELL, f"{path.name}: the first code cell is not the setup cell"
        last = next(i for i, source in enumerate(code) if re.search(r"^\s*(from|import) rlhf_core", source, re.M))
        chapters[path.name] = code[1 : last + 1]
    return {"setup": SETUP_CELL, "chapters": chapters}


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="needs git and a checkout")
def test_setup_cell_on_a_stand_in_colab(tmp_path):
    source = _repository_of_this_working_tree(tmp_path / "origin")
    python = _fresh_python(tmp_path)
    stand_in = tmp_path / "stand_in"
    (stand_in / "google" / "colab").mkdir(parents=True)  # google/ stays a namespace package, as on Colab
    (stand_in / "google" / "colab" / "__init__.py").write_text(STAND_IN)
    cells = tmp_path / "cells.json"
    cells.write_text(json.dumps(_cells_to_run()))
    content = tmp_path / "content"  # Colab's working directory
    content.mkdir()

    environment = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("RLHF_", "PIP_", "PYTHON", "VIRTUAL_ENV"))
    }
    environment.update(
        PYTHONPATH=str(stand_in),
        RLHF_COURSE_REPO=source.as_uri(),
        CUDA_VISIBLE_DEVICES="",
        PIP_NO_INDEX="1",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        MPLBACKEND="Agg",
    )
    script = tmp_path / "kernel.py"
    script.write_text(SCRIPT)
    result = subprocess.run(
        [str(python), str(script), str(cells)],
        cwd=content,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    first, *chapters, second = json.loads(result.stdout.split("REPORT ", 1)[1])

    clone = content / "rlhf-course"
    assert first["rlhf_core_missing_before"], "the fresh Python must not see this checkout's rlhf_core"
    assert len(chapters) == len(chapter_paths())
    for report in chapters:
        assert Path(report["rlhf_core"]) == clone / "rlhf_core" / "__init__.py", report
        assert Path(report["cwd"]) == clone / "chapters", report
        assert report["get_profile"] == "tiny", report  # auto, on a machine without CUDA
        assert report["profile"] == (None if report["chapter"].startswith("00_") else "tiny"), report  # 00: gym only
    assert Path(second["rlhf_core"]) == clone / "rlhf_core" / "__init__.py"
    assert Path(second["second_run_cwd"]) == clone / "chapters"
    assert second["widget_manager_enabled"] == 2
    copies = sorted(path.parent for path in content.rglob("pyproject.toml"))
    assert copies == [clone], "a second run of the cell must not clone the course again"
    installed = subprocess.run(
        [str(python), "-m", "pip", "show", "rlhf_core"], env=environment, capture_output=True, text=True
    )
    assert installed.returncode == 0 and "Editable project location: " + str(clone) in installed.stdout


def test_setup_cell_is_plain_python_that_does_nothing_outside_colab():
    compile(SETUP_CELL, "setup cell", "exec")
    assert not any(line.lstrip().startswith(("!", "%")) for line in SETUP_CELL.splitlines())
    assert 'if "google.colab" in sys.modules:' in SETUP_CELL
    before = set(sys.modules)
    namespace = {}
    exec(SETUP_CELL, namespace)  # this test process is not Colab: nothing is cloned, installed or changed
    assert set(namespace) - {"__builtins__"} == {"sys"} and set(sys.modules) == before


def _badge_repositories(text: str) -> set[str]:
    return set(re.findall(r"https://colab\.research\.google\.com/github/([\w.-]+/[\w.-]+)/blob/", text))


def test_the_default_repository_is_the_one_the_badges_open():
    default = re.search(r'os\.environ\.get\("RLHF_COURSE_REPO", "([^"]+)"\)', SETUP_CELL).group(1)
    badges = _badge_repositories((REPO / "README.md").read_text())
    for path in chapter_paths():
        notebook = nbformat.read(path, as_version=4)
        badge = _badge_repositories(notebook.cells[0].source)
        assert badge, f"{path.name}: no Colab badge in the first cell"
        assert f"/blob/main/chapters/{path.name})" in notebook.cells[0].source, (
            f"{path.name}: its badge opens another file"
        )
        badges |= badge
    assert {f"https://github.com/{repository}" for repository in badges} == {default}


# What Colab's runtime ships (2025 images), or a little less: the course must install on it without
# upgrading anything it already has. ipywidgets is the one Colab keeps on an old major version.
COLAB_PREINSTALLED = {
    "torch": "2.6.0",
    "transformers": "4.50.0",
    "tokenizers": "0.21.0",
    "datasets": "2.19.0",
    "safetensors": "0.5.0",
    "numpy": "1.26.4",
    "pandas": "2.2.2",
    "matplotlib": "3.10.0",
    "tqdm": "4.67.1",
    "ipywidgets": "7.7.1",
}


def test_lower_bounds_admit_what_colab_has():
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for requirement in dependencies:
        name, specifier = re.match(r"([\w-]+)\s*(.*)", requirement).groups()
        if name in COLAB_PREINSTALLED:
            assert SpecifierSet(specifier).contains(COLAB_PREINSTALLED[name]), (requirement, COLAB_PREINSTALLED[name])
    assert "ipywidgets" in {re.match(r"[\w-]+", requirement).group() for requirement in dependencies}
