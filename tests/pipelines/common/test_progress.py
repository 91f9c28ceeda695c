"""Progress of long work: plain, rate-limited lines when the stream is a log file, not a terminal."""

from __future__ import annotations

import io
import os

from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR

from latentforge.pipelines.common.progress import Progress, progress, quiet_library_bars


def test_plain_lines_in_a_log_file_at_most_every_interval() -> None:
    log = io.StringIO()  # no terminal: no bar, no carriage returns
    assert list(progress(range(5), "epoch 1/3", unit="steps", interval_s=3600, stream=log)) == [0, 1, 2, 3, 4]
    assert log.getvalue() == ""  # done before the first interval: nothing said
    items = list(progress(range(3), "epoch 2/3", unit="steps", interval_s=0, stream=log))
    lines = log.getvalue().splitlines()
    assert items == [0, 1, 2] and len(lines) == 3 and "\r" not in log.getvalue()
    assert lines[0].startswith("[latentforge] epoch 2/3: 1/3 steps (33%), ") and "ETA" in lines[0]
    assert lines[-1].startswith("[latentforge] epoch 2/3: 3/3 steps (100%), ") and lines[-1].endswith("ETA 0s")


def test_unknown_total() -> None:
    bar = Progress("reading", None, unit="rows", stream=io.StringIO())
    bar.update(7)
    assert bar.line(2.0) == "reading: 7 rows, 3.5 rows/s"


def test_library_bars_are_off_when_the_log_is_a_file(monkeypatch, tmp_path):
    for name in ("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "HF_HUB_DISABLE_PROGRESS_BARS"):
        monkeypatch.setenv(name, "unset")  # recorded, so that the test's changes are undone after it
        monkeypatch.delenv(name)
    with open(tmp_path / "log.txt", "w") as log:
        quiet_library_bars(log)
    assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "false" and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    assert MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.get() is False  # MLflow reads it as off
