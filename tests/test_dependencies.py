"""Every runtime dependency in pyproject.toml is imported by flow_trl, and `evaluate` only by the shapes metric."""

import ast
import re
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]


def normalized(name: str) -> str:
    """A distribution name in its PEP 503 form (``PyYAML`` -> ``pyyaml``, ``Foo_Bar`` -> ``foo-bar``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_modules(path: Path) -> set[str]:
    """The top-level names of the absolute imports in the module at `path`."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_every_runtime_dependency_is_imported():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    requirements = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    modules_of: dict[str, set[str]] = {}  # distribution -> the import names it installs
    for module, distributions in packages_distributions().items():
        for distribution in distributions:
            modules_of.setdefault(normalized(distribution), set()).add(module)
    imported = set().union(*map(imported_modules, (ROOT / "flow_trl").rglob("*.py")))
    unused = []
    for requirement in requirements:
        distribution = normalized(re.match(r"[A-Za-z0-9_.-]+", requirement).group())
        assert distribution in modules_of, f"{distribution} is not installed in this environment"
        if not modules_of[distribution] & imported:
            unused.append(distribution)
    assert not unused, f"runtime dependencies that flow_trl never imports: {unused}"


def test_only_the_shapes_metric_imports_evaluate():
    imported = {path.relative_to(ROOT).as_posix() for path in (ROOT / "flow_trl").rglob("*.py")
                if "evaluate" in imported_modules(path)}
    assert imported == {"flow_trl/toy/shapes_metric.py"}
    code = "import sys, flow_trl, flow_trl.toy, flow_trl.trainer, flow_trl.cli; print('evaluate' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.stdout.strip() == "False", out.stderr[-2000:]

