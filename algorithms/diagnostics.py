"""Per-round diagnostics of the client updates: the two Fed-MA challenges, measured.

The seed paper (Xiong et al. 2026, arXiv 2603.26786) names *parameter interference* when local
projectors are aggregated and *gradient oscillation* in one-pass collaborative SGD. These are the
measurements that show whether a scenario has them, for any algorithm (pure tensor math, no Ray;
the Aggregator calls :func:`round_diagnostics` when ``train.diagnostics`` is on):

- oscillation: ``step_cos_prev`` = cos(ΔW_t, ΔW_{t−1}) between successive global updates
  (negative: the server step reverses direction);
- interference: ``client_cos_mean`` (mean pairwise cosine of the client deltas Δ_k),
  ``client_cos_neg_share`` (share of client pairs pulling in opposite directions) and
  ``sign_conflict`` (p-weighted share of each client's coordinates whose sign disagrees with the
  sign of the mean delta Δ̄ = Σ p_k Δ_k, as in TIES-merging, Yadav et al. 2023, arXiv 2306.01708);
- client drift: ``drift`` = √(Σ p_k ‖Δ_k − Δ̄‖²) / ‖Δ̄‖, the spread of the client deltas relative to
  their mean (the square of it plus one is FedExP's Σ p_k ‖Δ_k‖² / ‖Δ̄‖², arXiv 2301.09604);
- spectrum: ``client_eff_rank``, the effective rank exp(H(λ / Σλ)) (Roy & Vetterli 2007) of the
  p-weighted client deltas as vectors (1: all clients move alike; K: mutually orthogonal); and per
  weight matrix ``[m, n]``, ``eff_rank/<key>`` of the stacked deltas [√p_1 Δ_1, …, √p_K Δ_K] and
  ``energy_quarter/<key>``, the share of their energy in the top ⌊min(m, n)/4⌋ directions (below 1:
  a canonical basis of rank min(m, n)/4 truncates something).

Everything is computed from one K × K Gram matrix G_ij = ⟨Δ_i, Δ_j⟩ (float64, keys in sorted
order) plus one pass for the signs and one Gram of the smaller side per matrix.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from fedsim.algorithms.base import ClientUpdate, Weights, sample_weights, sorted_updates


def update_gram(deltas: Sequence[Mapping[str, torch.Tensor]]) -> torch.Tensor:
    """G_ij = ⟨Δ_i, Δ_j⟩ over all keys (sorted), float64, ``[K, K]``."""
    return _gram_and_signs(deltas, None)[0]


def _gram_and_signs(
    deltas: Sequence[Mapping[str, torch.Tensor]], p: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gram matrix and, with weights ``p``, each client's sign-conflict share, from one
    float64 stack of the deltas per key (keys sorted).

    Sign conflict: the share of a client's nonzero coordinates whose sign disagrees with the
    p-weighted mean delta's (coordinates where the mean is 0 do not count); 0 without any.
    """
    k = len(deltas)
    dev = next(iter(deltas[0].values())).device
    gram = torch.zeros(k, k, dtype=torch.float64, device=dev)
    conflict = torch.zeros(k, dtype=torch.float64, device=dev)
    counted = torch.zeros(k, dtype=torch.float64, device=dev)
    for key in sorted(deltas[0]):
        flat = torch.stack([d[key].reshape(-1).to(torch.float64) for d in deltas])
        gram += flat @ flat.T
        if p is None:
            continue
        mean_sign = torch.sign(p @ flat)  # [D]
        signs = torch.sign(flat)  # [K, D]
        live = (signs != 0) & (mean_sign != 0)[None, :]
        conflict += ((signs != mean_sign[None, :]) & live).sum(1).to(torch.float64)
        counted += live.sum(1).to(torch.float64)
    share = torch.where(counted > 0, conflict / counted.clamp_min(1.0), 0.0)
    return gram, share


def effective_rank(eigenvalues: torch.Tensor) -> float:
    """exp of the Shannon entropy of λ / Σλ (λ ≥ 0); 0 for an all-zero spectrum."""
    lam = eigenvalues.to(torch.float64).clamp_min(0.0)
    total = float(lam.sum())
    if total <= 0:
        return 0.0
    q = lam[lam > 0] / total
    return math.exp(float(-(q * q.log()).sum()))


def matrix_spectrum(deltas: Sequence[torch.Tensor], p: Sequence[float]) -> torch.Tensor:
    """Eigenvalues (descending) of the smaller-side Gram of the stacked √p_k Δ_k (float64).

    Σ p_k Δ_k Δ_kᵀ (m × m) when m ≤ n, else Σ p_k Δ_kᵀ Δ_k (n × n): the stacked matrix
    [√p_1 Δ_1, …, √p_K Δ_K] has the first as its Gram, the vertical stack the second; both are
    the energy of the deltas along the directions a canonical basis would keep.
    """
    m, n = deltas[0].shape
    dim = min(m, n)
    g = torch.zeros(dim, dim, dtype=torch.float64, device=deltas[0].device)
    for d, pk in zip(deltas, p):
        d64 = d.to(torch.float64)
        g.add_(d64 @ d64.T if m <= n else d64.T @ d64, alpha=pk)
    return torch.linalg.eigvalsh(g).flip(0).clamp_min(0.0)


def round_diagnostics(
    updates: Sequence[ClientUpdate],
    step: Mapping[str, torch.Tensor],
    previous_step: Mapping[str, torch.Tensor] | None,
) -> dict[str, float]:
    """The diagnostics of one round: its accepted ``updates`` and the global ``step`` ΔW_t.

    ``previous_step`` is ΔW_{t−1}, the last step that was taken (None in the first round).
    Values that are undefined (one client has no pairs; a zero step has no direction) are left
    out rather than reported as NaN.
    """
    ordered = sorted_updates(updates)
    deltas = [u.delta for u in ordered]
    dev = next(iter(deltas[0].values())).device
    p = torch.tensor(sample_weights(ordered), dtype=torch.float64, device=dev)
    k = len(deltas)
    gram, conflict_share = _gram_and_signs(deltas, p)
    out: dict[str, float] = {"clients": float(k)}

    norms = gram.diagonal().clamp_min(0.0).sqrt()
    if k >= 2:
        denom = norms[:, None] * norms[None, :]
        iu = torch.triu_indices(k, k, offset=1)
        pair = denom[iu[0], iu[1]]
        ok = pair > 0
        if bool(ok.any()):
            cos = gram[iu[0], iu[1]][ok] / pair[ok]
            out["client_cos_mean"] = float(cos.mean())
            out["client_cos_neg_share"] = float((cos < 0).to(torch.float64).mean())

    # ‖Δ̄‖² = pᵀ G p and Σ p_k ‖Δ_k − Δ̄‖² = Σ p_k G_kk − pᵀ G p.
    mean_sq = float(p @ gram @ p)
    spread = max(0.0, float((p * gram.diagonal()).sum()) - mean_sq)
    if mean_sq > 0:
        out["drift"] = math.sqrt(spread / mean_sq)
    sq = p.sqrt()
    out["client_eff_rank"] = effective_rank(
        torch.linalg.eigvalsh(sq[:, None] * gram * sq[None, :])
    )

    out["sign_conflict"] = float((p * conflict_share).sum())

    pl = p.tolist()
    for key in sorted(deltas[0]):
        if deltas[0][key].dim() != 2:
            continue
        lam = matrix_spectrum([d[key] for d in deltas], pl)
        out[f"eff_rank/{key}"] = effective_rank(lam)
        total = float(lam.sum())
        quarter = max(1, min(deltas[0][key].shape) // 4)
        out[f"energy_quarter/{key}"] = (
            float(lam[:quarter].sum()) / total if total > 0 else 1.0
        )

    if previous_step is not None:
        out.update(step_diagnostics(step, previous_step))
    return out


def step_diagnostics(
    step: Mapping[str, torch.Tensor], previous_step: Mapping[str, torch.Tensor]
) -> dict[str, float]:
    """``step_cos_prev`` = cos(ΔW_t, ΔW_{t−1}) (float64, keys sorted); empty for a zero step."""
    keys = sorted(step)
    s64 = [step[k].to(torch.float64) for k in keys]
    p64 = [previous_step[k].to(torch.float64) for k in keys]
    dot = sum(float((a * b).sum()) for a, b in zip(s64, p64))
    n1 = math.sqrt(sum(float(a.pow(2).sum()) for a in s64))
    n0 = math.sqrt(sum(float(b.pow(2).sum()) for b in p64))
    if n1 > 0 and n0 > 0:
        return {"step_cos_prev": dot / (n1 * n0)}
    return {}


def step_of(
    new: Mapping[str, torch.Tensor], old: Mapping[str, torch.Tensor]
) -> Weights:
    """ΔW_t = W_{t+1} − W_t per key (float32)."""
    return {k: (new[k].to(torch.float32) - old[k].to(torch.float32)) for k in old}
