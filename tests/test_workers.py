"""The worker pool: placement, stealing, rejection, ordered lanes, and clean stops."""

from __future__ import annotations

import logging
import random
import threading

import pytest

import netpool
from netpool.workers import Lane, WorkerPool

from .conftest import netpool_threads, run_concurrently, wait_for


@pytest.fixture
def pools():
    """Worker pools made in a test; all stopped (threads joined) at teardown."""
    made: list[WorkerPool] = []

    def make(*args, **kwargs) -> WorkerPool:
        pool = WorkerPool(*args, **kwargs)
        made.append(pool)
        return pool

    yield make
    for pool in made:
        assert pool.stop(timeout=5)


def block_workers(pool: WorkerPool, n: int) -> threading.Event:
    """Occupy n workers with tasks that wait for the returned event."""
    gate = threading.Event()
    for _ in range(n):
        pool.submit(gate.wait, 10)
    wait_for(lambda: pool.stats().busy == n, what=f"{n} busy workers")
    return gate


def test_runs_every_task_on_named_threads_and_stop_joins_them():
    """All submitted tasks run on netpool-worker-* threads, and stop() leaves no thread behind."""
    done = []
    lock = threading.Lock()
    pool = WorkerPool(3, name="t")
    assert sorted(n for n in netpool_threads() if n.startswith("netpool-worker-t-")) == [
        "netpool-worker-t-0", "netpool-worker-t-1", "netpool-worker-t-2"]

    def task(i):
        with lock:
            done.append((i, threading.current_thread().name))

    for i in range(100):
        pool.submit(task, i)
    assert pool.stop(timeout=5)
    assert sorted(i for i, _ in done) == list(range(100))
    assert all(name.startswith("netpool-worker-t-") for _, name in done)
    stats = pool.stats()
    assert stats.submitted == stats.completed == 100 and stats.busy == 0
    assert not netpool_threads()


def test_placement_fills_queues_to_half_then_overflow_then_rejects(pools):
    """With workers busy: queues fill to half, then the overflow queue, then submit raises Overloaded."""
    pool = pools(2, queue_size=4, overflow_size=3)
    gate = block_workers(pool, 2)
    ran = []
    for i in range(7):
        pool.submit(ran.append, i)
    stats = pool.stats()
    assert stats.queued == (2, 2) and stats.overflow == 3
    with pytest.raises(netpool.Overloaded, match="overloaded"):
        pool.submit(ran.append, 99)
    assert pool.stats().rejected == 1
    gate.set()
    wait_for(lambda: pool.stats().completed == 9, what="all tasks to run")
    assert sorted(ran) == list(range(7))
    assert pool.stats().steals >= 3  # the overflow queue is only ever stolen from


def test_an_idle_worker_steals_from_a_busy_workers_queue(pools):
    """Tasks queued behind a long task on one worker are stolen and run by the idle worker."""
    pool = pools(2, queue_size=16)
    gate = threading.Event()
    pool.submit(gate.wait, 10)  # round-robin: worker 0
    wait_for(lambda: pool.stats().busy == 1, what="the long task to start")
    ran = []
    for i in range(10):  # round-robin alternates; half land behind the long task
        pool.submit(ran.append, i)
    wait_for(lambda: len(ran) == 10, what="every short task, while the long one still runs")
    assert pool.stats().busy <= 1 and not gate.is_set()
    assert pool.stats().steals >= 1
    gate.set()


def test_a_raising_task_is_reported_and_the_worker_goes_on(pools, caplog):
    """An exception in a task reaches on_error (or the log) and the worker keeps serving."""
    seen = []
    pool = pools(1, on_error=lambda exc, fn, args: seen.append((type(exc), args)))
    pool.submit(int, "not a number")
    done = threading.Event()
    pool.submit(done.set)
    assert done.wait(5)
    assert seen == [(ValueError, ("not a number",))]
    assert pool.stats().errors == 1

    logged = pools(1, name="logged")
    with caplog.at_level(logging.ERROR, logger="netpool.workers"):
        logged.submit(int, "x")
        wait_for(lambda: logged.stats().errors == 1, what="the error")
    assert "worker pool logged" in caplog.text and "ValueError" in caplog.text


def test_stop_drains_or_drops_and_then_refuses_work():
    """stop() runs what is queued (or drops it with drain=False); later submits raise WorkerPoolStopped."""
    pool = WorkerPool(1, queue_size=16)
    gate = block_workers(pool, 1)
    ran = []
    for i in range(5):
        pool.submit(ran.append, i)
    gate.set()
    assert pool.stop(drain=True)
    assert ran == [0, 1, 2, 3, 4]
    with pytest.raises(netpool.WorkerPoolStopped):
        pool.submit(ran.append, 5)

    pool = WorkerPool(1, queue_size=16)
    gate = block_workers(pool, 1)
    for i in range(5):
        pool.submit(ran.append, i)
    stopper = threading.Thread(target=pool.stop, kwargs={"drain": False})
    stopper.start()
    wait_for(lambda: pool.stats().dropped == 5, what="queued tasks dropped")
    gate.set()
    stopper.join(5)
    assert pool.stats().completed == 1


def test_concurrent_submitters_account_for_every_task(pools):
    """Under many concurrent submitters every task either runs once or is rejected, never lost."""
    pool = pools(3, queue_size=4, overflow_size=8)
    counter = [0]
    lock = threading.Lock()

    def work():
        with lock:
            counter[0] += 1

    accepted = [0] * 8

    def submitter(n):
        for _ in range(500):
            try:
                pool.submit(work)
                accepted[n] += 1
            except netpool.Overloaded:
                pass

    run_concurrently(submitter, [(n,) for n in range(8)], timeout=30)
    wait_for(lambda: pool.stats().completed == sum(accepted), what="every accepted task to run")
    stats = pool.stats()
    assert counter[0] == sum(accepted) == stats.submitted
    assert stats.submitted + stats.rejected == 4000


def test_lanes_keep_each_streams_order_and_never_overlap(pools):
    """Twenty lanes of 200 tasks on four workers: each lane's tasks run in order, one at a time."""
    pool = pools(4, queue_size=64)
    lanes = [pool.lane(max_pending=32, name=f"conn-{i}") for i in range(20)]
    results: list[list[int]] = [[] for _ in lanes]
    running = [False] * len(lanes)
    overlaps = []

    def step(lane_no, i):
        if running[lane_no]:
            overlaps.append(lane_no)
        running[lane_no] = True
        if random.random() < 0.05:
            threading.Event().wait(0.0005)
        results[lane_no].append(i)
        running[lane_no] = False

    def feeder(lane_no):
        for i in range(200):
            lanes[lane_no].submit(step, lane_no, i, timeout=10)

    run_concurrently(feeder, [(n,) for n in range(len(lanes))], timeout=30)
    for lane in lanes:
        assert lane.join(10)
    assert not overlaps
    assert all(r == list(range(200)) for r in results)


def test_a_full_lane_pushes_back_on_its_submitter(pools):
    """A lane with max_pending tasks waiting makes submit wait, then raise Overloaded at the timeout."""
    pool = pools(1)
    lane = Lane(pool, max_pending=2)
    gate = threading.Event()
    lane.submit(gate.wait, 10)
    wait_for(lambda: pool.stats().busy == 1 and lane.pending == 0, what="the first task to run")
    lane.submit(lambda: None)
    lane.submit(lambda: None)
    with pytest.raises(netpool.Overloaded, match="max_pending"):
        lane.submit(lambda: None, timeout=0.1)
    gate.set()
    assert lane.join(5)
    lane.submit(lambda: None, timeout=0.1)  # room again
    assert lane.join(5)


def test_a_lane_on_an_overloaded_pool_raises_and_queues_nothing(pools):
    """When the pool is full, a lane needing a turn raises Overloaded and holds nothing."""
    pool = pools(1, queue_size=2, overflow_size=0)
    gate = block_workers(pool, 1)
    pool.submit(lambda: None)  # worker queue now half full
    lane = pool.lane()
    with pytest.raises(netpool.Overloaded):
        lane.submit(lambda: None)
    assert lane.pending == 0 and lane.join(0.1)
    gate.set()


def test_lane_close_drops_waiting_tasks_and_refuses_new_ones(pools):
    """Closing a lane (its connection went away) drops what waits and refuses new tasks."""
    pool = pools(1)
    lane = pool.lane()
    gate = threading.Event()
    ran = []
    lane.submit(gate.wait, 10)
    wait_for(lambda: lane.pending == 0 and pool.stats().busy == 1, what="the first task to run")
    for i in range(3):
        lane.submit(ran.append, i)
    assert lane.close() == 3
    with pytest.raises(netpool.WorkerPoolStopped, match="closed"):
        lane.submit(ran.append, 9)
    gate.set()
    assert lane.join(5) and ran == []


def test_call_when_idle_runs_after_the_last_task(pools):
    """call_when_idle fires once the lane's tasks so far have run (at once when idle): a non-blocking EOF hook."""
    pool = pools(2)
    lane = pool.lane()
    order = []
    lane.call_when_idle(lambda: order.append("idle at once"))
    gate = threading.Event()
    lane.submit(gate.wait, 10)
    for i in range(3):
        lane.submit(order.append, i)
    fired = threading.Event()
    lane.call_when_idle(lambda: (order.append("drained"), fired.set()))
    assert order == ["idle at once"]
    gate.set()
    assert fired.wait(5)
    assert order == ["idle at once", 0, 1, 2, "drained"]


def test_bad_settings_are_config_errors():
    """Sizes are checked at construction, naming the setting."""
    with pytest.raises(netpool.ConfigError, match="workers"):
        WorkerPool(0)
    with pytest.raises(netpool.ConfigError, match="queue_size"):
        WorkerPool(2, queue_size=0)
