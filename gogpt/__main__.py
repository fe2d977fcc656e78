"""The command line: `python -m gogpt [--host H] [--port P] [--env-file F] [--workers N] [--clear] [--multi]`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from .config import ConfigError, load_settings
from .conv import hide_all_conversations
from .logs import configure_logging
from .serve import serve
from .sqlite_store import create_database_file


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
    parser.add_argument("--env-file", help="settings file, which must exist (default: .env, may be absent)")
    parser.add_argument("--workers", type=_positive, help="processes sharing the port (WORKERS, default 1)")
    parser.add_argument(
        "--clear", action="store_true", help="hide every conversation of the ChatGPT account before serving"
    )
    parser.add_argument(
        "--multi", action="store_true", help="one /conv reply at a time per conversation, not per account"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.env_file is not None and not os.path.isfile(args.env_file):
        print(f"gogpt: --env-file: no such file: {args.env_file}", file=sys.stderr)
        return 1
    try:
        settings = load_settings(args.env_file or ".env").with_overrides(
            host=args.host, port=args.port, workers=args.workers, multi=args.multi or None
        )
        if settings.store == "sqlite":
            create_database_file(settings.gogpt_db)  # once, before any worker: a bad path stops here
    except ConfigError as exc:
        print(f"gogpt: {exc}", file=sys.stderr)
        return 1
    if args.clear:
        configure_logging(settings.log_format)
        logging.getLogger("gogpt.conv").info("%s", asyncio.run(hide_all_conversations(settings)))
    serve(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
