"""Every third-party package the code imports is declared in pyproject.toml: the product's folders in
``dependencies``, bench/ and tests/ in ``dependencies`` or the ``dev`` extra. Imports are read from the
source with ``ast`` (one inside a function counts), and an import name is mapped to the distributions
that provide it with ``importlib.metadata.packages_distributions()`` (``yaml`` -> PyYAML, ``PIL`` ->
pillow). The lock file's format is checked too: every line pinned and hashed, as ``--require-hashes``
needs."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PRODUCT = ("models", "pipelines", "runtime", "serving")
DEV_ONLY = ("bench", "tests")


def normalize(name: str) -> str:
    """A distribution name as PEP 503 compares it: ``Scikit_Learn`` -> ``scikit-learn``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    """``ray[train,serve]>=2.50`` -> ``ray``."""
    return normalize(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1))


def declared() -> tuple[set[str], set[str]]:
    """(runtime, dev) distribution names of pyproject.toml."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runtime = {requirement_name(r) for r in project["dependencies"]}
    dev = {requirement_name(r) for r in project["optional-dependencies"]["dev"]}
    return runtime, dev


def third_party_imports(path: Path, local: set[str]) -> list[tuple[int, str]]:
    """(line, top-level name) of each absolute import in ``path`` that is neither the standard library,
    the project, nor one of the ``local`` module names (bench's ``common``)."""
    skip = set(sys.stdlib_module_names) | set(PRODUCT) | {"latentforge", "__future__"} | local
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        out.extend((node.lineno, top) for top in (name.split(".")[0] for name in names) if top not in skip)
    return out


def undeclared_imports(folder: Path, allowed: set[str], local: set[str] = frozenset()) -> list[str]:
    """One line per import in ``folder`` whose package is not among the ``allowed`` distributions."""
    providers = packages_distributions()
    problems = []
    for path in sorted(folder.rglob("*.py")):
        for line, name in third_party_imports(path, local):
            dists = {normalize(d) for d in providers.get(name, [])}
            where = f"{path.relative_to(folder.parent)}:{line}"
            if not dists:
                problems.append(f"{where} imports {name}, which no installed distribution provides")
            elif not dists & allowed:
                problems.append(f"{where} imports {name} ({', '.join(sorted(dists))}), not declared in pyproject.toml")
    return problems


@pytest.mark.parametrize("folder", PRODUCT + DEV_ONLY)
def test_every_import_is_declared(folder: str) -> None:
    runtime, dev = declared()
    allowed = runtime if folder in PRODUCT else runtime | dev
    # bench/'s scripts import their sibling `common`; tests import `tests.<...>` helpers
    local = set() if folder in PRODUCT else {folder} | {p.stem for p in (REPO / folder).glob("*.py")}
    problems = undeclared_imports(REPO / folder, allowed, local)
    assert not problems, "\n".join(problems)


def test_the_checker_sees_an_undeclared_import(tmp_path: Path) -> None:
    """A function-level import of a dev-only package fails for the product; an unknown one fails always."""
    folder = tmp_path / "pkg"
    folder.mkdir()
    (folder / "m.py").write_text("import os\nimport numpy\n\ndef f():\n    import pytest\n    from no_such_dist_xyz import y\n")
    runtime, dev = declared()
    assert undeclared_imports(folder, runtime) == [
        "pkg/m.py:5 imports pytest (pytest), not declared in pyproject.toml",
        "pkg/m.py:6 imports no_such_dist_xyz, which no installed distribution provides",
    ]
    assert undeclared_imports(folder, runtime | dev) == [
        "pkg/m.py:6 imports no_such_dist_xyz, which no installed distribution provides",
    ]


def test_the_lock_pins_and_hashes_every_line() -> None:
    """requirements.lock: one ``name==version --hash=sha256:<64 hex>`` per line (``pip install
    --require-hashes`` refuses anything less), every declared distribution among them, torch once."""
    lines = [l for l in (REPO / "requirements.lock").read_text().splitlines() if l and not l.startswith("#")]
    pattern = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+) --hash=sha256:[0-9a-f]{64}")
    bad = [l for l in lines if not pattern.fullmatch(l)]
    assert not bad, f"requirements.lock: lines not pinned and hashed: {bad}"
    locked = {normalize(pattern.fullmatch(l).group(1)) for l in lines}
    runtime, dev = declared()
    assert not (runtime | dev) - locked, f"declared but not locked (run `make lock`): {sorted((runtime | dev) - locked)}"
    assert sum(l.startswith("torch==") for l in lines) == 1
