"""``fedsim bench --sections aggregation-limit`` at a small size: every ratio is the quotient
of the record's own numbers, both product precisions of Fed-CMP's sketch are timed and their
accuracy measured, and the products' floor follows from its FLOP count."""

from __future__ import annotations

import io
import math

import pytest
from rich.console import Console

from fedsim.bench_aggregation import aggregation_limit_table, bench_aggregation_limit

SHAPES = {"p.weight": (64, 48), "p.bias": (64,)}


def test_aggregation_limit_record_is_consistent():
    a = bench_aggregation_limit(SHAPES, 6, 8, 1, 1, ("toy",))
    r = a["toy"]
    assert r["params"] == 64 * 48 + 64
    assert r["bytes_fedavg_must_move"] == (6 + 2) * r["params"] * 4
    keys = ("fedcmp_sketch", "fedcmp_sketch_bf16", "fedcmp_sketch_srht_bf16")
    for key in (*keys, "fedcmp_power"):
        assert r[f"{key}_ratio_to_fedavg"] == pytest.approx(
            r[f"{key}_seconds"] / r["fedavg_seconds"]
        )
    assert r["weighted_sums"].startswith(("fused (", "ATen: "))
    assert r["fedavg_aten_path_seconds"] > 0
    lo, hi = r["fedavg_ratio_to_bound_range"]
    assert lo <= r["fedavg_ratio_to_bound"] <= hi
    floor = r["sketch_products_floor"]
    # Two passes of 2 · m · n · ℓ flops per client, ℓ = min(r + 10, m, n · K) = 18.
    assert floor["flops"] == 2 * 2 * 64 * 48 * 18 * 6
    for dt in ("float32", "bfloat16"):
        f = floor[dt]
        assert f["seconds"] == pytest.approx(floor["flops"] / (f["gflop_s"] * 1e9))
        assert f["ratio_to_fedavg"] == pytest.approx(f["seconds"] / r["fedavg_seconds"])
        assert f["pass2_ratio_to_fedavg"] == pytest.approx(f["ratio_to_fedavg"] / 2)
    acc = {(x["sketch_map"], x["products"]): x for x in r["accuracy"]}
    assert set(acc) == {
        (sm, dt) for sm in ("gaussian", "srht") for dt in ("float32", "bfloat16")
    }
    for x in acc.values():
        # Ky Fan: no rank-8 orthonormal basis captures more of G_U's energy than its exact
        # top-8 eigenvectors (the ratio ≤ 1, up to the float64 evaluation's rounding).
        assert 0 < x["energy_captured_vs_exact"] <= 1 + 1e-9
        assert math.isfinite(x["projected_mean_relative_error"])
    text = io.StringIO()
    Console(file=text, width=250).print(aggregation_limit_table(a))
    assert "bf16" in text.getvalue() and "SRHT" in text.getvalue()
    assert "weighted sums: " + r["weighted_sums"] in " ".join(text.getvalue().split())
