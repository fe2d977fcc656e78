"""Settings: every knob of gogpt, read once from the environment and `.env`, validated, frozen."""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import SplitResult, urlsplit

from environs import Env, EnvValidationError
from marshmallow.validate import OneOf, Range

__all__ = ["ConfigError", "Settings", "load_settings"]

_MEMORY_DB = ":memory:"  # GOGPT_DB's value for state kept in the process, as SQLite spells it


class ConfigError(Exception):
    """A setting is missing or malformed; the message names the variable and never its value."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """One immutable bag of settings; secrets are kept out of `repr` so they never reach a log."""

    secret_key: str = field(repr=False)
    api_proxy: str = "https://api.openai.com"
    chat_api_key: str = field(default="", repr=False)
    unofficial_proxy: str = ""
    access_token: str = field(default="", repr=False)
    openai_organization: str = ""
    openai_project: str = ""
    host: str = "0.0.0.0"
    port: int = 8000
    max_body_bytes: int = 32 * 1024 * 1024
    upstream_timeout: float = 600.0
    shutdown_grace: float = 30.0
    rate_limit: int = 0
    token_failure_limit: int = 10
    redis_url: str = field(default="", repr=False)
    gogpt_db: str = "gogpt.db"
    workers: int = 1
    log_format: str = "text"
    multi: bool = False
    splice: bool = True
    client_timeout: float = 60.0
    idle_timeout: float = 75.0
    upstream_retries: int = 2
    sse_keepalive: float = 15.0
    budget_reserve: int = 4096
    # Names this start of gogpt: every worker it starts gets the same settings, so the same id,
    # and a once-per-start rule (/conv's first list) holds once for all of them. Not a variable.
    run_id: str = field(default_factory=lambda: secrets.token_hex(8), compare=False)

    def __post_init__(self) -> None:
        if not self.secret_key:
            raise ConfigError("SECRET_KEY: must be set (it signs client tokens)")
        object.__setattr__(self, "api_proxy", normalize_base_url("API_PROXY", self.api_proxy))
        if self.unofficial_proxy:
            object.__setattr__(
                self,
                "unofficial_proxy",
                normalize_base_url("UNOFFICIAL_PROXY", self.unofficial_proxy),
            )
        for name in ("openai_organization", "openai_project"):
            if not _HEADER_TOKEN.fullmatch(getattr(self, name)):
                raise ConfigError(f"{name.upper()}: expected an id (visible ASCII characters, no spaces)")

        if self.redis_url and _split_url("REDIS_URL", self.redis_url).scheme not in _REDIS_SCHEMES:
            raise ConfigError("REDIS_URL: expected redis://, rediss:// or unix://")
        if self.store == "memory" and self.workers > 1:
            raise ConfigError(
                f"GOGPT_DB: {_MEMORY_DB} keeps state inside one process, so {self.workers} workers would "
                "each have their own limits and /conv locks; use a file (the default) or REDIS_URL"
            )

    @property
    def store(self) -> Literal["redis", "sqlite", "memory"]:
        """Where shared state lives: Redis when REDIS_URL is set, else the GOGPT_DB file, or the process."""
        if self.redis_url:
            return "redis"
        return "memory" if self.gogpt_db == _MEMORY_DB else "sqlite"

    @property
    def chat_api_keys(self) -> tuple[str, ...]:
        """`CHAT_API_KEY` as a pool: several keys separated by commas."""
        return tuple(key for key in (part.strip() for part in self.chat_api_key.split(",")) if key)

    def with_overrides(self, **changes: Any) -> Settings:
        """A copy with command-line overrides applied (None means 'not given')."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


_REDIS_SCHEMES = ("redis", "rediss", "unix")
_HEADER_TOKEN = re.compile(r"[!-~]*")  # visible ASCII: sent as a header value as it is


def _split_url(name: str, value: str) -> SplitResult:
    try:
        return urlsplit(value)
    except ValueError:  # an unclosed "[" of an IPv6 address, say
        raise ConfigError(f"{name}: not a valid URL") from None


def normalize_base_url(name: str, value: str) -> str:
    """Bare `host[:port]` means `http://host[:port]`, as in the Go original; anything else must be http(s)."""
    value = value.strip()
    if "://" not in value:
        value = "http://" + value
    parts = _split_url(name, value)
    if parts.scheme not in ("http", "https"):
        raise ConfigError(f"{name}: the URL scheme must be http or https")
    try:
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        raise ConfigError(f"{name}: the port is not a number between 0 and 65535") from None
    if parts.username is not None or parts.password is not None:
        raise ConfigError(
            f"{name}: credentials in the URL are not supported (the upstream key has its own variable)"
        )
    if not parts.hostname or parts.query or parts.fragment:
        raise ConfigError(f"{name}: expected a base URL such as https://api.openai.com")
    return value.rstrip("/")


def load_settings(env_file: str | os.PathLike[str] | None = ".env") -> Settings:
    """Read settings from the process environment, then `env_file`.

    The environment wins over the file; a missing file is fine. Every problem is reported
    in one `ConfigError` naming the variables, never their values.
    """
    env = Env(eager=False, expand_vars=False)
    if env_file is not None:
        try:
            env.read_env(Path(env_file), recurse=False)
        except (OSError, ValueError):  # a directory, unreadable, or not UTF-8
            raise ConfigError(f"{env_file}: not a readable UTF-8 settings file") from None
    positive = Range(min=1)
    values: dict[str, Any] = dict(
        secret_key=env.str("SECRET_KEY", ""),
        api_proxy=env.str("API_PROXY", "https://api.openai.com") or "https://api.openai.com",
        chat_api_key=env.str("CHAT_API_KEY", ""),
        unofficial_proxy=env.str("UNOFFICIAL_PROXY", ""),
        access_token=env.str("ACCESS_TOKEN", ""),
        openai_organization=env.str("OPENAI_ORGANIZATION", ""),
        openai_project=env.str("OPENAI_PROJECT", ""),
        host=env.str("HOST", "0.0.0.0"),
        port=env.int("PORT", 8000, validate=Range(min=0, max=65535)),
        max_body_bytes=env.int("MAX_BODY_BYTES", 32 * 1024 * 1024, validate=positive),
        upstream_timeout=env.float("UPSTREAM_TIMEOUT", 600.0, validate=Range(min=0, min_inclusive=False)),
        shutdown_grace=env.float("SHUTDOWN_GRACE", 30.0, validate=Range(min=0)),
        rate_limit=env.int("RATE_LIMIT", 0, validate=Range(min=0)),
        token_failure_limit=env.int("TOKEN_FAILURE_LIMIT", 10, validate=Range(min=0)),
        redis_url=env.str("REDIS_URL", ""),
        gogpt_db=env.str("GOGPT_DB", "gogpt.db") or "gogpt.db",
        workers=env.int("WORKERS", 1, validate=positive),
        log_format=env.str("LOG_FORMAT", "text", validate=OneOf(("text", "json"))),
        splice=env.str("SPLICE", "on", validate=OneOf(("on", "off"))) != "off",
        client_timeout=env.float("CLIENT_TIMEOUT", 60.0, validate=Range(min=0, min_inclusive=False)),
        idle_timeout=env.float("IDLE_TIMEOUT", 75.0, validate=Range(min=0, min_inclusive=False)),
        upstream_retries=env.int("UPSTREAM_RETRIES", 2, validate=Range(min=0, max=10)),
        sse_keepalive=env.float("SSE_KEEPALIVE", 15.0, validate=Range(min=0)),
        budget_reserve=env.int("BUDGET_RESERVE", 4096, validate=Range(min=1, max=10**12)),
    )
    try:
        env.seal()
    except EnvValidationError as exc:
        raise ConfigError(_describe(exc.error_messages)) from None  # type: ignore[arg-type]
    return Settings(**values)


def _describe(errors: Mapping[str, Any]) -> str:
    parts = []
    for name, messages in errors.items():
        text = " ".join(messages) if isinstance(messages, list) else str(messages)
        parts.append(f"{name}: {text}")
    return "; ".join(parts)
