"""Server aggregation time and memory at LLaVA-1.5-7B projector size (fp32, CPU).

The projector of LLaVA-1.5-7B is mlp2x_gelu 1024 → 4096 → 4096: linear_1.weight [4096, 1024],
linear_2.weight [4096, 4096] and two biases, 21M parameters. Each algorithm runs in its own
process (so each peak is its own) on 50 client deltas (low-rank shared part + noise, fixed seed),
for two rounds (the second exercises gauge fixing and momentum transport). Reported: seconds per
round, peak resident memory of the process, and the extra memory over what holding the deltas
takes; ratios against FedAvg measured in the same run.

    .venv/bin/python benchmarks/fedcmp_aggregation.py --clients 50 --out runs/bench-fedcmp.json

``--device cuda`` draws the deltas on the GPU and aggregates them there (scripts/gpu_check.sh);
the peak is then the GPU's allocated memory. ``--device cpu`` (the default) is unchanged.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {
    "linear_1.weight": (4096, 1024),
    "linear_1.bias": (4096,),
    "linear_2.weight": (4096, 4096),
    "linear_2.bias": (4096,),
}


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(
    algorithm: str,
    clients: int,
    rank: int,
    threads: int,
    device: str = "cpu",
    params: dict | None = None,
) -> dict:
    import torch

    from fedsim.algorithms import build_algorithm
    from fedsim.bench_aggregation import make_deltas

    torch.set_num_threads(threads)
    gpu = device.startswith("cuda")
    if gpu and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: torch sees no CUDA device")
    # W_t = 0; a shared rank-16 part plus noise per client (the bench section's data).
    weights, updates = make_deltas(SHAPES, clients, 0, device=device)
    base_rss = _rss_mb()
    if gpu:  # the GPU's own peak: what the deltas and the server half allocate there
        torch.cuda.synchronize()
        base_gpu = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    params = {
        **({"rank": rank} if algorithm.startswith("fedcmp") else {}),
        **(params or {}),
    }
    algo = build_algorithm(algorithm, params)
    state = algo.init_state(weights)
    seconds = []
    for rnd in (1, 2):
        t0 = time.perf_counter()
        res = algo.aggregate(weights, updates, state, rnd)
        if gpu:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
        weights, state = res.weights, res.state
    extra = {}
    if gpu:
        extra = {
            "device": torch.cuda.get_device_name(0),
            "gpu_with_deltas_mb": base_gpu / 2**20,
            "gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20,
        }
    return {
        **extra,
        "algorithm": algorithm,
        "params": params,
        "clients": clients,
        "seconds_round1": seconds[0],
        "seconds_round2": seconds[1],
        "rss_with_deltas_mb": base_rss,
        "peak_rss_mb": _peak_mb(),
        "extra_over_deltas_mb": _peak_mb() - base_rss,
        "deltas_mb": clients
        * sum(torch.Size(s).numel() for s in SHAPES.values())
        * 4
        / 2**20,
        "metrics_round2": {
            k: v
            for k, v in res.metrics.items()
            if "linear_2.weight" in k or k == "update_norm"
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--rank", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--algorithms", default="fedavg,fedcmp-cra,fedcmp")
    ap.add_argument("--out", type=Path, default=Path("runs/bench-fedcmp.json"))
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (deltas on the GPU)")
    ap.add_argument(
        "--params",
        default="{}",
        help='the algorithms\' further parameters as JSON, e.g. \'{"basis": "sketch"}\'',
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.device != "cpu" and not args.device.startswith("cuda"):
        ap.error(f"--device {args.device!r}: use cpu or cuda")
    try:
        params = json.loads(args.params)
    except json.JSONDecodeError as e:
        ap.error(f"--params {args.params!r}: not JSON ({e.msg})")
    if not isinstance(params, dict):
        ap.error(f"--params {args.params!r}: must be a JSON object")
    if args.worker:
        row = worker(
            args.worker, args.clients, args.rank, args.threads, args.device, params
        )
        print(json.dumps(row))
        return
    from rich.console import Console
    from rich.table import Table

    rows = []
    for algo in args.algorithms.split(","):
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            algo,
            "--clients",
            str(args.clients),
            "--rank",
            str(args.rank),
            "--threads",
            str(args.threads),
            "--device",
            args.device,
            "--params",
            args.params,
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    base = rows[0]
    table = Table(
        title=f"aggregation of {args.clients} client deltas at LLaVA-1.5-7B projector size (fp32, CPU, {args.threads} threads)"
    )
    for col in (
        "algorithm",
        "s / round (1st)",
        "s / round (2nd)",
        "time vs " + base["algorithm"],
        "peak RSS MiB",
        "extra over deltas MiB",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r["algorithm"],
            f"{r['seconds_round1']:.2f}",
            f"{r['seconds_round2']:.2f}",
            f"{r['seconds_round2'] / base['seconds_round2']:.1f}×",
            f"{r['peak_rss_mb']:.0f}",
            f"{r['extra_over_deltas_mb']:.0f}",
        )
    Console().print(table)
    print(f"client deltas: {rows[0]['deltas_mb']:.0f} MiB")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
