"""Serving from a script as the ``netpool`` command does: logging, signals, a graceful stop and a summary.

``start_listener(...)`` then ``listener.wait()`` is the building block; a
script that wants to behave like a server (Ctrl-C or SIGTERM stops it
gracefully, SIGHUP reloads, the summary is logged) calls :func:`serve`
instead of handling signals itself.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Mapping

from .config import ListenerConfig
from .foreground import run_until_signal
from .malloc_arenas import cap_arenas
from .supervisor import serve_processes

__all__ = ["serve", "configure_logging", "LOG_FORMAT"]

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str = "info") -> None:
    """Log to stderr as the CLI does, unless the program has set up logging of its own."""
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, stream=sys.stderr)


def serve(config: ListenerConfig | Mapping[str, Any], *, grace: float = 5.0, log_level: str = "info") -> None:
    """Serve ``config`` until SIGINT (Ctrl-C) or SIGTERM, then stop within ``grace`` seconds and log a summary.

    What ``netpool run`` does, for a script: it logs where it listens, each
    reload and the summary at the end (to stderr, unless logging is already
    set up); SIGHUP is a rolling reload with the same config (certificates
    read again); with ``processes > 1`` it forks the workers and supervises
    them; glibc's malloc arenas are capped (``malloc_arenas``). Raises
    ConfigError, ListenError or TLSError if it cannot start.
    """
    config = ListenerConfig.coerce(config)
    configure_logging(log_level)
    cap_arenas()
    if config.processes > 1:
        serve_processes(config, config.processes, grace)
    else:
        run_until_signal(config, grace)
