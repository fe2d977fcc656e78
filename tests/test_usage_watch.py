"""Finding the usage in an answer as it passes (gogpt/usage_watch.py) and asking for it
(gogpt/usage_request.py), on plain bytes: every way the upstream's reads and chunks may split a
stream gives the client the same events, the usage-only chunk taken out when gogpt asked for it."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gogpt.chunked_coding import ChunkedFraming, Dechunker
from gogpt.json_child import object_fields
from gogpt.usage_reports import EventReport, event_report
from gogpt.usage_request import REQUEST_FIELDS, with_usage_asked
from gogpt.usage_watch import EventWatch

USAGE = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}


def event(payload: dict | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def delta(content: str) -> bytes:
    return event(
        {"choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}], "usage": None}
    )


ROLE = event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}], "usage": None})
FINISH = event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": None})
USAGE_ONLY = event({"id": "c", "choices": [], "usage": USAGE})
DONE = b"data: [DONE]\n\n"
STREAM = ROLE + delta("Hel") + delta("lo") + delta("!") + FINISH + USAGE_ONLY + DONE
WITHOUT_USAGE = STREAM.replace(USAGE_ONLY, b"")


class Seen:
    """What the watch reported: the usage events it read."""

    def __init__(self) -> None:
        self.events: list[bytes] = []

    def __call__(self, event: bytes) -> EventReport | None:
        self.events.append(event)
        return event_report(event)


def watch(strip: bool = True) -> tuple[EventWatch, Seen]:
    seen = Seen()
    return EventWatch(seen, strip=strip), seen


def relayed(reads: list[bytes], strip: bool = True) -> tuple[bytes, EventWatch, Seen]:
    """The bytes a client gets when the upstream's body arrives as `reads` (no chunk framing)."""
    w, seen = watch(strip)
    out = b"".join(w.feed(data) for data in reads) + w.end()
    return out, w, seen


def framed(data: bytes, chunk_sizes: list[int]) -> bytes:
    """`data` in chunks of these sizes (the rest in a last one), then the terminal chunk."""
    chunks, pos = [], 0
    for size in [*chunk_sizes, len(data)]:
        piece = data[pos : pos + size]
        pos += len(piece)
        if piece:
            chunks.append(b"%x\r\n%s\r\n" % (len(piece), piece))
    return b"".join(chunks) + b"0\r\n\r\n"


def spliced(wire: bytes, reads: list[int], strip: bool = True) -> tuple[bytes, EventWatch, Seen]:
    """The data a client gets when chunked `wire` arrives in reads cut at these offsets, checked by
    the splice's framing and passed through the watch as the splice does."""
    w, seen = watch(strip)
    framing = ChunkedFraming()
    out, cuts = b"", [0, *reads, len(wire)]
    for start, end in itertools.pairwise(cuts):
        body, terminal = framing.feed(wire[start:end])
        out += w.feed_framed(body, framing, terminal is not None)
        if terminal is not None:
            break
    return Dechunker().feed(out), w, seen


def test_the_usage_only_chunk_is_taken_out_wherever_one_cut_splits_the_stream():
    for cut in range(len(STREAM) + 1):
        out, w, seen = relayed([STREAM[:cut], STREAM[cut:]])
        assert out == WITHOUT_USAGE, cut
        assert seen.events == [USAGE_ONLY], cut
        assert w.usage == (9, 3), cut


def test_the_usage_only_chunk_is_taken_out_arriving_a_byte_at_a_time():
    out, _, seen = relayed([STREAM[i : i + 1] for i in range(len(STREAM))])
    assert out == WITHOUT_USAGE
    assert seen.events == [USAGE_ONLY]


def test_two_events_in_one_read_lose_only_the_usage_one():
    out, _, _ = relayed([delta("a"), FINISH + USAGE_ONLY + DONE])
    assert out == delta("a") + FINISH + DONE


def test_when_the_client_asked_every_byte_goes_as_it_came_and_the_usage_is_still_read():
    for cut in range(0, len(STREAM) + 1, 7):
        out, _, seen = relayed([STREAM[:cut], STREAM[cut:]], strip=False)
        assert out == STREAM, cut
        assert seen.events == [USAGE_ONLY], cut


def test_reads_that_end_between_events_without_usage_pass_as_they_are():
    w, seen = watch()
    first = delta("a") + delta("b")
    assert w.feed(first) is first  # the same object: nothing copied
    assert seen.events == []
    assert w.events == 2


def test_an_unfinished_event_is_held_back_until_its_end_comes_then_sent_whole():
    w, _ = watch()
    assert w.feed(delta("a") + b'data: {"choi') == delta("a")
    assert w.feed(b'ces":[]}\n\n') == b'data: {"choices":[]}\n\n'


def test_a_stream_that_never_ends_an_event_is_let_through_past_2_mib():
    """An upstream's endless line must not swell gogpt (40 such streams held over 600 MiB at 8 MiB),
    and what was held goes once."""
    w, _ = watch()
    piece, sent, out = b"data: " + b"x" * (64 << 10), b"", b""
    for _ in range(48):
        sent += piece
        out += w.feed(piece)
        assert len(sent) - len(out) <= (2 << 20) + len(piece)
    assert out + w.end() == sent
    wire = framed(sent, [len(piece)] * 47)
    assert spliced(wire, list(range(len(piece), len(wire), len(piece))))[0] == sent  # the splice's way


def test_through_the_splice_a_chunk_too_large_to_hold_is_let_through_as_it_comes():
    """One 8 MiB chunk: held whole until its end, it would swell gogpt as the endless line would."""
    w, _ = watch()
    framing = ChunkedFraming()
    data = b"data: " + b"x" * (8 << 20)
    wire = b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data)
    step, sent, out = 64 << 10, 0, b""
    for start in range(0, len(wire), step):
        body, terminal = framing.feed(wire[start : start + step])
        out += w.feed_framed(body, framing, terminal is not None)
        sent += len(body)
        assert sent - len(out) <= (2 << 20) + step
    assert Dechunker().feed(out) == data  # and what was held went once


def test_a_stream_that_ends_inside_an_event_still_sends_every_byte():
    out, _, _ = relayed([delta("a"), b"data: cut sho", b"rt"])
    assert out == delta("a") + b"data: cut short"


def test_crlf_and_cr_line_ends_are_event_boundaries_too():
    usage = USAGE_ONLY.replace(b"\n\n", b"\r\n\r\n")
    stream = delta("a").replace(b"\n\n", b"\r\r") + usage + DONE.replace(b"\n\n", b"\r\n\r\n")
    for cut in range(len(stream) + 1):
        out, _, seen = relayed([stream[:cut], stream[cut:]])
        assert out == stream.replace(usage, b""), cut
        assert len(seen.events) == 1, cut


def test_the_responses_api_usage_is_read_from_its_completed_event_and_never_dropped():
    created = b'event: response.created\ndata: {"type":"response.created","response":{"max_output_tokens":null,"usage":null}}\n\n'
    text = b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","delta":"Hi"}\n\n'
    done = b'event: response.completed\ndata: {"type":"response.completed","response":{"usage":{"input_tokens":5,"output_tokens":1}}}\n\n'
    read: list[bytes] = []
    w = EventWatch(lambda event: read.append(event), strip=False)
    stream = created + text + done
    assert b"".join(w.feed(stream[i : i + 10]) for i in range(0, len(stream), 10)) + w.end() == stream
    assert read == [created, done]


def _cut_in_every_usage_key() -> list[int]:
    """Chunk sizes that cut the stream inside each `_tokens"` of the usage event."""
    cuts, at = [], STREAM.find(b'_tokens"')
    while at >= 0:
        cuts.append(at + 3)
        at = STREAM.find(b'_tokens"', at + 1)
    return [end - start for start, end in zip([0, *cuts], cuts, strict=False)]


@pytest.mark.parametrize(
    "chunk_sizes",
    [
        [],  # one chunk for all
        [len(ROLE), len(delta("Hel")), len(delta("lo")), len(delta("!")), len(FINISH), len(USAGE_ONLY)],
        [7, 40, 3, 100, 1, 60],  # chunks that cut events anywhere
        [STREAM.index(USAGE_ONLY) + 10],  # the usage event split before its usage keys
        _cut_in_every_usage_key(),
    ],
    ids=[
        "one chunk",
        "a chunk per event",
        "chunks across events",
        "usage split by a chunk",
        "usage keys split",
    ],
)
def test_through_the_splice_the_usage_chunk_is_taken_out_wherever_reads_and_chunks_cut(chunk_sizes):
    wire = framed(STREAM, chunk_sizes)
    for cut in range(len(wire) + 1):
        out, w, seen = spliced(wire, [cut])
        assert out == WITHOUT_USAGE, cut
        assert seen.events == [USAGE_ONLY], cut
        assert w.usage == (9, 3), cut


def test_through_the_splice_the_usage_chunk_is_taken_out_arriving_a_byte_at_a_time():
    wire = framed(STREAM, [7, 40, 3, 100, 1, 60])
    out, _, seen = spliced(wire, list(range(1, len(wire))))
    assert out == WITHOUT_USAGE
    assert seen.events == [USAGE_ONLY]


def test_through_the_splice_a_usage_event_written_in_two_chunks_is_taken_out_however_reads_cut_the_first():
    sizes = [
        len(ROLE),
        len(delta("Hel")),
        len(delta("lo")),
        len(delta("!")),
        len(FINISH),
        10,
    ]  # the usage event's first 10 bytes
    wire = framed(STREAM, sizes)
    start = wire.index(b"\r\na\r\n" + USAGE_ONLY[:10]) + 2  # that chunk: size line "a", 10 bytes, CRLF
    end = start + len(b"a\r\n") + 10 + 2
    for cut in range(start, end):  # a read ends inside it, the next one exactly at its end
        out, _, seen = spliced(wire, [cut, end])
        assert out == WITHOUT_USAGE, cut
        assert seen.events == [USAGE_ONLY], cut


def test_through_the_splice_an_upstream_sending_running_totals_is_counted_by_its_last_one():
    def running(content: str, completion: int) -> bytes:
        usage = {"prompt_tokens": 9, "completion_tokens": completion, "total_tokens": 9 + completion}
        return event({"choices": [{"index": 0, "delta": {"content": content}}], "usage": usage})

    totals = [running("Hel", 1), running("lo", 2), running("!", 3)]
    data = b"".join(totals) + DONE
    wire = framed(data, [len(part) for part in totals])
    for reads in ([], [wire.index(b"data: [DONE]") - 3]):  # all in one read; the totals in one read
        out, w, seen = spliced(wire, reads)
        assert out == data  # nothing taken out: each total comes with its content
        assert seen.events[-1:] == [totals[-1]]
        assert w.usage == (9, 3)


def test_through_the_splice_bytes_like_an_event_end_inside_a_chunk_are_not_taken_for_one():
    inside = b"data: a\n\n\r\ndata: b\n\n"  # an event, a blank CRLF line and an event, in one chunk
    data = delta("x") + inside + FINISH + USAGE_ONLY + DONE
    wire = framed(data, [len(delta("x")), len(inside), len(FINISH), len(USAGE_ONLY)])
    at = wire.index(b"\n\n\r\ndata: b") + 6
    for cut in range(at, at + 8):
        out, _, _ = spliced(wire, [cut])
        assert out == data.replace(USAGE_ONLY, b""), cut


def test_through_the_splice_reads_of_whole_events_without_usage_go_framed_as_they_came():
    w, _ = watch()
    framing = ChunkedFraming()
    wire = framed(delta("a") + delta("b"), [len(delta("a"))]).removesuffix(b"0\r\n\r\n")
    body, _ = framing.feed(wire)
    assert w.feed_framed(body, framing, False) is body


def test_through_the_splice_a_client_that_asked_gets_the_wire_bytes_unchanged():
    wire = framed(STREAM, [7, 40, 3, 100, 1, 60])
    for cut in range(0, len(wire) + 1, 5):
        w, seen = watch(strip=False)
        framing, out = ChunkedFraming(), b""
        for part in (wire[:cut], wire[cut:]):
            body, terminal = framing.feed(part)
            out += w.feed_framed(body, framing, terminal is not None)
            if terminal is not None:
                break
        assert out == wire.removesuffix(b"0\r\n\r\n"), cut
        assert seen.events == [USAGE_ONLY], cut


def test_the_dechunker_gives_back_the_data_wherever_the_framing_let_reads_end():
    data = STREAM
    wire = framed(data, [5, 17, 1, 200]).removesuffix(b"0\r\n\r\n")
    for cut in range(len(wire) + 1):
        framing, dechunker, out = ChunkedFraming(), Dechunker(), b""
        for part in (wire[:cut], wire[cut:]):
            body, _ = framing.feed(part)
            out += dechunker.feed(body)
        assert out == data, cut


# ---- asking for the usage ----------------------------------------------------------------------


def fields_of(body: bytes) -> dict:
    """The fields metering reads, as gogpt reads them (bodies.read_json_object)."""
    fields = object_fields(body, REQUEST_FIELDS)
    assert isinstance(fields, dict)
    return fields


def test_the_request_is_asked_for_usage_with_every_other_byte_as_sent():
    body = (
        b'{"model": "gpt-4o-mini", "stream": true,\n "messages": [{"role": "user", "content": "h\\u00e9"}]}'
    )
    sent = with_usage_asked(body, fields_of(body))
    assert sent == b'{"stream_options":{"include_usage":true},' + body[1:]
    assert json.loads(sent)["stream_options"] == {"include_usage": True}


def test_a_member_named_like_the_option_does_not_ask():
    body = b'{"stream": true, "stream_options.include_usage": true}'
    sent = with_usage_asked(body, fields_of(body))
    assert json.loads(sent)["stream_options"] == {"include_usage": True}


def test_a_request_that_asked_is_sent_as_it_is():
    body = b'{"stream": true, "stream_options": {"include_usage": true}}'
    assert with_usage_asked(body, fields_of(body)) is body


@pytest.mark.parametrize("options", ["{}", "null", '{"include_usage": false, "x": 1}'])
def test_stream_options_that_do_not_ask_are_rewritten_and_nothing_else(options: str):
    body = f'{{"a": [1, {{"stream_options": 2}}], "stream_options": {options} , "stream": true}}'.encode()
    sent = with_usage_asked(body, fields_of(body))
    head, tail = body.split(options.encode())
    assert sent.startswith(head) and sent.endswith(tail)
    fields = json.loads(sent)
    assert fields["stream_options"]["include_usage"] is True
    assert fields["a"] == [1, {"stream_options": 2}]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=10,
)


@given(
    fields=st.dictionaries(st.text(max_size=8), json_values, max_size=5),
    options=st.none()
    | st.just("absent")
    | st.dictionaries(st.sampled_from(["include_usage", "x"]), json_values),
    indent=st.none() | st.integers(0, 3),
    ascii_only=st.booleans(),
)
def test_any_streamed_request_asks_for_usage_and_keeps_the_rest(fields, options, indent, ascii_only):
    fields = {**fields, "stream": True}
    if options != "absent":
        fields["stream_options"] = options
    else:
        fields.pop("stream_options", None)
    body = json.dumps(fields, indent=indent, ensure_ascii=ascii_only).encode()
    sent = json.loads(with_usage_asked(body, fields_of(body)))
    kept = dict(options) if isinstance(options, dict) else {}
    assert sent == {**fields, "stream_options": {**kept, "include_usage": True}}
