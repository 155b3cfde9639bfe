"""``fedsim bench --sections aggregation-limit``: server aggregation against the machine's limit.

At two sizes, the toy backbone's projector and LLaVA-1.5-7B's (``mlp2x_gelu`` 1024 → 4096 → 4096:
linear_1 [4096, 1024], linear_2 [4096, 4096] and two biases, 21 M fp32 parameters), with
``clients`` client deltas (a shared rank-16 part plus noise, fixed seed):

- the memory bandwidth of this process, measured in the same run (a large tensor's sum: read;
  a large copy: read + write), and the **bound**: the bytes FedAvg must move (read every Δ_k and
  W_t once, write W_{t+1} once) over the read bandwidth;
- FedAvg's server half (``FedAvg.aggregate``) and the Aggregator's whole round (validation,
  FedAvg, update norm), each as a ratio to the bound; the unblocked float64 loop it replaced
  (``--agg-limit-baseline``) for the speed-up;
- Fed-CMP with ``basis: sketch`` (two passes over the deltas), with its products in float32
  and in bfloat16 (``sketch_dtype``), and, at the toy size or with ``--agg-limit-power``, with
  the default ``basis: power``: seconds of a round (the second, which also carries momentum
  and gauge) and the ratio to FedAvg;
- the sketch's accuracy (float32 and bfloat16 products) against the exact decomposition in
  float64 (eigenvectors of the Gram operators of the stacked deltas), at the toy size and at
  [1024, 1024] × ``clients`` (the float64 Gram of a 4096-wide side is 7 TFLOP at 50 clients):
  principal angles with the exact top-r bases, the share of the exact top-r energy captured,
  and the relative error of the projected aggregate Û Ûᵀ Δ̄ V̂ V̂ᵀ against the exact one
  (Δ̄ = Σ p_k Δ_k).

Timings are medians of ``repeats`` (bandwidth: the best of two sums, measured before each
FedAvg call; FedAvg's ratio to the bound is the median of the per-pair ratios), never asserted
in tests.
"""

from __future__ import annotations

import contextlib
import gc
import math
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from rich.table import Table

from fedsim.aggregator import Aggregator
from fedsim.algorithms import fused_sums
from fedsim.algorithms.base import ClientUpdate
from fedsim.algorithms.fedcmp import sketch_bases
from fedsim.algorithms.registry import build_algorithm

#: LLaVA-1.5-7B's projector (CLIP ViT-L/14-336 features 1024 → Vicuna-7B hidden 4096).
LLAVA_7B = {
    "linear_1.weight": (4096, 1024),
    "linear_1.bias": (4096,),
    "linear_2.weight": (4096, 4096),
    "linear_2.bias": (4096,),
}
BANDWIDTH_BYTES = 1 << 29  # 512 MiB per buffer: far beyond any cache


#: Fed-CMP's two-pass sketch as the bench times it: Gaussian test matrices with float32 and with
#: bfloat16 products, and the block SRHT first pass with bfloat16 products in the second.
SKETCH_VARIANTS: dict[str, dict[str, str]] = {
    "fedcmp_sketch": {"basis": "sketch"},
    "fedcmp_sketch_bf16": {"basis": "sketch", "sketch_dtype": "bfloat16"},
    "fedcmp_sketch_srht_bf16": {
        "basis": "sketch",
        "sketch_dtype": "bfloat16",
        "sketch_map": "srht",
    },
}


def _timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median seconds of ``repeats`` calls (after none: the first call is timed too, because
    a 4 GB round cannot be warmed up for free) and the last result."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def bandwidth(repeats: int) -> dict[str, float]:
    """Read (sum) and copy (read + write) bandwidth in GB/s, the best of ``repeats``."""
    n = BANDWIDTH_BYTES // 4
    src = torch.ones(n)
    dst = torch.empty(n)
    dst.copy_(src)  # touch every page first
    reads, copies = [], []
    for _ in range(max(2, repeats)):
        t0 = time.perf_counter()
        float(src.sum())
        reads.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        dst.copy_(src)
        copies.append(time.perf_counter() - t0)
    return {
        "read_gb_s": BANDWIDTH_BYTES / min(reads) / 1e9,
        "copy_gb_s": 2 * BANDWIDTH_BYTES / min(copies) / 1e9,
    }


def sketch_products_floor(
    shapes: Mapping[str, tuple[int, ...]],
    clients: int,
    rank: int,
    fedavg_seconds: float,
    oversample: int = 10,
) -> dict[str, Any]:
    """The least time the sketch's two passes of products can take on this machine: their
    FLOPs (Δ_k Ω_k and Q_Uᵀ Δ_k, 2 · 2mnℓ per client and matrix) at the rate a single matmul
    of the largest pass-1 shape reaches here (best of 3, float32 and bfloat16), and that time
    as a multiple of FedAvg's — the part of Fed-CMP's ratio no implementation on this CPU can
    remove at this rank."""
    mats = [s for s in shapes.values() if len(s) == 2]
    flops = sum(
        2 * 2.0 * m * n * min(rank + oversample, m, n * clients) * clients
        for m, n in mats
    )
    m, n = max(mats, key=math.prod)
    ell = min(rank + oversample, m, n * clients)
    out: dict[str, Any] = {"flops": flops, "matmul_shape": [m, n, ell]}
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(0)
        a = torch.randn(m, n, generator=g).to(dtype)
        b = torch.randn(n, ell, generator=g).to(dtype)
        a @ b  # warm-up (the library's first call picks its kernel)
        best = min(_timed(lambda a=a, b=b: a @ b, 1)[0] for _ in range(3))
        rate = 2.0 * m * n * ell / best
        name = str(dtype).removeprefix("torch.")
        out[name] = {
            "gflop_s": rate / 1e9,
            "seconds": flops / rate,
            "ratio_to_fedavg": flops / rate / fedavg_seconds,
            # With the block SRHT the first pass is no product: the second pass alone.
            "pass2_ratio_to_fedavg": flops / 2 / rate / fedavg_seconds,
        }
    return out


def make_deltas(
    shapes: Mapping[str, tuple[int, ...]],
    clients: int,
    seed: int,
    device: str = "cpu",
) -> tuple[dict[str, torch.Tensor], list[ClientUpdate]]:
    """W_t = 0 and ``clients`` updates: a shared rank-16 part (scale 1e-3) plus noise (1e-4),
    drawn on ``device`` (the CPU draws the same numbers whatever the device default)."""
    g = torch.Generator(device).manual_seed(seed)
    weights = {k: torch.zeros(s, device=device) for k, s in shapes.items()}
    shared = {
        k: torch.randn(s[0], 16, generator=g, device=device)
        @ torch.randn(16, s[1], generator=g, device=device)
        * 1e-3
        for k, s in shapes.items()
        if len(s) == 2
    }
    updates = []
    for cid in range(clients):
        delta = {}
        for k, s in shapes.items():
            noise = torch.randn(s, generator=g, device=device).mul_(1e-4)
            delta[k] = noise.add_(shared[k]) if k in shared else noise
        updates.append(ClientUpdate(cid, delta, 100 + cid, 0.0, 1))
    return weights, updates


def _unblocked_fedavg(
    weights: Mapping[str, torch.Tensor], updates: list[ClientUpdate]
) -> dict[str, torch.Tensor]:
    """FedAvg's mean as it was summed before blocking: a float64 copy of every Δ_k."""
    total = sum(u.num_samples for u in updates)
    out = {}
    for key in weights:
        acc = torch.zeros_like(weights[key], dtype=torch.float64)
        for u in updates:
            acc.add_(u.delta[key].to(torch.float64), alpha=u.num_samples / total)
        out[key] = weights[key] + acc.to(torch.float32)
    return out


def _two_rounds(
    name: str, params: dict[str, Any], weights: dict[str, torch.Tensor], updates: list
) -> float:
    """Seconds of the second of two rounds (the first has no carried state to transport)."""
    algo = build_algorithm(name, params)
    state = algo.init_state(weights)
    res = algo.aggregate(weights, updates, state, 1)
    t0 = time.perf_counter()
    algo.aggregate(res.weights, updates, res.state, 2)
    return time.perf_counter() - t0


def _fedavg_pairs(
    weights: dict[str, torch.Tensor],
    updates: list[ClientUpdate],
    clients: int,
    must_move: int,
    count: int,
) -> list[tuple[dict[str, float], float, float, float, float]]:
    """``count`` × (bandwidth, bound, FedAvg s, Aggregator round s, FedAvg s on the ATen path).

    Each FedAvg call right after its own bandwidth measurement, and the ratio taken per pair:
    the machine's state (clock boost, a neighbour's load) moves both alike, where a bandwidth
    measured once beside median timings mixed two moments (the bound moved by 35 % between two
    quiet runs). FedAvg goes through the ATen path too (the same bits,
    :mod:`fedsim.algorithms.fused_sums`) in the same pairs, so the fused weighted sum's gain is
    measured, not assumed; which of the two goes first alternates (the first call after the
    bandwidth's 512 MiB buffers finds the caches cold).
    """
    fedavg = build_algorithm("fedavg")
    agg = Aggregator("fedavg", {}, weights, clients)
    pairs = []
    for i in range(count):
        bw_i = bandwidth(2)
        with fused_sums.aten_only() if i % 2 else contextlib.nullcontext():
            t_first, _ = _timed(lambda: fedavg.aggregate(weights, updates, {}, 1), 1)
        with contextlib.nullcontext() if i % 2 else fused_sums.aten_only():
            t_second, _ = _timed(lambda: fedavg.aggregate(weights, updates, {}, 1), 1)
        t_avg, t_aten = (t_second, t_first) if i % 2 else (t_first, t_second)
        t_agg, _ = _timed(lambda: agg.aggregate(weights, updates, 1), 1)
        bound_i = must_move / (bw_i["read_gb_s"] * 1e9)
        pairs.append((bw_i, bound_i, t_avg, t_agg, t_aten))
    return pairs


def one_size(
    shapes: Mapping[str, tuple[int, ...]],
    clients: int,
    rank: int,
    repeats: int,
    power: bool,
    baseline: bool,
) -> dict[str, Any]:
    """Bandwidth, bound and every timing at one projector size."""
    gc.collect()
    weights, updates = make_deltas(shapes, clients, 0)
    params = sum(math.prod(s) for s in shapes.values())
    # FedAvg must read K deltas and W_t, and write W_{t+1}: (K + 2) · P · 4 bytes.
    must_move = (clients + 2) * params * 4
    pairs = _fedavg_pairs(weights, updates, clients, must_move, max(5, repeats))
    med = statistics.median
    bw = {k: med(p[0][k] for p in pairs) for k in pairs[0][0]}
    bound = med(p[1] for p in pairs)
    t_fedavg = med(p[2] for p in pairs)
    t_round = med(p[3] for p in pairs)
    out: dict[str, Any] = {
        "clients": clients,
        "params": params,
        "bandwidth": bw,
        "bytes_fedavg_must_move": must_move,
        "bound_seconds": bound,
        "fedavg_seconds": t_fedavg,
        "fedavg_ratio_to_bound": med(p[2] / p[1] for p in pairs),
        "fedavg_ratio_to_bound_range": [
            min(p[2] / p[1] for p in pairs),
            max(p[2] / p[1] for p in pairs),
        ],
        "aggregator_round_seconds": t_round,
        "aggregator_round_ratio_to_bound": med(p[3] / p[1] for p in pairs),
        "weighted_sums": fused_sums.status(),
        "fedavg_aten_path_seconds": med(p[4] for p in pairs),
        "fedavg_aten_path_ratio_to_bound": med(p[4] / p[1] for p in pairs),
        "pairs": len(pairs),
    }
    if baseline:
        t_old, _ = _timed(lambda: _unblocked_fedavg(weights, updates), 1)
        out["unblocked_fedavg_seconds"] = t_old
        out["speedup_over_unblocked"] = t_old / t_fedavg
    for name, params in SKETCH_VARIANTS.items():
        secs = _two_rounds("fedcmp", {"rank": rank, **params}, weights, updates)
        out[f"{name}_seconds"] = secs
        out[f"{name}_ratio_to_fedavg"] = secs / t_fedavg
    out["sketch_products_floor"] = sketch_products_floor(
        shapes, clients, rank, t_fedavg
    )
    if power:
        out["fedcmp_power_seconds"] = _two_rounds(
            "fedcmp", {"rank": rank}, weights, updates
        )
        out["fedcmp_power_ratio_to_fedavg"] = out["fedcmp_power_seconds"] / t_fedavg
    return out


#: NVIDIA H200 SXM peaks assumed on paper (datasheet): HBM3e bandwidth, FP32 on the CUDA cores
#: (Fed-CMP's matmuls are fp32; TF32 is off by default in torch), and a PCIe 5.0 ×16 link's
#: practical host-to-device rate for deltas that arrive in host memory.
H200 = {"hbm_gb_s": 4800.0, "fp32_tflop_s": 67.0, "pcie_gb_s": 55.0}


def paper_costs(
    shapes: Mapping[str, tuple[int, ...]],
    clients: int,
    rank: int,
    oversample: int = 10,
    power_iters: int = 2,
) -> dict[str, Any]:
    """FLOPs and bytes of one round, counted from the algorithms' products, and the seconds
    they take at :data:`H200`'s peaks (a lower bound: every kernel at its roofline).

    Per [m, n] matrix with K clients, ℓ = r + oversample, q power iterations:
    FedAvg 2mnK flops over (K + 2)·mn·4 bytes; Fed-CMP ``power``: per side 1 + q + 1 Gram
    applications of 2 products with ℓ columns (2 · 2mnℓ · K each), then the coefficients
    Uᵀ Δ_k V (2rmn + 2r²n per client); ``sketch``: the sketch and the projection (2 · 2mnℓK),
    the Ritz Gram (2ℓ²nK), Sᵀ P_k (2rℓnK), V̂ from the [r, n] projections (as ``power`` on
    one side, 4 · 2 · 2rnℓK) and the coefficients (2r²nK). Both read the deltas
    ``passes`` times (plus one read for the residual's weighted sum and one for the norms).
    """
    k = clients
    ell = rank + oversample
    applies = 1 + power_iters + 1
    out = {"fedavg": 0.0, "power": 0.0, "sketch": 0.0, "bytes_deltas": 0.0}
    for s in shapes.values():
        size = math.prod(s)
        out["fedavg"] += 2.0 * size * k
        out["bytes_deltas"] += 4.0 * size * k
        if len(s) != 2:
            continue
        m, n = s
        r, le = min(rank, m, n), min(ell, m, n)
        out["power"] += 2 * applies * 2 * 2.0 * m * n * le * k
        out["power"] += (2.0 * r * m * n + 2.0 * r * r * n) * k
        out["sketch"] += 2 * 2.0 * m * n * le * k + 2.0 * le * le * n * k
        out["sketch"] += 2.0 * r * le * n * k + applies * 2 * 2.0 * r * n * le * k
        out["sketch"] += 2.0 * r * r * n * k
    bytes_fedavg = out["bytes_deltas"] + 2 * out["bytes_deltas"] / k
    flop_s = H200["fp32_tflop_s"] * 1e12
    hbm = H200["hbm_gb_s"] * 1e9
    # Roofline per algorithm: max(compute, memory); Fed-CMP reads the deltas
    # 2 (sketch) or 2 · applies + 1 (power) times, plus the residual's weighted sum.
    fedavg_s = max(out["fedavg"] / flop_s, bytes_fedavg / hbm)
    sketch_s = max(out["sketch"] / flop_s, 3 * out["bytes_deltas"] / hbm)
    power_s = max(out["power"] / flop_s, (2 * applies + 2) * out["bytes_deltas"] / hbm)
    return {
        "assumed_peaks": H200,
        "flops": {a: out[a] for a in ("fedavg", "power", "sketch")},
        "bytes_fedavg": bytes_fedavg,
        "seconds_at_peak": {"fedavg": fedavg_s, "sketch": sketch_s, "power": power_s},
        "sketch_ratio_to_fedavg": sketch_s / fedavg_s,
        "power_ratio_to_fedavg": power_s / fedavg_s,
        "host_to_device_seconds": out["bytes_deltas"] / (H200["pcie_gb_s"] * 1e9),
    }


def _exact_top(gram: torch.Tensor, r: int) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(gram)
    return vecs.flip(1)[:, :r]


def sketch_accuracy(
    shape: tuple[int, int],
    clients: int,
    rank: int,
    signal: int = 16,
    dtype: torch.dtype = torch.float32,
    sketch_map: str = "gaussian",
) -> dict[str, Any]:
    """The sketched bases of one matrix (products in ``dtype``, first-pass test matrices
    ``sketch_map``) against the exact float64 decomposition."""
    weights, updates = make_deltas({"w": shape}, clients, 1)
    deltas = [u.delta["w"] for u in updates]
    total = sum(u.num_samples for u in updates)
    p = [u.num_samples / total for u in updates]
    m, n = shape
    r = min(rank, m, n)
    sk = sketch_bases(
        deltas,
        p,
        r,
        torch.Generator().manual_seed(0),
        dtype=dtype,
        sketch_map=sketch_map,  # type: ignore[arg-type]
    )
    u_s = sk.left.vectors[:, :r].to(torch.float64)
    v_s = sk.right.vectors[:, :r].to(torch.float64)
    g_u = torch.zeros(m, m, dtype=torch.float64)
    g_v = torch.zeros(n, n, dtype=torch.float64)
    mean = torch.zeros(m, n, dtype=torch.float64)
    for d, pk in zip(deltas, p):
        d64 = d.to(torch.float64)
        g_u.add_(d64 @ d64.T, alpha=pk)
        g_v.add_(d64.T @ d64, alpha=pk)
        mean.add_(d64, alpha=pk)
    u_x, v_x = _exact_top(g_u, r), _exact_top(g_v, r)
    # Principal angles: arccos of the singular values of U_exactᵀ Û.
    cos_u = torch.linalg.svdvals(u_x.T @ u_s).clamp(max=1.0)
    cos_v = torch.linalg.svdvals(v_x.T @ v_s).clamp(max=1.0)
    k = min(signal, r)
    cos_u_sig = torch.linalg.svdvals(u_x[:, :k].T @ u_s).clamp(max=1.0)
    cos_v_sig = torch.linalg.svdvals(v_x[:, :k].T @ v_s).clamp(max=1.0)
    exact_energy = float(torch.trace(u_x.T @ g_u @ u_x))
    sketch_energy = float(torch.trace(u_s.T @ g_u @ u_s))
    proj_x = u_x @ (u_x.T @ mean @ v_x) @ v_x.T
    proj_s = u_s @ (u_s.T @ mean @ v_s) @ v_s.T
    return {
        "shape": list(shape),
        "clients": clients,
        "rank": r,
        "products": str(dtype).removeprefix("torch."),
        "sketch_map": sketch_map,
        "max_angle_deg_top_signal_u": math.degrees(math.acos(float(cos_u_sig.min()))),
        "max_angle_deg_top_signal_v": math.degrees(math.acos(float(cos_v_sig.min()))),
        "signal_directions": k,
        "subspace_overlap_u": float((cos_u**2).mean()),
        "subspace_overlap_v": float((cos_v**2).mean()),
        "energy_captured_vs_exact": sketch_energy / exact_energy,
        "projected_mean_relative_error": float(
            (proj_s - proj_x).norm() / proj_x.norm()
        ),
    }


#: (first-pass test matrices, product precision) of the accuracy rows.
ACCURACY_ROUTES = [
    ("gaussian", torch.float32),
    ("gaussian", torch.bfloat16),
    ("srht", torch.float32),
    ("srht", torch.bfloat16),
]


def bench_aggregation_limit(
    toy_shapes: Mapping[str, tuple[int, ...]],
    clients: int,
    rank: int,
    repeats: int,
    threads: int,
    sizes: tuple[str, ...] = ("toy", "7b"),
    power_7b: bool = False,
    baseline: bool = True,
) -> dict[str, Any]:
    """The section's record (``bench.json`` → ``aggregation_limit``)."""
    torch.set_num_threads(threads)
    out: dict[str, Any] = {"threads": threads, "rank": rank}
    if "toy" in sizes:
        out["toy"] = one_size(toy_shapes, clients, rank, repeats, True, baseline)
        mats = sorted({s for s in toy_shapes.values() if len(s) == 2})
        out["toy"]["accuracy"] = [
            sketch_accuracy(s, clients, rank, dtype=dt, sketch_map=sm)
            for sm, dt in ACCURACY_ROUTES
            for s in mats
        ]
    if "7b" in sizes:
        out["7b"] = one_size(LLAVA_7B, clients, rank, repeats, power_7b, baseline)
        out["7b"]["gpu_on_paper"] = paper_costs(LLAVA_7B, clients, rank)
        gc.collect()
        out["7b"]["accuracy"] = [
            sketch_accuracy((1024, 1024), clients, rank, dtype=dt, sketch_map=sm)
            for sm, dt in ACCURACY_ROUTES
        ]
    return out


def aggregation_limit_table(a: dict[str, Any]) -> Table:
    table = Table(
        title=f"aggregation against the memory-bandwidth bound ({a['threads']} threads, "
        f"Fed-CMP rank {a['rank']})",
        caption="weighted sums: "
        + ", ".join(sorted({a[s]["weighted_sums"] for s in ("toy", "7b") if s in a})),
    )
    cols = [
        "size",
        "clients × params",
        "read GB/s",
        "bound s",
        "FedAvg s",
        "× bound",
        "round s",
        "× bound",
        "Fed-CMP sketch × FedAvg",
        "sketch bf16 × FedAvg",
        "sketch SRHT + bf16 × FedAvg",
        "bf16 products alone × FedAvg (pass 2 alone)",
        "Fed-CMP power × FedAvg",
        "projected-mean error fp32 / bf16 / SRHT + bf16",
    ]
    for col in cols:
        table.add_column(col, justify="right")
    for size in ("toy", "7b"):
        if size not in a:
            continue
        r = a[size]
        power = r.get("fedcmp_power_ratio_to_fedavg")
        err = {
            (sm, dt): max(
                (
                    x["projected_mean_relative_error"]
                    for x in r["accuracy"]
                    if x.get("products", "float32") == dt
                    and x.get("sketch_map", "gaussian") == sm
                ),
                default=math.nan,
            )
            for sm, dt in (
                ("gaussian", "float32"),
                ("gaussian", "bfloat16"),
                ("srht", "bfloat16"),
            )
        }
        bf16 = r.get("fedcmp_sketch_bf16_ratio_to_fedavg")
        srht = r.get("fedcmp_sketch_srht_bf16_ratio_to_fedavg")
        floor = r["sketch_products_floor"]["bfloat16"]
        pass2 = floor.get("pass2_ratio_to_fedavg")
        table.add_row(
            size,
            f"{r['clients']} × {r['params']:,}",
            f"{r['bandwidth']['read_gb_s']:.1f}",
            f"{r['bound_seconds']:.3f}",
            f"{r['fedavg_seconds']:.3f}",
            f"{r['fedavg_ratio_to_bound']:.2f}",
            f"{r['aggregator_round_seconds']:.3f}",
            f"{r['aggregator_round_ratio_to_bound']:.2f}",
            f"{r['fedcmp_sketch_ratio_to_fedavg']:.1f}",
            "—" if bf16 is None else f"{bf16:.1f}",
            "—" if srht is None else f"{srht:.1f}",
            f"{floor['ratio_to_fedavg']:.1f}"
            + ("" if pass2 is None else f" ({pass2:.1f})"),
            "—" if power is None else f"{power:.1f}",
            " / ".join(f"{e:.1e}" for e in err.values()),
        )
    return table
