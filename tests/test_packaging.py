"""The set-up files agree: what environment.yml installs is what pyproject.toml declares."""

import re
import sys
from pathlib import Path

import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pyproject_requirements() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in ("dev", "gym", "lab"):
        requirements += project["optional-dependencies"][extra]
    return {_name(r): r.split(";")[0].strip() for r in requirements if "python_version < '3.11'" not in r}


def _environment_requirements() -> dict[str, str]:
    environment = yaml.safe_load((REPO / "environment.yml").read_text())
    pip_part = next(d["pip"] for d in environment["dependencies"] if isinstance(d, dict))
    return {_name(r): r.strip() for r in pip_part if not r.startswith("-e")}


def test_environment_yml_and_pyproject_agree():
    assert _environment_requirements() == _pyproject_requirements()


def test_environment_installs_this_package_with_its_extras():
    environment = yaml.safe_load((REPO / "environment.yml").read_text())
    pip_part = next(d["pip"] for d in environment["dependencies"] if isinstance(d, dict))
    assert "-e .[dev,gym,lab]" in pip_part


def test_ci_installs_cpu_torch_first_then_runs_pytest():
    script = (REPO / ".ci" / "run").read_text()
    assert script.index("torch==2.13.0") < script.index('-e ".[dev,gym,lab]"') < script.rindex("pytest")
    assert "torch==" not in (REPO / "pyproject.toml").read_text()  # GPU users keep their own build


COLAB = "https://colab.research.google.com/github/rlhf-course/rlhf-course/blob/main/"


def test_readme_badges_match_the_chapter_files():
    readme = (REPO / "README.md").read_text()
    badge_paths = set(re.findall(re.escape(COLAB) + r"(chapters/[\w.]+\.ipynb)", readme))
    notebooks = {f"chapters/{p.name}" for p in (REPO / "chapters").glob("*.ipynb")}
    assert badge_paths == notebooks
    for path in notebooks:
        assert f"]({path})" in readme  # the table links the file too
