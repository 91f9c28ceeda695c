"""The ``latentforge`` command: one sub-command per lifecycle stage, each a thin shell over pure functions."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipelines.params import DEFAULT_PARAMS, ParamsError, apply_overrides, load_params


def _params(args: argparse.Namespace) -> dict:
    return apply_overrides(load_params(args.params), args.set or [])


def cmd_prepare(args: argparse.Namespace) -> int:
    from pipelines.prepare import prepare

    out_dir, manifest = prepare(_params(args))
    counts = ", ".join(f"{s} {v['count']}" for s, v in manifest["splits"].items())
    print(f"prepared {manifest['name']} ({manifest['source']}): {counts}; image {tuple(manifest['image_shape'])} -> {out_dir}")
    if args.json:
        print(json.dumps(manifest["splits"]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentforge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def stage(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--params", type=Path, default=DEFAULT_PARAMS, help="params file (default: params.yaml)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a param, e.g. data.name=digits (repeatable)")
        return p

    p = stage("prepare", "turn the configured data set into data/prepared/<name>/ (train/val/test Parquet + manifest.json)")
    p.add_argument("--json", action="store_true", help="also print the split summary as JSON")
    p.set_defaults(func=cmd_prepare)
    return parser


# Errors a user can cause: one line on stderr and exit status 2, no traceback.
def _user_errors() -> tuple[type[BaseException], ...]:
    from models.base import ConfigError
    from pipelines.data import DataError

    return (ParamsError, DataError, ConfigError, FileNotFoundError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except _user_errors() as exc:
        print(f"latentforge {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
