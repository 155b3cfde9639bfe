"""Shamir secret sharing over the prime field GF(2^521 − 1), on Python integers.

Shamir, "How to Share a Secret", CACM 1979. A secret s < p is the constant term of a random
polynomial f of degree t − 1; share i is (i, f(i)) for i = 1…n; any t shares give s back by
Lagrange interpolation at 0, and t − 1 shares say nothing about it. p = 2^521 − 1 (a Mersenne
prime) holds a 32-byte seed or X25519 key as one element. Randomness from :mod:`secrets`.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping

PRIME = 2**521 - 1
ELEMENT_BYTES = (PRIME.bit_length() + 7) // 8  # 66: one field element on the wire


def share(secret: int, xs: list[int], threshold: int) -> dict[int, int]:
    """Shares ``{x: f(x)}`` of ``secret`` at the points ``xs`` (distinct, in 1…p−1)."""
    if not 0 <= secret < PRIME:
        raise ValueError("shamir: the secret must be in [0, p)")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"shamir: threshold {threshold} is not in 1..{len(xs)}")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ValueError("shamir: share points must be distinct and non-zero")
    coeffs = [secret] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    out = {}
    for x in xs:
        acc = 0
        for c in reversed(coeffs):  # Horner: f(x) = c_0 + x (c_1 + x (…))
            acc = (acc * x + c) % PRIME
        out[x] = acc
    return out


def reconstruct(shares: Mapping[int, int], threshold: int) -> int:
    """f(0) from any ``threshold`` of ``shares`` (ValueError when fewer are given)."""
    if len(shares) < threshold:
        raise ValueError(
            f"shamir: {len(shares)} shares, fewer than the threshold {threshold}"
        )
    points = sorted(shares.items())[:threshold]
    secret = 0
    for i, (xi, yi) in enumerate(points):
        # Lagrange basis at 0: Π_{j≠i} x_j / (x_j − x_i)
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if j != i:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    return secret
