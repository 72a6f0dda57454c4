"""TLS with pyOpenSSL: contexts built once, handshakes with a deadline, a thread-safe transport.

OpenSSL forbids two threads in one SSL object at once, yet a netpool
connection is read by the thread serving it while any thread may send. So a TLS
connection's socket is non-blocking and every SSL call is made under one lock
that is *never held while waiting*: a reader waiting for bytes sits in
``poll()`` without the lock, so senders go ahead (cheroot's pyOpenSSL adapter
holds its lock across blocking calls, which is what makes its sends wait on
reads).

Waking a reader works as for plain sockets: shutting the socket down makes
``poll()`` return; the reader then sees ``closing`` and stops without another
``SSL_read`` (see ``TLSTransport.told_to_close``).
"""

from __future__ import annotations

import errno
import functools
import os
import select
import socket
import threading
import time
from typing import Any, Callable, Optional

from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL

from .deadline import poll_until
from .errors import TLSError, TLSHandshakeError, TLSHandshakeTimeout
from .transport import SendIncomplete, end_with_fin
from .tls_config import INTERMEDIATE_CIPHERS, TLSConfig, TLSInfo

__all__ = [
    "TLSTransport",
    "build_server_context",
    "server_handshake",
    "start_server_session",
    "handshake_step",
    "negotiated",
]

OPENSSL_VERSIONS = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}

# Said when OpenSSL reports a failure with nothing in its error queue (the C
# hot path says the same).
NO_REASON = "OpenSSL gave no reason"

# Largest plaintext handed to SSL_write at once: one TLS record holds 16 KiB,
# and a few records per call keep the lock hold time short for other senders.
WRITE_CHUNK = 65536


# -- contexts -----------------------------------------------------------------


def _readable(option: str, path: str) -> str:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise TLSError(f"ssl.{option} {path}: cannot read it: {exc.strerror}") from None
    return path


def _load_pair(ctx: SSL.Context, certfile: str, keyfile: Optional[str], password: Any, where: str) -> None:
    _readable(f"{where}certfile", certfile)
    key_option = f"{where}keyfile" if keyfile is not None else f"{where}certfile"
    key_path = _readable(key_option, keyfile or certfile)
    try:
        ctx.use_certificate_chain_file(certfile)
    except SSL.Error as exc:
        raise TLSError(f"ssl.{where}certfile {certfile}: not a PEM certificate OpenSSL can load ({_ssl_reason(exc)})") from None
    # The key is decrypted by cryptography (pyOpenSSL's passphrase callback
    # is deprecated), which also tells a wrong password from a bad file.
    secret = password.encode() if isinstance(password, str) else password
    with open(key_path, "rb") as fh:
        pem = fh.read()
    try:
        key = serialization.load_pem_private_key(pem, secret)
    except TypeError:
        hint = "the key is encrypted: give ssl.password" if secret is None else "the key is not encrypted: drop ssl.password"
        raise TLSError(f"ssl.{key_option} {key_path}: {hint}") from None
    except ValueError as exc:
        raise TLSError(
            f"ssl.{key_option} {key_path}: cannot load the private key (is it PEM, and is the password right?): {exc}"
        ) from None
    try:
        # A key type pyOpenSSL cannot use (DH, X25519, ...) raises TypeError, caught below.
        ctx.use_privatekey(key)  # type: ignore[arg-type]
        ctx.check_privatekey()
    except (SSL.Error, TypeError):
        raise TLSError(f"ssl.{key_option} {key_path} does not match the certificate in {certfile}") from None


def build_server_context(tls: TLSConfig, name: str = "netpool") -> SSL.Context:
    """Build the pyOpenSSL context once per listener; every problem names its file.

    Raises :class:`TLSError` for unreadable or invalid files, a key that does
    not match its certificate, or a cipher string OpenSSL rejects.
    """
    ctx = _context_for(tls, tls.certfile, tls.keyfile, tls.password, "", name)
    if tls.sni:
        # The context switched to by SNI governs the rest of the handshake
        # (ALPN, client verification), so each one is configured in full.
        by_name = {
            server_name.encode(): _context_for(
                tls, pair["certfile"], pair.get("keyfile"), pair.get("password"), f"sni.{server_name}.", name
            )
            for server_name, pair in tls.sni.items()
        }

        def pick_certificate(conn: SSL.Connection) -> None:
            requested = conn.get_servername()
            if requested and requested.lower() in by_name:
                conn.set_context(by_name[requested.lower()])

        ctx.set_tlsext_servername_callback(pick_certificate)
    return ctx


def _context_for(tls: TLSConfig, certfile: str, keyfile: Optional[str], password: Any, where: str,
                 name: str) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(OPENSSL_VERSIONS[tls.min_version])
    # No renegotiation (a DoS and injection vector), no compression (CRIME),
    # and the server's cipher order. A TCP FIN without close_notify is the
    # end of the stream, as netpool reads it anyway: without
    # OP_IGNORE_UNEXPECTED_EOF, OpenSSL 3 answers it with a decode_error
    # alert, which a client that half-closed its side reads in place of the
    # replies still due to it.
    ctx.set_options(SSL.OP_NO_RENEGOTIATION | SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE
                    | getattr(SSL, "OP_IGNORE_UNEXPECTED_EOF", 0))
    # Idle connections give their read/write buffers back: memory per
    # connection matters when thousands sit idle.
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    _load_pair(ctx, certfile, keyfile, password, where)
    ciphers = tls.ciphers or INTERMEDIATE_CIPHERS
    try:
        ctx.set_cipher_list(ciphers.encode())
    except SSL.Error as exc:
        raise TLSError(f"ssl.ciphers {ciphers!r}: OpenSSL accepts none of them ({_ssl_reason(exc)})") from None
    if tls.cafile:
        _readable("cafile", tls.cafile)
        try:
            ctx.load_verify_locations(tls.cafile)
            ctx.load_client_ca(tls.cafile.encode())
        except SSL.Error as exc:
            raise TLSError(f"ssl.cafile {tls.cafile}: cannot load CA certificates ({_ssl_reason(exc)})") from None
    mode = {
        "none": SSL.VERIFY_NONE,
        "optional": SSL.VERIFY_PEER,
        "required": SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
    }[tls.verify_client]
    ctx.set_verify(mode, None)  # OpenSSL's own chain verification decides
    # Resumption: session caching needs a session id context when client
    # certificates are in play; TLS 1.3 tickets work with OpenSSL's defaults.
    ctx.set_session_id(f"netpool-{name}".encode()[:32])
    if tls.alpn:
        ours = [p.encode() for p in tls.alpn]

        def select_alpn(_conn: SSL.Connection, offered: list[bytes]) -> "bytes | SSL._NoOverlappingProtocols":
            for proto in ours:
                if proto in offered:
                    return proto
            return SSL.NO_OVERLAPPING_PROTOCOLS

        ctx.set_alpn_select_callback(select_alpn)
    return ctx


def _ssl_reason(exc: Exception) -> str:
    errors = exc.args[0] if exc.args else None
    if isinstance(errors, list):
        if not errors:
            return NO_REASON
        if isinstance(errors[0], tuple):
            return "; ".join(str(e[-1]) for e in errors)
    return str(exc) or type(exc).__name__


# -- waiting ------------------------------------------------------------------


def _poller(sock: socket.socket, events: int) -> "select.poll":
    poller = select.poll()
    poller.register(sock, events)
    return poller


# -- handshake ----------------------------------------------------------------


def start_server_session(sock: socket.socket, ctx: SSL.Context) -> SSL.Connection:
    """Put ``sock`` in non-blocking mode and wrap it for the server side of a handshake."""
    sock.setblocking(False)
    ssl_conn = SSL.Connection(ctx, sock)
    ssl_conn.set_accept_state()
    return ssl_conn


def handshake_step(ssl_conn: SSL.Connection) -> int:
    """Advance a handshake without blocking: 0 when done, else the poll event it waits for.

    Raises :class:`TLSHandshakeError` with OpenSSL's reason.
    """
    try:
        ssl_conn.do_handshake()
        return 0
    except SSL.WantReadError:
        return select.POLLIN
    except SSL.WantWriteError:
        return select.POLLOUT
    except SSL.SysCallError as exc:
        raise TLSHandshakeError(_syscall_message(exc, "during the TLS handshake")) from None
    except SSL.Error as exc:
        raise TLSHandshakeError(f"TLS handshake failed: {_ssl_reason(exc)}") from None


def handshake_timed_out(timeout: float) -> TLSHandshakeTimeout:
    return TLSHandshakeTimeout(f"TLS handshake not finished within {timeout:g}s (handshake_timeout)")


def server_handshake(sock: socket.socket, ctx: SSL.Context, timeout: float) -> SSL.Connection:
    """Run the server side of a TLS handshake on ``sock`` within ``timeout`` seconds, blocking.

    The deadline covers the whole handshake, so a client that trickles bytes
    cannot stretch it. Raises :class:`TLSHandshakeTimeout` or
    :class:`TLSHandshakeError` (with OpenSSL's reason).
    """
    ssl_conn = start_server_session(sock, ctx)
    deadline = time.monotonic() + timeout
    pollers: dict[int, "select.poll"] = {}
    while True:
        wanted = handshake_step(ssl_conn)
        if not wanted:
            return ssl_conn
        poller = pollers.get(wanted) or pollers.setdefault(wanted, _poller(sock, wanted))
        if not poll_until(poller, deadline):
            raise handshake_timed_out(timeout)


def _syscall_message(exc: SSL.SysCallError, when: str) -> str:
    code = exc.args[0] if exc.args else None
    if code in (-1, 0):
        return f"peer closed the connection {when}"
    if isinstance(code, int) and code > 0:
        return f"{os.strerror(code)} {when}"
    return f"{exc} {when}"


def negotiated(ssl_conn: SSL.Connection) -> TLSInfo:
    cert = ssl_conn.get_peer_certificate(as_cryptography=True)
    subject = cert.subject.rfc4514_string() if cert is not None else None
    alpn = ssl_conn.get_alpn_proto_negotiated()
    name = ssl_conn.get_servername()
    return TLSInfo(
        version=ssl_conn.get_protocol_version_name(),
        cipher=ssl_conn.get_cipher_name() or "",
        alpn=alpn.decode() if alpn else None,
        server_name=name.decode() if name else None,
        peer_subject=subject,
        session_reused=_session_reused(ssl_conn),
    )


def _session_reused(ssl_conn: SSL.Connection) -> bool:
    # pyOpenSSL has no public accessor; its cffi binding of
    # SSL_session_reused does the job where present.
    try:
        from OpenSSL.SSL import _lib

        return bool(_lib.SSL_session_reused(ssl_conn._ssl))
    except (ImportError, AttributeError):
        return False


# -- the transport ------------------------------------------------------------


class TLSTransport:
    """recv/send over one SSL connection, safe for one reader plus many senders (see transport.PlainTransport)."""

    __slots__ = ("socket", "_ssl", "_ssl_ptr", "_lock", "_read_poll", "_write_poll", "_notified", "closing")

    is_tls = True
    # The C module's SSL_read (hot_path.use_speedups sets it; None: pyOpenSSL's
    # recv): it reads into one reused buffer, where pyOpenSSL allocates the
    # full ``size`` for every call and the short-lived blocks fragment malloc.
    c_recv: Optional[Callable[["TLSTransport", int], bytes]] = None

    def __init__(self, sock: socket.socket, ssl_conn: SSL.Connection) -> None:
        self.socket = sock
        self._ssl = ssl_conn
        # The session's SSL pointer, for the C hot path (0: Python only).
        # The object stays alive with _ssl.
        self._ssl_ptr = _session_address(ssl_conn) if _C_PATH else 0
        self._lock = threading.Lock()
        # One poll object per side: the reader and a sender may wait at once,
        # and one poll object refuses concurrent poll() calls.
        self._read_poll = _poller(sock, select.POLLIN)
        self._write_poll: Optional["select.poll"] = None
        # _notified: close_notify sent, or the session is broken and must not
        # be touched again. closing: the connection was told to close; the
        # reader, woken by the socket shutdown, must stop without another
        # SSL_read on a half-shut socket.
        self._notified = False
        self.closing = False

    def recv_nowait(self, size: int) -> bytes:
        """Read what is decrypted and ready: bytes, b"" at end of stream; BlockingIOError when it must wait.

        Raises ConnectionResetError on a reset and TLSError on a protocol error.
        """
        if self.closing:
            # Told to close: stop without another SSL_read on a half-shut socket.
            return b""
        with self._lock:
            if self.closing:  # told while this reader waited for the lock: the close may be reading the socket
                return b""
            c_recv = self.c_recv
            if c_recv is not None and self._ssl_ptr:
                return c_recv(self, size)
            try:
                return self._ssl.recv(size)
            except (SSL.WantReadError, SSL.WantWriteError):
                raise BlockingIOError(errno.EAGAIN, "TLS record not complete") from None
            except SSL.ZeroReturnError:
                return b""  # close_notify: a clean end
            except SSL.SysCallError as exc:
                self._notified = True  # a broken session gets no close_notify
                code = exc.args[0] if exc.args else -1
                if code in (-1, 0):
                    return b""  # TCP FIN without close_notify: treat as end of stream
                raise ConnectionResetError(code, os.strerror(code)) from None
            except SSL.Error as exc:
                self._notified = True
                raise TLSError(f"TLS error: {_ssl_reason(exc)}") from None

    def pending(self) -> int:
        """Decrypted bytes OpenSSL holds already (epoll cannot see them)."""
        with self._lock:
            return self._ssl.pending()

    def send_nowait(self, data: "bytes | memoryview") -> int:
        """Encrypt and send what the socket takes now; BlockingIOError when it must wait.

        After a BlockingIOError the same bytes must be offered again
        (OpenSSL's rule for retried writes). Raises ConnectionResetError,
        BrokenPipeError or TLSError.
        """
        sent = self._send_once(data)[0]
        if not sent:
            raise BlockingIOError(errno.EAGAIN, "TLS session cannot write now")
        return sent

    def send_until(self, data: "bytes | memoryview", deadline: float) -> None:
        """Encrypt and send all of ``data`` by ``deadline`` (monotonic) or raise SendIncomplete."""
        view = memoryview(data)
        while view:
            sent, wanted = self._send_once(view)
            if sent:
                view = view[sent:]
                continue
            poller = self._read_poll if wanted == select.POLLIN else self._writable()
            if not poll_until(poller, deadline):
                raise SendIncomplete(len(data) - len(view))

    def _send_once(self, data: "bytes | memoryview") -> tuple[int, int]:
        """One SSL_write: (bytes sent, 0), or (0, the poll event to wait for)."""
        with self._lock:
            try:
                return self._ssl.send(data[:WRITE_CHUNK]), 0
            except SSL.WantWriteError:
                return 0, select.POLLOUT
            except SSL.WantReadError:
                return 0, select.POLLIN
            except SSL.ZeroReturnError:
                raise BrokenPipeError(errno.EPIPE, "peer closed the TLS session") from None
            except SSL.SysCallError as exc:
                code = exc.args[0] if exc.args and isinstance(exc.args[0], int) and exc.args[0] > 0 else errno.EPIPE
                raise ConnectionResetError(code, os.strerror(code)) from None
            except SSL.Error as exc:
                raise TLSError(f"TLS error: {_ssl_reason(exc)}") from None

    def told_to_close(self, abort: bool) -> None:
        """The connection is closing: the reader stops (``closing``); ``abort``: close_notify now.

        ``closing`` is set holding the session, and the caller shuts the
        socket down only after this returns: an SSL_read already running
        finishes first, and none starts after. An SSL_read that met the
        shutdown midway would take it for the peer's EOF (OpenSSL 3 then
        sends the client a decode_error alert where a close_notify was
        due: seen under load in reloads).
        """
        with self._lock:
            self.closing = True
        if abort:
            self.notify_close()

    def end_with_fin(self) -> None:
        """As PlainTransport's, holding the session: a reader inside SSL_read now finishes first.

        Raw reads racing an SSL_read would hand OpenSSL the tail of a record
        whose head was read away, and it would answer the client with a
        decode_error alert (seen once under load). Readers that come later
        see ``closing`` (set before this) and never call SSL_read.
        """
        with self._lock:
            end_with_fin(self.socket)

    def notify_close(self) -> None:
        """Send close_notify once, without waiting for the peer's (never blocks)."""
        with self._lock:
            if self._notified:
                return
            self._notified = True
            try:
                self._ssl.shutdown()
            except (SSL.Error, OSError):
                pass  # the peer is gone or the socket is already shut: nothing to tell

    def _writable(self) -> "select.poll":
        if self._write_poll is None:
            self._write_poll = _poller(self.socket, select.POLLOUT)
        return self._write_poll


# -- the C hot path -------------------------------------------------------------

# What netpool._speedups calls directly, in this order (see configure_tls there).
_C_FUNCTIONS = ("SSL_read", "SSL_write", "SSL_get_error", "SSL_pending", "ERR_get_error", "ERR_peek_error",
                "ERR_clear_error", "ERR_reason_error_string", "ERR_GET_REASON")


_ffi: Any = None  # pyOpenSSL's cffi FFI, once _openssl_functions found what it needs


@functools.cache  # the answer never changes: probe OpenSSL once, however many TLS listeners ask
def _openssl_functions() -> tuple[Optional[tuple[int, ...]], int]:
    """Addresses of _C_FUNCTIONS in the OpenSSL pyOpenSSL uses, and OpenSSL's "EOF without close_notify" reason.

    They come from cryptography's cffi library, which holds its own copy of
    OpenSSL: the system's libssl would be another library with other
    structures. (None, -1) when this pyOpenSSL or cryptography does not
    expose them: TLS then takes the Python path.
    """
    global _ffi
    try:
        from cryptography.hazmat.bindings.openssl.binding import Binding

        binding = Binding()
        ffi, lib = binding.ffi, binding.lib
        raw = lib.SSL_read.__self__  # the cffi Lib behind pyOpenSSL's wrapper module
        addresses = tuple(int(ffi.cast("uintptr_t", ffi.addressof(raw, name))) for name in _C_FUNCTIONS)
        eof_reason = lib.SSL_R_UNEXPECTED_EOF_WHILE_READING if lib.Cryptography_HAS_UNEXPECTED_EOF_WHILE_READING else -1
        probe = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
        if ffi.typeof(probe._ssl) is not ffi.typeof("SSL *"):  # pyOpenSSL keeps the session elsewhere now
            return None, -1
    except Exception:  # any other layout: stay in Python
        return None, -1
    _ffi = ffi
    return addresses, eof_reason


def _session_address(ssl_conn: SSL.Connection) -> int:
    return int(_ffi.cast("uintptr_t", ssl_conn._ssl))


# Whether the C hot path serves TLSTransport sessions (then each carries its
# SSL* address): set by use_c_path() when a TLS listener installs the path.
_C_PATH = False


def c_path_parts() -> tuple[type, Optional[tuple[int, ...]], int, int]:
    """What ``hot_path.install_tls`` takes: the transport class, OpenSSL's functions, its EOF reason, the write chunk."""
    return (TLSTransport, *_openssl_functions(), WRITE_CHUNK)


def use_c_path(on: bool) -> None:
    """Sessions made from now on carry what the C hot path needs (the listener calls this once it is installed)."""
    global _C_PATH
    _C_PATH = on
