"""Per-round diagnostics: hand-computed cases for each measure, and one run that records them.

Tolerances: every expected value is a ratio of small integers or square roots of them computed in
float64 from float32 inputs that are exactly representable (0, ±1, ±2, 3), so the only rounding is
float64's in sums of ≤ 16 terms and one eigendecomposition of a ≤ 4 × 4 matrix: 1e-12 relative is
far above it.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from fedsim.algorithms.base import ClientUpdate
from fedsim.algorithms.diagnostics import (
    effective_rank,
    round_diagnostics,
    step_diagnostics,
)

TOL = dict(rel=1e-12, abs=1e-12)


def _u(cid: int, n: int, **tensors: list) -> ClientUpdate:
    return ClientUpdate(
        client_id=cid,
        delta={k: torch.tensor(v, dtype=torch.float32) for k, v in tensors.items()},
        num_samples=n,
        loss=0.0,
        steps=1,
    )


def test_orthogonal_clients_have_no_conflict_and_drift_one():
    # Δ_1 = e1, Δ_2 = e2, p = ½ each: cos 0; Δ̄ = (e1+e2)/2, ‖Δ̄‖² = ½,
    # Σ p‖Δ_k‖² − ‖Δ̄‖² = 1 − ½ → drift √(½ / ½) = 1; √p G √p = ½ I → effective rank 2.
    ups = [_u(0, 5, b=[1.0, 0.0]), _u(1, 5, b=[0.0, 1.0])]
    d = round_diagnostics(ups, {"b": torch.tensor([0.5, 0.5])}, None)
    assert d["client_cos_mean"] == pytest.approx(0.0, **TOL)
    assert d["client_cos_neg_share"] == 0.0
    assert d["drift"] == pytest.approx(1.0, **TOL)
    assert d["client_eff_rank"] == pytest.approx(2.0, **TOL)
    # Each client is zero where the other is not: no live coordinate disagrees.
    assert d["sign_conflict"] == 0.0
    assert "step_cos_prev" not in d


def test_opposed_clients_conflict_fully():
    # Δ_1 = a (n = 3), Δ_2 = −a (n = 1), a = (1, 2): p = (¾, ¼), Δ̄ = a/2.
    # cos = −1 (the one pair is negative); client 2 disagrees with sign(Δ̄) on both coordinates:
    # sign_conflict = ¼ · 1. Σ p‖Δ_k‖² = ‖a‖² = 5, ‖Δ̄‖² = 5/4 → drift = √((5 − 5/4)/(5/4)) = √3.
    ups = [_u(0, 3, b=[1.0, 2.0]), _u(1, 1, b=[-1.0, -2.0])]
    d = round_diagnostics(ups, {"b": torch.tensor([0.5, 1.0])}, None)
    assert d["client_cos_mean"] == pytest.approx(-1.0, **TOL)
    assert d["client_cos_neg_share"] == 1.0
    assert d["sign_conflict"] == pytest.approx(0.25, **TOL)
    assert d["drift"] == pytest.approx(math.sqrt(3.0), **TOL)
    # Both deltas lie on one line: one non-zero eigenvalue.
    assert d["client_eff_rank"] == pytest.approx(1.0, **TOL)


def test_identical_clients_and_matrix_spectrum():
    # Identical rank-1 matrix deltas u vᵀ: everything agrees, one direction holds all energy.
    w = [[1.0, 2.0, 0.0, 0.0], [2.0, 4.0, 0.0, 0.0], [0.0] * 4, [0.0] * 4]
    ups = [_u(c, 1 + c, w=w) for c in range(3)]
    d = round_diagnostics(ups, {"w": torch.tensor(w)}, None)
    assert d["client_cos_mean"] == pytest.approx(1.0, **TOL)
    assert d["drift"] == pytest.approx(0.0, abs=1e-7)
    assert d["sign_conflict"] == 0.0
    assert d["eff_rank/w"] == pytest.approx(1.0, **TOL)
    # ⌊4 / 4⌋ = 1 direction keeps all of a rank-1 spectrum.
    assert d["energy_quarter/w"] == pytest.approx(1.0, **TOL)


def test_full_rank_spectrum_energy_quarter():
    # Two clients, Δ_1 = diag(1, 1, 0, 0), Δ_2 = diag(0, 0, 1, 1), p = ½: Σ p Δ Δᵀ = ½ I₄ →
    # effective rank 4, and the top ⌊4/4⌋ = 1 direction holds ¼ of the energy.
    ups = [
        _u(0, 2, w=torch.diag(torch.tensor([1.0, 1, 0, 0])).tolist()),
        _u(1, 2, w=torch.diag(torch.tensor([0.0, 0, 1, 1])).tolist()),
    ]
    d = round_diagnostics(ups, {"w": torch.zeros(4, 4)}, None)
    assert d["eff_rank/w"] == pytest.approx(4.0, **TOL)
    assert d["energy_quarter/w"] == pytest.approx(0.25, **TOL)


def test_step_cosine_and_effective_rank():
    # ΔW_t = (1, 1), ΔW_{t−1} = (−1, 0): cos = −1/√2 (the server step turned back).
    d = step_diagnostics(
        {"b": torch.tensor([1.0, 1.0])}, {"b": torch.tensor([-1.0, 0.0])}
    )
    assert d["step_cos_prev"] == pytest.approx(-1 / math.sqrt(2), **TOL)
    assert step_diagnostics({"b": torch.zeros(2)}, {"b": torch.ones(2)}) == {}
    # exp(H) of (½, ¼, ¼): H = ½ ln 2 + ½ ln 4 = 1.5 ln 2 → 2^1.5.
    assert effective_rank(torch.tensor([2.0, 1.0, 1.0])) == pytest.approx(2**1.5, **TOL)
    assert effective_rank(torch.zeros(3)) == 0.0


def test_run_records_diagnostics(tmp_path, toy_path, cache_dir, ray_session):
    """Every round's record carries them, beside (not inside) the algorithm's own metrics.

    That a resumed run writes the same ones (round 2's oscillation needs round 1's step, which
    only the checkpoint's server state can give back) is checked in tests/test_reliability.py.
    """
    from tests.small_runs import NO_EVAL, small_run

    small_run(tmp_path / "a", cache_dir, *NO_EVAL, "train.diagnostics=true", "rounds=3")
    lines = (tmp_path / "a/metrics.jsonl").read_text().splitlines()
    recs = [r for r in map(json.loads, lines) if r.get("round", 0) >= 1]
    assert [r["round"] for r in recs] == [1, 2, 3]
    for r in recs:
        diag = r["diagnostics"]
        assert diag["clients"] == 4
        assert -1.0 <= diag["client_cos_mean"] <= 1.0
        # K = 4 clients: the effective rank of 4 vectors lies in [1, 4].
        assert 1.0 <= diag["client_eff_rank"] <= 4.0 + 1e-9
        assert 0.0 <= diag["sign_conflict"] <= 1.0
        assert any(k.startswith("eff_rank/") for k in diag)
        assert "diagnostics" not in r["algorithm"]
    assert "step_cos_prev" not in recs[0]["diagnostics"]
    assert -1.0 <= recs[1]["diagnostics"]["step_cos_prev"] <= 1.0
