"""Settings from the environment and .env: defaults, precedence, and clear refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from gogpt import ConfigError, Settings, load_settings

VARIABLES = [
    "API_PROXY",
    "CHAT_API_KEY",
    "UNOFFICIAL_PROXY",
    "ACCESS_TOKEN",
    "SECRET_KEY",
    "HOST",
    "PORT",
    "MAX_BODY_BYTES",
    "UPSTREAM_TIMEOUT",
    "SHUTDOWN_GRACE",
    "RATE_LIMIT",
    "REDIS_URL",
    "WORKERS",
    "LOG_FORMAT",
]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SECRET_KEY", "k" * 40)


def test_defaults_match_the_spec() -> None:
    settings = load_settings()
    assert settings.api_proxy == "https://api.openai.com"
    assert (settings.host, settings.port) == ("0.0.0.0", 8000)
    assert settings.max_body_bytes == 32 * 1024 * 1024
    assert settings.upstream_timeout == 600
    assert settings.shutdown_grace == 30
    assert (settings.rate_limit, settings.workers) == (0, 1)


def test_environment_wins_over_the_env_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("PORT=9001\nCHAT_API_KEY=from-file\n")
    monkeypatch.setenv("PORT", "9002")
    settings = load_settings()
    assert settings.port == 9002
    assert settings.chat_api_key == "from-file"


def test_a_missing_env_file_is_fine() -> None:
    assert load_settings(".env").port == 8000


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("127.0.0.1:3000", "http://127.0.0.1:3000"),
        ("proxy.internal", "http://proxy.internal"),
        ("https://api.openai.com/", "https://api.openai.com"),
        ("https://gw.example.com/openai", "https://gw.example.com/openai"),
    ],
)
def test_api_proxy_bare_host_means_http(monkeypatch: pytest.MonkeyPatch, given: str, expected: str) -> None:
    monkeypatch.setenv("API_PROXY", given)
    assert load_settings().api_proxy == expected


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PORT", "eighty"),
        ("PORT", "70000"),
        ("MAX_BODY_BYTES", "0"),
        ("UPSTREAM_TIMEOUT", "-1"),
        ("WORKERS", "0"),
        ("RATE_LIMIT", "lots"),
        ("API_PROXY", "ftp://files.example.com"),
        ("API_PROXY", "http://host:notaport"),
        ("UNOFFICIAL_PROXY", "gopher://x"),
        ("LOG_FORMAT", "xml"),
        ("REDIS_URL", "http://cache:6379"),
    ],
)
def test_a_malformed_variable_is_refused_by_name_without_its_value(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as refused:
        load_settings()
    assert name in str(refused.value)
    assert value not in str(refused.value)


def test_a_missing_secret_key_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SECRET_KEY")
    with pytest.raises(ConfigError, match="SECRET_KEY"):
        load_settings()


def test_settings_never_show_secrets_in_repr() -> None:
    settings = Settings(
        secret_key="s3cret-signing",
        chat_api_key="sk-paid",
        access_token="at-account",
        redis_url="redis://:pw@h",
    )
    text = repr(settings)
    for secret in ("s3cret-signing", "sk-paid", "at-account", "pw@h"):
        assert secret not in text


def test_settings_are_frozen() -> None:
    settings = Settings(secret_key="x" * 40)
    with pytest.raises(AttributeError):
        settings.port = 1  # type: ignore[misc]
