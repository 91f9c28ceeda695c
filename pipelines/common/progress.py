"""Progress of long work: a live bar on a terminal, a plain line now and then in a log file.

A stage's log is often a file (``make demo > demo.log``, CI, a Ray worker's forwarded stdout): there a
redrawn bar would write one line per update. So a bar is drawn only when the stream is a terminal;
elsewhere one line every ``interval_s`` seconds says how far the work is, and nothing at all when it
finishes sooner.
"""

from __future__ import annotations

import os
import sys
import time
from typing import IO, Iterable, Iterator, TypeVar

T = TypeVar("T")

LOG_INTERVAL_S = 30.0  # seconds between plain progress lines when the stream is not a terminal


class Progress:
    """Count ``total`` units of ``desc`` (``total`` None: unknown) on ``stream`` (default stderr).

    On a terminal: a tqdm bar, removed when done. Elsewhere: ``[latentforge] <desc>: <done>/<total> <unit>
    (<pct>%), <rate> <unit>/s, ETA <s>s`` at most every ``interval_s`` seconds."""

    def __init__(self, desc: str, total: int | None = None, unit: str = "it", interval_s: float = LOG_INTERVAL_S,
                 stream: IO[str] | None = None):
        self.desc, self.total, self.unit, self.interval_s = desc, total, unit, interval_s
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0
        self.start = self.last_line = time.monotonic()
        self.bar = None
        if _is_terminal(self.stream):
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream, leave=False, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        """``n`` more units done."""
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last_line >= self.interval_s:
            self.last_line = now
            print(f"[latentforge] {self.line(now - self.start)}", file=self.stream, flush=True)

    def line(self, elapsed_s: float) -> str:
        """The plain progress line after ``elapsed_s`` seconds."""
        rate = self.done / max(elapsed_s, 1e-9)
        if not self.total:
            return f"{self.desc}: {self.done} {self.unit}, {rate:.3g} {self.unit}/s"
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        return (f"{self.desc}: {self.done}/{self.total} {self.unit} ({100 * self.done / self.total:.0f}%), "
                f"{rate:.3g} {self.unit}/s, ETA {eta:.0f}s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it",
             interval_s: float = LOG_INTERVAL_S, stream: IO[str] | None = None) -> Iterator[T]:
    """Iterate ``items`` while counting them in a :class:`Progress` (``total`` default: ``len(items)``)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(desc, total, unit, interval_s, stream) as bar:
        for item in items:
            yield item
            bar.update()


def quiet_library_bars(stream: IO[str] | None = None) -> None:
    """When ``stream`` (default stderr) is no terminal, turn off the bars of the libraries a stage calls,
    which a log file would get as one long line of carriage returns: MLflow's artifact downloads and
    Hugging Face's (the sentence encoder's "Loading weights"). Their own switches, set only where unset;
    child processes (Ray workers started here) inherit them."""
    if not _is_terminal(stream if stream is not None else sys.stderr):
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
