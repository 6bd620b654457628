"""Packaging invariants: import names, the package list, and the CPU pin."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _run_python(code: str, cwd: Path) -> str:
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_every_package_directory_is_listed_in_pyproject():
    tool = _pyproject()["tool"]["setuptools"]
    listed = set(tool["packages"])
    package_dirs = tool.get("package-dir", {})
    found = set()
    for top in ("entropic", "pi_eval"):
        for init in (REPO / top).rglob("__init__.py"):
            found.add(".".join(init.parent.relative_to(REPO).parts))
    kernels_root = REPO / package_dirs["entropic_kernels"]
    for init in kernels_root.rglob("__init__.py"):
        found.add(".".join(("entropic_kernels", *init.parent.relative_to(kernels_root).parts)))
    assert found == listed, f"missing from pyproject: {sorted(found - listed)}; stale: {sorted(listed - found)}"


def test_kernels_directory_installs_under_a_non_colliding_name(tmp_path):
    out = _run_python(
        "import importlib.util, entropic_kernels; "
        "print(importlib.util.find_spec('kernels') is None, entropic_kernels.__name__)",
        cwd=tmp_path,
    )
    assert out == "True entropic_kernels"


def test_transformers_does_not_mistake_our_kernels_for_hf_kernels_from_the_repo_root():
    # Run from the repository root, where `kernels/` is on sys.path as the current directory.
    out = _run_python(
        "import sys; from transformers.utils import is_kernels_available; "
        "print(is_kernels_available(), 'entropic_kernels' in sys.modules)",
        cwd=REPO,
    )
    assert out == "False False"


def test_cpu_constraints_pin_the_cpu_torch_build_and_pyproject_does_not():
    constraints = (REPO / "constraints" / "cpu.txt").read_text().splitlines()
    assert "torch==2.13.0+cpu" in constraints
    torch_requirements = [d for d in _pyproject()["project"]["dependencies"] if d.startswith("torch")]
    assert torch_requirements and all("+cpu" not in d and "<" not in d for d in torch_requirements)
