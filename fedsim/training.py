"""Local training of one client's projector on a resident backbone (no Ray here).

A worker calls :func:`train_cohort` for each group of clients of a round (cohort batching): each
client's start projector is copied in place into a projector slot (the resident projector and
copies of it kept for the whole run), the clients' rows are read from the memory-mapped dataset,
and each local step runs one forward/backward pass of the frozen backbone over every client's
batch, the image features of each client going through its own projector. Each client has its own
optimiser, step count and algorithm hooks; the delta Δ_k = W_k − W_t of each comes back.
:func:`train_client` is a cohort of one. Every random draw (caption or question per example) comes from a generator keyed by
(seed, round, client), so the result does not depend on which worker runs the task or when.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedsim.algorithms.base import ClientUpdate, LocalTraining, Weights
from fedsim.data.collate import training_batch
from fedsim.data.feature_cache import cached_tower
from fedsim.data.loaders import DataError
from fedsim.data.rows import RowReader
from fedsim.losses import per_example_loss, token_mean_loss
from fedsim.models.backbone import Backbone, check_projector_shapes

if TYPE_CHECKING:
    from fedsim.scenarios.silos import CaptionTransform

TASK_STREAM = 7004  # generator purpose id: per-example task (caption or question)


@dataclass(frozen=True)
class ClientTask:
    """One client's work in one round, as the driver sends it to a worker.

    Attributes
    ----------
    client_id, server_round:
        Who and when (keys of the private generator, with ``seed``).
    rows:
        Dataset row ids, ``steps × batch_size`` of them, in stream order.
    lrs:
        The learning rate of each local step (global schedule).
    client_state:
        What the client-state store holds for this client (e.g. optimiser state), or empty.
    qa_flags:
        Which rows are questions rather than captions; None draws them from the task's private
        generator (:func:`task_flags`). Data-parallel training passes each rank its share of the
        flags drawn for the whole batch, so that the split does not change the task.
    cost:
        Predicted tokens (:class:`fedsim.cost.TokenCost`); orders the round's tasks.
    owners:
        The client that owns each of ``rows`` (the key of its caption transforms), when it is
        not ``client_id``: the centralized run's pooled stream mixes every client's rows.
    """

    client_id: int
    server_round: int
    seed: int
    rows: np.ndarray
    lrs: tuple[float, ...]
    batch_size: int
    client_state: Weights = field(default_factory=dict)
    qa_flags: np.ndarray | None = None
    cost: int = 0
    owners: np.ndarray | None = None


@dataclass(frozen=True)
class TrainSettings:
    """The parts of the run config that local training needs.

    ``captions``: the scenario's per-client caption transforms (noisy silos, caption styles;
    :mod:`fedsim.scenarios.silos`), None when off.
    """

    optimizer: str = "adamw"
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    loss: str = "per_example"
    qa_fraction: float = 0.3
    max_update_norm: float | None = None
    captions: CaptionTransform | None = None


@dataclass(frozen=True)
class ClientResult:
    """A client's update, its new persistent state, and timing."""

    update: ClientUpdate
    client_state: Weights
    seconds: float
    bad_images: int = 0


def _optimizer(
    params: list[torch.nn.Parameter], settings: TrainSettings, lr: float
) -> torch.optim.Optimizer:
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=settings.weight_decay)
    if settings.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=settings.weight_decay)
    raise ValueError(f"train.optimizer: unknown optimizer {settings.optimizer!r}")


def optimizer_state_to_tensors(opt: torch.optim.Optimizer) -> Weights:
    """Flatten an optimiser's per-parameter state to ``optim.<i>.<name>`` tensors."""
    out: Weights = {}
    for i, state in opt.state_dict()["state"].items():
        for name, value in state.items():
            out[f"optim.{i}.{name}"] = torch.as_tensor(value).detach().clone()
    return out


def load_optimizer_state(
    opt: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor]
) -> None:
    """Inverse of :func:`optimizer_state_to_tensors` (no-op when there is nothing stored)."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if not key.startswith("optim."):
            continue
        _, i, name = key.split(".", 2)
        state.setdefault(int(i), {})[name] = value.clone()
    if state:
        sd = opt.state_dict()
        sd["state"] = state
        opt.load_state_dict(sd)


def training_text(
    data: dict[str, list[Any]],
    task: ClientTask,
    positions: Sequence[int] | np.ndarray,
    settings: TrainSettings,
) -> dict[str, list[Any]]:
    """The text a client trains on: the columns ``data`` read for ``task.rows[positions]``,
    through the scenario's caption transforms (each row as the client owning it writes it).

    This is where the transforms hook in: on the worker, after the rows are read and before
    their text reaches the tokenizer. Without transforms ``data`` comes back as it is.
    """
    if settings.captions is None or len(positions) == 0:
        return data
    rows = task.rows[np.asarray(positions, dtype=np.int64)]
    if task.owners is not None:
        owners = task.owners[np.asarray(positions, dtype=np.int64)]
    else:
        owners = np.full(len(rows), task.client_id, dtype=np.int64)
    return settings.captions.apply(data, rows, owners)


def task_flags(
    seed: int, server_round: int, client_id: int, n: int, qa_fraction: float
) -> np.ndarray:
    """Which of the task's ``n`` examples are questions (True) rather than captions."""
    rng = np.random.default_rng([seed, TASK_STREAM, server_round, client_id + 1])
    return rng.random(n) < qa_fraction


class CohortProjector(torch.nn.Module):
    """Applies each client's own projector to its own images (a cohort of clients in one pass).

    ``groups`` holds, in batch order, how many images belong to each slot; the frozen encoder and
    LM see one batch, while the projector, its gradients and its optimiser stay per client. The
    projector is a small share of the work (the LM dominates), so each slot runs its own module
    on its slice: the same operations as training that client alone.
    """

    def __init__(self, slots: list[torch.nn.Module]) -> None:
        super().__init__()
        self.slots = torch.nn.ModuleList(slots)
        self.groups: list[tuple[int, int]] = []  # (slot, images) in batch order

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out, at = [], 0
        for slot, n in self.groups:
            out.append(self.slots[slot](features[at : at + n]))
            at += n
        if at != features.shape[0]:
            raise RuntimeError(
                f"cohort projector: {at} images assigned, the batch has {features.shape[0]}"
            )
        return torch.cat(out, 0)


def _slots(backbone: Backbone, n: int) -> list[torch.nn.Module]:
    """``n`` projector modules: the resident one first, then copies kept on the backbone."""
    import copy

    extra: list[torch.nn.Module] = backbone.__dict__.setdefault("cohort_slots", [])
    while len(extra) < n - 1:
        extra.append(copy.deepcopy(backbone.projector))
    return [backbone.projector, *extra[: n - 1]]


@dataclass
class _Client:
    """One client's local-training state inside a cohort."""

    task: ClientTask
    module: torch.nn.Module
    named: dict[str, torch.nn.Parameter]
    opt: torch.optim.Optimizer
    ctx: dict[str, Any]
    start: dict[str, torch.Tensor]
    flags: np.ndarray
    losses: list[float] = field(default_factory=list)
    trained: int = 0
    bad_images: int = 0


def train_client(
    backbone: Backbone,
    reader: RowReader,
    task: ClientTask,
    global_weights: Mapping[str, torch.Tensor],
    payload: Mapping[str, torch.Tensor],
    local: LocalTraining,
    settings: TrainSettings,
) -> ClientResult:
    """Train the projector from ``global_weights`` on the task's rows; return Δ and stats."""
    return train_cohort(
        backbone, reader, [task], [global_weights], payload, local, settings
    )[0]


def train_cohort(
    backbone: Backbone,
    reader: RowReader,
    tasks: Sequence[ClientTask],
    starts: Sequence[Mapping[str, torch.Tensor]],
    payload: Mapping[str, torch.Tensor],
    local: LocalTraining,
    settings: TrainSettings,
) -> list[ClientResult]:
    """Train several clients of one round together: one frozen-backbone pass per local step.

    Client ``k`` starts from ``starts[k]``; each keeps its own projector, optimiser (and step
    count), algorithm context and loss. Step ``s`` batches the rows of every client that still
    has a step ``s``; a client whose steps are done is left out (masked) from then on. Padding is
    to the longest sequence of the batch and carries no loss. The result equals training the
    clients one after another up to floating-point summation order in the shared LM (a cohort of
    one is exactly that).
    """
    if len(tasks) != len(starts):
        raise ValueError(f"{len(tasks)} cohort tasks but {len(starts)} start weights")
    t0 = time.perf_counter()
    loss_fn = per_example_loss if settings.loss == "per_example" else token_mean_loss
    device = next(backbone.model.parameters()).device
    clients = [
        _start_client(backbone, task, w, module, payload, local, settings)
        for task, w, module in zip(tasks, starts, _slots(backbone, len(tasks)))
    ]
    with _cohort_model(backbone, reader, clients) as cohort:
        steps = max((len(c.task.lrs) for c in clients), default=0)
        for step in range(steps):
            _cohort_step(
                backbone,
                reader,
                clients,
                step,
                loss_fn,
                device,
                local,
                settings,
                cohort,
            )
    seconds = (time.perf_counter() - t0) / max(len(clients), 1)
    return [_client_result(c, local, seconds) for c in clients]


def _start_client(
    backbone: Backbone,
    task: ClientTask,
    w: Mapping[str, torch.Tensor],
    module: torch.nn.Module,
    payload: Mapping[str, torch.Tensor],
    local: LocalTraining,
    settings: TrainSettings,
) -> _Client:
    """A client's slot loaded with its start weights, its optimiser (its state restored when
    the algorithm keeps it), its algorithm context and its caption/question draws."""
    check_projector_shapes(backbone, w, where=f"client {task.client_id} projector")
    named = dict(module.named_parameters())
    with torch.no_grad():
        for name, value in w.items():
            named[name].copy_(value)
    opt = _optimizer(list(named.values()), settings, task.lrs[0] if task.lrs else 0.0)
    if local.persistent_optimizer:
        load_optimizer_state(opt, task.client_state)
    flags = (
        task.qa_flags
        if task.qa_flags is not None
        else task_flags(
            task.seed,
            task.server_round,
            task.client_id,
            len(task.rows),
            settings.qa_fraction,
        )
    )
    return _Client(
        task,
        module,
        named,
        opt,
        local.prepare(task.client_state, payload),
        {k: v.detach().clone() for k, v in named.items()},
        flags,
    )


@contextmanager
def _cohort_model(
    backbone: Backbone, reader: RowReader, clients: list[_Client]
) -> Iterator[CohortProjector | None]:
    """The backbone in training mode with the cohort's projectors in place of the resident one
    (and the cached-feature tower when the reader hands out features); restored after."""
    llava = backbone.model.model
    resident = llava.multi_modal_projector
    cohort = CohortProjector([c.module for c in clients]) if len(clients) > 1 else None
    if cohort is not None:
        llava.multi_modal_projector = cohort
    tower = llava.vision_tower
    if getattr(reader, "features", None) is not None:
        # The reader hands out cached encoder features: the encoder is skipped.
        llava.vision_tower = cached_tower(backbone.model)
    backbone.model.train()
    try:
        yield cohort
    finally:
        backbone.model.eval()
        llava.vision_tower = tower
        if cohort is not None:
            llava.multi_modal_projector = resident


def _client_result(c: _Client, local: LocalTraining, seconds: float) -> ClientResult:
    """Δ_k = end − start in fp32, the algorithm's extras and new client state, the stats."""
    end = {
        k: v.detach().to(torch.float32).clone()
        for k, v in c.module.state_dict().items()
    }
    start32 = {k: v.to(torch.float32) for k, v in c.start.items()}
    delta = {k: end[k] - start32[k] for k in end}
    extras, new_state = local.finish(start32, end, c.task.lrs, c.ctx)
    if local.persistent_optimizer:
        new_state = {**new_state, **optimizer_state_to_tensors(c.opt)}
    update = ClientUpdate(
        client_id=c.task.client_id,
        delta=delta,
        num_samples=c.trained,
        loss=float(np.mean(c.losses)) if c.losses else math.nan,
        steps=len(c.task.lrs),
        extras=extras,
    )
    return ClientResult(update, new_state, seconds, c.bad_images)


def _cohort_step(
    backbone: Backbone,
    reader: RowReader,
    clients: list[_Client],
    step: int,
    loss_fn: Any,
    device: torch.device,
    local: LocalTraining,
    settings: TrainSettings,
    cohort: CohortProjector | None,
) -> None:
    """Local step ``step`` of every client that has one, in one forward/backward pass."""
    inputs = _step_inputs(backbone, reader, clients, step, local, settings)
    if inputs is None:
        return
    prompts, targets, pixels, active = inputs
    batch = {
        k: v.to(device)
        for k, v in training_batch(
            backbone, (), prompts, targets, pixels=pixels
        ).items()
    }
    labels = batch.pop("labels")
    if cohort is not None:
        cohort.groups = [(slot, n) for slot, _, n in active]
    for _, c, _ in active:
        lr = c.task.lrs[step]
        for group in c.opt.param_groups:
            group["lr"] = lr
    logits = backbone.model(**batch).logits  # [B, L, V]
    total: torch.Tensor | None = None
    losses = []
    at = 0
    for _, c, n in active:
        # Slices of the shared batch: a client's loss depends on its own rows only.
        loss = (
            loss_fn(logits[at : at + n], labels[at : at + n])
            if len(active) > 1
            else loss_fn(logits, labels)
        )
        at += n
        extra = local.loss_term(c.named, c.start, c.ctx)
        term = loss + extra if extra is not None else loss
        total = term if total is None else total + term
        losses.append(loss)
    for _, c, _ in active:
        c.opt.zero_grad(set_to_none=True)
    assert total is not None
    total.backward()
    for (_, c, _), loss in zip(active, losses):
        local.correct_gradients(c.named, c.ctx)
        if settings.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(list(c.named.values()), settings.grad_clip)
        c.opt.step()
        c.losses.append(float(loss.detach()))


def _step_inputs(
    backbone: Backbone,
    reader: RowReader,
    clients: list[_Client],
    step: int,
    local: LocalTraining,
    settings: TrainSettings,
) -> tuple[list[str], list[str], torch.Tensor, list[tuple[int, _Client, int]]] | None:
    """Step ``step``'s prompts, targets and pixels of every client that has the step, and
    (slot, client, examples) of each in batch order; None when no client has a readable row."""
    prompts: list[str] = []
    targets: list[str] = []
    pixel_parts: list[torch.Tensor] = []
    active: list[tuple[int, _Client, int]] = []  # (slot, client, examples)
    for slot, c in enumerate(clients):
        if step >= len(c.task.lrs):
            continue  # this client's local steps are done: left out of the batch
        b = c.task.batch_size
        rows = c.task.rows[step * b : (step + 1) * b]
        data, pixels, kept = reader.read(rows, backbone)
        c.bad_images += len(rows) - len(kept)
        if pixels is None:  # every image of the step was unreadable (skip policy)
            if getattr(local, "collective", False):
                raise DataError(
                    f"client {c.task.client_id}: every image of step {step} is unreadable; "
                    "data-parallel training cannot skip a step on one worker"
                )
            continue
        # The caption transforms of the scenario, keyed by (seed, owner, row).
        data = training_text(data, c.task, np.asarray(kept) + step * b, settings)
        qa = c.flags[step * b : (step + 1) * b][kept]
        if "question" in data:
            prompts += [
                backbone.qa_prompt.format(question=q) if f else backbone.caption_prompt
                for q, f in zip(data["question"], qa)
            ]
            targets += [
                a if f else cap
                for a, cap, f in zip(data["answer"], data["caption"], qa)
            ]
        else:  # a caption corpus: LLaVA's stage-1 plain template, the image then the caption
            prompts += [backbone.caption_prompt] * len(kept)
            targets += list(data["caption"])
        pixel_parts.append(pixels)
        active.append((slot, c, len(kept)))
        c.trained += len(kept)
    if not active:
        return None
    pixels = pixel_parts[0] if len(pixel_parts) == 1 else torch.cat(pixel_parts, 0)
    return prompts, targets, pixels, active
