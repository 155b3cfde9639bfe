"""The algorithm plug-in interface: a server half and a client half, both free of Ray.

An algorithm is a frozen dataclass (its fields are its hyper-parameters, validated from the
``algorithm`` config section) registered under a name with :func:`register`. Its server half is a
pure function over ``name → tensor`` dicts: it takes the global weights, the round's client updates
(in sorted client-id order) and its server state, and returns new weights, new state and metrics.
Its client half (:class:`LocalTraining`) changes local training: an extra loss term, a gradient
correction, per-client state, extra uploads. The round loop is written once, in ``fedsim.rounds``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

from fedsim.algorithms.fused_sums import fused_sum

Weights = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ClientUpdate:
    """What one client returns after local training.

    Attributes
    ----------
    client_id:
        The logical client (k).
    delta:
        Δ_k = W_k − W_t, fp32, keyed like the global weights.
    num_samples:
        n_k, the samples the client trained on this round.
    loss:
        Mean training loss over the client's local steps.
    steps:
        Local optimiser steps taken.
    extras:
        Algorithm-specific uploads (e.g. SCAFFOLD's Δc_k); empty for FedAvg.
    """

    client_id: int
    delta: Weights
    num_samples: int
    loss: float
    steps: int
    extras: Weights = field(default_factory=dict)


@dataclass(frozen=True)
class AggregateResult:
    """The server half's output: new global weights, new server state, per-round metrics."""

    weights: Weights
    state: Weights
    metrics: dict[str, float] = field(default_factory=dict)


class LocalTraining:
    """The client half of an algorithm; the default changes nothing (FedAvg's local SGD).

    Subclasses override what they need. All methods are called inside a worker, with the projector
    parameters of the resident model; none may keep state between clients except through the
    returned ``client_state`` (stored by the driver's client-state store).
    """

    #: Keep the local optimiser's state across rounds in the client-state store (centralized).
    persistent_optimizer: ClassVar[bool] = False

    def loss_term(
        self,
        params: Mapping[str, torch.Tensor],
        start: Mapping[str, torch.Tensor],
        ctx: dict[str, Any],
    ) -> torch.Tensor | None:
        """An extra term added to the local loss (FedProx's proximal term), or None."""
        return None

    def correct_gradients(
        self, params: Mapping[str, torch.nn.Parameter], ctx: dict[str, Any]
    ) -> None:
        """Change ``p.grad`` in place after backward (SCAFFOLD's control-variate correction)."""

    def prepare(
        self,
        client_state: Mapping[str, torch.Tensor],
        payload: Mapping[str, torch.Tensor],
    ) -> dict[str, Any]:
        """Build the per-client context from its stored state and the server payload."""
        return {}

    def finish(
        self,
        start: Mapping[str, torch.Tensor],
        end: Mapping[str, torch.Tensor],
        lrs: Sequence[float],
        ctx: dict[str, Any],
    ) -> tuple[Weights, Weights]:
        """After local training (``lrs``: each step's learning rate): ``(extras, new client state)``."""
        return {}, {}


@runtime_checkable
class Algorithm(Protocol):
    """What the driver and the aggregator need from an algorithm."""

    name: ClassVar[str]
    paper: ClassVar[str]
    #: Train on the pooled data of every client as one logical client (centralized upper bound).
    pooled: ClassVar[bool]
    #: Every client keeps its own projector; nothing is aggregated (the local-only baseline).
    personal: ClassVar[bool]
    #: The server half uses the updates only through Σ_k p_k Δ_k: workers may pre-sum them.
    presummable: ClassVar[bool]

    def init_state(
        self, weights: Weights, num_clients: int | None = None
    ) -> Weights: ...

    def server_payload(self, state: Weights) -> Weights: ...

    def aggregate(
        self,
        weights: Weights,
        updates: Sequence[ClientUpdate],
        state: Weights,
        server_round: int,
    ) -> AggregateResult: ...

    def local_training(self) -> LocalTraining: ...

    def evaluate_round(self, due: bool, last: bool) -> bool:
        """Whether the run evaluates after this round; ``due``: the run's schedule says so
        (every ``eval_every`` rounds and after the last), ``last``: it is the last round."""
        ...


class ServerDefaults:
    """The optional parts of :class:`Algorithm` for algorithms that do not need them.

    No server state, no payload to clients, unchanged local training, evaluation on the run's
    schedule. One level, no logic: an algorithm overrides whichever it needs.
    """

    def init_state(self, weights: Weights, num_clients: int | None = None) -> Weights:
        return {}

    def server_payload(self, state: Weights) -> Weights:
        return {}

    def local_training(self) -> LocalTraining:
        return LocalTraining()

    def evaluate_round(self, due: bool, last: bool) -> bool:
        return due


def check_positive(**values: float) -> None:
    """Raise ValueError naming the first parameter that is not > 0."""
    for name, v in values.items():
        if not v > 0:
            raise ValueError(f"{name} must be > 0, got {v}")


def check_fraction(**values: float) -> None:
    """Raise ValueError naming the first parameter outside [0, 1)."""
    for name, v in values.items():
        if not 0.0 <= v < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {v}")


# ---------------------------------------------------------------------------------------------
# Shared pure helpers


def check_same_keys(
    reference: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor], what: str
) -> None:
    """Raise ValueError when ``other`` does not have exactly the keys and shapes of ``reference``."""
    if set(reference) != set(other):
        missing = sorted(set(reference) - set(other))
        extra = sorted(set(other) - set(reference))
        raise ValueError(
            f"{what}: keys differ from the global weights (missing {missing}, unexpected {extra})"
        )
    for k, v in reference.items():
        if tuple(other[k].shape) != tuple(v.shape):
            raise ValueError(
                f"{what}: {k} has shape {list(other[k].shape)}, expected {list(v.shape)}"
            )


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or ±Inf in ``t``.

    For floating tensors through ``aminmax`` (NaN propagates to both ends, ±Inf is an end), one
    read of the tensor and no allocation, where ``isfinite(t).all()`` writes a bool tensor of
    ``t``'s size first.
    """
    if t.numel() == 0 or not (t.is_floating_point() or t.is_complex()):
        return True
    if t.is_complex():
        return bool(torch.isfinite(t).all())
    lo, hi = torch.aminmax(t)
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


def validate_update(
    update: ClientUpdate,
    reference: Mapping[str, torch.Tensor],
    max_norm: float | None = None,
) -> str | None:
    """Why ``update`` must be rejected (wrong keys/shapes, NaN/Inf, no samples, ‖Δ‖₂ above
    ``max_norm``), or None."""
    try:
        check_same_keys(reference, update.delta, f"client {update.client_id}")
    except ValueError as e:
        return str(e)
    for k, v in update.delta.items():
        if not all_finite(v):
            return f"client {update.client_id}: non-finite values (NaN/Inf) in {k}"
    for k, v in update.extras.items():
        if not all_finite(v):
            return (
                f"client {update.client_id}: non-finite values (NaN/Inf) in extras {k}"
            )
    if update.num_samples <= 0:
        return f"client {update.client_id}: no samples"
    if max_norm is not None:
        norm = global_norm(update.delta)
        if norm > max_norm:
            return (
                f"client {update.client_id}: update norm {norm:.4g} exceeds "
                f"validation.max_update_norm {max_norm:g}"
            )
    return None


def check_updates(
    reference: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]
) -> None:
    """Every update's delta has exactly the keys and shapes of ``reference`` (errors name the client)."""
    for u in updates:
        check_same_keys(reference, u.delta, f"client {u.client_id}")


def sample_weights(updates: Sequence[ClientUpdate]) -> list[float]:
    """p_k = n_k / Σ n, in the order of ``updates``."""
    total = sum(u.num_samples for u in updates)
    if total <= 0:
        raise ValueError("aggregate: the updates hold no samples")
    return [u.num_samples / total for u in updates]


#: Elements per block of :func:`accumulate` on the CPU: a multiple of every SIMD width (the
#: vector loop of each block then has no scalar tail of its own), large enough that the two
#: operations per client and block cost little next to their work (32 blocks for a 4096 ×
#: 4096 matrix) and that ATen splits each across its intra-op threads (above its grain of
#: 32768), and small enough that the float64 accumulator block and the converted input
#: (2 × 8 × 2¹⁹ B = 8 MiB) stay in the last-level cache while every client's block streams
#: through once. Measured at 50 × 21 M parameters on 2 cores (AMD EPYC): 2¹⁴ with one Python
#: thread per core 1.14 s, 2¹⁸ 0.39 s, 2¹⁹ 0.36 s, 2²¹ 0.51 s (the blocks leave the cache);
#: again after the float32 result was written block by block (whole FedAvg step, best of 3,
#: three interleaved trials): 2¹⁷ 0.67 s, 2¹⁸ 0.53–0.55 s, 2¹⁹ 0.43–0.52 s, 2²⁰ 0.53–0.54 s.
BLOCK = 1 << 19


def _blocks(
    flats: Sequence[torch.Tensor],
    coeffs: Sequence[float],
    n: int,
    acc: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> None:
    """Σ_k c_k · float64(T_k[i]) for i < ``n``, block by block, on this thread: added into
    ``acc`` (flat float64) when given, else summed from zero in a block-sized scratch; each
    finished block is copied into ``out`` (flat, any dtype) when given.

    Float32 inputs go through the fused kernel where it is available and gives ATen's bits
    (:mod:`fedsim.algorithms.fused_sums`: one pass; at 50 × 21 M elements ≈ 0.08 s against
    0.21–0.31 s here)."""
    if (acc is None) != (out is None) and fused_sum(flats, coeffs, acc=acc, out=out):
        return
    buf = torch.empty(BLOCK, dtype=torch.float64)
    scratch = torch.empty(BLOCK, dtype=torch.float64) if acc is None else None
    for start in range(0, n, BLOCK):
        stop = min(n, start + BLOCK)
        b = buf[: stop - start]
        if acc is not None:
            a = acc[start:stop]
        else:
            assert scratch is not None
            a = scratch[: stop - start].zero_()
        for t, c in zip(flats, coeffs):
            if t.dtype == torch.float64:
                a.add_(t[start:stop], alpha=c)
            else:
                b.copy_(t[start:stop])  # the float32 → float64 conversion, in cache
                a.add_(b, alpha=c)
        if out is not None:
            out[start:stop].copy_(a)


def accumulate(
    acc: torch.Tensor, tensors: Sequence[torch.Tensor], coeffs: Sequence[float]
) -> torch.Tensor:
    """acc += Σ_k c_k · float64(T_k) in the given order, in place (``acc``: contiguous float64).

    Each element receives the same operations in the same order as the unblocked
    ``acc.add_(T_k.to(float64), alpha=c_k)`` for k = 1..K (elementwise: one multiply-add per
    client, independent of every other element), so the result is the same to the bit
    (tests/test_blocked_sums.py holds it). What changes is the memory traffic: on the CPU the
    sum runs block by block, so the accumulator block and the converted input stay in the cache
    and each client's tensor is read once, 4 bytes an element, instead of writing and
    re-reading a float64 copy of it and of the accumulator (4 + 8 + 8 + 8 + 8 bytes). Each
    block's two operations per client are split across ``torch.get_num_threads()`` threads
    by ATen itself (a block is above its intra-op grain). On other devices one operation per
    client (a kernel launch per block would cost more than it saves).
    """
    if len(tensors) != len(coeffs):
        raise ValueError(
            f"accumulate: {len(tensors)} tensors but {len(coeffs)} coefficients"
        )
    flat = acc.view(-1)
    n = flat.numel()
    cs = [float(c) for c in coeffs]
    if acc.device.type != "cpu" or n <= BLOCK:
        for t, c in zip(tensors, cs):
            flat.add_(t.reshape(-1).to(torch.float64), alpha=c)
        return acc
    flats = [t.reshape(-1) for t in tensors]  # views of contiguous tensors
    _blocks(flats, cs, n, acc=flat)
    return acc


def weighted_sum(
    tensors: Sequence[Mapping[str, torch.Tensor]], coeffs: Sequence[float]
) -> Weights:
    """Σ_k c_k · T_k per key, accumulated in float64 in the given order, returned as float32."""
    if len(tensors) != len(coeffs):
        raise ValueError(
            f"weighted_sum: {len(tensors)} tensors but {len(coeffs)} coefficients"
        )
    if not tensors:
        raise ValueError("weighted_sum: nothing to sum")
    out: Weights = {}
    cs = [float(c) for c in coeffs]
    for key in tensors[0]:
        first = tensors[0][key]
        if first.device.type == "cpu" and first.numel() > BLOCK:
            # The float32 result block by block: no float64 accumulator of the whole tensor
            # (8 bytes an element written, read back and converted), the same bits.
            out[key] = torch.empty(first.shape, dtype=torch.float32)
            flats = [t[key].reshape(-1) for t in tensors]
            _blocks(flats, cs, first.numel(), out=out[key].view(-1))
            continue
        acc = torch.zeros_like(first, dtype=torch.float64)
        accumulate(acc, [t[key] for t in tensors], cs)
        out[key] = acc.to(torch.float32)
    return out


def add(
    weights: Mapping[str, torch.Tensor],
    delta: Mapping[str, torch.Tensor],
    scale: float = 1.0,
) -> Weights:
    """W + scale · Δ per key (float32).

    Two roundings per element, as ``W + scale * Δ`` writes it (the product rounded to float32,
    then the sum; no fused multiply-add); on the CPU above one block, block by block through a
    block-sized buffer, so the product is never a tensor of its own (same bits,
    tests/test_blocked_sums.py).
    """
    out: Weights = {}
    for k in weights:
        w, d = weights[k].to(torch.float32), delta[k].to(torch.float32)
        if w.device.type != "cpu" or w.numel() <= BLOCK:
            out[k] = w + scale * d
            continue
        new = torch.empty(w.shape, dtype=torch.float32)
        flat, wf, df = new.view(-1), w.reshape(-1), d.reshape(-1)
        buf = torch.empty(BLOCK, dtype=torch.float32)
        for start in range(0, flat.numel(), BLOCK):
            stop = min(flat.numel(), start + BLOCK)
            b = buf[: stop - start]
            torch.mul(df[start:stop], scale, out=b)
            torch.add(wf[start:stop], b, out=flat[start:stop])
        out[k] = new
    return out


def global_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    """√(Σ ‖T‖²) over all keys, in float64, summed in sorted key order.

    The order is fixed because a dict's order is not: weights restored from a checkpoint come
    back in safetensors' sorted order, a live model's in its state-dict order, and a float sum
    in another order may differ in its last bit (a resumed run's update_norm did).
    """
    return math.sqrt(sum(sum_squares(tensors[k]) for k in sorted(tensors)))


#: Elements per block of :func:`sum_squares` (an 8 MiB float64 copy at a time).
_SQ_BLOCK = 1 << 20


def sum_squares(t: torch.Tensor, copy_to: torch.Tensor | None = None) -> float:
    """‖T‖²_F accumulated in float64 block by block (2²⁰ elements, blocks in order).

    A float64 copy of the whole tensor is never made (``t.to(float64).pow(2).sum()`` writes
    two); the summation order differs from that expression's, so the last bits may too.
    ``copy_to`` (same number of elements, any dtype, contiguous): ``t`` is also copied into it,
    block by block while each block is in the cache — one read of ``t`` for both.
    """
    flat = t.reshape(-1)
    total = 0.0
    dst = None if copy_to is None else copy_to.view(-1)
    if flat.dtype == torch.float64 or flat.numel() <= _SQ_BLOCK:
        if dst is not None:
            dst.copy_(flat)
        for start in range(0, flat.numel(), _SQ_BLOCK):
            block = flat[start : start + _SQ_BLOCK].to(torch.float64)
            total += float(torch.dot(block, block))
        return total
    # One reused float64 buffer: a fresh 8 MiB copy per block cost more in page faults than
    # the conversion (0.21 of 0.30 s for 50 × 21 M elements); the same values, the same dots.
    buf = torch.empty(_SQ_BLOCK, dtype=torch.float64, device=t.device)
    for start in range(0, flat.numel(), _SQ_BLOCK):
        src = flat[start : start + _SQ_BLOCK]
        if dst is not None:
            dst[start : start + src.numel()].copy_(src)
        block = buf[: src.numel()]
        block.copy_(src)
        total += float(torch.dot(block, block))
    return total


def sorted_updates(updates: Sequence[ClientUpdate]) -> list[ClientUpdate]:
    """Updates in ascending client-id order; duplicate ids are an error."""
    ordered = sorted(updates, key=lambda u: u.client_id)
    ids = [u.client_id for u in ordered]
    if len(set(ids)) != len(ids):
        raise ValueError(f"aggregate: duplicate client ids in {ids}")
    return ordered


@dataclass(frozen=True)
class PartialSum:
    """A group of accepted clients pre-summed on its worker: Σ n_k Δ_k (float64) and Σ n_k.

    Algorithms of the FedAvg family (``presummable``) depend on a round's updates only through
    Σ_k p_k Δ_k, so a worker can send one partial sum per group instead of one Δ per client.
    """

    clients: tuple[int, ...]
    samples: int
    weighted: Weights


def partial_sum(updates: Sequence[ClientUpdate]) -> PartialSum:
    """Σ n_k Δ_k over ``updates`` in ascending client-id order, accumulated in float64."""
    ordered = sorted_updates(updates)
    if not ordered:
        raise ValueError("partial_sum: no updates")
    out: Weights = {}
    for key in ordered[0].delta:
        acc = torch.zeros_like(ordered[0].delta[key], dtype=torch.float64)
        out[key] = accumulate(
            acc, [u.delta[key] for u in ordered], [u.num_samples for u in ordered]
        )
    return PartialSum(
        tuple(u.client_id for u in ordered), sum(u.num_samples for u in ordered), out
    )


def combine_partial_sums(parts: Sequence[PartialSum]) -> ClientUpdate:
    """One update holding Σ_k p_k Δ_k of every group (groups in order of their first client).

    ``fedavg_delta`` of this single update is its delta, so a presummable algorithm's server
    half gives the same step as over the clients' own updates (up to float64 summation order).
    """
    ordered = sorted(parts, key=lambda p: p.clients[0])
    ids = [c for p in ordered for c in p.clients]
    if len(set(ids)) != len(ids):
        raise ValueError(f"aggregate: duplicate client ids in {sorted(ids)}")
    total = sum(p.samples for p in ordered)
    if total <= 0:
        raise ValueError("aggregate: the partial sums hold no samples")
    mean: Weights = {}
    for key in ordered[0].weighted:
        acc = torch.zeros_like(ordered[0].weighted[key], dtype=torch.float64)
        accumulate(acc, [p.weighted[key] for p in ordered], [1.0] * len(ordered))
        mean[key] = (acc / total).to(torch.float32)
    return ClientUpdate(
        client_id=ordered[0].clients[0],
        delta=mean,
        num_samples=total,
        loss=math.nan,
        steps=0,
    )
