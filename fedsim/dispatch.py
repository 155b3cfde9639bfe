"""Sending a round's client groups to the BackboneWorkers, and surviving the loss of some.

Pull scheduling: groups go out largest first, each worker kept ``depth`` deep (one running, one
waiting, which hides the call latency) and topped up as its groups finish, so no worker idles
while another still has a queue. A worker that dies (its process, or its node) fails every group
it held; each such group goes back to the front of the queue for the live workers, and a
replacement worker is started in the lost one's place and joins once its backbone is loaded. A
group's result depends only on its tasks (keyed RNGs, the same resident weights everywhere), so a
retried group returns the bits it would have returned the first time: a run that lost workers
ends with the projector of a run that did not. Retries and lost workers are counted per round.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

#: How long to wait for a replacement worker when no other worker is alive (seconds).
START_TIMEOUT = 600.0


class WorkersLost(RuntimeError):
    """No live worker is left, or a group lost its worker more often than allowed."""


def lost_errors() -> tuple[type[BaseException], ...]:
    """Ray's errors that mean "the worker or its node is gone", not "the task failed"."""
    from ray import exceptions as rx

    return (
        rx.RayActorError,  # ActorDiedError, ActorUnavailableError
        rx.ObjectLostError,  # a result that lived on a removed node
        rx.NodeDiedError,
        rx.WorkerCrashedError,
    )


class WorkerSet:
    """A run's BackboneWorkers: the live ones, and replacements still loading their backbone."""

    def __init__(self, pool: Any, workers: Sequence[Any]) -> None:
        self.pool = pool
        self.live: dict[int, Any] = dict(enumerate(workers))
        self.starting: dict[Any, tuple[int, Any]] = {}

    def lose(self, index: int, handle: Any) -> bool:
        """Worker ``index`` (``handle``) failed: drop it and start a replacement.

        Returns False when this handle was already known lost (its other groups fail too).
        """
        if self.live.get(index) is not handle:
            return False
        del self.live[index]
        new = self.pool.replace_worker(index)
        self.starting[new.ready.remote()] = (index, new)
        return True

    def started(self, ref: Any) -> None:
        """A replacement answered ``ready`` (or died trying: then it stays out)."""
        import ray

        index, handle = self.starting.pop(ref)
        try:
            ray.get(ref)
        except lost_errors():
            return
        self.live[index] = handle

    def handles(self) -> list[Any]:
        return [self.live[i] for i in sorted(self.live)]

    def ask(self, method: str) -> dict[str, Any]:
        """``{"worker<i>": answer}`` of every live worker to ``method`` (no arguments); a worker
        lost after the last round is left out instead of failing the finished run."""
        import ray

        refs = {i: getattr(self.live[i], method).remote() for i in sorted(self.live)}
        out: dict[str, Any] = {}
        for i, ref in refs.items():
            try:
                out[f"worker{i}"] = ray.get(ref)
            except lost_errors():
                continue
        return out


@dataclass
class DispatchStats:
    """What it took to get a round's groups through: resubmissions and workers lost."""

    retries: int = 0
    lost: list[int] = field(default_factory=list)


def dispatch(
    groups: Sequence[Any],
    submit: Callable[[Any, Any], Any],
    workers: WorkerSet,
    on_result: Callable[[Any], None],
    *,
    depth: int = 2,
    max_retries: int = 3,
    label: Callable[[Any], str] = str,
) -> DispatchStats:
    """Run every group on some live worker; ``on_result`` gets each group's output as it lands.

    ``submit(worker, group)`` returns the ObjectRef of the group's result. A group whose worker
    is lost is sent again, at most ``max_retries`` times.
    """
    import ray

    lost = lost_errors()
    pending = list(groups)
    inflight: dict[Any, tuple[int, Any, Any]] = {}
    load: dict[int, int] = {}  # id(handle) -> groups in flight on it
    tries: dict[int, int] = {}  # id(group) -> times it was sent again
    stats = DispatchStats()

    def fill() -> None:
        while pending:
            free = [
                (load.get(id(h), 0), i)
                for i, h in workers.live.items()
                if load.get(id(h), 0) < depth
            ]
            if not free:
                return
            _, i = min(free)
            handle = workers.live[i]
            group = pending.pop(0)
            inflight[submit(handle, group)] = (i, handle, group)
            load[id(handle)] = load.get(id(handle), 0) + 1

    fill()
    while inflight or pending:
        if not inflight and not workers.starting:
            raise WorkersLost(
                f"every worker was lost; {len(pending)} client group(s) of the round not done"
            )
        waits = [*inflight, *workers.starting]
        done, _ = ray.wait(
            waits, num_returns=1, timeout=None if inflight else START_TIMEOUT
        )
        if not done:
            raise WorkersLost(
                f"no live worker, and no replacement started within {START_TIMEOUT:.0f} s "
                "(does the cluster still have room for one?)"
            )
        ref = done[0]
        if ref in workers.starting:
            workers.started(ref)
            fill()
            continue
        index, handle, group = inflight.pop(ref)
        load[id(handle)] -= 1
        try:
            out = ray.get(ref)
        except lost as e:
            if workers.lose(index, handle):
                stats.lost.append(index)
            n = tries[id(group)] = tries.get(id(group), 0) + 1
            if n > max_retries:
                raise WorkersLost(
                    f"client group {label(group)} lost its worker {n} times "
                    f"(ray.task_retries={max_retries}); last: {type(e).__name__}"
                ) from None
            stats.retries += 1
            pending.insert(0, group)
            fill()
            continue
        on_result(out)
        fill()
    return stats
