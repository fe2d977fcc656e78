"""What a JSON answer's usage is read from, kept as the answer passes: the whole of a small answer,
the two ends of a large one, a compressed one decoded on the way, in bounded memory. Plain bytes."""

from __future__ import annotations

import base64
import functools
import gzip
import json
import os
import tracemalloc
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gogpt import usage_reports
from gogpt.json_parser import INLINE_BYTES
from gogpt.json_watch import JsonWatch
from gogpt.usage_reports import UsageReport

USAGE = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}
EXACT = UsageReport((9, 3), "gpt-4o-mini-2024-07-18")


def answer(filler: str = "Hello!") -> bytes:
    message = {"role": "assistant", "content": filler}
    body = {"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o-mini-2024-07-18"}
    return json.dumps({**body, "choices": [{"index": 0, "message": message}], "usage": USAGE}).encode()


def large_answer(size: int) -> bytes:
    """An answer of about `size` bytes whose text hardly compresses (as an embedding's numbers)."""
    return answer(base64.b64encode(os.urandom(size * 3 // 4)).decode())


def raw_deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


def pieces(data: bytes, size: int) -> list[bytes]:
    return [data[at : at + size] for at in range(0, len(data), size)]


def watched(codings: list[str], parts: list[bytes]) -> UsageReport | None:
    watch = JsonWatch(codings)
    for part in parts:
        assert watch.feed(part) is part  # every byte is relayed as it came
    return watch.report()


ENCODINGS = {
    "gzip": (["gzip"], gzip.compress),
    "deflate": (["deflate"], zlib.compress),
    "raw deflate": (["deflate"], raw_deflate),
    "two gzip members": (["gzip"], lambda data: gzip.compress(data[:100]) + gzip.compress(data[100:])),
    "gzip over deflate": (["deflate", "gzip"], lambda data: gzip.compress(zlib.compress(data))),
}


def test_a_small_answer_is_read_whole():
    assert watched([], [answer()]) == EXACT


@pytest.mark.parametrize("size", [INLINE_BYTES + 1, 3 * INLINE_BYTES, 5 << 20])
def test_a_large_answer_is_read_from_its_ends(size: int):
    assert watched([], pieces(large_answer(size), 16 << 10)) == EXACT


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("size", [100, 3 * INLINE_BYTES])
def test_a_compressed_answer_is_decoded_as_it_passes(encoding: str, size: int):
    codings, encode = ENCODINGS[encoding]
    sent = encode(large_answer(size) if size > INLINE_BYTES else answer())
    assert watched(codings, pieces(sent, 1000)) == EXACT


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_a_compressed_answer_read_a_byte_at_a_time_is_read(encoding: str):
    codings, encode = ENCODINGS[encoding]
    assert watched(codings, pieces(encode(answer()), 1)) == EXACT


@given(st.lists(st.integers(min_value=1, max_value=400), min_size=1, max_size=20))
def test_however_reads_cut_a_gzipped_answer_its_usage_is_read(cuts: list[int]):
    sent = gzip.compress(answer())
    parts, at = [], 0
    for cut in cuts:
        parts.append(sent[at : at + cut])
        at += cut
    parts.append(sent[at:])
    assert watched(["gzip"], parts) == EXACT


def fed_in_reads(codings: list[str], sent: bytes) -> tuple[JsonWatch, int]:
    """A watch fed `sent` in 64 KiB reads, and the most memory it held meanwhile."""
    tracemalloc.start()
    try:
        watch = JsonWatch(codings)
        for at in range(0, len(sent), 64 << 10):  # one read at a time
            watch.feed(sent[at : at + (64 << 10)])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return watch, peak


def test_what_is_kept_of_a_large_compressed_answer_does_not_grow_with_it():
    watch, peak = fed_in_reads(["gzip"], gzip.compress(large_answer(8 << 20), compresslevel=1))
    assert peak < 1 << 20  # the answer is 8 MiB, 6 MiB compressed
    assert watch.report() == EXACT


@functools.cache
def gzip_bomb() -> bytes:
    return gzip.compress(b" " * (65 << 20))  # 64 KiB that inflate to 65 MiB


def test_a_bomb_is_given_up_on_without_being_held():
    watch, peak = fed_in_reads(["gzip"], gzip_bomb())
    assert peak < 4 << 20
    assert watch.report() is None


def test_a_bomb_is_given_up_after_a_few_mib_of_inflating(monkeypatch: pytest.MonkeyPatch):
    """Inflating is work the loop does in one read: a bomb sent in one read once took 0.15 s."""
    inflated = 0
    keep_decoded = JsonWatch._keep_decoded

    def counted(watch: JsonWatch, data: bytes) -> None:
        nonlocal inflated
        inflated += len(data)
        keep_decoded(watch, data)

    monkeypatch.setattr(JsonWatch, "_keep_decoded", counted)
    watch, _ = fed_in_reads(["gzip"], gzip_bomb())
    assert inflated <= 6 << 20  # 1 MiB, then 64 times the read's 64 KiB, and one more step
    assert watch.report() is None


def test_an_answer_of_thousands_of_model_members_is_given_up_after_a_few(monkeypatch: pytest.MonkeyPatch):
    """Each member looked at decodes up to 4 KiB on the loop: 20,000 of them once held it 0.75 s."""
    decoded = []
    decoder = usage_reports._DECODER

    class Counting:
        def raw_decode(self, text: str, at: int = 0) -> tuple[object, int]:
            decoded.append(len(text))
            return decoder.raw_decode(text, at)

    monkeypatch.setattr(usage_reports, "_DECODER", Counting())
    hostile = b'{"model":' * (400_000 // 9)
    assert watched([], pieces(hostile, 64 << 10)) == UsageReport(None, None)
    assert len(decoded) <= 3 * 16  # usage from the end, model near the start, model from the end


def test_an_answer_stuck_repeating_a_word_is_read_however_well_it_compresses():
    sent = gzip.compress(answer("the " * (200 << 10)))  # 800 KiB in 2 KiB: 400 to 1
    assert watched(["gzip"], pieces(sent, 512)) == EXACT


@pytest.mark.parametrize(
    ("codings", "sent"),
    [
        (["gzip"], gzip.compress(answer())[:-9]),  # cut short
        (["gzip"], gzip.compress(answer()) + b"junk"),
        (["gzip"], b"not gzip at all"),
        (["br"], b"\x0b\x02\x80{}\x03"),  # a coding gogpt does not ask for
    ],
    ids=["cut short", "bytes after the end", "not what it says", "an unknown coding"],
)
def test_an_answer_that_does_not_decode_reports_nothing(codings: list[str], sent: bytes):
    assert watched(codings, pieces(sent, 4096)) is None


def test_an_answer_whole_at_once_is_read_as_one_passing_in_pieces():
    watch = JsonWatch(["gzip"])
    watch.whole(gzip.compress(answer()))
    assert watch.report() == EXACT
