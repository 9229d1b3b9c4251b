"""A strict, small, sans-IO HTTP/1.1 request parser for spike's servers.

Why not h11 here: measured on this project's 2-core benchmark machine, h11
spent about 150 µs of CPU per request and response, more than half of the
server's whole budget; this parser does what spike's servers need in a few
µs (bench/http_parsers.py and docs/benchmarks.md keep the comparison).  h11
still drives the client side (keeper polls, the CLI), where volume is small,
and a differential test (tests/transport/test_http1_differential.py) holds
this parser to h11's reading of every request, except where it is stricter
on purpose.

What it accepts (and refuses, with the status to answer):

* a request line ``METHOD SP origin-form-target SP HTTP/1.1`` (or 1.0);
  anything else is 400, another version 505;
* header fields ``token ":" OWS value OWS`` with CRLF line ends; a bare LF
  anywhere in a head, a chunk line or the trailers, obsolete line folding,
  control characters, a missing Host (1.1) are 400, refused as soon as they
  are seen; a head longer than the limit is 431;
* a body by ``Content-Length`` (one value, digits only) or by
  ``Transfer-Encoding: chunked`` (nothing else), never both (the classic
  request-smuggling ambiguity): 400; other transfer codings 501; a body
  above the limit 413, decided as soon as it is known.  Chunk trailers obey
  the header rules (and are then ignored).  A chunked HTTP/1.0 request is
  read and then the connection closes (RFC 9112 6.1: its framing is suspect).

A server may judge a request by its head before reading its body (`head`,
then `skip_body` to answer early and discard the body as it comes).

The parser never raises anything but `HttpError`, whatever bytes it is fed,
and holds at most the head limit plus the body limit (plus one read) in
memory per connection (`buffered`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import msgspec

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET = re.compile(rb"/[\x21-\x7e]*")
_FIELD_VALUE_BAD = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# RFC 9112 7.1: chunk-size [ chunk-ext ] CRLF, where an extension holds no control character.
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,8})(?:;[^\x00-\x08\x0a-\x1f\x7f]*)?")
_MAX_CHUNK_LINE = 1024


class HttpError(Exception):
    """The request cannot be served; `status` is what to answer before closing."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class Request(msgspec.Struct, frozen=True):
    method: str
    target: str
    headers: dict[bytes, bytes]  # lower-case names; repeated fields joined with ", "
    body: bytes
    keep_alive: bool

    def __repr__(self) -> str:  # the body may be a secret, and a header a token: their sizes only
        return (
            f"Request(method={self.method!r}, target={self.target!r}, headers=<{len(self.headers)}>, "
            f"body=<{len(self.body)} bytes>, keep_alive={self.keep_alive!r})"
        )


class Head(msgspec.Struct, frozen=True):
    """A request whose head is whole and whose body is still to come."""

    method: str
    target: str
    headers: dict[bytes, bytes]
    keep_alive: bool
    number: int  # counts heads on this connection: a server judges each one once

    def __repr__(self) -> str:  # a header may be a token: their number only
        return (
            f"Head(method={self.method!r}, target={self.target!r}, headers=<{len(self.headers)}>, "
            f"keep_alive={self.keep_alive!r}, number={self.number!r})"
        )


class RequestParser:
    __slots__ = (
        "_body",
        "_buf",
        "_chunk_left",
        "_chunked",
        "_chunked_size",
        "_head",
        "_heads",
        "_keep_alive",
        "_larger_bodies",
        "_limit",
        "_max_body",
        "_max_head",
        "_method",
        "_need",
        "_skip",
        "_target",
        "continue_wanted",
    )

    def __init__(self, *, max_head: int, max_body: int, larger_bodies: Mapping[str, int] | None = None) -> None:
        self._buf = bytearray()
        self._max_head = max_head
        self._max_body = max_body
        # Paths whose bodies may be larger than `max_body` (the request target without its query): the
        # limit is chosen by the head, before any of the body is held.
        self._larger_bodies: Mapping[str, int] = larger_bodies or {}
        self._limit = max_body  # the body limit of the request under way
        self._head: dict[bytes, bytes] | None = None
        self._heads = 0
        self._method = ""
        self._target = ""
        self._keep_alive = True
        self._chunked = False
        self._need = 0  # bytes of Content-Length body still to come
        self._chunk_left = -1  # chunked: data bytes left in this chunk; -1 before a size line, -2 in trailers
        self._body = bytearray()  # chunked: the data of the chunks read so far
        self._chunked_size = 0  # chunked: the body's size so far (kept or discarded), against the limit
        self._skip = False  # the body is discarded as it comes (the request was answered early)
        self.continue_wanted = False  # the client sent "Expect: 100-continue" and awaits it

    @property
    def in_progress(self) -> bool:
        """Some bytes of a request have arrived (blank lines between requests do not count)."""
        return self._head is not None or bool(self._buf.strip(b"\r\n"))

    @property
    def head_received(self) -> bool:
        return self._head is not None

    @property
    def head(self) -> Head | None:
        """The request under way once its head is whole (and until it ends), else None."""
        if self._head is None:
            return None
        return Head(self._method, self._target, self._head, self._keep_alive, self._heads)

    @property
    def skipping(self) -> bool:
        """The body under way is being discarded: its request has had its answer."""
        return self._skip

    @property
    def buffered(self) -> int:
        """Bytes this parser holds: unparsed input and the body read so far."""
        return len(self._buf) + len(self._body)

    def feed(self, data: bytes) -> None:
        self._buf += data

    def discard(self) -> None:
        """Drop everything held (the connection is closing)."""
        self._buf = bytearray()
        self._body = bytearray()

    def skip_body(self) -> None:
        """Discard the current request's body, already read and still to come; the request is
        never returned.  For a server that answered the head (a refusal) without its body."""
        if self._head is None:
            raise RuntimeError("no request head to skip the body of")
        self._skip = True
        self._body = bytearray()
        self.continue_wanted = False

    def next_request(self) -> Request | None:
        """The next complete request, or None until more data comes.  Raises `HttpError`."""
        while True:
            if self._head is None and not self._parse_head():
                return None
            body = self._read_chunked() if self._chunked else self._read_sized()
            if body is None:
                return None
            head = self._head
            assert head is not None
            skipped = self._skip
            self._head = None
            self._body = bytearray()
            self._skip = False
            self.continue_wanted = False
            if not skipped:
                return Request(self._method, self._target, head, body, self._keep_alive)

    # ------------------------------------------------------------------ head

    def _parse_head(self) -> bool:
        buf = self._buf
        while buf[:2] == b"\r\n":  # RFC 9112 2.2: ignore empty lines before a request
            del buf[:2]
        limit = self._max_head + 4
        end = buf.find(b"\r\n\r\n", 0, limit)
        if end < 0:
            # What cannot start a request line is refused at once, not at the request timeout
            # (TLS on the plain port, a binary protocol); a lone CR may still be an empty line.
            if buf and buf[0] < 0x21 and buf != b"\r":
                raise HttpError(400, "malformed request line")
            if _bare_lf(buf, min(len(buf), limit)):
                raise HttpError(400, "bare LF in a request head")
            if len(buf) > self._max_head:
                raise HttpError(431, "request head too large")
            return False
        head = bytes(buf[:end])
        if head.count(b"\n") != head.count(b"\r\n"):
            raise HttpError(400, "bare LF in a request head")
        lines = head.split(b"\r\n")
        del buf[: end + 4]
        method, target, version = _request_line(lines[0])
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, value = _field(line)
            if name in headers:
                if name == b"content-length" and headers[name] != value:
                    raise HttpError(400, "conflicting Content-Length")
                if name in (b"content-length", b"host"):
                    if name == b"host":
                        raise HttpError(400, "more than one Host")
                    continue
                headers[name] = headers[name] + b", " + value
            else:
                headers[name] = value
        if version == b"HTTP/1.1" and b"host" not in headers:
            raise HttpError(400, "missing Host")
        connection = headers.get(b"connection", b"").lower()
        tokens = {t.strip() for t in connection.split(b",")}
        keep_alive = b"close" not in tokens if version == b"HTTP/1.1" else b"keep-alive" in tokens
        self._limit = self._larger_bodies.get(target.partition("?")[0], self._max_body)
        self._set_body_mode(headers)
        if self._chunked and version == b"HTTP/1.0":
            keep_alive = False  # RFC 9112 6.1: read it, then close
        self._head = headers
        self._heads += 1
        self._method = method
        self._target = target
        self._keep_alive = keep_alive
        self.continue_wanted = headers.get(b"expect", b"").lower() == b"100-continue"
        return True

    def _set_body_mode(self, headers: dict[bytes, bytes]) -> None:
        coding = headers.get(b"transfer-encoding")
        length = headers.get(b"content-length")
        if coding is not None:
            if length is not None:
                raise HttpError(400, "both Transfer-Encoding and Content-Length")
            if coding.lower() != b"chunked":
                raise HttpError(501, "unsupported transfer coding")
            self._chunked = True
            self._chunk_left = -1
            self._chunked_size = 0
            self._need = 0
            return
        self._chunked = False
        if length is None:
            self._need = 0
            return
        if not length.isdigit() or len(length) > 18:
            raise HttpError(400, "malformed Content-Length")
        self._need = int(length)
        if self._need > self._limit:
            raise HttpError(413, "body too large")

    # ------------------------------------------------------------------ body

    def _read_sized(self) -> bytes | None:
        need = self._need
        buf = self._buf
        if self._skip:
            gone = min(need, len(buf))
            del buf[:gone]
            self._need = need - gone
            return b"" if self._need == 0 else None
        if len(buf) < need:
            return None
        with memoryview(buf) as view:  # one copy, not two
            body = bytes(view[:need])
        del buf[:need]
        return body

    def _read_chunked(self) -> bytes | None:
        buf = self._buf
        while True:
            left = self._chunk_left
            if left > 0:  # inside a chunk's data: take what has come
                take = min(left, len(buf))
                if not self._skip:
                    self._body += buf[:take]
                del buf[:take]
                self._chunk_left = left - take
                if self._chunk_left:
                    return None
                self._chunk_left = 0
                left = 0
            if left == 0:  # after a chunk's data: its CRLF
                if len(buf) < 2:
                    if buf and buf[0] != 0x0D:  # not even the CR of the CRLF
                        raise HttpError(400, "malformed chunk")
                    return None
                if buf[:2] != b"\r\n":
                    raise HttpError(400, "malformed chunk")
                del buf[:2]
                self._chunk_left = -1
            elif left == -1:  # a chunk-size line
                line_end = buf.find(b"\r\n", 0, _MAX_CHUNK_LINE)
                if line_end < 0:
                    if buf.find(b"\n", 0, _MAX_CHUNK_LINE) >= 0:
                        raise HttpError(400, "bare LF in a chunk line")
                    if len(buf) >= _MAX_CHUNK_LINE:
                        raise HttpError(400, "malformed chunk")
                    return None
                match = _CHUNK_SIZE.fullmatch(buf, 0, line_end)
                if match is None:
                    raise HttpError(400, "malformed chunk size")
                size = int(match.group(1), 16)
                del buf[: line_end + 2]
                if size == 0:
                    self._chunk_left = -2
                    continue
                self._chunked_size += size
                if self._chunked_size > self._limit:
                    raise HttpError(413, "body too large")
                self._chunk_left = size
            else:  # the trailer section: header fields (checked, then ignored) and an empty line
                if not self._read_trailers():
                    return None
                return b"" if self._skip else bytes(self._body)

    def _read_trailers(self) -> bool:
        buf = self._buf
        if buf[:2] == b"\r\n":
            del buf[:2]
            return True
        limit = self._max_head + 4
        end = buf.find(b"\r\n\r\n", 0, limit)
        if _bare_lf(buf, end if end >= 0 else min(len(buf), limit)):
            raise HttpError(400, "bare LF in chunk trailers")
        if end < 0:
            if len(buf) > self._max_head:
                raise HttpError(431, "chunk trailers too large")
            return False
        for line in bytes(buf[:end]).split(b"\r\n"):
            _field(line)
        del buf[: end + 4]
        return True


def _bare_lf(buf: bytearray, end: int) -> bool:
    """Whether an LF that no CR precedes is among the first `end` bytes."""
    return buf.find(b"\n", 0, end) >= 0 and buf.count(b"\n", 0, end) != buf.count(b"\r\n", 0, end)


def _field(line: bytes) -> tuple[bytes, bytes]:
    """One header (or trailer) field line: (lower-case name, value without surrounding whitespace)."""
    if line[:1] in (b" ", b"\t"):
        raise HttpError(400, "obsolete line folding")
    name, sep, value = line.partition(b":")
    if not sep or not _TOKEN.fullmatch(name):
        raise HttpError(400, "malformed header field")
    value = value.strip(b" \t")
    if _FIELD_VALUE_BAD.search(value):
        raise HttpError(400, "control character in a header value")
    return name.lower(), value


def _request_line(line: bytes) -> tuple[str, str, bytes]:
    parts = line.split(b" ")
    if len(parts) != 3:
        raise HttpError(400, "malformed request line")
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        raise HttpError(400, "malformed method")
    if not _TARGET.fullmatch(target):
        raise HttpError(400, "malformed request target")
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        if version.startswith(b"HTTP/"):
            raise HttpError(505, "HTTP version not supported")
        raise HttpError(400, "malformed request line")
    return method.decode("ascii"), target.decode("ascii"), version


_REASONS = {
    100: b"Continue",
    200: b"OK",
    204: b"No Content",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    409: b"Conflict",
    411: b"Length Required",
    413: b"Content Too Large",
    415: b"Unsupported Media Type",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    503: b"Service Unavailable",
    505: b"HTTP Version Not Supported",
}


def response(status: int, content_type: str, body: bytes, *, close: bool, head: bool = False) -> bytes:
    """One complete HTTP/1.1 response, ready to write; `head`: the answer to a HEAD request, without its body."""
    reason = _REASONS.get(status, b"")
    connection = b"connection: close\r\n" if close else b""
    if status == 204:  # no body, and so no Content-Length (RFC 9110, 8.6)
        return b"HTTP/1.1 204 No Content\r\ncache-control: no-store\r\n%s\r\n" % connection
    return b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\ncache-control: no-store\r\n%s\r\n%s" % (
        status,
        reason,
        content_type.encode("ascii"),
        len(body),
        connection,
        b"" if head else body,  # RFC 9110 9.3.2: the length a GET would get, and no body
    )


CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
