"""The command line: `python -m gogpt [--host H] [--port P] [--env-file F] [--workers N]`."""

from __future__ import annotations

import argparse
import os
import sys

from .config import ConfigError, load_settings
from .serve import serve


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError("must be a number from 0 to 65535")
    return int(text)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError("must be a whole number of at least 1")
    return int(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m gogpt", description="The gogpt LLM gateway.")
    parser.add_argument("--host", help="listen address (HOST, default 0.0.0.0)")
    parser.add_argument("--port", type=_port, help="listen port (PORT, default 8000)")
    parser.add_argument("--env-file", default=".env", help="settings file (default: .env, may be absent)")
    parser.add_argument("--workers", type=_positive, help="processes sharing the port (WORKERS, default 1)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.env_file != ".env" and not os.path.isfile(args.env_file):
        print(f"gogpt: --env-file: no such file: {args.env_file}", file=sys.stderr)
        return 1
    try:
        settings = load_settings(args.env_file).with_overrides(
            host=args.host, port=args.port, workers=args.workers
        )
    except ConfigError as exc:
        print(f"gogpt: {exc}", file=sys.stderr)
        return 1
    serve(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
