"""Notice when files change (a renewed certificate), by looking at them now and then.

Certificate renewers (certbot, cert-manager, acme.sh) replace the files in
place or by rename, usually the certificate and the key one after the
other. A change is acted on once the files have looked the same for one
whole interval, so a pair caught half-written is not tried (and logged as
broken) on the way. Polling ``stat()`` costs nothing at the intervals that
make sense here (seconds) and needs no inotify, which misses renames of the
watched path itself and is absent on some file systems.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Callable, Optional

__all__ = ["FileWatch"]

log = logging.getLogger("netpool.file_watch")

Signature = tuple[Optional[tuple[int, int, int]], ...]


class FileWatch:
    """A thread that calls ``on_change()`` after ``paths`` changed and then stayed unchanged for ``interval`` seconds."""

    def __init__(self, paths: list[str], interval: float, on_change: Callable[[], object], *, name: str) -> None:
        self._paths = list(paths)
        self._interval = interval
        self._on_change = on_change
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"netpool-watch-{name}", daemon=True)

    def start(self) -> "FileWatch":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.ident is not None:
            self._thread.join()

    def _signature(self) -> Signature:
        marks: list[Optional[tuple[int, int, int]]] = []
        for path in self._paths:
            try:
                st = os.stat(path)
            except OSError:
                marks.append(None)  # missing for now (being replaced): a change like any other
            else:
                marks.append((st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(marks)

    def _run(self) -> None:
        acted_on = self._signature()
        seen = acted_on
        while not self._stopping.wait(self._interval):
            now = self._signature()
            if now != seen:
                seen = now  # changed since the last look: wait until it settles
                continue
            if now != acted_on:
                acted_on = now
                try:
                    self._on_change()
                except Exception:
                    log.exception("reacting to a change of %s failed", ", ".join(self._paths))
