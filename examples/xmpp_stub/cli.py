"""``netpool xmpp`` (serve the XMPP example) and ``netpool xmpp adduser NAME``: click wiring only.

The group takes every listener and TLS flag ``netpool echo`` takes (netpool's
own ``listener_options``), plus the XMPP settings. netpool's CLI finds it
through the ``netpool.commands`` entry point (setup.cfg) and builds it by
calling :func:`command` when ``netpool xmpp`` is asked for; netpool itself
never imports the examples.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Optional

import click

from netpool import ConfigError
from netpool.broker import redact_url
from netpool.broker_url import shares_sessions
from netpool.cli import StartupError, listener_options, serve_settings, settings_from_flags
from netpool.config import load_toml

from .jid import InvalidJID, localpart
from .parser import Limits
from .server import LISTENER_DEFAULTS, XMPPServer
from .settings import ServerSettings
from .users import UserStore, UserStoreError

__all__ = ["command", "DEFAULT_USERS_FILE"]

DEFAULT_USERS_FILE = "xmpp-users.json"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # as netpool's own CLI logs

log = logging.getLogger("netpool.xmpp")


def serve(xmpp: dict[str, Any], config_file: Optional[str], grace: float, log_level: str,
          flags: dict[str, Any]) -> None:
    """Build the server from the XMPP options and serve it with netpool's CLI machinery."""

    logging.basicConfig(level=log_level.upper(), format=LOG_FORMAT, stream=sys.stderr)
    users = None
    if not xmpp["accept_any_password"]:
        try:
            users = UserStore.open(xmpp["users_file"])
        except UserStoreError as exc:
            raise StartupError(
                f"{exc}. Add users with `netpool xmpp adduser NAME --users {xmpp['users_file']}`, "
                "or pass --accept-any-password for a quick prototype"
            ) from None
    try:
        server = XMPPServer(ServerSettings(
            domain=xmpp["domain"],
            users=users,
            accept_any_password=xmpp["accept_any_password"],
            require_tls=xmpp["require_tls"],
            login_timeout=xmpp["login_timeout"],
            session_timeout=xmpp["session_timeout"],
            limits=Limits(max_stanza_bytes=xmpp["max_stanza_size"]),
        ))
        listener = settings_from_flags(config_file, flags, default_name=LISTENER_DEFAULTS["name"])
        if flags.get("port") is None and "unix" not in listener and not _config_has(config_file, "port"):
            listener["port"] = LISTENER_DEFAULTS["port"]
        settings = server.listener_settings(**listener)
    except (ConfigError, ValueError) as exc:
        raise StartupError(str(exc)) from None
    processes = settings.get("processes", 1)
    if processes > 1 and not shares_sessions(settings.get("broker")):
        # Each worker process would have its own session table: users on
        # different processes could neither see nor reach each other.
        raise StartupError(f"--processes {processes} needs a shared session table: add "
                               "--broker redis://HOST:PORT/DB (a Redis server every process reaches)")
    s = server.settings
    if s.accept_any_password:
        log.warning("--accept-any-password: anyone can log in as anyone; for prototypes on a trusted machine only")
    ssl = settings.get("ssl")
    if not ssl:
        tls = "no TLS (no certificate)"
    elif ssl.get("mode") != "starttls":
        tls = "implicit TLS"
    else:
        tls = "STARTTLS required" if s.require_tls else "STARTTLS offered"
    accounts = "any name and password" if users is None else f"users from {users.path} ({len(users)})"
    broker = settings.get("broker")
    sessions = f"sessions shared through {redact_url(broker)}" if shares_sessions(broker) else "sessions in this process"
    log.info("xmpp serving %s: %s; %s; %s; login within %gs, silent up to %gs",
             s.domain, accounts, tls, sessions, s.login_timeout, s.session_timeout)
    serve_settings(settings, grace, log_level)


def _config_has(config_file: Optional[str], key: str) -> bool:
    return config_file is not None and key in load_toml(config_file)


def add_user(users_file: str, name: str, password_stdin: bool, replace: bool) -> None:
    """Add a user (or change a password) in the user file; the password is prompted for, never echoed."""
    try:
        user = localpart(name)
    except InvalidJID as exc:
        raise StartupError(f"{name!r} cannot be a user name: {exc}") from None
    store = UserStore(users_file)
    try:
        existed = user in store
    except UserStoreError as exc:
        raise click.ClickException(str(exc)) from None
    if existed and not replace:
        raise StartupError(f"{user} is already in {users_file}: pass --replace to change the password")
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt="Repeat the password")
    try:
        store.add(user, password, replace=replace)
    except ValueError as exc:
        raise StartupError(str(exc)) from None
    except (KeyError, UserStoreError) as exc:  # KeyError: added by someone else meanwhile
        raise click.ClickException(f"cannot add {user}: {exc}") from None
    click.echo(f"{'changed the password of' if existed else 'added'} {user} in {users_file}")


def command() -> click.Group:
    """Build the ``netpool xmpp`` group (netpool's CLI calls this once to register it)."""
    @click.group(name="xmpp", invoke_without_command=True)
    @click.option("--domain", default="localhost", show_default=True,
                  help="The domain served: users log in as NAME@DOMAIN.")
    @click.option("--users", "users_file", type=click.Path(dir_okay=False), default=DEFAULT_USERS_FILE,
                  show_default=True, help="User file (names and salted password hashes); see `adduser`.")
    @click.option("--accept-any-password", is_flag=True,
                  help="Let anyone log in as anyone: for quick prototypes only.")
    @click.option("--require-tls", is_flag=True,
                  help="Refuse to log anyone in before STARTTLS (needs --certfile).")
    @click.option("--login-timeout", type=click.FloatRange(0, min_open=True), default=30.0, show_default=True,
                  help="Seconds a client gets from connecting to being logged in.")
    @click.option("--session-timeout", type=click.FloatRange(0, min_open=True), default=900.0, show_default=True,
                  help="Seconds a logged-in client may stay silent (clients keep alive every ~300 s).")
    @click.option("--max-stanza-size", type=click.IntRange(256), default=65536, show_default=True,
                  help="Largest stanza in bytes; a larger one closes the stream (policy-violation).")
    # The stream parser frames the bytes itself (framing is always raw), and
    # a certificate means STARTTLS unless --tls-mode says otherwise.
    @listener_options(exclude={"framing"}, defaults={
        "name": LISTENER_DEFAULTS["name"], "port": str(LISTENER_DEFAULTS["port"]), "tls_mode": "starttls",
        "idle_timeout": "the session timeout + 60"})
    @click.pass_context
    def xmpp(ctx: click.Context, domain: str, users_file: str, accept_any_password: bool, require_tls: bool,
             login_timeout: float, session_timeout: float, max_stanza_size: int, config_file: Optional[str],
             grace: float, log_level: str, **flags: Any) -> None:
        """Serve the XMPP example: a chat server real XMPP clients can log in to.

        \b
          netpool xmpp adduser alice                 # prompts for the password
          netpool xmpp --port 5222 --domain localhost
          netpool xmpp --certfile cert.pem --keyfile key.pem --require-tls

        With a certificate, STARTTLS is offered (--tls-mode implicit serves
        direct TLS instead). --idle-timeout is the socket-level backstop; it
        defaults to the session timeout plus a minute.
        """
        if ctx.invoked_subcommand is not None:
            return
        xmpp_options = {
            "domain": domain, "users_file": users_file, "accept_any_password": accept_any_password,
            "require_tls": require_tls, "login_timeout": login_timeout, "session_timeout": session_timeout,
            "max_stanza_size": max_stanza_size,
        }
        serve(xmpp_options, config_file, grace, log_level, flags)

    @xmpp.command("adduser")
    @click.argument("name")
    @click.option("--users", "users_file", type=click.Path(dir_okay=False), default=None,
                  help=f"User file to change. [default: the group's --users, {DEFAULT_USERS_FILE}]")
    @click.option("--password-stdin", is_flag=True, help="Read the password from standard input (for scripts).")
    @click.option("--replace", is_flag=True, help="Change the password of an existing user.")
    @click.pass_context
    def adduser(ctx: click.Context, name: str, users_file: Optional[str], password_stdin: bool,
                replace: bool) -> None:
        """Add user NAME to the user file, asking for the password (stored as a salted scrypt hash)."""
        parent = ctx.parent.params if ctx.parent is not None else {}
        add_user(users_file or parent.get("users_file") or DEFAULT_USERS_FILE, name, password_stdin, replace)
    return xmpp
