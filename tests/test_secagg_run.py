"""Secure aggregation in rounds (fedsim/privacy/secure.py, fedsim/secure_round.py): workers
mask, the aggregator unmasks the sum; FedAvg's step up to the fixed-point rounding; dropouts
recovered; too few survivors keep W_t and, under on_reject=fail, stop the run (exit 2)."""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace

import pytest
import torch
from small_runs import NO_EVAL, SMALL, cli_run_args, small_run

from fedsim.algorithms import build_algorithm
from fedsim.algorithms.base import ClientUpdate
from fedsim.algorithms.fedavg import fedavg_delta
from fedsim.config import load_config
from fedsim.configtools import ConfigError
from fedsim.privacy.plan import plan_privacy
from fedsim.privacy.secagg import SecAggClient, SecAggServer
from fedsim.privacy.secure import (
    leaves_after_keys,
    mask_group,
    plan_secure,
    secure_mean,
)
from fedsim.training import ClientResult

SECURE = ["privacy.secure_aggregation=true", "validation.max_update_norm=100"]


def _cfg(*extra: str):
    return load_config(None, [*SMALL, *extra])


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["algorithm.name=fedcmp"], "fedcmp cannot run under secure aggregation"),
        (["algorithm.name=scaffold"], "scaffold cannot run under secure aggregation"),
        (["validation.max_update_norm=null"], "validation.max_update_norm"),
        (["privacy.secagg_threshold=2"], "privacy.secagg_threshold: must be in 3..4"),
        (["privacy.secagg_threshold=5"], "privacy.secagg_threshold"),
        (["train.presum=true"], "train.presum"),
    ],
)
def test_refused_secure_combinations(extra, says):
    with pytest.raises(ConfigError) as e:
        _cfg(*SECURE, *extra)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_local_noise_needs_secure_aggregation_and_adaptive_clip_is_refused():
    dp = ["privacy.clip=0.1", "privacy.noise_multiplier=1"]
    with pytest.raises(ConfigError, match="privacy.mechanism: local noise"):
        _cfg("privacy.mechanism=local", *dp)
    with pytest.raises(ConfigError, match="privacy.adaptive_clip"):
        _cfg(
            *SECURE,
            "privacy.mechanism=central",
            *dp,
            "privacy.adaptive_clip=true",
            "privacy.count_noise=5",
        )


def test_the_ring_is_sized_for_the_cohort():
    """No DP: entries ≤ n_max · max_norm = (2 steps × 4) × 100 = 800; 4 clients · 800 · 2^f
    must stay under 2^63: f = min(40, ⌊63 − log2 3200⌋ − 1) = 40."""
    cfg = _cfg(*SECURE)
    plan = plan_secure(cfg, None)
    assert plan.ring.bound == 800 and plan.ring.frac_bits == 40 and plan.threshold == 3
    small = plan_secure(_cfg(*SECURE, "privacy.ring_bits=32"), None)
    assert 4 * 800 * 2**small.ring.frac_bits < 2**31


def _updates(n: int, d: int = 50) -> list[ClientUpdate]:
    g = torch.Generator().manual_seed(0)
    return [
        ClientUpdate(
            c,
            {"w": torch.randn(d, generator=g) * 0.1, "b": torch.randn(3, generator=g)},
            4 + 2 * c,  # unequal n_k: FedAvg's weights matter
            0.0,
            1,
        )
        for c in range(n)
    ]


def _secure_round(updates, plan, reference, privacy=None, seed=0):
    """The protocol as the run drives it, without Ray: keys, masking on the 'worker', unmask."""
    ids = [u.client_id for u in updates]
    clients = {c: SecAggClient(c, plan.threshold) for c in ids}
    server = SecAggServer(plan.threshold, plan.ring)
    roster = server.advertise([c.advertise() for c in clients.values()])
    inbox = server.route({i: c.share_keys(roster) for i, c in clients.items()})
    for i, c in clients.items():
        c.receive_shares(inbox[i])
    results = [ClientResult(u, {}, 0.0) for u in updates]
    up = mask_group(results, clients, reference, plan, seed, 1, 100.0)
    assert all(r.update.delta == {} for r in up.results)  # no Δ leaves the worker
    for c, y in up.masked.items():
        server.collect(c, y)
    alive = server.survivors()
    total = server.unmask({j: clients[j].unmask(alive) for j in alive})
    return secure_mean(total, plan, privacy, reference, seed, 1), up


def test_secure_fedavg_is_fedavg_up_to_the_encoding():
    """Σ n_k Δ_k is encoded per client with error ≤ 2^-(f+1) per entry; over s clients and
    divided by Σ n the mean is within s · 2^-(f+1) / Σ n, plus one float32 rounding."""
    cfg = _cfg(*SECURE)
    plan = plan_secure(cfg, None)
    ups = _updates(4)
    reference = {k: torch.zeros_like(v) for k, v in ups[0].delta.items()}
    (mean, samples), _ = _secure_round(ups, plan, reference)
    want = fedavg_delta(ups)
    assert samples == sum(u.num_samples for u in ups)
    atol = 4 * 2.0 ** -(plan.ring.frac_bits + 1) / samples
    for k in want:
        torch.testing.assert_close(mean[k], want[k], rtol=2**-23, atol=atol)


def test_rejected_and_departed_clients_are_left_out_and_recovered():
    """A NaN update is rejected on the worker and one client leaves after ShareKeys: both
    send nothing; with a cohort of 5 and t = 3 the other three unmask to their FedAvg mean."""
    cfg = _cfg(*SECURE, "scenario.cohort_size=5")
    plan = plan_secure(cfg, None)
    ups = _updates(5)
    ups[1] = ClientUpdate(
        1, {"w": torch.full((50,), float("nan")), "b": torch.zeros(3)}, 4, 0, 1
    )
    # a seed at which exactly one client other than 1 leaves, with dropout 0.3
    plan = replace(plan, dropout=0.3)
    seed = next(
        s
        for s in range(100)
        if sum(leaves_after_keys(plan, s, 1, c) for c in (0, 2, 3, 4)) == 1
        and not leaves_after_keys(plan, s, 1, 1)
    )
    reference = {k: torch.zeros_like(v) for k, v in ups[0].delta.items()}
    (mean, samples), up = _secure_round(ups, plan, reference, seed=seed)
    assert [r["client_id"] for r in up.rejected] == [1] and len(up.left) == 1
    kept = [u for u in ups if u.client_id not in (1, *up.left)]
    want = fedavg_delta(kept)
    atol = 3 * 2.0 ** -(plan.ring.frac_bits + 1) / samples
    for k in want:
        torch.testing.assert_close(mean[k], want[k], rtol=2**-23, atol=atol)


def test_central_dp_under_secure_aggregation_clips_on_the_client():
    """z = 0: the server's result is Σ clip_C(Δ_k) / m, computed by hand from the clips."""
    cfg = _cfg(
        *SECURE,
        "privacy.mechanism=central",
        "privacy.clip=0.5",
        "privacy.noise_multiplier=0",
    )
    privacy = plan_privacy(cfg, type(build_algorithm("fedavg")))
    plan = plan_secure(cfg, privacy)
    assert plan.ring.bound == 0.5 and not plan.weighted
    ups = _updates(4)
    reference = {k: torch.zeros_like(v) for k, v in ups[0].delta.items()}
    (mean, _), _ = _secure_round(ups, plan, reference, privacy)
    for k in reference:
        by_hand = (
            sum(
                u.delta[k].double()
                * min(
                    1.0,
                    0.5
                    / float(
                        torch.cat(
                            [v.double().flatten() for v in u.delta.values()]
                        ).norm()
                    ),
                )
                for u in ups
            )
            / 4
        )
        torch.testing.assert_close(
            mean[k],
            by_hand.float(),
            rtol=2**-22,
            atol=4 * 2.0 ** -(plan.ring.frac_bits + 1) / 4,
        )


@pytest.mark.slow
def test_a_secure_run_steps_like_plain_fedavg(
    tmp_path, toy_path, cache_dir, ray_session
):
    """One round each (later rounds would start from W_1s that differ by the rounding):
    W_1 under secure aggregation is plain FedAvg's up to the encoding's bound."""
    one = [*NO_EVAL, "rounds=1", "validation.max_update_norm=100"]
    sec = small_run(
        tmp_path / "sec", cache_dir, *one, "privacy.secure_aggregation=true"
    )
    plain = small_run(tmp_path / "plain", cache_dir, *one)
    rec = sec.history[-1]
    assert rec["secagg"]["survivors"] == 4 and rec["secagg"]["failed"] is None
    assert rec["secagg"]["bytes_per_client_max"] > 8 * sum(
        v.numel() for v in sec.weights.values()
    )
    cfg = load_config(None, [*SMALL, *one, "privacy.secure_aggregation=true"])
    f = plan_secure(cfg, None).ring.frac_bits
    samples = rec["samples"]
    for k, w in plain.weights.items():
        torch.testing.assert_close(
            sec.weights[k], w, rtol=2**-22, atol=4 * 2.0 ** -(f + 1) / samples
        )
    assert "secagg" not in plain.history[-1]


@pytest.mark.slow
def test_local_dp_with_departures_records_recovery_and_failure(
    tmp_path, toy_path, cache_dir, ray_session
):
    """Clients leave after ShareKeys with probability 0.3 (t = 3 of 4): each round either
    unmasks the survivors' sum or keeps W_t, as the record says; ε is logged either way."""
    extra = [
        *NO_EVAL,
        "privacy.mechanism=local",
        "privacy.secure_aggregation=true",
        "privacy.clip=0.05",
        "privacy.noise_multiplier=1.0",
        "privacy.secagg_dropout=0.3",
    ]
    res = small_run(tmp_path / "r", cache_dir, *extra)
    cfg = load_config(None, [*SMALL, *extra])
    plan = plan_secure(cfg, plan_privacy(cfg, type(build_algorithm("fedavg"))))
    outcomes = set()
    for rec in res.history:
        if rec.get("round", 0) < 1:
            continue
        s = rec["secagg"]
        left = [
            c for c in rec["clients"] if leaves_after_keys(plan, 0, rec["round"], c)
        ]
        assert s["left_after_keys"] == left
        assert s["survivors"] == (4 - len(left) if len(left) <= 1 else 0)
        assert (s["failed"] is not None) == (len(left) > 1)
        assert ("action" in rec) == (len(left) > 1)
        assert isinstance(rec["epsilon"], float)
        outcomes.add(len(left) > 1)
    assert outcomes == {True, False}  # seed 0: round 1 fails, round 2 unmasks


def test_a_failed_secure_round_under_fail_exits_2_after_its_record(tmp_path, cache_dir):
    args = cli_run_args(
        tmp_path / "out",
        cache_dir,
        *NO_EVAL,
        *SECURE,
        "privacy.secagg_dropout=0.3",
        "validation.on_reject=fail",
    )
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "fewer than the threshold 3" in err[0], err
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    last = json.loads(lines[-1])
    assert last["round"] == 1 and "W_t and server state kept" in last["action"]
