"""How many connections each worker process holds, on a page of memory the supervisor shares with them.

systemd's ``STATUS=`` should say how many connections the whole server
holds, but the supervisor serves none itself and must not start threads
(it forks). Each worker writes its live count into its own slot of an
anonymous shared mapping made before the first fork; the parent adds the
slots up whenever it refreshes the status. A slot per worker index and
per reload parity, so that an old worker draining and its successor never
write over each other; the parent clears a slot when its worker ends.
"""

from __future__ import annotations

import mmap
import struct
import threading
from typing import Callable

__all__ = ["LiveBoard"]

_SLOT = struct.Struct("q")


class LiveBoard:
    """``2 * workers`` counters in shared memory (an aligned 8-byte store is never seen half-written)."""

    def __init__(self, workers: int) -> None:
        self._slots = 2 * workers
        self._memory = mmap.mmap(-1, max(mmap.PAGESIZE, self._slots * _SLOT.size))

    def slot(self, index: int, generation: int) -> int:
        return 2 * index + generation % 2

    def write(self, slot: int, value: int) -> None:
        _SLOT.pack_into(self._memory, slot * _SLOT.size, value)

    def total(self) -> int:
        return sum(_SLOT.unpack_from(self._memory, i * _SLOT.size)[0] for i in range(self._slots))

    def keep_writing(self, slot: int, live: Callable[[], int], stopped: Callable[[float], bool],
                     every: float = 1.0) -> threading.Thread:
        """In a worker: write ``live()`` into ``slot`` every ``every`` seconds until ``stopped(timeout)`` is True."""

        def run() -> None:
            while True:
                self.write(slot, live())
                if stopped(every):
                    self.write(slot, 0)
                    return

        thread = threading.Thread(target=run, name="netpool-live-board", daemon=True)
        thread.start()
        return thread
