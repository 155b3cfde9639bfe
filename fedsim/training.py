"""Local training of one client's projector on a resident backbone (no Ray here).

A worker calls :func:`train_client` for each task: the global projector is copied into the
resident model in place, the client's rows are read from the memory-mapped dataset, ``steps``
optimiser steps run with the algorithm's client half hooked in, and the delta Δ_k = W_k − W_t
comes back. Every random draw (caption or question per example) comes from a generator keyed by
(seed, round, client), so the result does not depend on which worker runs the task or when.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from fedsim.algorithms.base import ClientUpdate, LocalTraining, Weights
from fedsim.data.collate import training_batch
from fedsim.data.loaders import DataError
from fedsim.data.rows import RowReader
from fedsim.losses import per_example_loss, token_mean_loss
from fedsim.models.backbone import Backbone, get_projector, set_projector_

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
    """

    client_id: int
    server_round: int
    seed: int
    rows: np.ndarray
    lrs: tuple[float, ...]
    batch_size: int
    client_state: Weights = field(default_factory=dict)
    qa_flags: np.ndarray | None = None


@dataclass(frozen=True)
class TrainSettings:
    """The parts of the run config that local training needs."""

    optimizer: str = "adamw"
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    loss: str = "per_example"
    qa_fraction: float = 0.3


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


def task_flags(
    seed: int, server_round: int, client_id: int, n: int, qa_fraction: float
) -> np.ndarray:
    """Which of the task's ``n`` examples are questions (True) rather than captions."""
    rng = np.random.default_rng([seed, TASK_STREAM, server_round, client_id + 1])
    return rng.random(n) < qa_fraction


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
    t0 = time.perf_counter()
    set_projector_(backbone, global_weights)
    named = dict(backbone.projector.named_parameters())
    params = list(named.values())
    opt = _optimizer(params, settings, task.lrs[0] if task.lrs else 0.0)
    if local.persistent_optimizer:
        load_optimizer_state(opt, task.client_state)
    ctx = local.prepare(task.client_state, payload)
    start = {k: v.detach().clone() for k, v in named.items()}
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
    loss_fn = per_example_loss if settings.loss == "per_example" else token_mean_loss
    device = next(backbone.model.parameters()).device
    losses: list[float] = []
    backbone.model.train()
    b = task.batch_size
    trained = bad_images = 0
    for step, lr in enumerate(task.lrs):
        rows = task.rows[step * b : (step + 1) * b]
        data, pixels, kept = reader.read(rows, backbone)
        bad_images += len(rows) - len(kept)
        if pixels is None:  # every image of the step was unreadable (skip policy)
            if getattr(local, "collective", False):
                raise DataError(
                    f"client {task.client_id}: every image of step {step} is unreadable; "
                    "data-parallel training cannot skip a step on one worker"
                )
            continue
        qa = flags[step * b : (step + 1) * b][kept]
        if "question" in data:
            prompts = [
                backbone.qa_prompt.format(question=q) if f else backbone.caption_prompt
                for q, f in zip(data["question"], qa)
            ]
            targets = [
                a if f else c for a, c, f in zip(data["answer"], data["caption"], qa)
            ]
        else:  # a caption corpus: LLaVA's stage-1 plain template, the image then the caption
            prompts = [backbone.caption_prompt] * len(kept)
            targets = list(data["caption"])
        trained += len(kept)
        batch = {
            k: v.to(device)
            for k, v in training_batch(
                backbone, (), prompts, targets, pixels=pixels
            ).items()
        }
        labels = batch.pop("labels")
        for group in opt.param_groups:
            group["lr"] = lr
        logits = backbone.model(**batch).logits  # [B, L, V]
        loss = loss_fn(logits, labels)
        extra = local.loss_term(named, start, ctx)
        total = loss + extra if extra is not None else loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        local.correct_gradients(named, ctx)
        if settings.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
        opt.step()
        losses.append(float(loss.detach()))
    backbone.model.eval()
    end = get_projector(backbone)
    start32 = {k: v.to(torch.float32) for k, v in start.items()}
    delta = {k: end[k] - start32[k] for k in end}
    extras, new_state = local.finish(start32, end, task.lrs, ctx)
    if local.persistent_optimizer:
        new_state = {**new_state, **optimizer_state_to_tensors(opt)}
    mean_loss = float(np.mean(losses)) if losses else math.nan
    update = ClientUpdate(
        client_id=task.client_id,
        delta=delta,
        num_samples=trained,
        loss=mean_loss,
        steps=len(task.lrs),
        extras=extras,
    )
    return ClientResult(update, new_state, time.perf_counter() - t0, bad_images)
