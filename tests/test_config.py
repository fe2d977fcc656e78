"""Settings from the environment and `.env`: defaults, precedence, and clear refusals."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from gogpt import ConfigError, Settings, load_settings

KEY = "k" * 40


@pytest.fixture(autouse=True)
def environment(bare_environment: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Only SECRET_KEY set, in an empty working directory."""
    monkeypatch.setenv("SECRET_KEY", KEY)
    return bare_environment


def test_defaults_are_the_documented_ones() -> None:
    settings = load_settings()
    assert settings == Settings(
        secret_key=KEY,
        api_proxy="https://api.openai.com",
        chat_api_key="",
        unofficial_proxy="",
        access_token="",
        host="0.0.0.0",
        port=8000,
        max_body_bytes=33554432,
        upstream_timeout=600,
        shutdown_grace=30,
        rate_limit=0,
        redis_url="",
        gogpt_db="gogpt.db",
        workers=1,
    )


def test_state_lives_in_gogpt_db_unless_redis_url_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().store == "sqlite"
    monkeypatch.setenv("GOGPT_DB", ":memory:")
    assert load_settings().store == "memory"
    monkeypatch.setenv("REDIS_URL", "redis://cache:6379/0")
    assert load_settings().store == "redis"


def test_gogpt_db_in_memory_is_refused_with_more_than_one_worker() -> None:
    settings = Settings(secret_key=KEY, gogpt_db=":memory:")
    with pytest.raises(ConfigError, match=r"^GOGPT_DB: :memory: keeps state inside one process"):
        settings.with_overrides(workers=2)  # as --workers 2 does


def test_the_environment_wins_over_the_env_file(environment: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (environment / ".env").write_text("PORT=9001\nAPI_PROXY=https://from-file.example\n")
    monkeypatch.setenv("PORT", "9002")
    monkeypatch.setenv("API_PROXY", "https://from-env.example")
    settings = load_settings()
    assert (settings.port, settings.api_proxy) == (9002, "https://from-env.example")


def test_the_env_file_supplies_what_the_environment_does_not(environment: Path) -> None:
    (environment / ".env").write_text("CHAT_API_KEY=sk-from-file\nMAX_BODY_BYTES=1024\n")
    settings = load_settings()
    assert (settings.chat_api_key, settings.max_body_bytes) == ("sk-from-file", 1024)


def test_a_missing_env_file_is_fine(environment: Path) -> None:
    assert not (environment / ".env").exists()
    assert load_settings().port == 8000


def test_a_named_env_file_is_read(environment: Path) -> None:
    (environment / "prod.env").write_text("PORT=9004\n")
    assert load_settings(environment / "prod.env").port == 9004


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("127.0.0.1:3000", "http://127.0.0.1:3000"),
        ("proxy.internal", "http://proxy.internal"),
        ("proxy.internal:8080/openai", "http://proxy.internal:8080/openai"),
    ],
)
def test_a_bare_host_and_port_means_http(monkeypatch: pytest.MonkeyPatch, given: str, expected: str) -> None:
    monkeypatch.setenv("API_PROXY", given)
    assert load_settings().api_proxy == expected


@pytest.mark.parametrize(
    "url", ["https://api.openai.com", "http://10.0.0.2:8080", "https://gw.example.com/openai"]
)
def test_a_full_url_is_used_as_given(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("API_PROXY", url)
    assert load_settings().api_proxy == url


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("https://api.openai.com/", "https://api.openai.com"),
        ("127.0.0.1:3000/", "http://127.0.0.1:3000"),
        ("https://gw.example.com/openai/", "https://gw.example.com/openai"),
    ],
)
def test_a_trailing_slash_is_stripped(monkeypatch: pytest.MonkeyPatch, given: str, expected: str) -> None:
    monkeypatch.setenv("API_PROXY", given)
    assert load_settings().api_proxy == expected


def test_unofficial_proxy_follows_the_same_rule_and_keeps_its_path_prefix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("UNOFFICIAL_PROXY", "127.0.0.1:3040/backend-api/")
    assert load_settings().unofficial_proxy == "http://127.0.0.1:3040/backend-api"


def test_an_empty_api_proxy_means_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("API_PROXY", "")
    assert load_settings().api_proxy == "https://api.openai.com"


# Values chosen so that finding one in the message means the message quoted it.
MALFORMED = [
    ("PORT", "eighty"),
    ("PORT", "70000"),
    ("PORT", "-8080"),
    ("MAX_BODY_BYTES", "-4096"),
    ("MAX_BODY_BYTES", "lots"),
    ("MAX_BODY_BYTES", "1e3"),
    ("UPSTREAM_TIMEOUT", "soon"),
    ("UPSTREAM_TIMEOUT", "-30"),
    ("SHUTDOWN_GRACE", "-5"),
    ("RATE_LIMIT", "lots"),
    ("RATE_LIMIT", "-60"),
    ("WORKERS", "-2"),
    ("WORKERS", "many"),
    ("API_PROXY", "ftp://files.example.com"),
    ("API_PROXY", "ftp://user:hunter2@files.example.com"),
    ("API_PROXY", "http://proxy.example.com:port"),
    ("API_PROXY", "http://proxy.example.com:99999"),
    ("UNOFFICIAL_PROXY", "gopher://chat.example.com"),
    ("LOG_FORMAT", "xml"),
    ("REDIS_URL", "http://cache.example.com:6379"),
]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        *MALFORMED,
        ("MAX_BODY_BYTES", "0"),
        ("WORKERS", "0"),
        ("UPSTREAM_TIMEOUT", "0"),
        ("UPSTREAM_TIMEOUT", "nan"),
        ("SHUTDOWN_GRACE", "inf"),
    ],
)
def test_a_malformed_variable_is_refused_naming_it(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as refused:
        load_settings()
    assert str(refused.value).startswith(f"{name}:")


@pytest.mark.parametrize(("name", "value"), MALFORMED)
def test_a_malformed_variable_is_refused_without_its_value(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as refused:
        load_settings()
    assert value not in str(refused.value)


def test_a_malformed_variable_in_the_env_file_is_refused(environment: Path) -> None:
    (environment / ".env").write_text("PORT=eighty\n")
    with pytest.raises(ConfigError, match=r"^PORT:"):
        load_settings()


def test_a_missing_secret_key_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SECRET_KEY")
    with pytest.raises(ConfigError, match=r"^SECRET_KEY:"):
        load_settings()


def test_the_empty_secret_key_of_env_example_is_refused(
    environment: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SECRET_KEY")
    example = Path(__file__).parent.parent / ".env.example"
    (environment / ".env").write_text(example.read_text())
    with pytest.raises(ConfigError, match=r"^SECRET_KEY:"):
        load_settings()


def test_repr_never_shows_a_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SECRET_KEY", "signing-secret-4f1c9a")
    monkeypatch.setenv("CHAT_API_KEY", "sk-paid-key-77b2e0")
    monkeypatch.setenv("ACCESS_TOKEN", "account-token-9d3a51")
    monkeypatch.setenv("REDIS_URL", "redis://:redis-password-5e8c@cache:6379/0")
    text = repr(load_settings())
    for secret in (
        "signing-secret-4f1c9a",
        "sk-paid-key-77b2e0",
        "account-token-9d3a51",
        "redis-password-5e8c",
    ):
        assert secret not in text


def test_settings_are_frozen() -> None:
    settings = load_settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.port = 1  # type: ignore[misc]


def test_env_example_lists_every_variable_with_a_comment() -> None:
    """Each variable sits in a block of lines under a `#` comment (HOST and PORT share one)."""
    lines = (Path(__file__).parent.parent / ".env.example").read_text().splitlines()
    not_variables = {"MULTI", "RUN_ID"}  # --multi only; set at each start
    variables = {field.name.upper() for field in dataclasses.fields(Settings)} - not_variables
    for name in variables:
        [index] = [n for n, line in enumerate(lines) if line.startswith(f"{name}=")]
        while index > 0 and "=" in lines[index - 1] and not lines[index - 1].startswith("#"):
            index -= 1
        assert lines[index - 1].startswith("# "), name


def test_the_openai_organization_and_project_are_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPENAI_ORGANIZATION", "org-gateway")
    monkeypatch.setenv("OPENAI_PROJECT", "proj_gateway")
    settings = load_settings()
    assert (settings.openai_organization, settings.openai_project) == ("org-gateway", "proj_gateway")


@pytest.mark.parametrize("name", ["OPENAI_ORGANIZATION", "OPENAI_PROJECT"])
@pytest.mark.parametrize("value", ["org with spaces", "org-1\r\nX-Injected: 1", "org-é"])
def test_an_organization_or_project_that_is_no_header_value_is_refused_naming_it(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as refused:
        load_settings()
    assert str(refused.value).startswith(f"{name}: ")
