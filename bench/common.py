"""Helpers shared by the benchmarks in bench/: the environment record and atomic JSON output.

Not a benchmark itself (``make bench`` runs every bench/*.py, so running this file only says so).
Each benchmark imports it as ``common`` (bench/ is on ``sys.path`` when a script in it runs).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results"

# The benchmarks import the project as the installed `latentforge` package (`make install` installs this
# checkout in editable mode), so the figures are those of the code in this tree.


def git_commit() -> str:
    """HEAD of the checkout, with ``+dirty`` when tracked files differ from it (figures of a work tree)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment() -> dict[str, Any]:
    """What the figures depend on: machine, versions, thread count, load at the start."""
    import torch

    env = {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
    }
    try:
        env["loadavg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return env


def parse_names(script: str, what: str, text: str, allowed) -> list[str] | None:
    """A comma-separated ``--<what>`` list; None, after one line on stderr naming the unknown ones and the
    choices, when any is not in ``allowed`` (the caller exits 2)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown:
        print(f"{script}: unknown {what} {', '.join(unknown)}; choose from {', '.join(allowed)}", file=sys.stderr)
        return None
    return names


def write_json(data: dict[str, Any], path: Path) -> Path:
    """Write ``data`` as indented JSON to ``path`` atomically (a temp file in the same folder, renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=False, default=_plain)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def rel(path: Path) -> str:
    """``path`` relative to the repository root when it lies inside it (for JSON and printed lines)."""
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    print("bench/common.py: shared helpers for the benchmarks; nothing to measure here")
