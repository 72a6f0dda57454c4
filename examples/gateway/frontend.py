"""The HTTP front end: netpool itself, with a small HTTP/1.1 framer, calling the back end over a pool.

Why netpool and not another server: the example is about the calling side,
and netpool's listener already gives what a front end under 1,000 keep-alive
connections needs (a connection limit, idle and send timeouts, a thread per
connection that can block on the pool without starving anyone, exact
close accounting) with no further dependency. ``http.server``'s
ThreadingHTTPServer has no connection limit or timeouts by default;
asyncio servers would need an async pool. The HTTP part is a sans-I/O
framer like netpool's own: bytes in, parsed requests out, with limits on
head and body size; it handles keep-alive and pipelining, and answers what
it does not support (chunked bodies) with a clear status.

Every outcome is a status and a JSON body, never a hang: bad JSON 400,
invalid fields 422, unknown user or wrong password 401, duplicate
registration 409, back end down or breaker open 503 (with Retry-After),
back end too slow 504, back end reply not in its protocol 502.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import netpool

from . import protocol as p

__all__ = ["HttpFramer", "HttpRequest", "Gateway", "start_frontend", "response"]

log = logging.getLogger("netpool.examples.gateway.frontend")

MAX_HEAD = 16384

REASONS = {
    200: "OK", 201: "Created", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
    405: "Method Not Allowed", 409: "Conflict", 411: "Length Required", 413: "Content Too Large",
    422: "Unprocessable Content", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
    501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout", 505: "HTTP Version Not Supported",
}


@dataclass
class HttpRequest:
    """One parsed request, or a framing error (``error`` = (status, code)) after which the connection closes."""

    method: str = ""
    path: str = ""
    version: str = "HTTP/1.1"
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    keep_alive: bool = True
    content_length: int = 0
    error: Optional[tuple[int, str]] = None


class HttpFramer:
    """Sans-I/O HTTP/1.1 request framer for netpool: bytes in, HttpRequest objects out.

    Bodies need Content-Length (no chunked uploads: 411/501). The head is
    limited to 16 KiB and the body to ``max_message_size``; a request past
    either becomes an error request (431/413) and nothing after it is read.
    """

    def __init__(self, max_message_size: int) -> None:
        self.max_body = max_message_size
        self._buf = bytearray()
        self._pending: Optional[HttpRequest] = None
        self._broken = False

    def feed(self, data: bytes) -> list[HttpRequest]:
        if self._broken:
            return []
        buf = self._buf
        buf += data
        out: list[HttpRequest] = []
        while True:
            req = self._pending
            if req is None:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    # Up to 3 bytes may be the start of the CRLF CRLF: a head within the
                    # limit must not be refused because a recv ended inside its terminator.
                    if len(buf) > MAX_HEAD + 3:
                        out.append(self._fail(431, "headers_too_large"))
                    break
                if end > MAX_HEAD:
                    out.append(self._fail(431, "headers_too_large"))
                    break
                req = _parse_head(bytes(buf[:end]), self.max_body)
                del buf[:end + 4]
                if req.error is not None:
                    self._broken = True
                    buf.clear()
                    out.append(req)
                    break
                self._pending = req
            need = req.content_length
            if len(buf) < need:
                break
            if need:
                req.body = bytes(buf[:need])
                del buf[:need]
            self._pending = None
            out.append(req)
        return out

    def eof(self) -> list[HttpRequest]:
        return []

    def encode(self, message: bytes) -> bytes:
        return message

    def _fail(self, status: int, code: str) -> HttpRequest:
        self._broken = True
        self._buf.clear()
        return HttpRequest(error=(status, code), keep_alive=False)


def _parse_head(head: bytes, max_body: int) -> HttpRequest:
    try:
        text = head.decode("latin-1")
        request_line, *lines = text.split("\r\n")
        method, path, version = request_line.split(" ")
    except ValueError:
        return HttpRequest(error=(400, "bad_request_line"), keep_alive=False)
    if not version.startswith("HTTP/1."):
        return HttpRequest(error=(505, "http_version_not_supported"), keep_alive=False)
    headers = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            return HttpRequest(error=(400, "bad_header"), keep_alive=False)
        headers[name.lower()] = value.strip()
    connection = headers.get("connection", "").lower()
    keep_alive = connection != "close" if version == "HTTP/1.1" else connection == "keep-alive"
    req = HttpRequest(method=method, path=path, version=version, headers=headers, keep_alive=keep_alive)
    if "transfer-encoding" in headers:
        req.error, req.keep_alive = (411, "length_required"), False
        return req
    length = headers.get("content-length")
    if length is not None:
        try:
            # isdigit() alone passes "\xb2" (a superscript 2 in latin-1), and int() refuses more
            # digits than sys.get_int_max_str_digits(): bad lengths, not exceptions out of feed().
            if not (length.isascii() and length.isdigit()):
                raise ValueError(length)
            req.content_length = int(length)
        except ValueError:
            req.error, req.keep_alive = (400, "bad_content_length"), False
            return req
        if req.content_length > max_body:
            req.error, req.keep_alive = (413, "body_too_large"), False
    return req


def response(status: int, body: dict, *, keep_alive: bool = True, extra: str = "") -> bytes:
    payload = json.dumps(body, separators=(",", ":")).encode()
    head = (
        f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n{extra}"
        + ("" if keep_alive else "Connection: close\r\n")
        + "\r\n"
    )
    return head.encode() + payload


def error(status: int, code: str, message: str, *, keep_alive: bool = True, extra: str = "") -> bytes:
    return response(status, {"error": code, "message": message}, keep_alive=keep_alive, extra=extra)


ROUTES = {"/register": p.OP_REGISTER, "/login": p.OP_LOGIN}


class Gateway:
    """The front end's handler: route, validate, call the back end on the pool, map the reply to HTTP.

    ``backend`` is a :class:`netpool.ConnectionPool` (with ``max_idle=0`` it
    becomes "no pool": a new back-end connection for every request).
    ``timeout`` is the per-request deadline for the whole back-end call.
    """

    def __init__(self, backend: netpool.ConnectionPool, timeout: float = 5.0) -> None:
        self.backend = backend
        self.timeout = timeout

    def __call__(self, request: HttpRequest, conn: netpool.Connection) -> None:
        reply = self.respond(request)
        conn.send_bytes(reply)
        if not request.keep_alive or request.error is not None:
            conn.close()

    def respond(self, request: HttpRequest) -> bytes:
        keep = request.keep_alive
        if request.error is not None:
            status, code = request.error
            return error(status, code, "the request could not be read", keep_alive=False)
        path = request.path.split("?", 1)[0]
        if path == "/health":
            if request.method != "GET":
                return error(405, "method_not_allowed", "use GET", keep_alive=keep, extra="Allow: GET\r\n")
            return self._call(p.encode_request(p.OP_PING), keep, health=True)
        op = ROUTES.get(path)
        if op is None:
            return error(404, "not_found", f"no route {path}; try POST /register or POST /login", keep_alive=keep)
        if request.method != "POST":
            return error(405, "method_not_allowed", "use POST with a JSON body", keep_alive=keep, extra="Allow: POST\r\n")
        try:
            data = json.loads(request.body)
        except (ValueError, UnicodeDecodeError):
            return error(400, "bad_json", "the body must be a JSON object", keep_alive=keep)
        if not isinstance(data, dict):
            return error(400, "bad_json", "the body must be a JSON object", keep_alive=keep)
        username, password = data.get("username"), data.get("password")
        if not isinstance(username, str) or not isinstance(password, str) or not username or not password:
            return error(422, "invalid_fields", "username and password must be non-empty strings", keep_alive=keep)
        try:
            frame = p.encode_request(op, username, password)
        except p.ProtocolViolation as exc:
            return error(422, "invalid_fields", str(exc), keep_alive=keep)
        return self._call(frame, keep, username=username, op=op)

    def _call(self, frame: bytes, keep: bool, *, username: str = "", op: int = 0, health: bool = False) -> bytes:
        try:
            raw = self.backend.request(frame, deadline=self.timeout)
        except netpool.CircuitOpen as exc:
            return error(503, "backend_unavailable", "the back end is failing; try again shortly",
                         keep_alive=keep, extra=f"Retry-After: {max(1, round(exc.retry_after))}\r\n")
        except netpool.PoolTimeout:
            return error(503, "busy", "every back-end connection is busy; try again", keep_alive=keep,
                         extra="Retry-After: 1\r\n")
        except netpool.DeadlineExceeded:
            return error(504, "backend_timeout", f"the back end did not answer within {self.timeout:g} s", keep_alive=keep)
        except (netpool.DialError, netpool.PoolClosed, netpool.ProtocolError, OSError):
            return error(503, "backend_unavailable", "the back end cannot be reached", keep_alive=keep)
        try:
            reply = p.decode_reply(raw)
        except p.ProtocolViolation as exc:
            # The back end answered, but not in its protocol: a 502 for this
            # request (the HTTP client did nothing wrong), its connection kept.
            log.warning("back end %s sent a reply the gateway cannot read: %s", self.backend.address, exc)
            return error(502, "bad_gateway", "the back end sent a reply that could not be read", keep_alive=keep)
        if health:
            return response(200, {"status": "ok"}, keep_alive=keep)
        status = reply.status
        if status == p.OK:
            if op == p.OP_REGISTER:
                return response(201, {"username": username}, keep_alive=keep)
            return response(200, {"username": username, "authenticated": True}, keep_alive=keep)
        if status == p.EXISTS:
            return error(409, "user_exists", f"user {username!r} is already registered", keep_alive=keep)
        if status in (p.UNKNOWN_USER, p.WRONG_PASSWORD):
            # One answer for both, so the API does not tell which names exist.
            return error(401, "invalid_credentials", "unknown user or wrong password", keep_alive=keep)
        if status == p.BAD_REQUEST:
            return error(422, "invalid_fields", reply.detail, keep_alive=keep)
        return error(500, "backend_error", "the back end failed on this request", keep_alive=keep)


def start_frontend(
    backend_port: int,
    *,
    backend_host: str = "127.0.0.1",
    host: str = "127.0.0.1",
    port: int = 8080,
    pool: bool = True,
    max_open: int = 8,
    timeout: float = 5.0,
    breaker: Optional[netpool.CircuitBreaker] = None,
    max_connections: int = 4096,
    name: str = "gateway-frontend",
    metrics: Optional[Any] = None,
) -> tuple[netpool.Listener, netpool.ConnectionPool]:
    """Start the HTTP listener and its back-end pool; stop both when done (listener first)."""
    if breaker is None:
        breaker = netpool.CircuitBreaker("gateway-backend", failure_threshold=20, cooldown=2.0)
    backend = netpool.ConnectionPool(
        (backend_host, backend_port),
        max_open=max_open if pool else max(max_open, max_connections),
        max_idle=None if pool else 0,  # no idle connections kept: one dial per request
        acquire_timeout=timeout,
        connect_timeout=min(timeout, 2.0),
        read_timeout=timeout,
        write_timeout=timeout,
        breaker=breaker,
        name="gateway-backend",
    )
    handler: Any = Gateway(backend, timeout)
    if metrics is not None:
        handler = metrics.instrument_handler(handler, listener=name)
        metrics.add(backend, breaker)
    try:
        listener = netpool.start_listener(netpool.ListenerConfig(
            handler=handler,
            host=host,
            port=port,
            framing=HttpFramer,
            max_message_size=16384,
            max_connections=max_connections,
            backlog=4096,
            acceptors=4,
            idle_timeout=60.0,
            send_timeout=10.0,
            name=name,
        ))
    except BaseException:
        backend.close()
        raise
    if metrics is not None:
        metrics.add_listener(listener)
    return listener, backend
