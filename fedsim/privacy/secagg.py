"""Secure aggregation, simulated message by message: the server learns only the sum.

Bonawitz, Ivanov, Kreuter, Marcedone, McMahan, Patel, Ramage, Segal, Seth, "Practical Secure
Aggregation for Privacy-Preserving Machine Learning", CCS 2017 (eprint 2017/281), on the
complete graph; SecAgg+ (Bell et al. 2020, arXiv 2005.05325) replaces the complete graph by a
sparse one and is not simulated here. Per round, with U the clients and t the threshold:

0. AdvertiseKeys — client i makes two X25519 key pairs (c_i for encrypting shares, s_i for
   masks) and sends the public halves; the server broadcasts them.
1. ShareKeys — i draws a self-mask seed b_i, Shamir-shares b_i and s_i's secret key t-of-|U|
   (:mod:`fedsim.privacy.shamir`), and sends share j to client j encrypted with AES-GCM under
   HKDF(X25519(c_i, c_j)); the server only routes ciphertexts.
2. MaskedInputCollection — i sends y_i = x_i + PRG(b_i) + Σ_{j≠i} ±PRG(s_ij) in Z_{2^k}
   (+ for i < j, − for i > j; s_ij = HKDF(X25519(s_i, s_j)); PRG = ChaCha20 keystream).
   Clients that drop out here send nothing.
3. Unmasking — each survivor reveals, for every other client, the share of b_i when i sent
   y_i and the share of s_i's key when i dropped (never both). With ≥ t survivors the server
   rebuilds the survivors' self-masks and the dropped clients' pairwise masks and removes them:
   Σ_i y_i − masks = Σ_{survivors} x_i exactly, in the ring. Fewer than t: :class:`SecAggError`.

The server side (:class:`SecAggServer`) only ever receives public keys, ciphertexts, masked
vectors and shares; each client's x_i stays in its :class:`SecAggClient`. Primitives are the
``cryptography`` package's (X25519, HKDF-SHA256, ChaCha20, AES-GCM); only Shamir's arithmetic
is written here. Inputs are fixed-point encodings (:class:`FixedPoint`) of float vectors.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from fedsim.privacy import shamir

try:  # the optional extra fedsim[privacy]
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import (
        X25519PrivateKey,
        X25519PublicKey,
    )
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    RAW = serialization.Encoding.Raw
except ImportError:  # pragma: no cover - exercised only where the extra is missing
    serialization = None  # type: ignore[assignment]
KEY_BYTES = 32
NONCE_BYTES = 12  # AES-GCM nonce
TAG_BYTES = 16  # AES-GCM tag
ID_BYTES = 4  # a client id on the wire


class SecAggError(RuntimeError):
    """The round cannot be unmasked (too few survivors) or an input does not fit the ring."""


@dataclass(frozen=True)
class FixedPoint:
    """Floats in [−``bound``, ``bound``] as integers in Z_{2^k} with resolution 2^−f.

    encode(v) = round(v · 2^f) mod 2^k; a sum of n encodings decodes correctly while
    n · bound · 2^f < 2^(k−1) (the signed range), which :meth:`check_capacity` enforces.
    Each encoding is off by at most 2^−(f+1), so a decoded sum of n is within n · 2^−(f+1) of
    the float sum.

    Attributes
    ----------
    bound:
        The largest |value| an input may hold (e.g. the clip C: a clipped update's entries are
        at most ‖Δ‖₂ ≤ C). Larger values are refused, never clamped.
    ring_bits:
        k: 32 or 64.
    frac_bits:
        f: fraction bits.
    """

    bound: float
    ring_bits: int = 64
    frac_bits: int = 32

    def __post_init__(self) -> None:
        if self.ring_bits not in (32, 64):
            raise ValueError(
                f"privacy.ring_bits: must be 32 or 64, got {self.ring_bits}"
            )
        if not self.bound > 0 or not math.isfinite(self.bound):
            raise ValueError(f"secagg bound: must be finite and > 0, got {self.bound}")
        if not 0 <= self.frac_bits < self.ring_bits - 1:
            raise ValueError(f"privacy.frac_bits: must be in 0..{self.ring_bits - 2}")

    @property
    def dtype(self) -> type:
        return np.uint64 if self.ring_bits == 64 else np.uint32

    @property
    def resolution(self) -> float:
        return 2.0**-self.frac_bits

    def check_capacity(self, clients: int) -> None:
        """Refuse a cohort whose sum could overflow the signed range of Z_{2^k}."""
        if clients * self.bound * 2**self.frac_bits >= 2 ** (self.ring_bits - 1):
            raise SecAggError(
                f"secure aggregation: {clients} clients × bound {self.bound:g} × 2^"
                f"{self.frac_bits} overflows Z_2^{self.ring_bits}; lower privacy.frac_bits"
            )

    def encode(self, values: np.ndarray) -> np.ndarray:
        """round(v · 2^f) mod 2^k (ValueError on NaN/Inf or |v| > bound)."""
        v = np.asarray(values, dtype=np.float64)
        if not np.isfinite(v).all():
            raise ValueError("secagg encode: non-finite values (NaN/Inf)")
        if v.size and np.abs(v).max() > self.bound:
            raise ValueError(
                f"secagg encode: |value| {np.abs(v).max():.4g} exceeds the bound {self.bound:g}"
            )
        ints = np.rint(v * 2.0**self.frac_bits).astype(np.int64)
        return ints.astype(np.uint64).astype(self.dtype)  # two's complement: mod 2^k

    def decode(self, ring_values: np.ndarray) -> np.ndarray:
        """The signed value of each ring element, over 2^f (float64)."""
        signed = ring_values.view(np.int64 if self.ring_bits == 64 else np.int32)
        return signed.astype(np.float64) / 2.0**self.frac_bits


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info
    ).derive(secret)


def prg(seed: bytes, length: int, dtype: type) -> np.ndarray:
    """``length`` ring elements from ChaCha20's keystream under HKDF(seed)."""
    key = _hkdf(seed, b"fedsim secagg prg")
    enc = Cipher(algorithms.ChaCha20(key, b"\0" * 16), mode=None).encryptor()
    width = np.dtype(dtype).itemsize
    return np.frombuffer(enc.update(b"\0" * (length * width)), dtype=dtype).copy()


def _pub(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(RAW, serialization.PublicFormat.Raw)


def _secret_int(key: X25519PrivateKey) -> int:
    raw = key.private_bytes(
        RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return int.from_bytes(raw, "big")


def _key_of(value: int) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(value.to_bytes(KEY_BYTES, "big"))


def _fresh_key() -> bytes:
    if serialization is None:
        raise SecAggError(
            "privacy.secure_aggregation: needs the cryptography package: pip install "
            "'fedsim[privacy]'"
        )
    return X25519PrivateKey.generate().private_bytes(
        RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def _point(client_id: int) -> int:
    return client_id + 1  # Shamir evaluation point (never 0)


@dataclass(frozen=True)
class Keys:
    """AdvertiseKeys: client ``client_id``'s two public keys."""

    client_id: int
    c_pk: bytes
    s_pk: bytes


@dataclass
class SecAggClient:
    """One client's side of the protocol; its input never leaves it unmasked.

    Plain data (keys as raw bytes), so a client's protocol state can travel with its training
    task to the worker that masks its update.
    """

    client_id: int
    threshold: int
    sent_bytes: int = 0
    _c_raw: bytes = field(default_factory=_fresh_key)
    _s_raw: bytes = field(default_factory=_fresh_key)
    _b: bytes = field(default_factory=lambda: secrets.token_bytes(KEY_BYTES))
    _roster: dict[int, Keys] = field(default_factory=dict)
    _held: dict[int, tuple[int, int]] = field(
        default_factory=dict
    )  # i → (b share, s share)

    @property
    def _c(self) -> X25519PrivateKey:
        return X25519PrivateKey.from_private_bytes(self._c_raw)

    @property
    def _s(self) -> X25519PrivateKey:
        return X25519PrivateKey.from_private_bytes(self._s_raw)

    def advertise(self) -> Keys:
        self.sent_bytes += ID_BYTES + 2 * KEY_BYTES
        return Keys(self.client_id, _pub(self._c), _pub(self._s))

    def _channel(self, other: int) -> AESGCM:
        peer = X25519PublicKey.from_public_bytes(self._roster[other].c_pk)
        return AESGCM(_hkdf(self._c.exchange(peer), b"fedsim secagg shares"))

    def share_keys(self, roster: Mapping[int, Keys]) -> dict[int, bytes]:
        """Shares of b_i and of s_i's key for every client of ``roster``, each encrypted."""
        if len(roster) < self.threshold:
            raise SecAggError(
                f"secure aggregation: {len(roster)} clients advertised keys, fewer "
                f"than the threshold {self.threshold}"
            )
        self._roster = dict(roster)
        xs = [_point(j) for j in sorted(roster)]
        b_sh = shamir.share(int.from_bytes(self._b, "big"), xs, self.threshold)
        s_sh = shamir.share(_secret_int(self._s), xs, self.threshold)
        out = {}
        for j in sorted(roster):
            pair = (b_sh[_point(j)], s_sh[_point(j)])
            if j == self.client_id:
                self._held[j] = pair
                continue
            plain = b"".join(v.to_bytes(shamir.ELEMENT_BYTES, "big") for v in pair)
            nonce = secrets.token_bytes(NONCE_BYTES)
            aad = f"{self.client_id}->{j}".encode()
            out[j] = nonce + self._channel(j).encrypt(nonce, plain, aad)
            self.sent_bytes += 2 * ID_BYTES + len(out[j])
        return out

    def receive_shares(self, inbox: Mapping[int, bytes]) -> None:
        """Decrypt the shares other clients sent this client (routed by the server)."""
        n = shamir.ELEMENT_BYTES
        for i, blob in inbox.items():
            aad = f"{i}->{self.client_id}".encode()
            plain = self._channel(i).decrypt(
                blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad
            )
            self._held[i] = (
                int.from_bytes(plain[:n], "big"),
                int.from_bytes(plain[n:], "big"),
            )

    def masked_input(self, encoded: np.ndarray) -> np.ndarray:
        """y_i = x_i + PRG(b_i) + Σ_{j≠i} ±PRG(s_ij) in Z_{2^k} (wrapping integer adds)."""
        dtype = encoded.dtype.type
        y = encoded + prg(self._b, encoded.size, dtype)
        for j in sorted(self._roster):
            if j == self.client_id:
                continue
            mask = prg(self._pair_seed(j), encoded.size, dtype)
            y = y + mask if self.client_id < j else y - mask
        self.sent_bytes += ID_BYTES + y.nbytes
        return y

    def _pair_seed(self, other: int) -> bytes:
        peer = X25519PublicKey.from_public_bytes(self._roster[other].s_pk)
        return self._s.exchange(peer)

    def unmask(self, survivors: list[int]) -> dict[int, tuple[str, int]]:
        """For each client: its b-share if it survived, its s-key share if it dropped."""
        if len(survivors) < self.threshold:
            raise SecAggError(
                f"secure aggregation: {len(survivors)} survivors, fewer than the "
                f"threshold {self.threshold}"
            )
        alive = set(survivors)
        out = {
            i: ("b", b) if i in alive else ("s", s) for i, (b, s) in self._held.items()
        }
        self.sent_bytes += len(out) * (ID_BYTES + shamir.ELEMENT_BYTES)
        return out


@dataclass
class SecAggServer:
    """The server's side: routes ciphertexts, sums masked vectors, removes the masks.

    It never receives an input in the clear: :meth:`collect` takes masked ring vectors only.
    """

    threshold: int
    ring: FixedPoint
    seconds: float = 0.0
    roster: dict[int, Keys] = field(default_factory=dict)
    masked: dict[int, np.ndarray] = field(default_factory=dict)

    def advertise(self, keys: list[Keys]) -> dict[int, Keys]:
        t0 = time.perf_counter()
        self.roster = {k.client_id: k for k in keys}
        if len(self.roster) < self.threshold:
            raise SecAggError(
                f"secure aggregation: {len(self.roster)} clients, fewer than the "
                f"threshold {self.threshold}"
            )
        self.ring.check_capacity(len(self.roster))
        self.seconds += time.perf_counter() - t0
        return dict(self.roster)

    def route(
        self, outboxes: Mapping[int, Mapping[int, bytes]]
    ) -> dict[int, dict[int, bytes]]:
        """Ciphertexts from each sender to each receiver's inbox (opaque to the server)."""
        t0 = time.perf_counter()
        inboxes: dict[int, dict[int, bytes]] = {j: {} for j in self.roster}
        for i, out in outboxes.items():
            for j, blob in out.items():
                inboxes[j][i] = blob
        self.seconds += time.perf_counter() - t0
        return inboxes

    def collect(self, client_id: int, masked: np.ndarray) -> None:
        if masked.dtype != np.dtype(self.ring.dtype):
            raise SecAggError(
                f"secure aggregation: client {client_id} sent {masked.dtype}"
            )
        self.masked[client_id] = masked

    def survivors(self) -> list[int]:
        """U_3: the clients whose masked input arrived (SecAggError when fewer than t)."""
        alive = sorted(self.masked)
        if len(alive) < self.threshold:
            raise SecAggError(
                f"secure aggregation: {len(alive)} of {len(self.roster)} clients sent "
                f"masked inputs, fewer than the threshold {self.threshold}; the round "
                "cannot be unmasked"
            )
        return alive

    def unmask(
        self, responses: Mapping[int, Mapping[int, tuple[str, int]]]
    ) -> np.ndarray:
        """Σ_{survivors} x_i in Z_{2^k} from the masked inputs and the revealed shares."""
        t0 = time.perf_counter()
        alive = self.survivors()
        if len(responses) < self.threshold:
            raise SecAggError(
                f"secure aggregation: {len(responses)} unmasking responses, fewer than "
                f"the threshold {self.threshold}"
            )
        dtype = self.ring.dtype
        size = self.masked[alive[0]].size
        total: np.ndarray = np.zeros(size, dtype=dtype)
        for i in alive:
            total = total + self.masked[i]
        for i in sorted(self.roster):
            kind = "b" if i in self.masked else "s"
            shares = {}
            for j, resp in responses.items():
                got_kind, value = resp[i]
                if got_kind != kind:  # a survivor must never reveal both for one client
                    raise SecAggError(
                        f"secure aggregation: client {j} revealed {got_kind} for {i}"
                    )
                shares[_point(j)] = value
            secret = shamir.reconstruct(shares, self.threshold)
            if kind == "b":
                total = total - prg(secret.to_bytes(KEY_BYTES, "big"), size, dtype)
            else:
                total = self._remove_pairwise(total, i, _key_of(secret), alive)
        self.seconds += time.perf_counter() - t0
        return total

    def _remove_pairwise(
        self, total: np.ndarray, dropped: int, key: X25519PrivateKey, alive: list[int]
    ) -> np.ndarray:
        """Take out the masks survivors added toward ``dropped`` (it sent nothing to cancel)."""
        for j in alive:
            peer = X25519PublicKey.from_public_bytes(self.roster[j].s_pk)
            mask = prg(key.exchange(peer), total.size, total.dtype.type)
            # survivor j added +mask when j < dropped, −mask when j > dropped
            total = total - mask if j < dropped else total + mask
        return total


@dataclass(frozen=True)
class SecAggResult:
    """A securely aggregated round: the decoded sum, who survived, and the cost."""

    total: np.ndarray  # float64 decoded Σ_{survivors} x_i
    ring_total: np.ndarray  # the same sum in Z_{2^k}
    survivors: list[int]
    bytes_sent: dict[int, int]  # per client, every message it sent
    server_seconds: float
    client_seconds: float = 0.0  # mean over clients of their own protocol work


def secure_sum(
    inputs: Mapping[int, np.ndarray],
    ring: FixedPoint,
    threshold: int,
    dropped: frozenset[int] | set[int] = frozenset(),
) -> SecAggResult:
    """Run the four rounds for ``inputs`` (client id → float vector); ``dropped`` clients
    leave after ShareKeys and send no masked input. Raises :class:`SecAggError` when fewer
    than ``threshold`` remain."""
    clock = time.perf_counter
    t0 = clock()
    clients = {i: SecAggClient(i, threshold) for i in sorted(inputs)}
    keys = [c.advertise() for c in clients.values()]
    client_time = clock() - t0
    server = SecAggServer(threshold, ring)
    roster = server.advertise(keys)
    t0 = clock()
    outboxes = {i: c.share_keys(roster) for i, c in clients.items()}
    client_time += clock() - t0
    inboxes = server.route(outboxes)
    t0 = clock()
    for i, c in clients.items():
        c.receive_shares(inboxes[i])
    masked = {
        i: c.masked_input(ring.encode(inputs[i]))
        for i, c in clients.items()
        if i not in dropped
    }
    client_time += clock() - t0
    for i, y in masked.items():
        server.collect(i, y)
    alive = server.survivors()
    t0 = clock()
    responses = {j: clients[j].unmask(alive) for j in alive}
    client_time += clock() - t0
    ring_total = server.unmask(responses)
    return SecAggResult(
        ring.decode(ring_total),
        ring_total,
        alive,
        {i: c.sent_bytes for i, c in clients.items()},
        server.seconds,
        client_time / len(clients),
    )
