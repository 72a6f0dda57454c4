"""The ``netpool`` command: click wiring only; all behaviour lives in the library.

Settings are layered: ListenerConfig's defaults, then ``--config FILE.toml``,
then the flags given on the command line. Whatever stops a server from
starting (a bad setting, a handler that cannot be imported, a certificate
that cannot be used, an address in use) exits with status 2 and one
``Error: ...`` line, never a traceback; click's usage lines are kept for
what they help with, a misspelt option.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
import sys
from importlib.metadata import entry_points
from typing import Any, Callable, Collection, Mapping, Optional

import click

from . import __version__
from .config import OVERFLOW_STRATEGIES, ListenerConfig, load_toml
from .errors import ConfigError, ListenError, TLSError
from .framing import FRAMERS
from .foreground import run_until_signal
from .fresh_import import FreshImports
from .malloc_arenas import cap_arenas
from .serve import configure_logging
from .socket_activation import choose_socket, describe, inherited_sockets
from .supervisor import serve_processes
from .tls_config import TLSConfig

log = logging.getLogger("netpool.cli")


class StartupError(click.ClickException):
    """The server cannot start: one ``Error: ...`` line and exit status 2 (a UsageError adds two usage lines)."""

    exit_code = 2

CLI_DEFAULT_PORT = 5555
ECHO_HANDLER = "netpool.echo:echo"
# Commands that other packages add (the XMPP example's `netpool xmpp`):
# entry points NAME = module:factory, factory() returning a click command.
COMMANDS_GROUP = "netpool.commands"
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ListenerConfig)}


def _default(name: str, command_defaults: Mapping[str, str]) -> str:
    if name in command_defaults:
        return f"[default: {command_defaults[name]}]"
    if name == "name":
        return "[default: echo, or MODULE for run]"
    value = CLI_DEFAULT_PORT if name == "port" else _DEFAULTS[name]
    if isinstance(value, tuple):
        value = ",".join(value)
    return f"[default: {value}]"


# (flag, config key, click type, help). Every flag defaults to "not given", so
# a value from --config is only overridden by a flag the user really typed.
# FLAG marks an on/off switch.
FLAG = "flag"
LISTENER_OPTIONS: list[tuple[str, str, Any, str]] = [
    ("--host", "host", str, "Address to bind; 0.0.0.0 or :: serves the network."),
    ("--port", "port", click.IntRange(0, 65535), "TCP port; 0 picks a free one."),
    ("--unix", "unix", click.Path(dir_okay=False), "Listen on this UNIX socket path instead of host:port."),
    ("--unix-mode", "unix_mode", str, "Octal file mode of the UNIX socket, e.g. 660."),
    ("--acceptors", "acceptors", click.IntRange(1, 1000), "Threads blocking in accept() on the socket."),
    ("--max-connections", "max_connections", click.IntRange(1), "Live connections allowed at once."),
    ("--overflow", "overflow", click.Choice(OVERFLOW_STRATEGIES),
     "At the limit: refuse new clients, grow the limit, or wait (clients queue in the backlog)."),
    ("--grow-step", "grow_step", click.IntRange(1), "How much --overflow grow raises the limit."),
    ("--refuse-message", "refuse_message", str, "Text sent to a refused client before closing (\\n allowed)."),
    ("--io", "io", click.Choice(["threads", "events"]),
     "threads: handlers may block (a blocked one gets its own thread); events: handlers must not block."),
    ("--io-threads", "io_threads", click.IntRange(1, 64), "How many epoll loop threads read the connections."),
    ("--workers", "workers", click.IntRange(0, 1024),
     "Run handlers on a pool of N worker threads (per-connection order kept); 0 = on the reading thread."),
    ("--framing", "framing", click.Choice(list(FRAMERS)),
     "How bytes become messages: raw chunks, lines, or 4-byte length prefixes."),
    ("--max-message-size", "max_message_size", click.IntRange(1), "Largest message in bytes; larger closes the connection."),
    ("--idle-timeout", "idle_timeout", click.FloatRange(0), "Seconds of silence before a client is closed; 0 = never."),
    ("--message-timeout", "message_timeout", click.FloatRange(0),
     "Seconds a message may take from first to last byte (line/length framing); 0 = no limit."),
    ("--send-timeout", "send_timeout", click.FloatRange(0, min_open=True), "Seconds a send may wait on a client that does not read."),
    ("--outbox-limit", "outbox_limit", click.IntRange(1),
     "Bytes conn.post may queue for one peer before it is closed as not reading (outbox_overflow)."),
    ("--backlog", "backlog", click.IntRange(1), "Kernel accept queue length."),
    ("--reuse-port", "reuse_port", FLAG,
     "Set SO_REUSEPORT, so independent servers can share the port (--processes needs no such thing)."),
    ("--acceptor-nice", "acceptor_nice", click.IntRange(0, 19),
     "How many nice steps below the rest of the process the acceptors run."),
    ("--worker-queue", "worker_queue", click.IntRange(1), "Calls queued per --workers thread before senders wait."),
    ("--handshake-timeout", "handshake_timeout", click.FloatRange(0, min_open=True),
     "Seconds a TLS (or PROXY) handshake may take."),
    ("--alarm-threshold", "alarm_threshold", click.IntRange(1),
     "Live connections at which on_alarm is called (and a warning logged)."),
    ("--alarm-cooldown", "alarm_cooldown", click.FloatRange(0), "Seconds between two alarms."),
    ("--processes", "processes", click.IntRange(1, 256),
     "Worker processes accepting on one shared socket; max-connections applies to each."),
    ("--proxy-protocol", "proxy_protocol", click.Choice(["off", "v1", "v2", "any"]),
     "Expect HAProxy's PROXY header (from a load balancer) before anything else."),
    ("--proxy-trusted", "proxy_trusted", str, "Comma-separated networks allowed to send PROXY headers."),
    ("--broker", "broker", str,
     "Where listener.broker keeps sessions: local (this process), or redis://HOST:PORT/DB to reach "
     "sessions in other processes and machines."),
    ("--name", "name", str, "Name used in log lines and thread names."),
]


# TLS flags: they fill ListenerConfig.ssl (a [ssl] table in a --config file).
TLS_OPTIONS: list[tuple[str, str, Any, str]] = [
    ("--certfile", "certfile", click.Path(dir_okay=False), "PEM certificate (chain): serve TLS. `netpool cert` makes one."),
    ("--keyfile", "keyfile", click.Path(dir_okay=False), "PEM private key, if not in --certfile."),
    ("--cafile", "cafile", click.Path(dir_okay=False), "CA certificates that sign acceptable client certificates."),
    ("--verify-client", "verify_client", click.Choice(["none", "optional", "required"]),
     "Ask for client certificates. [default: none]"),
    ("--tls-min-version", "min_version", click.Choice(["1.2", "1.3"]), "Lowest TLS version served. [default: 1.2]"),
    ("--alpn", "alpn", str, "Comma-separated ALPN protocols, in order of preference."),
    ("--ciphers", "ciphers", str,
     "OpenSSL cipher list for TLS 1.2. [default: Mozilla's intermediate suites, ECDHE with AEAD only]"),
    ("--tls-reload-interval", "reload_interval", click.FloatRange(0, min_open=True),
     "Look at the certificate and key files every N seconds; new handshakes take a renewed pair, live "
     "connections go on. [default: only on SIGHUP]"),
    ("--tls-mode", "mode", click.Choice(["implicit", "starttls"]),
     "implicit: TLS from the first byte; starttls: plain until the handler calls conn.start_tls(). "
     "[default: implicit]"),
]


def listener_options(func: Optional[Callable[..., Any]] = None, *, exclude: Collection[str] = (),
                     defaults: Optional[Mapping[str, str]] = None) -> Any:
    """Add the flags that mirror ListenerConfig and its TLS options, plus --config, --grace and --log-level.

    As ``@listener_options``, or ``@listener_options(exclude=..., defaults=...)``
    for a command that fixes some settings itself (their flags are left out:
    keys as in ListenerConfig, TLS ones as ``tls_KEY``) or has defaults of its
    own (shown in its help instead of ListenerConfig's).
    """
    if func is None:
        return functools.partial(listener_options, exclude=exclude, defaults=defaults)
    command_defaults = defaults or {}
    for flag, key, kind, text in reversed(TLS_OPTIONS):
        if f"tls_{key}" in exclude:
            continue
        if f"tls_{key}" in command_defaults:
            text = re.sub(r"\[default: [^]]*\]", f"[default: {command_defaults[f'tls_{key}']}]", text)
        func = _option(flag, f"tls_{key}", kind, text)(func)
    extra = [
        click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
                     default="info", show_default=True, help="Logging verbosity."),
        click.option("--grace", type=click.FloatRange(0), default=5.0, show_default=True,
                     help="Seconds live connections get to finish on SIGINT/SIGTERM."),
        click.option("--config", "config_file", type=click.Path(dir_okay=False),
                     help="TOML file with ListenerConfig keys; flags override it."),
        click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
                     help="Serve Prometheus metrics on http://127.0.0.1:PORT/metrics (see --metrics-host)."),
        click.option("--metrics-host", default="127.0.0.1", show_default=True,
                     help="Address for --metrics-port."),
    ]
    for flag, key, kind, text in reversed(LISTENER_OPTIONS):
        if key not in exclude:
            func = _option(flag, key, kind, f"{text} {_default(key, command_defaults)}")(func)
    for option in extra:
        func = option(func)
    return func


def _option(flag: str, key: str, kind: Any, text: str) -> Callable[..., Any]:
    if kind == FLAG:
        return click.option(flag, key, is_flag=True, default=None, help=text)
    return click.option(flag, key, type=kind, default=None, help=text)


# Settings without a flag, and why; `--help` of echo and run names them.
CONFIG_FILE_ONLY = {
    "ssl.password": "the key's password, kept off the command line where ps shows it",
    "ssl.sni": "a table of server names to certificates",
    "extra": "free-form settings for your handlers",
}
CONFIG_FILE_EPILOG = ("Settings only a --config file sets: " + "; ".join(
    f"{name} ({why})" for name, why in CONFIG_FILE_ONLY.items()) + ". help(netpool.ListenerConfig) documents every field.")


class _Commands(click.Group):
    """The netpool group: its own commands, and those other packages register (COMMANDS_GROUP).

    Registered ones are imported only when named (or listed by --help), so a
    broken one cannot break `netpool run`, and the library imports none of
    them itself.
    """

    def _registered(self) -> dict[str, Any]:
        return {ep.name: ep for ep in entry_points(group=COMMANDS_GROUP) if ep.name not in self.commands}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*self.commands, *self._registered()])

    def get_command(self, ctx: click.Context, name: str) -> Optional[click.Command]:
        if name in self.commands:
            return self.commands[name]
        ep = self._registered().get(name)
        if ep is None:
            return None
        try:
            command = ep.load()()
        except Exception as exc:
            raise click.ClickException(f"the command {name!r} ({ep.value}) cannot be loaded: {exc}") from exc
        if not isinstance(command, click.Command):
            raise click.ClickException(f"the command {name!r} ({ep.value}) did not build a click command")
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # As click's own, except that a registered command that cannot load
        # is listed with the reason instead of failing the whole --help.
        rows = []
        for name in self.list_commands(ctx):
            try:
                command = self.get_command(ctx, name)
            except click.ClickException as exc:
                rows.append((name, f"(cannot be loaded: {exc.message})"))
                continue
            if command is not None and not command.hidden:
                rows.append((name, command.get_short_help_str(formatter.width - 6 - len(name))))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="netpool")
def main() -> None:
    """netpool: TCP servers on a pool of acceptor threads.

    Serve an echo server with `netpool echo`, or your own handler
    with `netpool run module:handler`. Stop with Ctrl-C or SIGTERM: live
    connections get --grace seconds, then a one-line summary is logged.
    """


@main.command(epilog=CONFIG_FILE_EPILOG)
@listener_options
def echo(config_file: Optional[str], grace: float, log_level: str, metrics_port: Optional[int],
         metrics_host: str, **flags: Any) -> None:
    """Serve an echo server (netpool.echo): every message comes straight back.

    Try it with: nc 127.0.0.1 5555
    """
    def read_settings() -> dict[str, Any]:
        return {**read_settings_and_flags(config_file, flags, default_name="echo"), "handler": ECHO_HANDLER}

    serve_settings(_first(read_settings), grace, log_level, metrics_port, metrics_host, reload_settings=read_settings)


@main.command(epilog=CONFIG_FILE_EPILOG)
@click.argument("handler", metavar="MODULE:HANDLER")
@listener_options
@click.option("--on-connect", "on_connect", metavar="MODULE:FN", default=None,
              help="Call on_connect(conn) from MODULE:FN before a connection's first read.")
@click.option("--on-close", "on_close", metavar="MODULE:FN", default=None,
              help="Call on_close(conn, reason) from MODULE:FN once when a connection has closed.")
@click.option("--on-alarm", "on_alarm", metavar="MODULE:FN", default=None,
              help="Call on_alarm(listener, live) from MODULE:FN when --alarm-threshold is reached.")
def run(handler: str, config_file: Optional[str], grace: float, log_level: str, metrics_port: Optional[int],
        metrics_host: str, **flags: Any) -> None:
    """Serve handler(message, conn) imported from MODULE:HANDLER.

    The current directory is importable, so `netpool run mymodule:handler`
    finds ./mymodule.py; --on-connect, --on-close and --on-alarm (or
    on_connect, on_close, on_alarm in --config) name hooks the same way.
    """
    def read_settings() -> dict[str, Any]:
        default_name = handler.partition(":")[0]
        return {**read_settings_and_flags(config_file, flags, default_name=default_name), "handler": handler}

    serve_settings(_first(read_settings), grace, log_level, metrics_port, metrics_host, reload_settings=read_settings)


@main.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True,
              help="Directory to write cert.pem and key.pem into (created if missing).")
@click.option("--host", "hosts", multiple=True,
              help="Host name or IP address the certificate is for; repeat for several. "
                   "[default: localhost, 127.0.0.1, ::1]")
@click.option("--days", type=click.IntRange(1, 3650), default=365, show_default=True, help="Validity in days.")
@click.option("--force", is_flag=True, help="Overwrite cert.pem and key.pem if they exist.")
def cert(out_dir: str, hosts: tuple[str, ...], days: int, force: bool) -> None:
    """Write a self-signed development certificate and key, for trying TLS locally.

    Then: netpool echo --certfile OUT/cert.pem --keyfile OUT/key.pem
    and:  openssl s_client -connect 127.0.0.1:5555
    """
    from .devcert import DEFAULT_HOSTS, write_dev_certificate

    try:
        cert_path, key_path = write_dev_certificate(out_dir, hosts or DEFAULT_HOSTS, days, force=force)
    except FileExistsError as exc:
        raise StartupError(f"{exc}: pass --force to overwrite them") from None
    except (OSError, ValueError) as exc:
        raise StartupError(f"cannot write the certificate: {exc}") from None
    click.echo(f"wrote {cert_path} and {key_path} (self-signed, for {', '.join(hosts or DEFAULT_HOSTS)}; "
               f"valid {days} days; development only)")
    click.echo(f"serve it: netpool echo --certfile {cert_path} --keyfile {key_path}")


def _first(read_settings: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The settings at start: a problem in them is a usage error (at a reload, a logged line)."""
    try:
        return read_settings()
    except ConfigError as exc:
        raise StartupError(str(exc)) from None


def settings_from_flags(config_file: Optional[str], flags: dict[str, Any], default_name: str) -> dict[str, Any]:
    """Listener settings from --config and the flags of :func:`listener_options` (flags win); for serve_settings."""
    return _first(lambda: read_settings_and_flags(config_file, flags, default_name))


def read_settings_and_flags(config_file: Optional[str], flags: dict[str, Any], default_name: str) -> dict[str, Any]:
    """As :func:`settings_from_flags`, raising ConfigError (a reload reads them again and keeps serving on one)."""
    settings: dict[str, Any] = {"name": default_name}
    if config_file is not None:
        settings.update(load_toml(config_file))
    # Options of the process rather than of the listener (metrics) are not settings.
    flags = {k: v for k, v in flags.items() if not k.startswith("metrics_")}
    tls = {key[4:]: value for key, value in flags.items() if key.startswith("tls_") and value is not None}
    settings.update({key: value for key, value in flags.items() if not key.startswith("tls_") and value is not None})
    if flags.get("refuse_message") is not None:
        # Shell users type "busy\n" literally; TOML values are already unescaped.
        text = flags["refuse_message"].encode("latin-1", "backslashreplace").decode("unicode_escape")
        settings["refuse_message"] = text.encode()
    if isinstance(settings.get("proxy_trusted"), str):
        settings["proxy_trusted"] = [n.strip() for n in settings["proxy_trusted"].split(",") if n.strip()]
    if tls:
        if "alpn" in tls:
            tls["alpn"] = [p.strip() for p in tls["alpn"].split(",") if p.strip()]
        base = settings.get("ssl") or {}
        if not isinstance(base, dict):
            raise ConfigError("ssl", "in the config file it must be a table of TLS options")
        settings["ssl"] = {**base, **tls}
    for key in ("idle_timeout", "message_timeout"):
        if settings.get(key) == 0:
            settings[key] = None
    if "port" not in settings and "unix" not in settings:
        settings["port"] = CLI_DEFAULT_PORT
    return settings


def serve_settings(settings: dict[str, Any], grace: float, log_level: str, metrics_port: Optional[int] = None,
                   metrics_host: str = "127.0.0.1",
                   reload_settings: Optional[Callable[[], dict[str, Any]]] = None) -> None:
    """Validate ``settings`` and serve them until SIGINT/SIGTERM, as ``netpool run`` does (exits on errors).

    SIGHUP is a rolling reload: ``reload_settings()`` reads the settings
    again (the same ``settings`` without it), and the server's own modules
    are imported afresh (``fresh_import``).
    """
    configure_logging(log_level)
    cap_arenas()  # before any thread starts (and before --processes forks: workers inherit it)
    imports = FreshImports()
    metrics: Any = None
    if metrics_port is not None:
        from .metrics import Metrics

        metrics = Metrics()

    def build(values: dict[str, Any]) -> ListenerConfig:
        config = imports.load(lambda: ListenerConfig.from_mapping(values))
        if metrics is not None:
            config = config.replace(handler=metrics.instrument_handler(config.handler, listener=config.name))
        return config

    def reload_config() -> ListenerConfig:
        return build(reload_settings() if reload_settings is not None else settings)

    try:
        config = build(settings)
    except ConfigError as exc:
        raise StartupError(str(exc)) from None
    if metrics_port is not None and config.processes > 1:
        raise StartupError("--metrics-port serves one process's metrics; it cannot be combined with --processes")
    servers: list[Any] = []
    on_started: Optional[Callable[[Any], None]] = None
    on_replaced: Optional[Callable[[Any, Any], None]] = None
    if metrics is not None:

        def export(listener: Any) -> None:
            metrics.add_listener(listener)
            if listener.workers is not None:
                metrics.add_worker_pool(listener.workers)

        def attach_metrics(listener: Any) -> None:
            export(listener)
            servers.append(metrics.serve(metrics_port, metrics_host))  # which logs where it serves

        def move_metrics(old: Any, new: Any) -> None:
            metrics.remove(old)
            if old.workers is not None:
                metrics.remove(old.workers)
            export(new)

        on_started, on_replaced = attach_metrics, move_metrics

    try:
        sock = _activated_socket(config)
        if config.processes > 1:
            if isinstance(config.ssl, TLSConfig):  # what ListenerConfig made of the ssl settings
                # Only workers serve TLS, but a certificate they cannot load is
                # a start-up error, not workers failing (and restarted) forever.
                from .tls import build_server_context

                build_server_context(config.ssl, config.name)
            sys.exit(serve_processes(config, config.processes, grace, sock=sock, reload_config=reload_config))
        run_until_signal(config, grace, on_started, sock=sock, reload_config=reload_config, on_replaced=on_replaced)
    except (ListenError, TLSError) as exc:
        raise StartupError(str(exc)) from None
    finally:
        for server in servers:
            server.stop()


def _activated_socket(config: ListenerConfig) -> Optional[Any]:
    """The socket systemd passed (socket activation) for ``config``'s address, or None to bind it here."""
    sockets = inherited_sockets()
    if not sockets:
        return None
    sock = choose_socket(sockets, host=config.host, port=config.port, unix=config.unix)
    for other in sockets:
        if other is not sock:
            other.close()  # one listener per process: the others are not ours to serve
    log.info("%s: serving %s, the socket systemd passed (socket activation)", config.name, describe(sock))
    return sock


if __name__ == "__main__":  # pragma: no cover
    main()
