"""The Aggregator actor: the algorithm's server half over each round's updates, its server
state, the rejection of invalid updates and the per-round diagnostics.

It runs on one device (``ray.aggregator_gpus`` > 0: the GPU Ray gives it; else the CPU). What
arrives from the host (weights, updates, partial sums, a checkpoint's state) is moved there
once, the server half and its state stay there (the algorithms create every tensor on the
device of their inputs), and what leaves for the host (new weights, payload, server state) is
moved back once. On the CPU every move is the identity.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from fedsim.algorithms import build_algorithm
from fedsim.algorithms.base import (
    ClientUpdate,
    PartialSum,
    Weights,
    combine_partial_sums,
    global_norm,
    validate_update,
)
from fedsim.algorithms.diagnostics import round_diagnostics, step_diagnostics, step_of
from fedsim.machine import node_id, peak_rss_mb
from fedsim.privacy.dp import central_release

if TYPE_CHECKING:  # fedsim.privacy's protocol modules load only when a run uses them
    from fedsim.privacy.plan import PrivacyPlan
    from fedsim.privacy.secure import SecurePlan

# Server-state keys that hold the previous global step (diagnostics), not the algorithm's state.
_PREVIOUS = "diagnostics/previous_step/"
# Server-state key of the current clip C under adaptive clipping (privacy).
_CLIP = "privacy/clip"


def _on(tree: Mapping[str, torch.Tensor], device: torch.device) -> Weights:
    """``tree`` with every tensor on ``device`` (the same tensors when already there)."""
    return {k: v.to(device) for k, v in tree.items()}


class Aggregator:
    """Runs the algorithm's server half over each round's updates; keeps its server state."""

    def __init__(
        self,
        algorithm: str,
        params: Mapping[str, Any],
        weights: Weights,
        num_clients: int | None = None,
    ) -> None:
        self.reset(algorithm, params, weights, num_clients)

    def reset(
        self,
        algorithm: str,
        params: Mapping[str, Any],
        weights: Weights,
        num_clients: int | None = None,
        max_norm: float | None = None,
        on_reject: str = "continue",
        diagnostics: bool = False,
        device: str = "cpu",
    ) -> None:
        """Start over for a new run: a fresh algorithm instance and its initial server state
        on ``device`` (``cpu`` or ``cuda``)."""
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(
                f"ray.aggregator_gpus: the Aggregator was given no usable CUDA device "
                f"(torch {torch.__version__}, CUDA_VISIBLE_DEVICES="
                f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r})"
            )
        self.device = torch.device(device)
        self.algorithm = build_algorithm(algorithm, params)
        self.state = self.algorithm.init_state(_on(weights, self.device), num_clients)
        self.max_norm = max_norm
        self.on_reject = on_reject
        self.diagnostics = diagnostics
        # ΔW_{t−1} for the oscillation diagnostic; saved with the server state so that a resumed
        # run reports the same values.
        self.previous_step: Weights | None = None
        self.privacy: PrivacyPlan | None = None
        self.secure: SecurePlan | None = None
        self.secagg: Any = None  # this round's SecAggServer
        self.seed = 0
        self.clip = math.nan

    def _in(self, tree: Mapping[str, torch.Tensor]) -> Weights:
        """To this Aggregator's device (from the host)."""
        return _on(tree, self.device)

    def _update_in(self, u: ClientUpdate) -> ClientUpdate:
        if self.device.type == "cpu":
            return u
        return dataclasses.replace(
            u, delta=self._in(u.delta), extras=self._in(u.extras)
        )

    @staticmethod
    def _out(tree: Mapping[str, torch.Tensor]) -> Weights:
        """To the host (for the driver, the workers and checkpoints)."""
        return _on(tree, torch.device("cpu"))

    def set_privacy(
        self, plan: PrivacyPlan | None, seed: int, secure: SecurePlan | None = None
    ) -> None:
        """DP and secure aggregation for this run (after :meth:`reset`)."""
        self.privacy, self.seed, self.secure = plan, seed, secure
        self.clip = plan.clip if plan is not None else math.nan

    # Secure aggregation: the server's side of each round (fedsim.privacy.secagg). Nothing
    # here receives an update in the clear: public keys, ciphertexts, masked vectors, shares.

    def secagg_advertise(self, keys: list[Any]) -> dict[int, Any]:
        """AdvertiseKeys: a fresh protocol server for the round; the roster to broadcast."""
        from fedsim.privacy.secagg import SecAggServer

        assert self.secure is not None
        self.secagg = SecAggServer(self.secure.threshold, self.secure.ring)
        return self.secagg.advertise(keys)

    def secagg_route(self, outboxes: Mapping[int, Any]) -> dict[int, Any]:
        """ShareKeys: encrypted shares to their receivers' inboxes."""
        return self.secagg.route(outboxes)

    def secagg_collect(self, masked: Mapping[int, Any]) -> list[int] | str:
        """MaskedInputCollection: the survivors, or why the round cannot be unmasked."""
        from fedsim.privacy.secagg import SecAggError

        for cid in sorted(masked):
            self.secagg.collect(cid, masked[cid])
        try:
            return self.secagg.survivors()
        except SecAggError as e:
            return str(e)

    def aggregate_secure(
        self,
        weights: Weights,
        responses: Mapping[int, Any],
        rejected: Sequence[dict[str, Any]],
        server_round: int,
    ) -> tuple[Weights, dict[str, Any]]:
        """Unmasking: the sum of the survivors' uploads, its mean, the server half."""
        from fedsim.privacy.secure import secure_mean

        assert self.secure is not None
        total = self.secagg.unmask(responses)
        stop = self._policy(weights, rejected, True)
        seconds = {"server_seconds": round(self.secagg.seconds, 6)}
        if stop is not None:
            return dict(weights), {**stop, "secagg": seconds}
        mean, samples = secure_mean(
            total, self.secure, self.privacy, weights, self.seed, server_round
        )
        update = ClientUpdate(min(responses), self._in(mean), samples, math.nan, 0)
        weights_out, metrics = self._step(self._in(weights), [update], server_round)
        weights_out = self._out(weights_out)
        metrics["rejected"] = sorted(rejected, key=lambda r: r["client_id"])
        if self.privacy is not None:
            metrics["privacy"] = {"clip": self.clip}
        return weights_out, {**metrics, "secagg": seconds}

    def keep_round(
        self, weights: Weights, rejected: Sequence[dict[str, Any]], why: str
    ) -> tuple[Weights, dict[str, Any]]:
        """A round that failed (secure aggregation below its threshold): W_t kept."""
        seconds = self.secagg.seconds if self.secagg is not None else 0.0
        return dict(weights), {
            "rejected": sorted(rejected, key=lambda r: r["client_id"]),
            "update_norm": 0.0,
            "action": f"{why}: W_t and server state kept",
            "secagg": {"server_seconds": round(seconds, 6)},
        }

    def _step(
        self,
        weights: Weights,
        updates: Sequence[ClientUpdate],
        server_round: int,
        per_client: bool = False,
    ) -> tuple[Weights, dict[str, Any]]:
        """The algorithm's server half over ``updates``; its metrics and the step's norm
        (diagnostics over the clients' own updates when ``per_client``)."""
        result = self.algorithm.aggregate(weights, updates, self.state, server_round)
        self.state = result.state
        metrics: dict[str, Any] = dict(result.metrics)
        if "update_norm" not in metrics:  # (setdefault would compute it every round)
            metrics["update_norm"] = global_norm(
                {k: result.weights[k] - weights[k] for k in weights}
            )
        self._diagnose(
            weights, result.weights, updates if per_client else None, metrics
        )
        return result.weights, metrics

    def _private_update(
        self,
        accepted: Sequence[ClientUpdate],
        reference: Weights,
        server_round: int,
    ) -> tuple[ClientUpdate, dict[str, Any]]:
        """The round's accepted updates as one: their clipped, noised, fixed-denominator
        mean (:func:`fedsim.privacy.dp.central_release`); the server half sees only it."""
        plan = self.privacy
        assert plan is not None
        release = central_release(
            [u.delta for u in accepted],
            reference,
            clip=self.clip,
            update_noise=plan.update_noise,
            denominator=plan.denominator,
            seed=self.seed,
            server_round=server_round,
            adaptive=plan.adaptive_clip,
            target_quantile=plan.target_quantile,
            clip_lr=plan.clip_lr,
            count_noise=plan.count_noise,
        )
        self.clip = release.next_clip
        shown: dict[str, Any] = {"clip": release.clip}
        if release.fraction is not None:
            shown["clipped_fraction_noised"] = release.fraction
        first = accepted[0].client_id if accepted else 0
        mean = ClientUpdate(first, release.mean, 1, math.nan, 0)
        return mean, {"privacy": shown}

    def _policy(
        self, weights: Weights, rejected: Sequence[dict[str, Any]], any_accepted: bool
    ) -> dict[str, Any] | None:
        """The round's metrics when it must not aggregate (nothing accepted, or skip_round)."""
        metrics: dict[str, Any] = {
            "rejected": sorted(rejected, key=lambda r: r["client_id"])
        }
        if not any_accepted:
            metrics["update_norm"] = 0.0
            metrics["action"] = "no accepted update: W_t kept"
            return metrics
        if rejected and self.on_reject == "skip_round":
            metrics["update_norm"] = 0.0
            metrics["action"] = "skip_round: W_t and server state kept"
            return metrics
        return None

    def payload(self) -> Weights:
        return self._out(self.algorithm.server_payload(self.state))

    def server_state(self) -> Weights:
        """The algorithm's server state (momentum, bases, ...), saved with the run.

        With diagnostics on, the previous global step rides along under ``diagnostics/``.
        """
        out = {k: v.contiguous() for k, v in self.state.items()}
        if self.previous_step is not None:
            out.update(
                {_PREVIOUS + k: v.contiguous() for k, v in self.previous_step.items()}
            )
        if self.privacy is not None and self.privacy.adaptive_clip:
            out[_CLIP] = torch.tensor([self.clip], dtype=torch.float64, device="cpu")
        return self._out(out)

    def load_state(self, state: Weights) -> None:
        """Continue from a checkpoint's server state (after :meth:`reset`)."""
        if _CLIP in state:
            self.clip = float(state[_CLIP][0])
        self.state = {
            k: v.clone().to(self.device)
            for k, v in state.items()
            if not k.startswith(_PREVIOUS) and k != _CLIP
        }
        previous = {
            k[len(_PREVIOUS) :]: v.clone().to(self.device)
            for k, v in state.items()
            if k.startswith(_PREVIOUS)
        }
        self.previous_step = previous or None

    def _diagnose(
        self,
        weights: Weights,
        new: Weights,
        updates: Sequence[ClientUpdate] | None,
        metrics: dict[str, Any],
    ) -> None:
        """Add ``metrics["diagnostics"]`` (when on) and remember this round's global step."""
        if not self.diagnostics:
            return
        step = step_of(new, weights)
        if updates:
            metrics["diagnostics"] = round_diagnostics(
                updates, step, self.previous_step
            )
        elif self.previous_step is not None:
            # Pre-summed rounds: only the global step is seen, not the clients'.
            metrics["diagnostics"] = step_diagnostics(step, self.previous_step)
        self.previous_step = step

    def aggregate(
        self, weights: Weights, updates: Sequence[ClientUpdate], server_round: int
    ) -> tuple[Weights, dict[str, Any]]:
        """Validate, sort by client id, aggregate. Rejected updates are reported, never averaged."""
        host = weights
        weights = self._in(weights)
        updates = [self._update_in(u) for u in updates]
        accepted, rejected = [], []
        for u in sorted(updates, key=lambda u: u.client_id):
            reason = validate_update(u, weights, self.max_norm)
            if reason is None:
                accepted.append(u)
            else:
                rejected.append({"client_id": u.client_id, "reason": reason})
        # Under DP every round releases its noised mean, empty or not (skip_round is refused).
        stop = self._policy(weights, rejected, bool(accepted) or bool(self.privacy))
        if stop is not None:
            return dict(host), stop
        metrics: dict[str, Any] = {"rejected": rejected}
        if self.privacy is not None:
            mean, shown = self._private_update(accepted, weights, server_round)
            accepted, metrics = [mean], {**metrics, **shown}
        new, step = self._step(weights, accepted, server_round, per_client=True)
        return self._out(new), {**metrics, **step}

    def aggregate_partials(
        self,
        weights: Weights,
        parts: Sequence[PartialSum],
        rejected: Sequence[dict[str, Any]],
        server_round: int,
    ) -> tuple[Weights, dict[str, Any]]:
        """The server half over pre-summed groups (presummable algorithms only)."""
        stop = self._policy(weights, rejected, bool(parts))
        if stop is not None:
            return dict(weights), stop
        metrics: dict[str, Any] = {
            "rejected": sorted(rejected, key=lambda r: r["client_id"])
        }
        if self.device.type != "cpu":
            parts = [
                dataclasses.replace(p, weighted=self._in(p.weighted)) for p in parts
            ]
        weights_in = self._in(weights)
        update = combine_partial_sums(parts)
        reason = validate_update(update, weights_in)
        if reason is not None:  # cannot happen for validated, finite parts
            raise ValueError(f"round {server_round}: combined partial sums: {reason}")
        new, step = self._step(weights_in, [update], server_round)
        return self._out(new), {**metrics, **step}

    def peak_rss_mb(self) -> float:
        return peak_rss_mb()

    def node(self) -> str:
        return node_id()


def actor_threads() -> int:
    """The torch threads an Aggregator actor runs with: Ray gives an actor that asks for no
    CPU ``OMP_NUM_THREADS=1`` unless the environment sets it (ray._private.utils.
    set_omp_num_threads_if_unset). Reductions (norms, sums) depend on the thread count."""
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "1")))
    except ValueError:
        return 1


class InDriver:
    """An :class:`Aggregator` inside the driver process (``ray.aggregator_in_driver``),
    called as the actor is: ``handle.aggregate.remote(...)`` returns an ObjectRef.

    The call runs at once, in the driver, on :func:`actor_threads` threads — what the actor
    would be given. Arguments and results travel as they do to and from an actor: each
    ObjectRef argument is resolved, every other argument and the result are copied through
    Ray's object store, so the Aggregator never shares a tensor with the driver and the
    results are the actor's bits. An exception is raised by ``.remote()`` itself, as the
    actor's own exception (not wrapped in a RayTaskError).
    """

    def __init__(self, *args: Any) -> None:
        self._aggregator = _on_actor_threads(Aggregator, *self._copied(args))

    @staticmethod
    def _copied(values: Sequence[Any]) -> list[Any]:
        import ray

        return [
            ray.get(v) if isinstance(v, ray.ObjectRef) else ray.get(ray.put(v))
            for v in values
        ]

    def __getattr__(self, name: str) -> _InDriverMethod:
        if name.startswith("_"):
            raise AttributeError(name)
        return _InDriverMethod(self, getattr(Aggregator, name))


@dataclasses.dataclass(frozen=True)
class _InDriverMethod:
    """One method of :class:`InDriver`'s Aggregator, with the actor method's ``.remote``."""

    owner: InDriver
    method: Any

    def remote(self, *args: Any) -> Any:
        import ray

        args = self.owner._copied(args)
        return ray.put(_on_actor_threads(self.method, self.owner._aggregator, *args))


def _on_actor_threads(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` with torch on :func:`actor_threads` threads, the driver's restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(actor_threads())
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(threads)
