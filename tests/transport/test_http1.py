"""The server's sans-IO HTTP/1.1 request parser: what it accepts, what it refuses, and that it never crashes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spike.transports.http1 import HttpError, Request, RequestParser, response

HEAD = 2048
BODY = 4096


def parse_all(data: bytes, *, split: int = 0) -> list[Request]:
    parser = RequestParser(max_head=HEAD, max_body=BODY)
    pieces = [data] if split <= 0 else [data[i : i + split] for i in range(0, len(data), split)]
    out: list[Request] = []
    for piece in pieces:
        parser.feed(piece)
        while (request := parser.next_request()) is not None:
            out.append(request)
    return out


def refused(data: bytes) -> int:
    with pytest.raises(HttpError) as caught:
        parse_all(data)
    return caught.value.status


POST = b'POST /v1/store/secrets?action=get HTTP/1.1\r\nHost: n:8553\r\nContent-Length: 14\r\n\r\n{"path":"a/b"}'


@pytest.mark.parametrize("split", [0, 1, 2, 7, 64])
def test_a_request_arrives_whole_however_the_bytes_are_split(split: int) -> None:
    [request] = parse_all(POST, split=split)
    assert request.method == "POST"
    assert request.target == "/v1/store/secrets?action=get"
    assert request.body == b'{"path":"a/b"}'
    assert request.headers[b"host"] == b"n:8553"
    assert request.keep_alive


def test_pipelined_requests_come_out_in_order() -> None:
    second = POST.replace(b"a/b", b"c/d")
    requests = parse_all(POST + b"\r\n" + second + POST)
    assert [r.body for r in requests] == [b'{"path":"a/b"}', b'{"path":"c/d"}', b'{"path":"a/b"}']


def test_chunked_bodies_are_joined_and_trailers_ignored() -> None:
    data = (
        b"POST /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"4;ext=1\r\nwiki\r\n5\r\npedia\r\n0\r\nTrailer: yes\r\n\r\n"
    )
    for split in (0, 1, 3):
        [request] = parse_all(data, split=split)
        assert request.body == b"wikipedia"


def test_connection_close_and_http10_keep_alive_rules() -> None:
    [closing] = parse_all(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    assert not closing.keep_alive
    [old] = parse_all(b"GET / HTTP/1.0\r\n\r\n")
    assert not old.keep_alive
    [old_kept] = parse_all(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert old_kept.keep_alive


def test_expect_continue_is_noticed_before_the_body() -> None:
    parser = RequestParser(max_head=HEAD, max_body=BODY)
    parser.feed(b"POST /x HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
    assert parser.next_request() is None
    assert parser.continue_wanted
    parser.feed(b"ok")
    request = parser.next_request()
    assert request is not None and request.body == b"ok"
    assert not parser.continue_wanted


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", 400),  # no Host
        (b"GET  / HTTP/1.1\r\nHost: h\r\n\r\n", 400),
        (b"GET http://h/ HTTP/1.1\r\nHost: h\r\n\r\n", 400),  # absolute form
        (b"G@T / HTTP/1.1\r\nHost: h\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\nHost: h\r\n\r\n", 505),
        (b"GET / FTP/1.1\r\nHost: h\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: h\r\n folded\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: h\r\nBad Header: x\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: h\r\nX: a\x00b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: h\r\nHost: i\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: +1\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
        (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 4097\r\n\r\n", 413),
        (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n1001\r\n", 413),
        (b"GET / HTTP/1.1\r\nHost: h\r\nX: " + b"a" * HEAD + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: h\r\nX: " + b"a" * HEAD, 431),  # incomplete, already too long
    ],
)
def test_bad_requests_are_refused_with_the_right_status(data: bytes, status: int) -> None:
    assert refused(data) == status


def test_a_chunked_body_growing_past_the_limit_is_refused_before_it_is_all_read() -> None:
    parser = RequestParser(max_head=HEAD, max_body=BODY)
    parser.feed(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
    for _ in range(3):
        parser.feed(b"400\r\n" + b"x" * 0x400 + b"\r\n")
        assert parser.next_request() is None
    parser.feed(b"401\r\n")
    with pytest.raises(HttpError) as caught:
        parser.next_request()
    assert caught.value.status == 413


def test_in_progress_ignores_blank_lines_between_requests() -> None:
    parser = RequestParser(max_head=HEAD, max_body=BODY)
    assert not parser.in_progress
    parser.feed(b"\r\n")
    assert not parser.in_progress
    parser.feed(b"G")
    assert parser.in_progress


def test_response_bytes() -> None:
    assert response(200, "application/json", b"{}", close=False) == (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\ncache-control: no-store\r\n\r\n{}"
    )
    assert b"connection: close\r\n" in response(404, "application/json", b"{}", close=True)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=3000), st.integers(min_value=1, max_value=64))
def test_any_bytes_give_requests_or_an_http_error_and_nothing_else(data: bytes, split: int) -> None:
    try:
        parse_all(data, split=split)
    except HttpError as exc:
        assert 400 <= exc.status < 600


_line = st.sampled_from(
    [
        b"GET / HTTP/1.1\r\n",
        b"POST /v1/store/shard HTTP/1.1\r\n",
        b"Host: h\r\n",
        b"Content-Length: 3\r\n",
        b"Transfer-Encoding: chunked\r\n",
        b"Connection: close\r\n",
        b"\r\n",
        b"abc",
        b"3\r\nabc\r\n",
        b"0\r\n\r\n",
        b" \r\n",
        b"X-\xff: y\r\n",
    ]
)


@settings(max_examples=400, deadline=None)
@given(st.lists(_line, max_size=30), st.integers(min_value=1, max_value=16))
def test_plausible_fragments_never_crash_and_bodies_respect_the_limit(lines: list[bytes], split: int) -> None:
    try:
        for request in parse_all(b"".join(lines), split=split):
            assert len(request.body) <= BODY
    except HttpError as exc:
        assert exc.status in (400, 413, 431, 501, 505)


# ---------------------------------------------------------------------- where spike once differed from h11


def test_a_trailer_with_a_bare_lf_does_not_swallow_the_next_request() -> None:
    """`0\\r\\nX: a\\n\\r\\nPOST ...` was one request to spike (its trailers ran to the next blank line), two to h11."""
    data = (
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX: a\n\r\n"
        b"POST /smuggled HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n"
    )
    assert refused(data) == 400


@pytest.mark.parametrize(
    "trailers",
    [
        b"X\x00: a\r\n",  # NUL in a name
        b"X: a\x00b\r\n",  # NUL in a value
        b"garbage\r\n",  # no colon
        b"X: a\r\n folded\r\n",  # obsolete line folding
        b"X : a\r\n",  # space before the colon
        b"\x01\x02\r\n",
    ],
    ids=["nul-name", "nul-value", "no-colon", "obs-fold", "space-before-colon", "control"],
)
def test_malformed_trailers_are_refused(trailers: bytes) -> None:
    data = b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n" + trailers + b"\r\n"
    assert refused(data) == 400


def test_well_formed_trailers_are_read_and_the_next_request_follows() -> None:
    data = (
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\nX: a\r\nY-Z: \tb c\r\n\r\n"
        b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n"
    )
    for split in (0, 1, 5):
        first, second = parse_all(data, split=split)
        assert (first.body, second.target) == (b"a", "/next")


def test_chunked_on_http10_is_read_and_then_the_connection_closes() -> None:
    """RFC 9112 6.1: Transfer-Encoding in HTTP/1.0 means faulty framing: process the message, then close."""
    data = b"POST / HTTP/1.0\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
    [request] = parse_all(data)
    assert request.body == b"ok"
    assert not request.keep_alive


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\nHost: h\n\n",
        b"GET / HTTP/1.1\r\nHost: h\n\r\n",
        b"GET / HTTP/1.1\nHost: h\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\nX: a\n",  # incomplete: refused without waiting for the rest
        b"\r\n\nGET / HTTP/1.1\r\nHost: h\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n1\na\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n1\n",
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX: a\n",
    ],
    ids=[
        "all-lf",
        "lf-end",
        "lf-request-line",
        "incomplete",
        "lf-before-request",
        "chunk-line",
        "chunk-line-cut",
        "trailer-cut",
    ],
)
def test_a_bare_lf_gets_400_at_once(data: bytes) -> None:
    """RFC 9112 2.2 lets a server refuse a bare LF line end; spike does, as soon as it sees one (not at a timeout)."""
    assert refused(data) == 400


def test_control_characters_in_a_chunk_extension_are_refused() -> None:
    data = b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n1;a=\x00\r\na\r\n0\r\n\r\n"
    assert refused(data) == 400


def test_a_larger_body_is_read_only_on_the_paths_given_whatever_the_query() -> None:
    """`larger_bodies`: the limit follows the request's path (Nexus's import route), chosen by the head."""
    big = b"x" * (BODY + 1)

    def sized(target: bytes, body: bytes) -> bytes:
        return b"POST " + target + b" HTTP/1.1\r\nHost: n\r\nContent-Length: %d\r\n\r\n" % len(body) + body

    def chunked(target: bytes, body: bytes) -> bytes:
        return (
            b"POST "
            + target
            + b" HTTP/1.1\r\nHost: n\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n" % len(body)
            + body
            + b"\r\n0\r\n\r\n"
        )

    for form in (sized, chunked):
        parser = RequestParser(max_head=HEAD, max_body=BODY, larger_bodies={"/v1/operator/import": 2 * BODY})
        parser.feed(form(b"/v1/operator/import?x=1", big))
        request = parser.next_request()
        assert request is not None and request.body == big
        for target, body in ((b"/v1/store/secrets", big), (b"/v1/operator/import", big * 2)):
            parser = RequestParser(max_head=HEAD, max_body=BODY, larger_bodies={"/v1/operator/import": 2 * BODY})
            parser.feed(form(target, body))
            with pytest.raises(HttpError) as caught:
                parser.next_request()
            assert caught.value.status == 413
