"""ListenerConfig: one frozen, validated description of a listener.

Everything is checked in ``__post_init__`` so a bad value fails at
construction, naming the field, long before a socket is bound. The same keys
work as keyword arguments, as a plain dict (:meth:`ListenerConfig.from_mapping`)
and in a TOML file (:func:`load_toml`), which is what the CLI's ``--config``
reads.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import os
import tomllib
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Optional

from .broker_url import check_broker_url
from .checks import whole_number
from .errors import ConfigError
from .field_docs import document_fields
from .framing import FRAMERS, FramerFactory
from .loader import load_object
from .proxy_protocol import parse_networks
from .tls_config import TLSConfig

__all__ = ["ListenerConfig", "Handler", "OVERFLOW_STRATEGIES", "load_toml", "format_address"]

# handler(message, conn): called once per message, in order per connection,
# on the thread serving it (its I/O loop, or in thread mode a handler thread).
Handler = Callable[[bytes, Any], None]

OVERFLOW_STRATEGIES = ("refuse", "grow", "wait")
Overflow = Literal["refuse", "grow", "wait"]


def _timeout(name: str, value: Any, *, optional: bool) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        allowed = "a number of seconds or None" if optional else "a number of seconds"
        raise ConfigError(name, f"expected {allowed}, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(name, f"must be a positive number of seconds, got {value!r}")


# How each callable field is called, for the message that refuses an async one.
_SIGNATURES = {
    "handler": "def handler(message, conn)",
    "on_connect": "def on_connect(conn)",
    "on_close": "def on_close(conn, reason)",
    "on_alarm": "def on_alarm(listener, live)",
}


def _is_async(obj: Any) -> bool:
    """Whether calling ``obj`` only makes a coroutine (or async generator) that nobody would run.

    Sees through ``functools.partial`` and bound methods, and looks at an
    instance's ``__call__``; a class is never async (calling it builds an instance).
    """
    while isinstance(obj, functools.partial):
        obj = obj.func
    if inspect.iscoroutinefunction(obj) or inspect.isasyncgenfunction(obj):
        return True
    if inspect.isroutine(obj) or inspect.isclass(obj):
        return False
    call = getattr(type(obj), "__call__", None)
    return call is not None and (inspect.iscoroutinefunction(call) or inspect.isasyncgenfunction(call))


def _refuse_async(name: str, value: Any, spec: Optional[str]) -> None:
    """Raise ConfigError if ``value`` (imported from ``spec``, if given) is async: netpool never awaits it."""
    if not _is_async(value):
        return
    if spec is not None:
        what = repr(spec)
    else:
        while isinstance(value, functools.partial):
            value = value.func
        qualname = getattr(value, "__qualname__", None)
        what = qualname if isinstance(qualname, str) else f"{type(value).__qualname__}.__call__"
    kind = "handlers" if name == "handler" else "hooks"
    hint = " (blocking calls are fine in io='threads')" if name == "handler" else ""
    raise ConfigError(
        name,
        f"{what} is an async function, but netpool calls {kind} from its own threads and does not run coroutines; "
        f"write `{_SIGNATURES[name]}`{hint}, or run your asyncio code with "
        "asyncio.run_coroutine_threadsafe from a plain function",
    )


def _hook(name: str, value: Any) -> Any:
    """The hook ``value`` names: itself, or the object a ``"module:attr"`` string imports; callable or None."""
    spec = None
    if isinstance(value, str):
        spec, value = value, load_object(value, field=name)
        if not callable(value):
            raise ConfigError(name, f"expected a callable or None, {spec!r} is {value!r}")
    if value is not None and not callable(value):
        raise ConfigError(name, f"expected a callable or None, got {value!r}")
    _refuse_async(name, value, spec)
    return value


@document_fields  # the field docstrings below, into the class docstring help() shows
@dataclass(frozen=True, kw_only=True)
class ListenerConfig:
    """How a listener listens, admits, frames and hands messages to ``handler``.

    Defaults are chosen to be safe when nothing else is said: loopback only,
    64 KiB messages, a 5-minute idle timeout and a 30-second send timeout, so
    neither a silent client nor one that stops reading can pin a thread
    forever.
    """

    handler: Handler | str
    """``handler(message: bytes, conn: Connection)``, or a ``"module:attr"`` spec; a plain function, not
    ``async def`` (netpool never awaits)."""

    host: str = "127.0.0.1"
    """Address to bind: loopback by default; ``"0.0.0.0"`` or ``"::"`` to serve the network."""
    port: int = 0
    """TCP port; 0 picks a free one, reported as ``listener.port``."""
    unix: Optional[str] = None
    """Path of a UNIX domain socket to listen on instead of host/port."""
    unix_mode: Optional[int] = None
    """File mode for the UNIX socket (e.g. ``0o660``); None keeps the umask's."""
    reuse_port: bool = False
    """Set SO_REUSEPORT so several independent servers can listen on the same port.

    Not needed for ``processes``, whose workers share one socket: with a
    socket each, a worker that died took the clients queued on its own
    backlog with it."""
    processes: int = 1
    """Worker processes for ``netpool run``/``serve_processes``, all accepting on the
    one socket the parent binds, each with its own acceptors and its own
    max_connections (the limits are per process)."""
    backlog: int = 1024
    """Kernel accept queue length (Ranch's default); with overflow="wait" clients wait here."""

    acceptors: int = 2
    """Threads blocking in ``accept()`` on the one listening socket.

    Two, not Ranch's ten: under the GIL one acceptor runs at a time, and each
    connection that arrives while one is busy wakes another, which then
    queues for the GIL behind it and the I/O loop. On the benchmark's one
    server core, ten acceptors accepted about 15% fewer connections a second
    than one or two (median of five interleaved rounds: 14,200/s against
    16,800 and 16,400). The second one is there so a connection is still
    accepted while the first is held up (a GC pause, a slow log handler)."""
    acceptor_nice: int = 5
    """How much lower than the rest of the process the acceptors run (a nice increment, 0..19).

    A connection arriving while the I/O loop runs wakes an acceptor, which
    then only waits for the GIL the loop holds: two context switches for
    nothing. Five steps down, an acceptor waits for the loop to pause instead
    and then accepts at once; it still gets about a quarter of a core the
    loop keeps busy, so accepting never stops. In the connection-rate
    benchmark (server on one core) this raised connections/s by 7 to 19% in
    four interleaved rounds, and context switches per connection fell from
    1.3 to 0.7; with the server free to use both cores, by 10 to 20%. Ten
    steps down was slower than none: acceptors starve. 0 runs acceptors at
    the process's priority."""
    max_connections: int = 1024
    """Live connections allowed at once."""
    overflow: Overflow = "refuse"
    """At the limit: "refuse" closes the newcomer, "grow" raises the limit, "wait" stops accepting."""
    grow_step: int = 128
    """How much "grow" raises the limit each time it is reached."""
    refuse_message: Optional[bytes] = None
    """Bytes sent to a refused client before closing (a protocol's "busy" line). Never sent on an
    implicit-TLS listener: plaintext there is a broken record to the client, which gets a clean close."""

    io: Literal["threads", "events"] = "threads"
    """Both read through ``io_threads`` epoll loops. "threads": handlers may block; a connection whose
    handler blocks gets a thread of its own. "events": handlers must not block (or use ``workers``)."""
    io_threads: int = 1
    """How many epoll loops share the connections."""

    workers: int = 0
    """Run handlers on a pool of this many worker threads (0: on the reading thread).
    Each connection's messages still reach the handler one at a time, in order."""
    worker_queue: int = 64
    """Messages that may wait per connection for a worker before its reader is held
    (threads) or the connection is closed as overloaded (events)."""

    framing: str | FramerFactory = "raw"
    """"raw" (each received chunk), "line", "length" (4-byte big-endian), or a framer factory."""
    max_message_size: int = 65536
    """Largest message accepted; a larger one closes that connection (message_too_large)."""
    idle_timeout: Optional[float] = 300.0
    """Seconds without a byte from the peer before the connection is closed; None = never."""
    message_timeout: Optional[float] = 60.0
    """Seconds a message may take from its first byte to its last (line and length framing);
    None = no limit. Stops slow-loris clients that trickle bytes to dodge idle_timeout."""
    send_timeout: float = 30.0
    """Seconds a send may wait for a peer that does not read before the connection is closed."""
    handshake_timeout: float = 10.0
    """Seconds a TLS handshake may take."""
    outbox_limit: int = 1 << 20
    """Bytes that may wait for one peer through ``conn.post`` (messages from other connections, other
    processes) beyond what the kernel took. A peer that falls further behind is closed
    (``outbox_overflow``): a reader that stops never holds up the senders, and never grows memory."""
    ssl: Optional[TLSConfig | Mapping[str, Any]] = None
    """TLS options (a TLSConfig or a dict of its keys); None or empty serves plain TCP."""

    proxy_protocol: Literal["off", "v1", "v2", "any"] = "off"
    """Expect a PROXY protocol header (HAProxy's) from a load balancer before anything else."""
    proxy_trusted: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    """Networks of the balancers allowed to send PROXY headers; other peers are refused."""

    on_connect: Optional[Callable[[Any], None] | str] = None
    """``on_connect(conn)``: called before the connection's first read, on the thread serving it;
    or a ``"module:attr"`` spec."""
    on_close: Optional[Callable[[Any, str], None] | str] = None
    """``on_close(conn, reason)``: called once when the connection has closed; or a ``"module:attr"`` spec."""

    alarm_threshold: Optional[int] = None
    """Live count at which ``on_alarm`` fires (Ranch's alarms)."""
    on_alarm: Optional[Callable[[Any, int], None] | str] = None
    """``on_alarm(listener, live)``; runs where on_connect does (never on an acceptor), just before it.
    A ``"module:attr"`` spec is accepted too."""
    alarm_cooldown: float = 5.0
    """Minimum seconds between two alarms."""

    broker: Optional[str] = None
    """Where ``listener.broker`` keeps its sessions: None (or "local") for this process alone;
    ``"redis://HOST:PORT/DB"`` to share them with other processes and machines (needs redis-py)."""

    name: str = "netpool"
    """Listener name, used in thread names and log lines."""

    extra: Mapping[str, Any] = field(default_factory=dict, repr=False)
    """Free-form settings for handlers (``listener.config.extra``); netpool ignores them."""

    def __post_init__(self) -> None:
        handler, spec = self.handler, None
        if isinstance(handler, str):
            spec, handler = handler, load_object(handler, field="handler")
            object.__setattr__(self, "handler", handler)
        if not callable(handler):
            raise ConfigError("handler", f"expected a callable handler(message, conn), got {handler!r}")
        _refuse_async("handler", handler, spec)

        if not isinstance(self.host, str):
            raise ConfigError("host", f"expected a host name or address, got {self.host!r}")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ConfigError("port", f"expected 0..65535, got {self.port!r}")
        if self.unix is not None and (not isinstance(self.unix, str) or not self.unix):
            raise ConfigError("unix", f"expected a socket file path, got {self.unix!r}")
        if self.unix_mode is not None:
            if isinstance(self.unix_mode, str):
                try:
                    object.__setattr__(self, "unix_mode", int(self.unix_mode, 8))
                except ValueError:
                    raise ConfigError("unix_mode", f"expected an octal mode like 660, got {self.unix_mode!r}") from None
            if isinstance(self.unix_mode, bool) or not isinstance(self.unix_mode, int) or not 0 <= self.unix_mode <= 0o777:
                raise ConfigError("unix_mode", f"expected a file mode 0..0o777, got {self.unix_mode!r}")
            if self.unix is None:
                raise ConfigError("unix_mode", "only applies together with unix=PATH")
        whole_number("backlog", self.backlog)
        whole_number("processes", self.processes)
        if not isinstance(self.reuse_port, bool):
            raise ConfigError("reuse_port", f"expected true or false, got {self.reuse_port!r}")
        whole_number("acceptors", self.acceptors)
        if self.acceptors > 1000:
            raise ConfigError("acceptors", f"{self.acceptors} threads in accept() buys nothing; use at most 1000")
        whole_number("acceptor_nice", self.acceptor_nice, minimum=0)
        if self.acceptor_nice > 19:
            raise ConfigError("acceptor_nice", f"nice increments go up to 19, got {self.acceptor_nice}")
        whole_number("max_connections", self.max_connections)
        if self.overflow not in OVERFLOW_STRATEGIES:
            raise ConfigError("overflow", f"expected one of {', '.join(OVERFLOW_STRATEGIES)}, got {self.overflow!r}")
        whole_number("grow_step", self.grow_step)
        if isinstance(self.refuse_message, str):
            object.__setattr__(self, "refuse_message", self.refuse_message.encode())
        if self.refuse_message is not None:
            if not isinstance(self.refuse_message, (bytes, bytearray)):
                raise ConfigError("refuse_message", f"expected bytes or str, got {self.refuse_message!r}")
            if len(self.refuse_message) > 4096:
                # It is sent without blocking the acceptor: it must fit the socket buffer.
                raise ConfigError("refuse_message", "keep it short: at most 4096 bytes")
            object.__setattr__(self, "refuse_message", bytes(self.refuse_message))

        if self.io not in ("threads", "events"):
            raise ConfigError("io", f"expected threads or events, got {self.io!r}")
        whole_number("io_threads", self.io_threads)
        whole_number("workers", self.workers, minimum=0)
        whole_number("worker_queue", self.worker_queue)
        if isinstance(self.framing, str):
            if self.framing not in FRAMERS:
                raise ConfigError("framing", f"expected one of {', '.join(FRAMERS)} or a framer factory, got {self.framing!r}")
        elif not callable(self.framing):
            raise ConfigError("framing", f"expected a name or a callable framer factory, got {self.framing!r}")
        whole_number("max_message_size", self.max_message_size)
        _timeout("idle_timeout", self.idle_timeout, optional=True)
        _timeout("send_timeout", self.send_timeout, optional=False)
        _timeout("message_timeout", self.message_timeout, optional=True)
        _timeout("handshake_timeout", self.handshake_timeout, optional=False)
        whole_number("outbox_limit", self.outbox_limit)
        tls = TLSConfig.coerce(self.ssl)
        object.__setattr__(self, "ssl", tls)
        if self.workers and tls is not None and tls.mode == "starttls":
            raise ConfigError("workers", "STARTTLS must run between reads, on the reading thread: "
                                         "use workers=0 with ssl mode starttls")

        if self.proxy_protocol not in ("off", "v1", "v2", "any"):
            raise ConfigError("proxy_protocol", f"expected off, v1, v2 or any, got {self.proxy_protocol!r}")
        trusted = (self.proxy_trusted,) if isinstance(self.proxy_trusted, str) else tuple(self.proxy_trusted)
        try:
            parse_networks(trusted)
        except ValueError as exc:
            raise ConfigError("proxy_trusted", str(exc)) from None
        object.__setattr__(self, "proxy_trusted", trusted)
        for hook in ("on_connect", "on_close", "on_alarm"):
            object.__setattr__(self, hook, _hook(hook, getattr(self, hook)))
        if self.alarm_threshold is not None:
            whole_number("alarm_threshold", self.alarm_threshold)
            if self.on_alarm is None:
                raise ConfigError("alarm_threshold", "set on_alarm too: the callback the alarm calls")
        _timeout("alarm_cooldown", self.alarm_cooldown, optional=False)
        check_broker_url(self.broker)
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError("name", f"expected a non-empty string, got {self.name!r}")

    @property
    def address(self) -> str:
        """Where this config listens, as people write it (``host:port``, ``[::1]:port`` or the path)."""
        return self.unix if self.unix is not None else format_address((self.host, self.port))

    def replace(self, **changes: Any) -> "ListenerConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> "ListenerConfig":
        """Build from a dict (or parsed TOML); an unknown key is an error naming it."""
        if not isinstance(data, Mapping):
            raise ConfigError("config", f"expected a ListenerConfig or a mapping, got {type(data).__name__}")
        _reject_unknown(data, "")
        if "handler" not in data:
            raise ConfigError("handler", "missing: the function called for each message")
        return cls(**data)

    @classmethod
    def coerce(cls, config: "ListenerConfig | Mapping[str, Any]") -> "ListenerConfig":
        # mypy keeps ListenerConfig in the else (cls may be a subclass): from_mapping refuses any non-mapping.
        return config if isinstance(config, cls) else cls.from_mapping(config)  # type: ignore[arg-type]


def load_toml(path: str) -> dict[str, Any]:
    """Read a TOML file of listener settings (same keys as ListenerConfig).

    Relative file paths in it (``unix``, and ``certfile``, ``keyfile``,
    ``cafile`` and each ``sni`` pair's files under ``[ssl]``) are taken
    relative to the file's own folder, not to the current directory, and
    returned absolute; absolute paths are kept as written.
    """
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", f"{path} is not valid TOML: {exc}") from None
    _reject_unknown(data, f" in {path}")
    _resolve_file_paths(data, os.path.dirname(os.path.abspath(path)))
    return data


def _resolve_file_paths(data: dict[str, Any], folder: str) -> None:
    """Make the relative paths of a TOML file's settings relative to ``folder``, in place.

    Values of the wrong type or empty are left alone for validation to refuse,
    naming the field; so is an abstract UNIX socket name (leading NUL).
    """
    def resolve(table: Any, key: str) -> None:
        value = table.get(key)
        if isinstance(value, str) and value and not value.startswith("\0"):
            table[key] = os.path.join(folder, value)  # join keeps an absolute value as it is

    resolve(data, "unix")
    ssl = data.get("ssl")
    if isinstance(ssl, dict):
        for key in ("certfile", "keyfile", "cafile"):
            resolve(ssl, key)
        sni = ssl.get("sni")
        if isinstance(sni, dict):
            for pair in sni.values():
                if isinstance(pair, dict):
                    resolve(pair, "certfile")
                    resolve(pair, "keyfile")


def format_address(address: Any) -> str:
    """``host:port``, ``[v6]:port``, or a UNIX socket path, for logs and messages."""
    if isinstance(address, tuple) and len(address) >= 2:
        host = address[0]
        return f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}"
    return str(address) or "unix socket"


def _reject_unknown(data: Mapping[str, Any], where: str) -> None:
    known = {f.name for f in dataclasses.fields(ListenerConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(unknown[0], f"unknown setting{where} (known: {', '.join(sorted(known))})")
