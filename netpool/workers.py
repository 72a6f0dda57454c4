"""A bounded pool of worker threads with round-robin placement and work stealing.

Why bounded everywhere: a server that queues without limit turns a burst
into unbounded memory and unbounded latency; one that blocks the submitter
stalls whoever feeds it (an acceptor, a connection's reader). Here every
queue has a size, and when all are full :meth:`WorkerPool.submit` raises
:class:`~netpool.Overloaded` at once, so the caller can shed the load
(answer "busy", close) instead of waiting.

Placement (the Go seed's two-tier balancer)::

    submit -> next worker round-robin whose queue is under half full
           -> else the shared overflow queue
           -> else Overloaded
    idle worker -> its own queue -> the overflow queue -> steal the oldest
                   task of the longest other queue -> sleep

Stealing keeps every thread busy when one worker's queue holds slow tasks.
Stealing means no task is tied to a worker, so plain ``submit`` keeps no
order between tasks. For work that must stay in order (one connection's
messages) use a :class:`Lane`: a serial executor on top of the pool that
runs its tasks one at a time, in order, on whichever worker is free.

Ownership: the pool owns its threads (named ``netpool-worker-NAME-i``) from
construction to :meth:`WorkerPool.stop`, which joins them. A task that
raises is logged (or given to ``on_error``) and its worker goes on: workers
only exit at stop.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from .checks import whole_number
from .errors import ConfigError, Overloaded, WorkerPoolStopped

__all__ = ["WorkerPool", "WorkerPoolStats", "Lane"]

log = logging.getLogger("netpool.workers")

Task = tuple[Callable[..., Any], tuple[Any, ...]]
ErrorHook = Callable[[BaseException, Callable[..., Any], tuple[Any, ...]], None]


@dataclass(frozen=True)
class WorkerPoolStats:
    """A consistent snapshot of a worker pool."""

    name: str
    workers: int
    queue_size: int
    overflow_size: int
    queued: tuple[int, ...]
    """Tasks waiting in each worker's own queue."""
    overflow: int
    """Tasks waiting in the shared overflow queue."""
    busy: int
    """Workers running a task right now."""
    submitted: int
    completed: int
    errors: int
    """Tasks that raised."""
    steals: int
    """Tasks a worker took from the overflow queue or from another worker's queue."""
    rejected: int
    """Submissions refused with Overloaded."""
    dropped: int
    """Queued tasks thrown away by ``stop(drain=False)``."""


class _Worker:
    __slots__ = ("index", "queue", "cond", "idle", "thread")

    def __init__(self, index: int, lock: threading.Lock) -> None:
        self.index = index
        self.queue: collections.deque[Task] = collections.deque()
        self.cond = threading.Condition(lock)
        self.idle = False
        self.thread: Optional[threading.Thread] = None


class WorkerPool:
    """``workers`` threads, each with a queue of ``queue_size``, plus a shared overflow queue.

    :param workers: number of threads (fixed for the pool's life).
    :param queue_size: capacity of each worker's queue; ``submit`` fills a
        queue only to half, leaving the balancer room to spread a burst.
    :param overflow_size: capacity of the shared queue idle workers steal
        from (default ``workers * queue_size``).
    :param on_error: ``on_error(exc, fn, args)`` for a task that raised
        (default: log it with its traceback).
    """

    def __init__(
        self,
        workers: int = 4,
        *,
        queue_size: int = 64,
        overflow_size: Optional[int] = None,
        name: str = "workers",
        on_error: Optional[ErrorHook] = None,
    ) -> None:
        whole_number("workers", workers)
        whole_number("queue_size", queue_size)
        if workers > 1024:
            raise ConfigError("workers", f"{workers} threads is past what one interpreter lock can use; use at most 1024")
        overflow_size = workers * queue_size if overflow_size is None else overflow_size
        whole_number("overflow_size", overflow_size, minimum=0)
        if on_error is not None and not callable(on_error):
            raise ConfigError("on_error", f"expected a callable on_error(exc, fn, args), got {on_error!r}")
        self.name = name
        self.queue_size = queue_size
        self.overflow_size = overflow_size
        self.on_error = on_error
        self._lock = threading.Lock()
        self._workers = [_Worker(i, self._lock) for i in range(workers)]
        self._idle: list[_Worker] = []
        self._overflow: collections.deque[Task] = collections.deque()
        self._next = 0
        self._stopping = False
        self._busy = 0
        self._submitted = 0
        self._completed = 0
        self._errors = 0
        self._steals = 0
        self._rejected = 0
        self._dropped = 0
        for worker in self._workers:
            thread = threading.Thread(
                target=self._run, args=(worker,), name=f"netpool-worker-{name}-{worker.index}", daemon=True
            )
            worker.thread = thread
            thread.start()

    def __repr__(self) -> str:
        return f"<WorkerPool {self.name} workers={len(self._workers)}{' stopping' if self._stopping else ''}>"

    @property
    def size(self) -> int:
        return len(self._workers)

    # -- submitting ------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue ``fn(*args)``; never blocks. Raises Overloaded when every queue is full.

        No result is returned and no order is kept between tasks (use a
        :class:`Lane` for order); exceptions go to ``on_error``.
        """
        task = (fn, args)
        with self._lock:
            if self._stopping:
                raise WorkerPoolStopped(f"worker pool {self.name} is stopping; it takes no more work")
            workers = self._workers
            n = len(workers)
            start = self._next
            half = self.queue_size
            for i in range(n):
                worker = workers[(start + i) % n]
                if 2 * len(worker.queue) < half:
                    worker.queue.append(task)
                    self._next = (start + i + 1) % n
                    self._submitted += 1
                    self._wake_locked(worker)
                    return
            if len(self._overflow) < self.overflow_size:
                self._overflow.append(task)
                self._submitted += 1
                self._wake_locked(None)
                return
            self._rejected += 1
            overflow = len(self._overflow)
        raise Overloaded(
            f"worker pool {self.name} is overloaded: all {n} worker queues are half full "
            f"and the overflow queue holds {overflow}; shed this work, or raise workers/queue_size"
        )

    def _wake_locked(self, preferred: Optional[_Worker]) -> None:
        # Wake the worker the task went to if it sleeps; otherwise any idle
        # worker, which will steal the task from the busy one.
        if preferred is not None and preferred.idle:
            self._idle.remove(preferred)
            worker = preferred
        elif self._idle:
            worker = self._idle.pop()
        else:
            return
        worker.idle = False
        worker.cond.notify()

    # -- the workers -----------------------------------------------------------

    def _run(self, me: _Worker) -> None:
        lock = self._lock
        finished = False
        while True:
            with lock:
                if finished:
                    self._busy -= 1
                    self._completed += 1
                task = self._next_task_locked(me)
                if task is None:
                    return  # stopping and nothing left anywhere
                self._busy += 1
            fn, args = task
            try:
                fn(*args)
            except BaseException as exc:  # a task must never kill its worker
                with lock:
                    self._errors += 1
                self._report(exc, fn, args)
            finished = True

    def _next_task_locked(self, me: _Worker) -> Optional[Task]:
        while True:
            if me.queue:
                return me.queue.popleft()
            if self._overflow:
                self._steals += 1
                return self._overflow.popleft()
            victim = max(self._workers, key=lambda w: len(w.queue))
            if victim.queue:
                self._steals += 1
                return victim.queue.popleft()  # the oldest: it has waited longest
            if self._stopping:
                return None
            me.idle = True
            self._idle.append(me)
            while me.idle and not self._stopping:
                me.cond.wait()
            if me.idle:  # woken by stop, not by a submit
                me.idle = False
                self._idle.remove(me)

    def _report(self, exc: BaseException, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        hook = self.on_error
        if hook is not None:
            try:
                hook(exc, fn, args)
                return
            except Exception:
                log.exception("worker pool %s: on_error raised", self.name)
        log.error("worker pool %s: task %r raised", self.name, fn, exc_info=exc)

    # -- lifecycle -------------------------------------------------------------

    def stop(self, *, drain: bool = True, timeout: float = 5.0) -> bool:
        """Take no more work, finish (``drain``) or drop what is queued, join every worker.

        Returns True when all threads were joined within ``timeout``; a task
        stuck in user code past it is logged and left running (daemon).
        Safe to call more than once, but not from a worker of this pool.
        """
        with self._lock:
            self._stopping = True
            if not drain:
                dropped = len(self._overflow) + sum(len(w.queue) for w in self._workers)
                self._dropped += dropped
                self._overflow.clear()
                for worker in self._workers:
                    worker.queue.clear()
            for worker in self._idle:
                worker.idle = False
                worker.cond.notify()
            self._idle.clear()
        deadline = time.monotonic() + timeout
        current = threading.current_thread()
        stuck = 0
        for worker in self._workers:
            thread = worker.thread
            if thread is None or thread is current:
                continue
            thread.join(max(0.0, deadline - time.monotonic()))
            stuck += thread.is_alive()
        if stuck:
            log.warning("worker pool %s: %d worker(s) still running a task after %g s; not waiting", self.name, stuck, timeout)
        return not stuck

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def stats(self) -> WorkerPoolStats:
        with self._lock:
            return WorkerPoolStats(
                name=self.name,
                workers=len(self._workers),
                queue_size=self.queue_size,
                overflow_size=self.overflow_size,
                queued=tuple(len(w.queue) for w in self._workers),
                overflow=len(self._overflow),
                busy=self._busy,
                submitted=self._submitted,
                completed=self._completed,
                errors=self._errors,
                steals=self._steals,
                rejected=self._rejected,
                dropped=self._dropped,
            )

    def lane(self, *, max_pending: int = 64, on_error: Optional[ErrorHook] = None, name: str = "") -> "Lane":
        """A new :class:`Lane` on this pool: tasks run one at a time, in order."""
        return Lane(self, max_pending=max_pending, on_error=on_error, name=name)


class Lane:
    """Run tasks one at a time, in submission order, on a shared :class:`WorkerPool`.

    One lane per ordered stream (a connection): the connection's reader
    calls ``lane.submit(handler, message, conn)`` for each message, and the
    handler calls of one connection never overlap or reorder, while the
    pool's workers serve every connection's lane. Only a lane with work is
    in the pool's queues, once; it runs up to ``batch`` tasks per turn, then
    queues itself again so one busy stream cannot hold a worker forever.

    Backpressure: at most ``max_pending`` tasks wait per lane; ``submit``
    blocks (up to ``timeout``) while the lane is full, which for a reader
    means it stops reading and TCP slows the peer down. If the pool itself
    is overloaded when the lane needs a turn, ``submit`` raises Overloaded
    and nothing was queued.
    """

    def __init__(
        self,
        pool: WorkerPool,
        *,
        max_pending: int = 64,
        batch: int = 16,
        on_error: Optional[ErrorHook] = None,
        name: str = "",
    ) -> None:
        if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
            raise ConfigError("max_pending", f"must be a whole number of at least 1, got {max_pending!r}")
        self.pool = pool
        self.max_pending = max_pending
        self.batch = max(1, batch)
        self.on_error = on_error
        self.name = name
        self._cond = threading.Condition(threading.Lock())
        self._pending: collections.deque[Task] = collections.deque()
        self._scheduled = False  # a _drain turn is queued or running
        self._closed = False
        self._when_idle: list[Callable[[], Any]] = []

    def submit(self, fn: Callable[..., Any], *args: Any, timeout: Optional[float] = None) -> None:
        """Queue ``fn(*args)`` behind this lane's earlier tasks.

        Blocks while ``max_pending`` tasks wait, at most ``timeout`` seconds
        (None: until there is room), then raises Overloaded. Raises
        WorkerPoolStopped once the lane is closed or its pool stops.
        """
        with self._cond:
            if len(self._pending) >= self.max_pending and not self._closed:
                deadline = None if timeout is None else time.monotonic() + timeout
                while len(self._pending) >= self.max_pending and not self._closed:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise Overloaded(
                            f"lane {self.name or id(self)} has {self.max_pending} tasks waiting (max_pending); "
                            "its tasks are slower than they arrive"
                        )
                    self._cond.wait(remaining)
            if self._closed:
                raise WorkerPoolStopped(f"lane {self.name or id(self)} is closed")
            if not self._scheduled:
                # Inside the lock, so no task can slip in behind a failed turn;
                # pool.submit never blocks, so holding the lock here is cheap.
                self.pool.submit(self._drain)
                self._scheduled = True
            self._pending.append((fn, args))

    def _drain(self) -> None:
        cond = self._cond
        callbacks: Optional[list[Callable[[], Any]]]
        while True:
            for _ in range(self.batch):
                with cond:
                    if not self._pending:
                        callbacks = self._went_idle_locked()
                        break
                    fn, args = self._pending.popleft()
                    cond.notify()  # room for a blocked submitter
                try:
                    fn(*args)
                except BaseException as exc:
                    self._report(exc, fn, args)
            else:
                with cond:
                    callbacks = self._went_idle_locked() if not self._pending else None
                if callbacks is None:
                    try:
                        self.pool.submit(self._drain)  # yield the worker; our turn comes again
                        return
                    except (Overloaded, WorkerPoolStopped):
                        continue  # nobody can take the turn: keep going here rather than strand the tasks
            for callback in callbacks:
                self._run_callback(callback)
            return

    def _went_idle_locked(self) -> list[Callable[[], Any]]:
        self._scheduled = False
        self._cond.notify_all()
        callbacks, self._when_idle = self._when_idle, []
        return callbacks

    def _run_callback(self, callback: Callable[[], Any]) -> None:
        try:
            callback()
        except Exception:
            log.exception("lane %s: call_when_idle callback raised", self.name)

    def call_when_idle(self, callback: Callable[[], Any]) -> None:
        """Call ``callback()`` once every task submitted so far has run.

        At once on this thread if the lane is idle, else on the worker that
        runs the last task. For a read loop that must not block (the event
        loop): on EOF, finish the connection from here instead of joining.
        """
        with self._cond:
            if self._scheduled:
                self._when_idle.append(callback)
                return
        self._run_callback(callback)

    def _report(self, exc: BaseException, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        hook = self.on_error or self.pool.on_error
        if hook is not None:
            try:
                hook(exc, fn, args)
                return
            except Exception:
                log.exception("lane %s: on_error raised", self.name)
        log.error("lane %s: task %r raised", self.name, fn, exc_info=exc)

    def join(self, timeout: Optional[float] = None) -> bool:
        """Wait until every task submitted so far has run; True if it did within ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._scheduled:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def close(self) -> int:
        """Refuse further tasks and drop the waiting ones (the running one finishes); returns how many were dropped."""
        with self._cond:
            self._closed = True
            dropped = len(self._pending)
            self._pending.clear()
            self._cond.notify_all()
        return dropped

    @property
    def pending(self) -> int:
        return len(self._pending)
