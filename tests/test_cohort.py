"""Cohort batching: several clients in one frozen-backbone pass give what one at a time gives.

The reference is :func:`train_client` run client after client (a cohort of one runs the resident
projector alone, exactly the one-client path). The two paths differ only in how the frozen LM
groups its float32 sums (a larger or further-padded batch), so they agree up to rounding.

Where the tolerance comes from (an argument, not one machine's value). The comparisons train with
plain SGD: Δ = −Σ_t η_t g_t is linear in the gradients, and one float32 reduction of n terms has a
relative error of at most γ_n = n·2⁻²⁴/(1 − n·2⁻²⁴) of Σ|terms| (Higham, Accuracy and Stability,
§3.1). The toy's longest reduction (a hidden width of 128 times at most 6 × 64 tokens of a batch)
has n < 5·10⁴, γ_n < 3·10⁻³ in the worst case and about √n·2⁻²⁴ < 2·10⁻⁵ typically; a few
steps at η ≤ 2·10⁻³ add at most η·L ≪ 1 of growth per step. Measured against the largest entry of
Δ (so a single entry that cancels to ~0 cannot blow it up), RTOL = 1e-3 sits between the typical and
the worst case, while a client trained on the wrong rows, masked at the wrong step or missing its
FedProx/SCAFFOLD term moves Δ by tens of percent. AdamW is left out of the tolerance checks on
purpose: its step g/(√v + ε) divides by the gradient's own size, so a coordinate whose gradient
rounds near zero can flip sign and no rounding bound holds (see
test_persistent_optimiser_state_and_step_counts_per_client for what is checked there).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsim.algorithms.base import LocalTraining
from fedsim.algorithms.registry import build_algorithm
from fedsim.data.rows import RowReader
from fedsim.data.scenes_dataset import ensure_scenes
from fedsim.data.synthetic import SceneSpec
from fedsim.models.backbone import get_projector, init_projector
from fedsim.training import (
    ClientTask,
    TrainSettings,
    train_client,
    train_cohort,
)

RTOL = 1e-3  # argued in the module docstring
SGD = TrainSettings(optimizer="sgd")


@pytest.fixture(scope="module")
def reader(tmp_path_factory):
    path = ensure_scenes(
        tmp_path_factory.mktemp("scenes"), SceneSpec(styles=("filled",)), 0, 5, 400
    )
    return RowReader.open(str(path))


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert set(a) == set(b), what
    for k in a:
        scale = float(a[k].abs().max())
        err = float((a[k] - b[k]).abs().max())
        assert err <= RTOL * max(scale, 1e-12), f"{what} {k}: {err} vs scale {scale}"


def _dist(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float(sum(((a[k] - b[k]) ** 2).sum() for k in a)) ** 0.5


def _tasks(steps: list[int], batch: int, states=None, rnd: int = 3) -> list[ClientTask]:
    out = []
    for i, n in enumerate(steps):
        cid = 10 + 7 * i
        rows = np.arange(cid * 5, cid * 5 + n * batch) % 400
        lrs = tuple(2e-3 * (1 - 0.1 * s) for s in range(n))
        out.append(
            ClientTask(cid, rnd, 0, rows, lrs, batch, (states or {}).get(cid, {}))
        )
    return out


def _compare(toy, reader, tasks, starts, payload, local, settings):
    alone = [
        train_client(toy, reader, t, w, payload, local, settings)
        for t, w in zip(tasks, starts)
    ]
    together = train_cohort(toy, reader, tasks, starts, payload, local, settings)
    assert [r.update.client_id for r in together] == [t.client_id for t in tasks]
    for a, b in zip(alone, together):
        cid = a.update.client_id
        _close(a.update.delta, b.update.delta, f"client {cid} delta")
        _close(a.update.extras, b.update.extras, f"client {cid} extras")
        _close(a.client_state, b.client_state, f"client {cid} state")
        assert b.update.num_samples == a.update.num_samples
        assert b.update.steps == a.update.steps
        assert b.update.loss == pytest.approx(a.update.loss, rel=RTOL)
        assert float(sum(v.abs().sum() for v in a.update.delta.values())) > 0
    return alone, together


def test_fedavg_cohort_with_unequal_local_steps_matches_one_at_a_time(toy, reader):
    # Clients with 5, 2 and 4 steps: from step 2 on the second is masked out, from step 4
    # the third; each client has its own start weights.
    tasks = _tasks([5, 2, 4], batch=6)
    starts = [init_projector(toy, s) for s in (1, 2, 3)]
    _, together = _compare(toy, reader, tasks, starts, {}, LocalTraining(), SGD)
    assert [r.update.steps for r in together] == [5, 2, 4]
    assert [r.update.num_samples for r in together] == [30, 12, 24]


@pytest.mark.parametrize("loss", ["per_example", "token_mean"])
def test_fedprox_term_and_loss_rules_per_client(toy, reader, loss):
    local = build_algorithm("fedprox", {"mu": 0.5}).local_training()
    w = init_projector(toy, 4)
    tasks = _tasks([3, 3, 3, 3], batch=5)
    _compare(
        toy,
        reader,
        tasks,
        [w] * 4,
        {},
        local,
        TrainSettings(optimizer="sgd", loss=loss),
    )


def test_scaffold_corrections_and_control_variates_per_client(toy, reader):
    algo = build_algorithm("scaffold", {})
    local = algo.local_training()
    w = init_projector(toy, 5)
    g = torch.Generator().manual_seed(0)
    # A server control variate c and distinct client variates c_i: each client's gradient
    # gets its own (c − c_i), and c_i⁺ comes back per client.
    payload = {f"c/{k}": 0.01 * torch.randn(v.shape, generator=g) for k, v in w.items()}
    states = {
        10 + 7 * i: {
            f"c/{k}": 0.01 * torch.randn(v.shape, generator=g) for k, v in w.items()
        }
        for i in range(3)
    }
    tasks = _tasks([4, 4, 3], batch=4, states=states)
    alone, _ = _compare(toy, reader, tasks, [w] * 3, payload, local, SGD)
    assert all(any(k.startswith("c/") for k in r.client_state) for r in alone)


def test_persistent_optimiser_state_and_step_counts_per_client(toy, reader):
    class Persistent(LocalTraining):
        persistent_optimizer = True

    local = Persistent()
    # Give the clients different optimiser histories (Adam step counts 2 and 5): bias
    # corrections then differ per client inside one cohort.
    w = init_projector(toy, 6)
    states = {}
    for i, steps in enumerate([2, 5]):
        t = _tasks([steps], batch=4, rnd=1)[0]
        res = train_client(toy, reader, t, w, {}, local, TrainSettings())
        states[10 + 7 * i] = res.client_state
    assert float(states[10]["optim.0.step"]) == 2.0
    assert float(states[17]["optim.0.step"]) == 5.0
    tasks = _tasks([3, 3], batch=4, states=states)
    alone = [train_client(toy, reader, t, w, {}, local, TrainSettings()) for t in tasks]
    together = train_cohort(toy, reader, tasks, [w, w], {}, local, TrainSettings())
    assert float(together[0].client_state["optim.0.step"]) == 5.0
    assert float(together[1].client_state["optim.0.step"]) == 8.0
    # AdamW has no rounding bound (module docstring), so no tolerance: each client's cohort
    # delta must be nearer its own one-at-a-time delta than the other client's, which it
    # would not be if histories, bias corrections or rows were mixed up between slots.
    for i, res in enumerate(together):
        own, other = alone[i].update.delta, alone[1 - i].update.delta
        assert _dist(res.update.delta, own) < _dist(res.update.delta, other), i


def test_cohort_leaves_the_resident_projector_in_place(toy, reader):
    before = toy.model.model.multi_modal_projector
    w = init_projector(toy, 7)
    train_cohort(
        toy,
        reader,
        _tasks([2, 2], batch=3),
        [w, w],
        {},
        LocalTraining(),
        SGD,
    )
    assert toy.model.model.multi_modal_projector is before
    # Slot 0 is the resident projector: it holds the first client's final weights.
    single = train_client(
        toy, reader, _tasks([1], batch=3)[0], w, {}, LocalTraining(), SGD
    )
    now = get_projector(toy)
    _close(
        {k: w[k] + single.update.delta[k] for k in w}, now, "resident after a cohort"
    )
