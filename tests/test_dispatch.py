"""fedsim.dispatch on small Ray actors: every group done once, lost workers replaced, limits.

The actors stand in for BackboneWorkers only in what dispatch uses (``ready`` and one method
per group); the round loop's own test with real workers is tests/test_reliability.py.
"""

from __future__ import annotations

import time

import pytest

from fedsim.dispatch import WorkerSet, WorkersLost, dispatch

pytestmark = pytest.mark.slow  # Ray actors


class Echo:
    """Returns its group after ``delay`` seconds; records which groups it ran."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    def ready(self) -> bool:
        return True

    def run(self, group: list[int]) -> list[int]:
        time.sleep(self.delay)
        return list(group)

    def peak_rss_mb(self) -> float:
        return 1.0


class Pool:
    """What WorkerSet needs from fedsim.pool.ActorPool: replace_worker."""

    def __init__(self, n: int, delay: float = 0.05) -> None:
        import sys

        import ray
        from ray import cloudpickle

        # The workers cannot import this test module: send its classes by value.
        cloudpickle.register_pickle_by_value(sys.modules[__name__])
        self.cls = ray.remote(num_cpus=0)(Echo)
        self.delay = delay
        self.workers = [self.cls.remote(delay) for _ in range(n)]
        self.replaced: list[int] = []

    def replace_worker(self, index: int) -> object:
        self.replaced.append(index)
        self.workers[index] = self.cls.remote(self.delay)
        return self.workers[index]


def _submit(worker, group):
    return worker.run.remote(group)


GROUPS = [[i, i + 100] for i in range(12)]


def test_every_group_once_in_any_order(ray_session):
    pool = Pool(2)
    got: list[list[int]] = []
    stats = dispatch(GROUPS, _submit, WorkerSet(pool, pool.workers), got.append)
    assert sorted(got) == sorted(GROUPS)
    assert stats.retries == 0 and stats.lost == [] and pool.replaced == []


def test_a_killed_worker_groups_go_to_the_others_and_it_is_replaced(ray_session):
    import ray

    pool = Pool(2, delay=0.2)
    workers = WorkerSet(pool, pool.workers)
    got: list[list[int]] = []
    victim = pool.workers[0]

    def on_result(out: list[int]) -> None:
        if not got:  # after the first result: worker 0 has groups in flight
            ray.kill(victim, no_restart=True)
        got.append(out)

    stats = dispatch(GROUPS, _submit, workers, on_result, max_retries=3)
    assert sorted(got) == sorted(GROUPS)  # each group's result exactly once
    assert stats.lost == [0] and pool.replaced == [0]
    assert stats.retries >= 1
    # The replacement joined, or is still loading; the set knows one live handle per index.
    assert set(workers.live) <= {0, 1} and 1 in workers.live
    assert set(workers.ask("peak_rss_mb")) <= {"worker0", "worker1"}


def test_all_workers_lost_and_none_can_start_is_an_error(ray_session):
    import ray

    class NoRoom(Pool):
        def replace_worker(self, index: int) -> object:
            # A replacement that dies at once (as when its node is gone too).
            self.replaced.append(index)
            dead = self.cls.remote(self.delay)
            ray.kill(dead, no_restart=True)
            return dead

    pool = NoRoom(1, delay=0.2)
    ray.kill(pool.workers[0], no_restart=True)
    with pytest.raises(WorkersLost, match="every worker was lost"):
        dispatch(GROUPS, _submit, WorkerSet(pool, pool.workers), lambda out: None)


def test_a_group_that_keeps_losing_its_worker_stops_after_the_retry_limit(
    ray_session,
):
    import ray

    class Doomed(Pool):
        def replace_worker(self, index: int) -> object:
            # Every replacement is lost again before it finishes anything.
            self.replaced.append(index)
            new = self.cls.remote(self.delay)
            self.workers[index] = new
            return new

    pool = Doomed(1, delay=0.5)
    workers = WorkerSet(pool, pool.workers)

    def submit(worker, group):
        ref = worker.run.remote(group)
        ray.kill(worker, no_restart=True)
        return ref

    with pytest.raises(
        WorkersLost, match=r"lost its worker 3 times \(ray.task_retries=2\)"
    ):
        dispatch([[1, 2]], submit, workers, lambda out: None, max_retries=2)
