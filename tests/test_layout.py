"""The layering of the source tree: data flows models -> pipelines -> export -> runtime -> serving, and no
folder imports one that sits above it. Read from the source with ``ast`` (nothing is imported), so that
an import inside a function counts as much as one at the top of a file."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "pipelines", "runtime", "serving")

# What each folder may import of the project (besides itself). runtime and models stand alone: serving
# and export checks run them without torch (runtime) or without any platform code (models).
ALLOWED = {
    "models": set(),
    "runtime": set(),
    "serving": {"runtime"},
    "pipelines": {"models", "runtime"},
}
# The `latentforge` command is the one entry point above everything: it starts the server too.
ENTRY_POINTS = {"pipelines/cli.py": {"serving"}}
# The shared plumbing of the stages sits below them: it imports no stage.
COMMON = "pipelines/common"


def project_imports(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every import in ``path`` that names a project package, namespaced or not."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        out.extend((node.lineno, name) for name in names if name.split(".")[0] in PACKAGES + ("latentforge",))
    return out


def source_files(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_respect_the_layers(package: str) -> None:
    problems = []
    for path in source_files(package):
        rel = path.relative_to(REPO).as_posix()
        allowed = ALLOWED[package] | ENTRY_POINTS.get(rel, set()) | {package}
        for line, name in project_imports(path):
            parts = name.split(".")
            if parts[0] != "latentforge":
                problems.append(f"{rel}:{line} imports {name}: project code is imported as latentforge.{name}")
                continue
            target = parts[1] if len(parts) > 1 else ""
            if target not in allowed:
                problems.append(f"{rel}:{line} imports {name}: {package} may import only {sorted(allowed)}")
            if rel.startswith(COMMON + "/") and target == "pipelines" and parts[2:3] != ["common"]:
                problems.append(f"{rel}:{line} imports {name}: the common plumbing imports no stage")
    assert not problems, "\n".join(problems)


def test_no_private_names_cross_modules() -> None:
    """A name another module needs is public: no ``from latentforge.x import _private``."""
    problems = []
    for package in PACKAGES:
        for path in source_files(package):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("latentforge."):
                    private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                    if private:
                        problems.append(f"{path.relative_to(REPO)}:{node.lineno} imports {', '.join(private)} from {node.module}")
    assert not problems, "\n".join(problems)


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    """The import reader finds namespaced, bare and function-level imports (the layering test can fail)."""
    src = tmp_path / "m.py"
    src.write_text("import os\nfrom latentforge.serving import app\n\ndef f():\n    from pipelines.train import x\n")
    assert project_imports(src) == [(2, "latentforge.serving"), (2, "latentforge.serving.app"), (5, "pipelines.train"), (5, "pipelines.train.x")]
