"""ConnectionThreads: reused threads that leave once a peak is over, and lose no job.

Real threads, no server: the pool is driven through submit and stop, and
watched through its counts.
"""

from __future__ import annotations

import random
import threading
import time

from netpool.conn_threads import ConnectionThreads

from .conftest import DEADLINE, wait_for

PEAK = 20
KEEPALIVE = 0.5
# Well under KEEPALIVE / PEAK: parked threads woken in turn would each get a
# job before their keepalive ran out, and none would ever leave.
TRICKLE = 0.005


def test_a_peaks_threads_leave_while_a_trickle_of_work_goes_on():
    pool = ConnectionThreads("t", keepalive=KEEPALIVE)
    release = threading.Event()
    started = threading.Semaphore(0)

    def hold() -> None:
        started.release()
        release.wait(DEADLINE)

    try:
        for _ in range(PEAK):
            pool.submit(hold)
        for _ in range(PEAK):
            assert started.acquire(timeout=DEADLINE)
        assert pool.threads == PEAK
        release.set()
        wait_for(lambda: pool.parked == PEAK, what="the peak's threads parked")
        done = []
        deadline = time.monotonic() + 10 * KEEPALIVE
        few = False
        # One short job at a time, as a quiet server's hand-offs come: the
        # thread parked last takes each, and the others leave.
        while time.monotonic() < deadline and not few:
            pool.submit(done.append, 1)
            time.sleep(TRICKLE)
            few = pool.threads <= 2
        assert few, f"{pool.threads} threads still alive {10 * KEEPALIVE}s after a peak of {PEAK}"
        assert done, "no job ran"
    finally:
        pool.stop(time.monotonic() + DEADLINE)
    assert pool.threads == 0


def test_no_job_is_lost_when_it_is_handed_to_a_thread_as_its_keepalive_runs_out():
    # A keepalive this short makes parked threads time out all the time, so
    # submits race with them leaving; every job must still run exactly once.
    pool = ConnectionThreads("t", keepalive=0.0005)
    ran = []
    lock = threading.Lock()
    rng = random.Random(19)

    def job(i: int) -> None:
        with lock:
            ran.append(i)

    try:
        for i in range(3000):
            pool.submit(job, i)
            if rng.random() < 0.3:
                time.sleep(rng.random() * 0.001)
        wait_for(lambda: len(ran) == 3000, what="every job run")
    finally:
        pool.stop(time.monotonic() + DEADLINE)
    assert sorted(ran) == list(range(3000))


def test_jobs_past_the_limit_wait_in_order_and_run_before_stop_returns():
    pool = ConnectionThreads("t", max_threads=2)
    release = threading.Event()
    order = []
    for _ in range(2):
        pool.submit(release.wait, DEADLINE)
    for i in range(5):
        pool.submit(order.append, i)
    assert pool.queued == 5 and pool.threads == 2
    urgent = threading.Event()
    pool.submit(urgent.set, urgent=True)  # never queued: a thread of its own
    assert urgent.wait(DEADLINE)
    release.set()
    assert pool.stop(time.monotonic() + DEADLINE) == 0
    assert order == [0, 1, 2, 3, 4]
    assert pool.threads == 0 and pool.parked == 0
