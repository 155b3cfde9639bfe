"""Secure aggregation (fedsim/privacy/secagg.py, shamir.py): exact sums with dropouts, masked
uploads that look uniform, a clear failure below the threshold, bytes from the protocol."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.stats import chisquare

from fedsim.privacy import shamir
from fedsim.privacy.secagg import (
    ID_BYTES,
    KEY_BYTES,
    NONCE_BYTES,
    TAG_BYTES,
    FixedPoint,
    SecAggClient,
    SecAggError,
    SecAggServer,
    secure_sum,
)

N, T, DIM = 7, 4, 3000  # 7 clients, any 4 survivors unmask: up to N − T = 3 may drop


def _inputs(seed: int = 0, bound: float = 1.0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    # adversarial-ish: the extremes of the range, zeros and random values
    out = {i: rng.uniform(-bound, bound, DIM) for i in range(N)}
    out[0][:10] = bound
    out[1][:10] = -bound
    out[2][:] = 0.0
    return out


@pytest.mark.parametrize("dropped", [set(), {3}, {0, 4, 6}])  # 0, 1 and N − T dropped
def test_unmasked_sum_is_the_sum_of_encodings_exactly(dropped):
    ring = FixedPoint(bound=1.0, ring_bits=64, frac_bits=32)
    x = _inputs()
    res = secure_sum(x, ring, T, dropped)
    alive = [i for i in range(N) if i not in dropped]
    assert res.survivors == alive
    plain = np.zeros(DIM, dtype=np.uint64)
    for i in alive:
        plain = plain + ring.encode(x[i])  # wraps mod 2^64 like the ring
    np.testing.assert_array_equal(res.ring_total, plain)
    # decoding: each encoding is within 2^-33 of its float, so the sum within |alive| · 2^-33
    float_sum = sum(x[i] for i in alive)
    assert np.abs(res.total - float_sum).max() <= len(alive) * 2.0**-33


def test_32_bit_ring_too():
    ring = FixedPoint(bound=4.0, ring_bits=32, frac_bits=16)
    x = _inputs(1, 4.0)
    res = secure_sum(x, ring, T, {5})
    plain = sum(ring.encode(x[i]).astype(np.uint64) for i in res.survivors)
    np.testing.assert_array_equal(res.ring_total, (plain % 2**32).astype(np.uint32))


def test_fewer_survivors_than_the_threshold_fail_the_round():
    with pytest.raises(SecAggError, match="fewer than the threshold 4"):
        secure_sum(_inputs(), FixedPoint(bound=1.0), T, {0, 1, 2, 3})


def test_the_ring_refuses_a_cohort_that_could_overflow():
    ring = FixedPoint(bound=1.0, ring_bits=32, frac_bits=28)
    ring.check_capacity(7)  # 7 · 2^28 < 2^31
    with pytest.raises(SecAggError, match="overflows"):
        ring.check_capacity(8)  # 8 · 2^28 = 2^31
    with pytest.raises(ValueError, match="exceeds the bound"):
        ring.encode(np.array([1.5]))
    with pytest.raises(ValueError, match="non-finite"):
        ring.encode(np.array([np.nan]))


def test_a_masked_upload_looks_uniform():
    """Chi-square of the top byte of one masked upload against uniform over 256 values:
    p < 1e-3 is a false alarm for a uniform vector with probability 1e-3. The same test
    rejects the unmasked encoding (top byte 0x00 or 0xFF), so it has power here."""
    ring = FixedPoint(bound=1.0)
    dim = 64_000  # 250 per byte value on average
    x = {i: np.full(dim, 0.25 * (i + 1)) for i in range(3)}  # a very non-uniform input
    clients = {i: SecAggClient(i, 2) for i in x}
    server = SecAggServer(2, ring)
    roster = server.advertise([c.advertise() for c in clients.values()])
    inboxes = server.route({i: c.share_keys(roster) for i, c in clients.items()})
    for i, c in clients.items():
        c.receive_shares(inboxes[i])
    masked = clients[0].masked_input(ring.encode(x[0]))
    top = (masked >> np.uint64(56)).astype(np.int64)
    assert chisquare(np.bincount(top, minlength=256)).pvalue > 1e-3
    raw_top = (ring.encode(x[0]) >> np.uint64(56)).astype(np.int64)
    assert chisquare(np.bincount(raw_top, minlength=256)).pvalue < 1e-3
    # the server holds masked vectors only: no coordinate equals the client's encoding
    server.collect(0, masked)
    assert (server.masked[0] != ring.encode(x[0])).mean() > 0.999


def test_bytes_each_client_sends_follow_the_protocol():
    ring = FixedPoint(bound=1.0)
    res = secure_sum(_inputs(), ring, T, {6})
    share_msg = 2 * ID_BYTES + NONCE_BYTES + 2 * shamir.ELEMENT_BYTES + TAG_BYTES
    keys = ID_BYTES + 2 * KEY_BYTES
    unmask = N * (ID_BYTES + shamir.ELEMENT_BYTES)  # one share per client, its own too
    survivor = keys + (N - 1) * share_msg + ID_BYTES + DIM * 8 + unmask
    assert res.bytes_sent[0] == survivor
    assert res.bytes_sent[6] == keys + (N - 1) * share_msg  # dropped before uploading
    assert res.server_seconds > 0


def test_shamir_any_t_shares_and_not_fewer():
    secret = int.from_bytes(b"\x07" * 32, "big")
    xs = [1, 2, 3, 4, 5]
    sh = shamir.share(secret, xs, 3)
    for subset in itertools.combinations(xs, 3):
        assert shamir.reconstruct({x: sh[x] for x in subset}, 3) == secret
    with pytest.raises(ValueError, match="fewer than the threshold"):
        shamir.reconstruct({1: sh[1], 2: sh[2]}, 3)
    # two shares of a 3-threshold sharing interpolate (as a line) to something else
    line = shamir.reconstruct({1: sh[1], 2: sh[2]}, 2)
    assert line != secret


def test_bench_secagg_reports_the_protocols_bytes():
    """fedsim bench's secagg section: bytes from the message sizes, as above."""
    from fedsim.bench_secagg import bench_secagg

    dim = 200
    out = bench_secagg(dim, [5, 10], repeats=1)
    for n in (5, 10):
        row = out["rows"][str(n)]
        assert row["threshold"] == n // 2 + 1 and row["left"] == n // 10
        share_msg = 2 * ID_BYTES + NONCE_BYTES + 2 * shamir.ELEMENT_BYTES + TAG_BYTES
        want = (
            ID_BYTES
            + 2 * KEY_BYTES
            + (n - 1) * share_msg
            + ID_BYTES
            + dim * 8
            + n * (ID_BYTES + shamir.ELEMENT_BYTES)
        )
        assert row["client_bytes"] == want
