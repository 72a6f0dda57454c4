"""What `netpool run` does to its process before it serves, done by the benchmark's netpool servers too.

They call start_listener themselves (to pass a handler object), so they
would otherwise measure a process that the CLI never runs.
"""


def like_netpool_run() -> None:
    """Cap glibc's malloc arenas as the CLI does; a netpool from before the cap (bench --against) has none."""
    try:
        from netpool.malloc_arenas import cap_arenas
    except ImportError:
        return
    cap_arenas()
