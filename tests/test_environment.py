"""environment.yml gives conda users the same dependencies as pyproject.toml."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]


def pyproject_requirements() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project.get("optional-dependencies", {})
    return [*project["dependencies"], *(req for group in extras.values() for req in group)]


def conda_environment() -> dict:
    path = ROOT / "environment.yml"
    assert path.exists(), "environment.yml is missing at the repository root"
    return yaml.safe_load(path.read_text())


def pip_section(env: dict) -> list[str]:
    sections = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(sections) == 1, "environment.yml needs exactly one 'pip:' section"
    return [str(item) for item in sections[0]]


def test_environment_lists_the_same_requirements_as_pyproject() -> None:
    pip = pip_section(conda_environment())
    requirements = [item for item in pip if not item.startswith("-e")]
    expected = pyproject_requirements()
    missing = sorted(set(expected) - set(requirements))
    extra = sorted(set(requirements) - set(expected))
    assert not missing, f"in pyproject.toml but not environment.yml: {missing}"
    assert not extra, f"in environment.yml but not pyproject.toml: {extra}"
    assert len(requirements) == len(set(requirements)), "a requirement is listed twice"


def test_environment_installs_the_package_itself() -> None:
    env = conda_environment()
    pip = pip_section(env)
    assert any(item.split("[")[0].strip() == "-e ." for item in pip), \
        "the pip section must install the package: add '- -e .'"
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    assert "pip" in conda, "list 'pip' as a conda dependency so the pip section runs"
    python = [d for d in conda if d.replace(" ", "").startswith("python")]
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert python and python[0].replace(" ", "").removeprefix("python") == requires, \
        f"environment.yml should pin python{requires} like pyproject.toml"


def test_torch_floor_is_kept() -> None:
    """The issue keeps ``torch>=2.4`` in pyproject.toml (the set-up pins a CPU build)."""
    assert "torch>=2.4" in pyproject_requirements()
