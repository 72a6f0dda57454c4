"""``python -m netpool.examples.gateway``: seed, backend, frontend, or run (both at once)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from typing import Any, Optional

import click

import netpool

from .passwords import DEFAULT_SCHEME, HashScheme
from .seed import ProgressBar, seed as seed_users

DEFAULT_DB = os.path.join("build", "gateway", "users.db")


def _scheme(_ctx: Any, _param: Any, value: str) -> HashScheme:
    try:
        return HashScheme.parse(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _wait_for_signal() -> str:
    """Block the main thread until SIGINT or SIGTERM; return the signal's name."""
    stop = threading.Event()
    got: list[str] = []

    def on_signal(signum: int, _frame: Any) -> None:
        got.append(signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    while not stop.wait(1.0):
        pass
    return got[0]


# Help for the options several commands share.
DB_HELP = "SQLite file of the users."
BACKEND_PORT_HELP = "TCP port of the back end."
POOL_HELP = "Reuse back-end connections, or dial one per request."
METRICS_HELP = "Serve Prometheus metrics on 127.0.0.1:PORT/metrics."
LOG_LEVEL_HELP = "debug, info, warning or error."


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """The gateway example: HTTP front end -> pooled TCP back end -> SQLite users."""


@main.command()
@click.option("--db", default=DEFAULT_DB, show_default=True, help="SQLite file to create.")
@click.option("--users", "count", type=click.IntRange(1), default=100_000, show_default=True,
              help="How many users (user<i> / password<i>).")
@click.option("--scheme", default=str(DEFAULT_SCHEME), show_default=True, callback=_scheme,
              help="pbkdf2_sha256:ITERATIONS or scrypt:N:R:P.")
@click.option("--batch", type=click.IntRange(1), default=10_000, show_default=True, help="Rows per insert transaction.")
@click.option("--processes", type=click.IntRange(1), default=None, help="Hashing processes [default: one per core].")
@click.option("--force", is_flag=True, help="Replace a database that already has users.")
def seed(db: str, count: int, scheme: HashScheme, batch: int, processes: Optional[int], force: bool) -> None:
    """Create the users database with N seeded users, with a progress bar."""
    os.makedirs(os.path.dirname(os.path.abspath(db)), exist_ok=True)
    bar = ProgressBar(count)
    try:
        result = seed_users(db, count, scheme, batch=batch, processes=processes, progress=bar.update, force=force)
    except FileExistsError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(f"seeded {result.users:,} users into {db} in {result.seconds:.1f} s "
               f"({result.users / result.seconds:,.0f}/s, {result.scheme})")


@main.command()
@click.option("--db", default=DEFAULT_DB, show_default=True, help=DB_HELP)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=7001, show_default=True,
              help="TCP port of the back end (0: any free port).")
@click.option("--scheme", default=str(DEFAULT_SCHEME), show_default=True, callback=_scheme,
              help="Hashing scheme for new registrations.")
@click.option("--log-level", default="info", show_default=True, help=LOG_LEVEL_HELP)
def backend(db: str, host: str, port: int, scheme: HashScheme, log_level: str) -> None:
    """Serve the TCP back end (length-prefixed protocol, SQLite users)."""
    from .backend import start_backend

    _logging(log_level)
    os.makedirs(os.path.dirname(os.path.abspath(db)), exist_ok=True)
    try:
        listener = start_backend(db, host=host, port=port, scheme=scheme)
    except netpool.ListenError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"backend ready on {listener.address}", err=True)
    _wait_for_signal()
    listener.stop(grace=2.0)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="HTTP port (0: any free port).")
@click.option("--backend-host", default="127.0.0.1", show_default=True, help="Where the back end listens.")
@click.option("--backend-port", type=click.IntRange(1, 65535), default=7001, show_default=True,
              help=BACKEND_PORT_HELP)
@click.option("--pool/--no-pool", default=True, show_default=True, help=POOL_HELP)
@click.option("--max-open", type=click.IntRange(1), default=8, show_default=True,
              help="Pool size: a few per back-end core (more only adds threads fighting for its GIL).")
@click.option("--timeout", type=click.FloatRange(0, min_open=True), default=5.0, show_default=True,
              help="Deadline of each back-end call, seconds.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
              help=METRICS_HELP)
@click.option("--log-level", default="info", show_default=True, help=LOG_LEVEL_HELP)
def frontend(host: str, port: int, backend_host: str, backend_port: int, pool: bool, max_open: int,
             timeout: float, metrics_port: Optional[int], log_level: str) -> None:
    """Serve the HTTP front end, calling the back end over a connection pool."""
    _logging(log_level)
    _serve_frontend(host, port, backend_host, backend_port, pool, max_open, timeout, metrics_port)


def _serve_frontend(host: str, port: int, backend_host: str, backend_port: int, pool: bool, max_open: int,
                    timeout: float, metrics_port: Optional[int]) -> None:
    from .frontend import start_frontend

    # 1,000 keep-alive clients are 1,000 threads: small stacks keep that cheap.
    threading.stack_size(256 * 1024)
    metrics = netpool.Metrics() if metrics_port is not None else None
    try:
        listener, backend_pool = start_frontend(
            backend_port, backend_host=backend_host, host=host, port=port, pool=pool,
            max_open=max_open, timeout=timeout, metrics=metrics,
        )
    except netpool.ListenError as exc:
        raise click.ClickException(str(exc)) from None
    server = metrics.serve(metrics_port) if metrics is not None else None
    click.echo(f"frontend ready on http://{listener.address} (pool {'on' if pool else 'off'}, "
               f"back end {backend_host}:{backend_port})", err=True)
    try:
        _wait_for_signal()
    finally:
        listener.stop(grace=2.0)
        backend_pool.close()
        if server is not None:
            server.stop()
        s = backend_pool.stats()
        logging.getLogger("netpool.examples.gateway").info(
            "back-end pool: dialled %d, reused %d, timeouts %d, closed %s", s.dialled, s.reused, s.timeouts,
            dict(s.closed_by_reason))


@main.command()
@click.option("--db", default=DEFAULT_DB, show_default=True, help=DB_HELP)
@click.option("--users", "count", type=click.IntRange(1), default=100_000, show_default=True,
              help="Users to seed when the database does not exist yet.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="HTTP port.")
@click.option("--backend-port", type=click.IntRange(1, 65535), default=7001, show_default=True,
              help=BACKEND_PORT_HELP)
@click.option("--pool/--no-pool", default=True, show_default=True, help=POOL_HELP)
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None, help=METRICS_HELP)
@click.option("--log-level", default="info", show_default=True, help=LOG_LEVEL_HELP)
def run(db: str, count: int, port: int, backend_port: int, pool: bool, metrics_port: Optional[int], log_level: str) -> None:
    """Seed if needed, start the back end (its own process) and the front end; Ctrl-C stops both."""
    _logging(log_level)
    if not os.path.exists(db):
        click.echo(f"no database at {db}: seeding {count:,} users first", err=True)
        os.makedirs(os.path.dirname(os.path.abspath(db)), exist_ok=True)
        bar = ProgressBar(count)
        seed_users(db, count, DEFAULT_SCHEME, progress=bar.update)
    # Two processes, so the front end and the back end each get a core and an interpreter lock.
    child = subprocess.Popen(
        [sys.executable, "-m", "netpool.examples.gateway", "backend", "--db", db, "--port", str(backend_port),
         "--log-level", log_level],
        stderr=subprocess.PIPE, text=True,
    )
    try:
        assert child.stderr is not None
        for line in child.stderr:
            sys.stderr.write(line)
            if "backend ready" in line:
                break
        else:
            raise click.ClickException("the back end exited before it was ready")
        threading.Thread(target=_copy, args=(child.stderr,), daemon=True).start()
        click.echo(f"try: curl -s -XPOST localhost:{port}/login -d '{{\"username\":\"user1\",\"password\":\"password1\"}}'",
                   err=True)
        _serve_frontend("127.0.0.1", port, "127.0.0.1", backend_port, pool, 8, 5.0, metrics_port)
    finally:
        child.terminate()
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()


def _copy(stream: Any) -> None:
    for line in stream:
        sys.stderr.write(line)


if __name__ == "__main__":  # pragma: no cover
    main()
