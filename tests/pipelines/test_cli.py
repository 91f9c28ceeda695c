"""The ``latentforge`` command line itself: its version and its help text."""

from __future__ import annotations

import argparse
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from latentforge.pipelines.cli import build_parser, main, plain_text

REPO = Path(__file__).resolve().parents[2]


def test_version_prints_the_package_version() -> None:
    expected = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    out = subprocess.run([sys.executable, "-m", "latentforge.pipelines.cli", "--version"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"latentforge {expected}"


def _subcommand_parsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices)


def test_help_of_every_command_is_plain_text(capsys) -> None:
    parser = build_parser()
    helps = {"latentforge": parser.format_help()}
    helps.update({name: sub.format_help() for name, sub in _subcommand_parsers(parser).items()})
    assert {"train", "evaluate", "serve", "mlflow-server"} <= set(helps)
    for name, text in helps.items():
        assert "`" not in text, f"{name} --help shows reStructuredText or Markdown backticks:\n{text}"
        assert ":func:" not in text and ":class:" not in text, f"{name} --help shows a reStructuredText role"
    assert "The latentforge command" in helps["latentforge"]
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    assert "--run-name" in capsys.readouterr().out


def test_plain_text_drops_literals_and_roles() -> None:
    assert plain_text("The ``latentforge`` command; see :func:`run_training` and :class:`~a.TrainJob`.") == (
        "The latentforge command; see run_training and a.TrainJob.")
