"""One line of ``metrics.jsonl``: the round record both round loops write and every reader reads.

:class:`RoundRecord` is the schema (a ``TypedDict``: the line is the JSON object as written, so
records round-trip through ``json`` unchanged); :data:`FIELDS` says what each key holds and which
runs write it — the docs' metrics reference is :func:`reference_markdown` (the site's build
fills it in), and :func:`check_record` refuses a key the schema does not declare (tests run it on every
line real runs write).
"""

from __future__ import annotations

from typing import Any, TypedDict


class RoundRecord(TypedDict, total=False):
    """A round's line of ``metrics.jsonl`` (round 0: the untrained projector's evaluation)."""

    round: int
    clients: list[int] | str
    num_clients: int
    samples: int
    loss: float | None
    lr: float
    update_norm: float | None
    rejected: list[dict[str, Any]]
    algorithm: dict[str, Any]
    action: str
    diagnostics: dict[str, float]
    client_seconds_max: float
    cohorts: list[list[int]]
    retries: int
    workers_lost: list[str]
    predicted_tokens: dict[str, int]
    upload_mib: float
    presummed_groups: int
    bad_images: int
    corpus: dict[str, Any]
    data_passes_max: int
    available: int
    sampled: list[int]
    dropped: list[int]
    stragglers: list[int]
    sim_seconds: float
    sim_clock: float
    epsilon: float | str
    secagg: dict[str, Any]
    privacy: dict[str, Any]
    local_steps: dict[str, int]
    train_workers: int
    eval: dict[str, float]
    eval_client_std: dict[str, float]
    wall_seconds: float


# key → (which records carry it, what it holds). "every" = every round ≥ 1 of every run.
FIELDS: dict[str, tuple[str, str]] = {
    "round": (
        "every line",
        "the round (0: the untrained projector, when `eval.at_start`)",
    ),
    "clients": (
        "every",
        'the clients that trained, sorted (`"pooled"` for `centralized`)',
    ),
    "num_clients": ("federated", "how many clients trained"),
    "samples": ("every", "examples trained on in the round"),
    "loss": (
        "every",
        "sample-weighted mean client loss (null when no client reported)",
    ),
    "lr": ("every", "the learning rate of the round's first local step"),
    "update_norm": ("every", "‖W_{t+1} − W_t‖₂"),
    "rejected": ("every", "rejected updates: client id and reason (never aggregated)"),
    "algorithm": (
        "federated",
        "the algorithm's own round metrics (e.g. Fed-CMP's rank, ρ)",
    ),
    "action": ("when W_t was kept", "what the server did instead of a step"),
    "diagnostics": (
        "`train.diagnostics`",
        "oscillation, client conflict, drift, effective rank (*Per-round diagnostics*)",
    ),
    "client_seconds_max": ("federated", "the slowest client's training seconds"),
    "cohorts": ("federated", "the client groups trained together, as sent"),
    "retries": ("federated", "client groups sent again after a lost worker"),
    "workers_lost": ("when a worker was lost", "the lost workers"),
    "predicted_tokens": ("federated", "each client's predicted tokens (cohort order)"),
    "upload_mib": ("federated", "MiB the workers sent back"),
    "presummed_groups": ("`train.presum`", "partial sums received"),
    "bad_images": ("federated", "images that did not decode (rows skipped)"),
    "corpus": (
        "round 1 (federated)",
        "the training corpus: rows, images missing at build",
    ),
    "data_passes_max": ("every", "the most passes any client's stream has begun"),
    "available": ("federated", "clients online this round"),
    "sampled": ("federated", "clients drawn before dropout and deadline"),
    "dropped": ("federated", "clients that dropped out"),
    "stragglers": ("federated", "clients past the deadline"),
    "sim_seconds": (
        "federated",
        "simulated round time (slowest client's compute + upload)",
    ),
    "sim_clock": ("federated", "simulated time since the start"),
    "epsilon": (
        "`privacy.mechanism`",
        'ε(δ) of the projectors after this round (`"inf"` when z = 0)',
    ),
    "secagg": (
        "`privacy.secure_aggregation`",
        "threshold, survivors, clients that left after ShareKeys, failure (or null), "
        "bytes each client sent (max, mean), server seconds",
    ),
    "privacy": (
        "`privacy.mechanism`",
        "δ, noise multiplier z, the round's clip C (and the noised clipped fraction)",
    ),
    "local_steps": ("unequal local steps", "each client's local steps (device tiers)"),
    "train_workers": ("`centralized`", "Ray Train workers"),
    "eval": ("evaluated rounds", "held-out scores (`attr_mean`, `yesno_acc`, …)"),
    "eval_client_std": (
        "`local`",
        "spread over clients of their own projector's scores",
    ),
    "wall_seconds": ("every line", "wall time of the round"),
}


def check_record(record: dict[str, Any], where: str = "record") -> None:
    """Raise ValueError naming any key :class:`RoundRecord` does not declare."""
    unknown = sorted(set(record) - set(RoundRecord.__annotations__))
    if unknown:
        raise ValueError(f"{where}: keys not in RoundRecord: {', '.join(unknown)}")


def reference_markdown() -> str:
    """The docs' metrics reference (docs/reference/metrics.md): a row per key, in schema order."""
    rows = ["| key | written | holds |", "|---|---|---|"]
    for key in RoundRecord.__annotations__:
        when, what = FIELDS[key]
        rows.append(f"| `{key}` | {when} | {what} |")
    return "\n".join(rows)
