"""Property-based fuzzing of what clients and operators control.

No input makes gogpt answer 5xx or crash, a refusal never reaches the upstream, and no path
trick reaches an upstream URL. One app and one fake upstream serve every example of a test;
each example starts from no recorded upstream requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import posixpath
import re
import time
import unicodedata
import warnings
from functools import partial
from pathlib import Path
from urllib.parse import urlencode

import jwt
import pytest
from aiohttp.test_utils import TestClient
from conftest import GOGPT_VARIABLES, SECRET_KEY, FakeUpstream, ask_token
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st

from gogpt import ConfigError, Settings, create_app, json_text, load_settings, mint_token
from gogpt.auth import verify_credential
from gogpt.json_child import loads, object_fields
from gogpt.usage_request import REQUEST_FIELDS, with_usage_asked

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

header_text = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x2FFF, exclude_characters="\x7f"), max_size=300
)
# Any byte but the line breaks that would end the header early (those are framing, not a value).
header_bytes = st.binary(max_size=300).map(lambda raw: raw.replace(b"\r", b"").replace(b"\n", b""))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


async def send_raw(client: TestClient, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """One request written byte for byte on its own connection, so headers go out exactly as given."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(head + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


def request_head(method: str, target: bytes, headers: dict[bytes, bytes]) -> bytes:
    lines = [b"%s %s HTTP/1.1" % (method.encode(), target), b"Host: gogpt"]
    lines += [name + b": " + value for name, value in headers.items()]
    return b"\r\n".join(lines) + b"\r\n"


def _token_header(token: str) -> dict[bytes, bytes]:
    return {b"Authorization": f"Bearer {token}".encode()}


# ---- /token ----------------------------------------------------------------------------------


@pytest.fixture
async def token_client(aiohttp_client, settings: Settings) -> TestClient:
    """gogpt without the wrong-key lockout, so every example reaches the key check and the mint
    (the lockout has its own tests; hundreds of wrong keys here would only meet its 429)."""
    return await aiohttp_client(create_app(settings.with_overrides(token_failure_limit=0)))


@FUZZ
@given(
    params=st.dictionaries(st.sampled_from(["id", "hour", "key", "other"]), st.text(max_size=40), max_size=4)
)
async def test_token_parameters_never_cause_a_server_error(token_client: TestClient, params: dict[str, str]):
    resp = await token_client.get("/token", params=params)
    assert resp.status in (200, 400, 403)
    body = await resp.json()
    assert ("token" in body) == (resp.status == 200)
    assert SECRET_KEY not in json.dumps(body)


token_fields = st.fixed_dictionaries(
    {},
    optional={
        "id": json_values | st.just("\ud800"),
        "hour": json_values | st.sampled_from(["1", "24", "-1", "1e3", "٣"]),
        "key": json_values | st.sampled_from([SECRET_KEY, SECRET_KEY + "\ud800", "\ud800", ""]),
        # the policy fields (their values are fuzzed for meaning further down)
        "models": json_values | st.sampled_from(["gpt-4o*", "gpt-*", "\ud800", "a,\x00"]),
        "budget": json_values | st.sampled_from(["100", "1e9", "\ud800"]),
        "period": json_values | st.sampled_from(["day", "\ud800"]),
        "rpm": json_values | st.sampled_from(["60", "0"]),
    },
)
token_content_types = st.sampled_from(
    [
        b"application/json",
        b"application/json; charset=latin-1",
        b"application/x-www-form-urlencoded",
        b"application/x-www-form-urlencoded; charset=no-such-codec",
        b"multipart/form-data",
        b"multipart/form-data; boundary=edge",
        b"text/plain",
    ]
)


def _token_body(fields: dict[str, object], shape: str) -> bytes:
    if shape == "json":
        return json.dumps(fields).encode("utf-8", "surrogatepass")
    text = {
        k: (v if isinstance(v, str) else json.dumps(v)).encode("utf-8", "surrogatepass")
        for k, v in fields.items()
    }
    return urlencode(text).encode()


@FUZZ
@given(
    content_type=token_content_types,
    body=st.builds(_token_body, token_fields, st.sampled_from(["json", "form"])) | st.binary(max_size=200),
)
async def test_token_post_bodies_never_cause_a_server_error(
    token_client: TestClient, content_type: bytes, body: bytes
):
    status, answer = await send_raw(
        token_client, request_head("POST", b"/token", {b"Content-Type": content_type}), body
    )
    assert status in (200, 400, 403), answer
    assert SECRET_KEY.encode() not in answer


token_ids = st.text(max_size=300) | st.sampled_from(
    [
        "admin",
        "ADMIN",
        "\uff41dmin",
        "-",
        " alice",
        "alice ",
        "a\nb",
        "a\rb",
        "\x85",
        "\u2028",
        "\u202e",
        "\x7f",
    ]
)


def _mintable(identity: str) -> bool:
    """What /token accepts as an id: one printable, unpadded piece of a log line that does not read
    as the admin credential (`admin`) or as no caller (`-`)."""
    reserved = unicodedata.normalize("NFKC", identity).casefold() in ("admin", "-")
    return (
        0 < len(identity) <= 256 and identity.isprintable() and identity == identity.strip() and not reserved
    )


@FUZZ
@given(identity=token_ids, transport=st.sampled_from(["json", "form", "get"]))
@example(identity="\ud800", transport="json")  # a lone surrogate, which only JSON can carry
@example(identity="Alice Smith", transport="form")
@example(identity="用户", transport="get")
@example(identity="admins", transport="json")
@example(identity="a" * 256, transport="json")
async def test_token_ids_are_minted_exactly_when_a_log_line_can_show_them(
    client: TestClient, upstream: FakeUpstream, identity: str, transport: str
):
    """Never a 5xx; 200 for every id a log reader cannot mistake, 400 for the rest; and a minted
    id comes back in the token and is accepted by the gateway."""
    params = {"id": identity, "hour": "1", "key": SECRET_KEY}
    resp = await ask_token(client, transport, params)
    assert resp.status == (200 if _mintable(identity) else 400)
    body = await resp.json()
    if resp.status == 400:
        assert "token" not in body
        return
    token = body["token"]
    assert jwt.decode(token, SECRET_KEY, algorithms=["HS256"])["jti"] == identity
    assert (await client.get("/v1/models", headers={"Authorization": f"Bearer {token}"})).status == 200


_model_names = st.text(max_size=12) | st.sampled_from(
    ["gpt-4o", "gpt-4o*", "*", "gpt-*o", " gpt-4o", "a,b", "x" * 257, "o1\n", "o1\u2028", "**"]
)
_policy_values = {
    "models": json_values
    | st.lists(_model_names, max_size=4)
    | st.lists(_model_names, max_size=4).map(",".join)
    | st.sampled_from(["", ",", "gpt-4o*,gpt-4o*", ",".join(["m"] * 65)]),
    "budget": json_values
    | st.integers(-2, 10**13).map(str)
    | st.sampled_from(["", " 7 ", "1e3", "٣", "0x10", str(10**12)]),
    "period": json_values | st.sampled_from(["", "day", "month", "total", "week", "DAY"]),
    "rpm": json_values | st.integers(-2, 2 * 10**6).map(str) | st.sampled_from(["", "60", "1.0"]),
}
POLICY_FIELDS = tuple(_policy_values)
_example_ids = itertools.count()


def _as_sent(value: object, transport: str) -> object:
    """A value as the transport carries it: JSON as it is, a query or form as text."""
    return value if transport == "json" or isinstance(value, str) else json.dumps(value)


def _signed_models(value: object) -> list[str] | bool | None:
    """What /token signs for `models` (None: no list), or False when it must refuse it."""
    if value is None or value == "":
        return None
    names = [name.strip() for name in value.split(",")] if isinstance(value, str) else value
    if not isinstance(names, list) or not 0 < len(names) <= 64:
        return False
    for name in names:
        if not (isinstance(name, str) and 0 < len(name) <= 256 and name.isprintable()):
            return False
        if name != name.strip() or "," in name or "*" in name[:-1] or name == "*":
            return False
    return list(dict.fromkeys(names))


def _signed_number(value: object, most: int) -> int | bool | None:
    """What /token signs for `budget` or `rpm` (None: none), or False when it must refuse it."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        text = value.strip()
        number = int(text) if text.isascii() and text.isdigit() and len(text) <= 13 else 0
    else:
        number = value if type(value) is int else 0
    return number if 0 < number <= most else False


def _expected_claims(sent: dict[str, object]) -> dict[str, object] | None:
    """The policy claims a token minted with `sent` carries, or None when /token must refuse."""
    models = _signed_models(sent.get("models"))
    budget = _signed_number(sent.get("budget"), 10**12)
    rpm = _signed_number(sent.get("rpm"), 10**6)
    period = sent.get("period")
    if (
        models is False
        or budget is False
        or rpm is False
        or period not in (None, "", "day", "month", "total")
    ):
        return None
    claims: dict[str, object] = {} if models is None else {"models": models}
    if budget is not None:
        claims |= {"budget": budget, "period": period or "month"}
    return claims if rpm is None else claims | {"rpm": rpm}


@FUZZ
@given(
    fields=st.fixed_dictionaries({}, optional=_policy_values),
    transport=st.sampled_from(["json", "form", "get"]),
)
@example(fields={"models": "gpt-4o-mini,gpt-4o*", "budget": "50000", "period": "day"}, transport="get")
@example(fields={"models": ["gpt-4o*", "gpt-4o*"], "budget": 10**12, "rpm": 10**6}, transport="json")
@example(fields={"models": "gpt-*o"}, transport="form")
async def test_token_policies_are_signed_exactly_when_every_field_is_valid(
    client: TestClient, upstream: FakeUpstream, fields: dict[str, object], transport: str
):
    """Never a 5xx; 200 exactly when every policy field is valid, else 400 naming a field; a
    signed policy is in the answer and the token, which the gateway accepts with that policy."""
    sent = {name: _as_sent(value, transport) for name, value in fields.items()}
    # an id of its own: a token's rpm limits its id, which earlier examples' tokens may have used up
    params = {"id": f"fuzz-{next(_example_ids)}", "hour": "1", "key": SECRET_KEY, **sent}
    resp = await ask_token(client, transport, params)
    expected = _expected_claims(sent)
    event(f"answered {resp.status}")
    body = await resp.json()
    assert resp.status == (400 if expected is None else 200), body
    if expected is None:
        assert body["error"]["message"].split()[0] in POLICY_FIELDS
        return
    claims = jwt.decode(body["token"], SECRET_KEY, algorithms=["HS256"])
    assert {name: claims[name] for name in POLICY_FIELDS if name in claims} == expected
    assert {name: body[name] for name in POLICY_FIELDS if name in body} == expected
    assert verify_credential(SECRET_KEY, body["token"]).policy.claims() == expected
    resp = await client.get("/v1/files", headers={"Authorization": f"Bearer {body['token']}"})
    assert resp.status == 200


# ---- Authorization ---------------------------------------------------------------------------


@FUZZ
@given(value=header_text)
async def test_authorization_values_are_refused_without_an_upstream_call(
    client: TestClient, upstream: FakeUpstream, value: str
):
    upstream.requests.clear()
    try:
        headers = {"Authorization": value.encode("utf-8").decode("latin-1")}  # raw bytes on the wire
    except UnicodeDecodeError:
        return
    resp = await client.post("/chat", json={}, headers=headers)
    if value.strip() in (SECRET_KEY, f"Bearer {SECRET_KEY}"):
        return
    assert resp.status in (400, 401)
    assert upstream.requests == []


@FUZZ
@given(value=header_bytes, bearer=st.booleans())
@example(value=b"e" * 5000, bearer=True)  # over gogpt's credential limit: 401 without hashing it
@example(value=b"e" * 20000, bearer=False)  # over aiohttp's header limit: 400 from the parser
@example(value="Bearer ключ".encode(), bearer=False)
@example(value=b"\xff\xfe\x80", bearer=True)
async def test_authorization_bytes_of_any_kind_are_refused_without_an_upstream_call(
    client: TestClient, upstream: FakeUpstream, value: bytes, bearer: bool
):
    upstream.requests.clear()
    raw = b"Bearer " + value if bearer else value
    status, answer = await send_raw(client, request_head("POST", b"/chat", {b"Authorization": raw}), b"{}")
    assert status in (400, 401), answer
    assert upstream.requests == []


def _signed(claims: dict[str, object], key: str, algorithm: str) -> str:
    with warnings.catch_warnings():  # PyJWT's advice on key length for HS384/HS512
        warnings.simplefilter("ignore", jwt.warnings.InsecureKeyLengthWarning)
        return jwt.encode(claims, key, algorithm=algorithm)


def _tampered(claims: dict[str, object], position: int, replacement: str) -> str:
    """A real token whose payload was edited after signing (not its last character, which may only
    carry padding bits)."""
    header, payload, signature = mint_token(SECRET_KEY, "victim", 1).split(".")
    if position < 0:  # swap in another payload, keep the signature
        forged = jwt.encode(claims, "k" * 32, algorithm="HS256").split(".")[1]
        return f"{header}.{forged}.{signature}"
    index = position % (len(payload) - 1)
    if payload[index] == replacement:
        replacement = "A" if replacement != "A" else "B"
    return f"{header}.{payload[:index]}{replacement}{payload[index + 1 :]}.{signature}"


_future = st.integers(int(time.time()) + 3600, int(time.time()) + 10**8)
_past = st.integers(0, int(time.time()) - 5)
_identity = st.text(min_size=1, max_size=20)
_claims = st.fixed_dictionaries({"jti": _identity, "exp": _future})
_bad_claims = st.one_of(
    st.fixed_dictionaries({"jti": _identity, "exp": _past}),  # expired
    st.fixed_dictionaries({"jti": _identity}),  # no exp
    st.fixed_dictionaries({"exp": _future}),  # no jti
    st.fixed_dictionaries(
        {"jti": st.sampled_from(["", None, 7, ["a"], {"a": 1}]), "exp": _future}
    ),  # jti not an identity
    st.fixed_dictionaries({"jti": _identity, "exp": st.sampled_from(["soon", None, [1], "1e99"])}),
    st.fixed_dictionaries({"jti": _identity, "exp": _future, "nbf": _future}),  # not valid yet
)
forged_tokens = st.one_of(
    st.builds(_signed, _claims, st.text(min_size=32).filter(lambda key: key != SECRET_KEY), st.just("HS256")),
    st.builds(_signed, _claims, st.just(SECRET_KEY), st.sampled_from(["HS384", "HS512"])),
    st.builds(lambda claims: jwt.encode(claims, None, algorithm="none"), _claims),
    st.builds(_signed, _bad_claims, st.just(SECRET_KEY), st.just("HS256")),
    st.builds(
        _tampered,
        _claims,
        st.integers(-1, 400),
        st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"),
    ),
)


@FUZZ
@given(token=forged_tokens, bearer=st.booleans())
async def test_forged_tokens_are_refused_with_401_and_never_reach_the_upstream(
    client: TestClient, upstream: FakeUpstream, token: str, bearer: bool
):
    upstream.requests.clear()
    resp = await client.post(
        "/chat", json={}, headers={"Authorization": f"Bearer {token}" if bearer else token}
    )
    assert resp.status == 401
    body = await resp.json()
    assert body["error"]["code"] == "invalid_api_key"
    assert token not in json.dumps(body)
    assert upstream.requests == []


# ---- bodies ----------------------------------------------------------------------------------


@FUZZ
@given(body=json_values | st.binary(max_size=200))
@example(body={"stream": True, "model": "m", "stream_options": None})
async def test_chat_bodies_are_relayed_only_when_they_are_json_objects(
    client: TestClient, upstream: FakeUpstream, auth: dict[str, str], body: object
):
    upstream.requests.clear()
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = await client.post("/chat", data=data, headers=auth)
    try:
        is_object = isinstance(json.loads(data), dict)
    except ValueError:
        is_object = False
    assert resp.status == (200 if is_object else 400)
    assert len(upstream.requests) == (1 if is_object else 0)
    if is_object:  # a streamed chat completion is asked for its usage, and nothing else changes
        fields = object_fields(data, REQUEST_FIELDS)
        assert isinstance(fields, dict)
        assert upstream.last.body == (
            with_usage_asked(data, fields) if fields.get("stream") is True else data
        )


def _outcome(parse, text: bytes) -> object:
    try:
        return ("parsed", parse(text))
    except (ValueError, RecursionError) as exc:
        return ("refused", type(exc))


# Objects with what json.loads handles around them (spaces, a BOM, other encodings) or refuses.
json_texts = st.one_of(
    st.binary(max_size=60),
    json_values.map(lambda value: json.dumps(value).encode()),
    st.builds(
        lambda before, obj, after, encoding: (before + json.dumps(obj) + after).encode(encoding),
        st.sampled_from(["", " ", "\ufeff", "\n"]),
        st.dictionaries(st.text(max_size=8), json_values, max_size=4),
        st.sampled_from(["", " ", "}", "{}", "x"]),
        st.sampled_from(["utf-8", "utf-16-le", "utf-32"]),
    ),
)


@settings(max_examples=2000, deadline=None)
@given(text=json_texts)
@example(text=b'{"a": "\xed\xa0\x80"}')  # a lone surrogate, which json.loads takes from bytes
@example(text=b'{"a": 1}{"b": 2}')
@example(text=b'{"a": 1} ')
def test_the_quick_json_parse_takes_and_refuses_exactly_what_json_loads_does(text: bytes):
    assert _outcome(loads, text) == _outcome(json.loads, text)


def _as_orjson_reads(digits: str) -> int | float:
    number = int(digits)
    return number if -(1 << 63) <= number < 1 << 64 else float(number)


@settings(max_examples=2000, deadline=None)
@given(text=json_texts)
@example(text=b'{"a": "\xed\xa0\x80"}')
@example(text=b'{"a": NaN, "b": 1e400}')
@example(text=b'{"max_tokens": 100000000000000000000000000000}')
@example(text='{"a": -9223372036854775809}'.encode("utf-16-le"))  # past 64 bits, in a text orjson refuses
def test_gogpt_s_json_parse_takes_and_refuses_what_json_loads_does_but_reads_huge_integers_as_floats(
    text: bytes,
):
    assert _outcome(json_text.loads, text) == _outcome(partial(json.loads, parse_int=_as_orjson_reads), text)


_ids = st.none() | st.just("") | st.from_regex(_ID, fullmatch=True) | json_values | st.just("../x")
conv_bodies = json_values | st.fixed_dictionaries(
    {"content": st.text(max_size=40) | json_values},
    optional={"parent_message_id": _ids, "conversation_id": _ids},
)


def _is_id_or_absent(value: object) -> bool:
    return value is None or value == "" or (isinstance(value, str) and _ID.fullmatch(value) is not None)


@FUZZ
@given(body=conv_bodies)
async def test_conv_messages_are_sent_only_when_well_formed(
    client: TestClient, upstream: FakeUpstream, auth: dict[str, str], body: object
):
    upstream.requests.clear()
    resp = await client.post("/conv", json=body, headers={**auth, "Chat-Type": "conversation"})
    well_formed = (
        isinstance(body, dict)
        and isinstance(body.get("content"), str)
        and body["content"] != ""
        and _is_id_or_absent(body.get("parent_message_id"))
        and _is_id_or_absent(body.get("conversation_id"))
    )
    if not well_formed:
        assert resp.status == 400
        assert upstream.requests == []
        return
    assert isinstance(body, dict)
    assert resp.status == 200
    [sent] = upstream.requests
    assert sent.path == "/backend-api/conversation"
    upstream_body = json.loads(sent.body)
    assert upstream_body["messages"][0]["content"]["parts"] == [body["content"]]
    if body.get("parent_message_id") and body.get("conversation_id"):
        assert upstream_body["conversation_id"] == body["conversation_id"]
    else:
        assert "conversation_id" not in upstream_body


# ---- Chat-Type and paths ---------------------------------------------------------------------

PATH_TRICKS = [
    "conversation/",
    "conversation/..",
    "conversation/../x",
    "conversation/../../v1/models",
    "conversation/%2e%2e",
    "conversation/%2e%2e%2fx",
    "conversation/..%2fx",
    "conversation/.",
    "conversation//x",
    "conversation/a/b",
    "conversation/a\\..\\b",
    "conversation/a?limit=1",
    "conversation/a#b",
    "conversation/a b",
    "conversation/\uff41\uff42\uff43",  # fullwidth letters: alphanumeric, but not ASCII
    "conversation/٣",
    "Conversation/abc",
    "conversations/",
    "conversations/../conversation/x",
    "conversationsx",
    "conversation/" + "a" * 129,
]


def _accepted_chat_type(chat_type: str) -> str | None:
    """The upstream path a Chat-Type may lead to (the SPEC's three forms), or None for a refusal."""
    if chat_type == "conversations":
        return "/backend-api/conversations"
    prefix, _, conversation_id = chat_type.partition("/")
    if prefix == "conversation" and _ID.fullmatch(conversation_id):
        return f"/backend-api/conversation/{conversation_id}"
    return None


@FUZZ
@given(chat_type=header_text | st.sampled_from(PATH_TRICKS), method=st.sampled_from(["GET", "POST"]))
async def test_chat_types_outside_the_three_forms_are_400_and_no_trick_reaches_the_upstream(
    client: TestClient, upstream: FakeUpstream, auth: dict[str, str], chat_type: str, method: str
):
    upstream.requests.clear()
    try:
        wire = chat_type.encode("utf-8").decode("latin-1")
    except UnicodeDecodeError:
        return
    resp = await client.request(method, "/conv", json={"content": "hi"}, headers={**auth, "Chat-Type": wire})
    allowed = _accepted_chat_type(chat_type.strip(" \t"))
    if allowed is None and chat_type.strip(" \t") != "conversation":
        assert resp.status == 400
        assert upstream.requests == []
    for sent in upstream.requests:
        assert sent.path in (allowed, "/backend-api/conversation")


@FUZZ
@given(value=header_bytes)
async def test_chat_type_bytes_of_any_kind_never_cause_a_server_error(
    client: TestClient, upstream: FakeUpstream, token: str, value: bytes
):
    upstream.requests.clear()
    status, answer = await send_raw(
        client, request_head("GET", b"/conv", {**_token_header(token), b"Chat-Type": value})
    )
    assert status < 500 or _accepted_chat_type(value.strip(b" \t").decode("latin-1")), answer
    for sent in upstream.requests:
        assert sent.path in (
            "/backend-api/conversations",
            "/backend-api/conversation/" + value.strip().decode(),
        )


path_pieces = st.sampled_from(
    [
        "..",
        ".",
        "%2e",
        "%2E%2e",
        "%2f",
        "%2F",
        "%5c",
        "\\",
        "/",
        "//",
        "%00",
        "%ff",
        "%252e%252e",
        ";",
        "~",
        "@",
    ]
) | st.text(st.sampled_from("abcXYZ019-._~!$&'()*+,;=:@%"), max_size=6)


@FUZZ
@given(
    pieces=st.lists(path_pieces, min_size=1, max_size=8), method=st.sampled_from(["GET", "POST", "DELETE"])
)
@example(pieces=["..", "%5c", "..", "%5c", "admin"], method="GET")
@example(pieces=["a", "%2f", "..", "%2f", "..", "%2f", "x"], method="GET")
@example(pieces=["%2e%2e", "/", "%2e%2e", "/", "x"], method="POST")
async def test_v1_paths_never_reach_the_upstream_outside_v1(
    client: TestClient, upstream: FakeUpstream, token: str, pieces: list[str], method: str
):
    upstream.requests.clear()
    target = ("/v1/" + "".join(pieces)).encode()
    status, answer = await send_raw(client, request_head(method, target, _token_header(token)))
    assert status < 500, answer
    for sent in upstream.requests:
        # however the upstream splits it (some servers take a backslash for a slash), it stays in /v1
        assert (posixpath.normpath(sent.path.replace("\\", "/")) + "/").startswith("/v1/"), sent.path


# ---- any other header ------------------------------------------------------------------------


@FUZZ
@given(
    name=st.sampled_from(
        [
            b"Content-Type",
            b"Content-Encoding",
            b"Accept-Encoding",
            b"Connection",
            b"Expect",
            b"Origin",
            b"Access-Control-Request-Headers",
            b"OpenAI-Beta",
            b"X-Anything",
            b"Transfer-Encoding",
        ]
    ),
    value=header_bytes,
    route=st.sampled_from([("POST", b"/chat"), ("POST", b"/v1/chat/completions"), ("OPTIONS", b"/chat")]),
)
@example(name=b"Expect", value=b"\x80", route=("POST", b"/chat"))
@example(name=b"Content-Encoding", value=b"gzip", route=("POST", b"/v1/chat/completions"))
@example(name=b"Content-Type", value=b"application/json; charset=no-such-codec", route=("POST", b"/chat"))
async def test_any_header_value_never_causes_a_server_error(
    client: TestClient, token: str, name: bytes, value: bytes, route: tuple[str, bytes]
):
    method, path = route
    # aiohttp answers Expect before routing; gogpt's handler covers its routes, while a method
    # without a route (OPTIONS /chat reaches the CORS middleware that way) keeps aiohttp's, which
    # fails on bytes that are not UTF-8 (aio-libs/aiohttp#7715 is the same fault for header names).
    assume(not (name == b"Expect" and method == "OPTIONS"))
    status, answer = await send_raw(
        client, request_head(method, path, {**_token_header(token), name: value}), b"{}"
    )
    assert status < 500, answer


# ---- settings --------------------------------------------------------------------------------

_setting_values = st.text(st.characters(exclude_characters="\x00", exclude_categories=["Cs"]), max_size=30)
_setting_values |= st.sampled_from(
    [
        "-1",
        "0",
        "1e999",
        "nan",
        "inf",
        "ftp://x",
        "http://",
        "[",
        "redis",
        "8080x",
        "65536",
        " 80 ",
        "~secret~",
    ]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.dictionaries(st.sampled_from(GOGPT_VARIABLES), _setting_values, max_size=5))
@example(values={"SECRET_KEY": "k", "API_PROXY": "["})  # an unclosed IPv6 bracket
@example(values={"SECRET_KEY": "k", "UNOFFICIAL_PROXY": "http://[::1"})
@example(values={"SECRET_KEY": "k", "REDIS_URL": "redis://[x"})
def test_any_setting_value_is_accepted_or_refused_in_one_line_naming_it(
    bare_environment: Path, values: dict[str, str]
):
    with pytest.MonkeyPatch.context() as env:
        for name, value in values.items():
            env.setenv(name, value)
        try:
            loaded = load_settings(None)
        except ConfigError as refused:
            message = str(refused)
            assert "\n" not in message
            assert any(name in message for name in [*values, "SECRET_KEY"])
            for value in values.values():
                # messages are fixed ASCII text, so only a value no message could contain by chance
                # (one with a character none of them has) shows an echo for what it is
                if not value.isascii() or any(char in value for char in "~|^`"):
                    assert value not in message
            return
    assert isinstance(loaded, Settings)
    assert loaded.secret_key
