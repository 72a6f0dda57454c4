"""XMPPServer: the netpool side of the example, and all that the streams of one server share.

netpool calls three functions per connection, each on that connection's own
thread: ``on_connect`` (a new :class:`ClientStream`), the handler with each
chunk of bytes as it arrives (framing "raw": the stream parser does its own
framing), and ``on_close``. That is the whole contract between a protocol
and netpool; everything else here is the protocol's.

Run it::

    server = XMPPServer(ServerSettings(domain="localhost", users=UserStore.open("xmpp-users.json")))
    listener = server.start(port=5222, ssl={"certfile": "cert.pem", "keyfile": "key.pem", "mode": "starttls"})
    listener.wait()
"""

from __future__ import annotations

import logging
from typing import Any

import netpool
from netpool import ConfigError, ConnectionClosed, ListenerConfig, SendTimeout

from .deadlines import Deadlines
from .router import Router
from .settings import ServerSettings
from .stream import ClientStream

__all__ = ["XMPPServer", "LISTENER_DEFAULTS"]

log = logging.getLogger("netpool.xmpp")

# The kernel-level idle timeout stays as a backstop behind the streams' own
# deadlines, far enough behind that the deadlines always fire first and send
# their connection-timeout stream error.
BACKSTOP_MARGIN = 60.0

LISTENER_DEFAULTS: dict[str, Any] = {"name": "xmpp", "port": 5222, "framing": "raw"}


class XMPPServer:
    """One XMPP domain served over netpool: settings, the router and the deadline keeper."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.router = Router(settings.domain)
        self.deadlines = Deadlines()

    # -- netpool's hooks (each on the connection's own thread) ------------------------

    def on_connect(self, conn: netpool.Connection) -> None:
        stream = ClientStream(self, conn)
        conn.state["xmpp"] = stream
        self.deadlines.watch(stream)

    def handle(self, data: bytes, conn: netpool.Connection) -> None:
        stream: ClientStream = conn.state["xmpp"]
        try:
            stream.receive(data)
        except (ConnectionClosed, SendTimeout):
            return  # this client's connection is already closing; netpool knows why
        except Exception:
            # A bug must cost one stream, not the server: say so, and close only this one.
            log.exception("conn %d: the XMPP handler failed; closing the stream", conn.id)
            stream.close("internal-server-error")

    def on_close(self, conn: netpool.Connection, reason: str) -> None:
        stream = conn.state.get("xmpp")
        if stream is not None:
            stream.closed(reason)

    # -- for the streams ----------------------------------------------------------------

    def check_password(self, user: str, password: str) -> bool:
        """Whether ``password`` logs ``user`` in (always, with accept_any_password)."""
        if self.settings.accept_any_password:
            return True
        assert self.settings.users is not None
        return self.settings.users.verify(user, password)

    # -- listening ----------------------------------------------------------------------

    def listener_settings(self, **listener: Any) -> dict[str, Any]:
        """netpool listener settings for this server; ``listener`` holds any ListenerConfig keys.

        The hooks and raw framing are the server's; the idle timeout defaults
        to a backstop behind the session timeout; TLS given without a mode
        means STARTTLS, as on XMPP's port 5222. A dict rather than a
        ListenerConfig so netpool's CLI can serve it as it serves any other.
        """
        settings = {**LISTENER_DEFAULTS, "idle_timeout": self.settings.session_timeout + BACKSTOP_MARGIN,
                    "outbox_limit": self.settings.max_outbound_bytes, **listener}
        for hook in ("handler", "on_connect", "on_close"):
            if settings.get(hook) is not None:
                raise ConfigError(hook, "the XMPP server provides its own")
        if settings["framing"] != "raw":
            raise ConfigError("framing", "the XMPP server parses the stream itself: framing must be raw")
        ssl = settings.get("ssl")
        if isinstance(ssl, dict) and ssl and "mode" not in ssl:
            settings["ssl"] = {**ssl, "mode": "starttls"}
        if self.settings.require_tls and not settings.get("ssl"):
            raise ConfigError("require_tls", "requiring TLS needs a certificate (certfile and keyfile)")
        settings.update(handler=self.handle, on_connect=self.on_connect, on_close=self.on_close)
        return settings

    def listener_config(self, **listener: Any) -> ListenerConfig:
        """The same as :meth:`listener_settings`, validated into a ListenerConfig."""
        return ListenerConfig.from_mapping(self.listener_settings(**listener))

    def start(self, **listener: Any) -> netpool.Listener:
        """Start serving (see :meth:`listener_config`); returns the running listener."""
        return netpool.start_listener(self.listener_config(**listener))
