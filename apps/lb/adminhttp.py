"""The admin listener's HTTP/1.1: a request head parsed strictly, its WSGI environ, whole answers.

Every answer closes its connection (no keep-alive): the admin is polled, not
loaded. Bodies need a Content-Length (chunked: 411) and at most `max_body` bytes
(413, told by the head alone).
"""
from __future__ import annotations

import http
import io
import re
import sys
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any, Callable
from urllib.parse import unquote_to_bytes

from apps.lb.errors import json_error

_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_VERSION = re.compile(rb"HTTP/1\.[01]")
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
WSGIApp = Callable[[dict, Callable], Any]
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class Refusal(Exception):
    """A request the server answers itself, with a JSON error."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Head:
    """A parsed request head."""

    method: str
    path: str   # raw, still percent-encoded
    query: str
    version: str
    headers: list[tuple[str, str]]
    length: int
    expects_continue: bool


def parse_head(raw: bytes, max_body: int) -> Head:
    """Parse a request head (without its blank line); raise Refusal for what cannot be served."""
    line, *lines = raw.split(b"\r\n")
    parts = line.split(b" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or _CONTROL.search(line):
        raise Refusal(400, "malformed request line")
    method, target, version = parts
    if not _VERSION.fullmatch(version):
        raise Refusal(505 if version.startswith(b"HTTP/") else 400,
                      "only HTTP/1.0 and HTTP/1.1 are served")
    if target.startswith((b"http://", b"https://")):  # absolute form: its path only
        target = b"/" + (target.split(b"/", 3)[3:] or [b""])[0]
    if not target.startswith(b"/"):
        raise Refusal(400, "the request target must be a path such as /status")
    path, _, query = target.partition(b"#")[0].partition(b"?")
    headers = []
    for header in lines:
        name, colon, value = header.partition(b":")
        if not colon or not _TOKEN.fullmatch(name) or _CONTROL.search(value):
            raise Refusal(400, "malformed header line")
        headers.append((name.decode("latin-1"), value.strip(b" \t").decode("latin-1")))
    named = {}
    for name, value in headers:
        named.setdefault(name.lower(), []).append(value)
    if version == b"HTTP/1.1" and len(named.get("host", ())) != 1:
        raise Refusal(400, "an HTTP/1.1 request needs exactly one Host header")
    if "transfer-encoding" in named:
        raise Refusal(411, "send the request body with a Content-Length (chunked is not taken)")
    lengths = {v.strip() for value in named.get("content-length", ()) for v in value.split(",")}
    if len(lengths) > 1 or not all(v.isdigit() and v.isascii() for v in lengths):
        raise Refusal(400, "invalid Content-Length")
    length = int(lengths.pop()) if lengths else 0
    if length > max_body:
        raise Refusal(413, f"request body larger than {max_body} bytes")
    expect = [v.strip().lower() for v in named.get("expect", ())]
    if any(v != "100-continue" for v in expect):
        raise Refusal(417, "only Expect: 100-continue is understood")
    return Head(method.decode("latin-1"), path.decode("latin-1"), query.decode("latin-1"),
                version.decode("latin-1"), headers, length,
                bool(expect) and version == b"HTTP/1.1")


def environ_for(head: Head, body: bytes, server: tuple, peer: tuple) -> dict[str, Any]:
    """The WSGI environ of one request (PEP 3333)."""
    environ: dict[str, Any] = {
        "REQUEST_METHOD": head.method, "SCRIPT_NAME": "",
        "PATH_INFO": unquote_to_bytes(head.path).decode("latin-1"),
        "QUERY_STRING": head.query, "RAW_URI": head.path + ("?" + head.query if head.query else ""),
        "SERVER_NAME": str(server[0]), "SERVER_PORT": str(server[1]),
        "SERVER_PROTOCOL": head.version,
        "REMOTE_ADDR": str(peer[0]), "REMOTE_PORT": str(peer[1]),
        "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr, "wsgi.multithread": True, "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    for name, value in head.headers:
        if "_" in name:
            continue  # X_Forwarded could pass for X-Forwarded below: dropped, as Gunicorn does
        key = name.upper().replace("-", "_")
        if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            key = "HTTP_" + key
        if key in environ:
            environ[key] += ("; " if key == "HTTP_COOKIE" else ",") + value
        else:
            environ[key] = value
    if "CONTENT_LENGTH" in environ:
        environ["CONTENT_LENGTH"] = str(head.length)
    return environ


def response_bytes(status: str, headers: list[tuple[str, str]], body: bytes,
                   head_only: bool = False) -> bytes:
    """A whole HTTP/1.1 response that closes its connection."""
    names = {name.lower() for name, _ in headers}
    lines = [f"HTTP/1.1 {status}"]
    lines += [f"{name}: {value}" for name, value in headers
              if name.lower() not in ("connection", "keep-alive", "transfer-encoding")]
    if "content-length" not in names:
        lines.append(f"Content-Length: {len(body)}")
    if "date" not in names:
        lines.append(f"Date: {formatdate(usegmt=True)}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head_only else body)


def error_bytes(status: int, message: str) -> bytes:
    """A JSON error answer, the same as the admin app's own (apps/lb/errors.py)."""
    response = json_error(status, message, source="admin")
    return response_bytes(f"{status} {http.HTTPStatus(status).phrase}",
                          [("Content-Type", response.content_type)],
                          response.get_data())


def run_app(app: WSGIApp, environ: dict[str, Any]) -> bytes:
    """Call a WSGI app and return its whole answer, ready to send."""
    started: list = []
    chunks: list[bytes] = []

    def start_response(status: str, headers: list, exc_info: Any = None) -> Callable:
        if exc_info and started:
            raise exc_info[1].with_traceback(exc_info[2])
        started[:] = [status, headers]
        return chunks.append

    result = app(environ, start_response)
    try:
        chunks.extend(result)
    finally:
        if hasattr(result, "close"):
            result.close()
    status, headers = started
    return response_bytes(status, headers, b"".join(chunks),
                          environ["REQUEST_METHOD"] == "HEAD")

