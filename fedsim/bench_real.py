"""``fedsim bench --sections real-shape``: the simulator at LLaVA-1.5-7B's widths.

Measured on the skeleton backbone (:mod:`fedsim.models.skeleton`: CLIP ViT-L/14-336 and
Vicuna-7B widths, 576 image tokens, a 21 M parameter ``mlp2x_gelu`` projector, vocabulary
32 000, bf16 weights, few layers), with the synthetic scenes at 336 px:

- **resident vs fresh** — the same client workload trained (a) on the resident backbone one
  client at a time, (b) with cohort batching, (c) with a fresh model loaded from the safetensors
  on disk for every client task, as a per-task simulator does; seconds and ratios to (a).
- **swap share** — one projector swap (an in-place copy of 21 M parameters) against a local step.
- **memory** — ``fedsim run`` on the skeleton in its own process: peak resident memory of every
  fedsim process (``resources.json``), against the bytes of the weights file.
- **cohort gain** — (a) / (b) at 576 image tokens.
- **per-layer cost** — FLOPs (``torch.utils.flop_counter``, forward and backward of fedsim's
  own local step) and bytes (parameters; activations saved for backward, counted with
  ``saved_tensors_hooks``) of one LM decoder layer, one vision encoder layer, the projector, the
  LM head and the embeddings, with the sums extrapolated to 32 LM and 24 vision layers.

The workload is fixed (``CLIENTS`` clients × ``STEPS`` step × batch ``BATCH``): the toy bench's
defaults would take hours at this size. Timings are medians of ``repeats`` after a warm-up and
are never asserted in tests.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from fedsim.bench_startup import run_command

CLIENTS = 4
STEPS = 1
BATCH = 1
#: LLaVA-1.5-7B's depth, the target of the extrapolation.
FULL_LM_LAYERS = 32
FULL_VISION_LAYERS = 24


def skeleton_sets(path: Path, cache_dir: str | None) -> list[str]:
    """The config of a small run on the skeleton (bf16 weights on CPU, no evaluation)."""
    sets = [
        f"model.backbone={path}",
        "model.dtype=bfloat16",
        "model.device=cpu",
        "data.num_scenes=64",
        "data.eval_scenes=1",  # the last round always evaluates: one generation
        f"scenario.num_clients={CLIENTS}",
        f"scenario.cohort_size={CLIENTS}",
        f"train.local_steps={STEPS}",
        f"train.batch_size={BATCH}",
        f"train.cohort_batch={CLIENTS}",
        "ray.workers=1",
        "eval_every=0",
        "eval.at_start=false",
        "eval.benchmarks=[]",
    ]
    return sets + ([f"cache_dir={cache_dir}"] if cache_dir else [])


def bench_real_shape(
    cache_dir: str | None, repeats: int, threads: int, out: Path, console: Any
) -> dict[str, Any]:
    """Every measurement of the section (see the module docstring), in one process."""
    from fedsim.algorithms.base import LocalTraining
    from fedsim.bench_common import (
        BenchSettings,
        client_tasks,
        max_relative,
        swap_seconds,
        training_ways,
    )
    from fedsim.config import load_config
    from fedsim.data.rows import RowReader
    from fedsim.models.backbone import init_projector, load_backbone
    from fedsim.models.skeleton import SkeletonConfig, build_skeleton
    from fedsim.prepare import prepare, train_settings
    from fedsim.runio import cache_folder

    torch.set_num_threads(threads)
    skel = SkeletonConfig(dtype="bf16")
    path = build_skeleton(skel, cache_folder(cache_dir))
    cfg = load_config(None, [*skeleton_sets(path, cache_dir), "rounds=1"])
    prep = prepare(cfg)

    def load() -> Any:
        return load_backbone(path, dtype=torch.bfloat16)

    t0 = time.perf_counter()
    backbone = load()
    load_s = time.perf_counter() - t0
    reader = RowReader.open(str(prep.train_path), prep.pixel_path)
    s = BenchSettings(clients=CLIENTS, steps=STEPS, batch=BATCH)
    tasks = client_tasks(prep.shards, s, cfg.seed)
    w0 = init_projector(backbone, cfg.seed)
    settings = train_settings(cfg, prep.shards)
    one, cohort, fresh = training_ways(
        load, backbone, reader, tasks, w0, LocalTraining(), settings
    )
    console.print(
        f"[bold]real shape[/bold]: {CLIENTS} clients × {STEPS} step × batch {BATCH}, "
        f"{skel.image_tokens} image tokens, bf16 skeleton {path.name}"
    )
    seconds: dict[str, float] = {}
    results: dict[str, list[Any]] = {}
    for name, fn, warm in [
        ("resident, one client at a time", one, True),
        ("resident, cohort batching", cohort, True),
        # No warm-up: a per-task simulator pays the load every time (the page cache is warm
        # from the resident loads above, so the disk is not what is measured).
        ("fresh model per client task (peer simulators)", fresh, False),
    ]:
        seconds[name], results[name] = _timed(fn, repeats, warm)
    swap_s = swap_seconds(backbone, cfg.seed + 1, max(repeats, 3), lambda: None)
    record: dict[str, Any] = {
        "skeleton": _skeleton_record(path, skel),
        "workload": {"clients": CLIENTS, "steps": STEPS, "batch": BATCH},
        "threads": threads,
        "load_seconds": load_s,
        **_ways_record(seconds, results, swap_s, max_relative),
        "projector_params": sum(v.numel() for v in w0.values()),
    }
    record["per_layer"] = per_layer_costs(backbone, reader, tasks[0], w0, settings)
    del backbone
    record["memory"] = run_memory(path, cache_dir, out, console)
    return record


def _ways_record(
    seconds: dict[str, float],
    results: dict[str, list[Any]],
    swap_s: float,
    max_relative: Callable[[Any, Any], float],
) -> dict[str, Any]:
    """The three ways' times as ratios to one client at a time, the cohort's gain and its
    difference from one at a time, and the swap's share of one local step."""
    base = seconds["resident, one client at a time"]
    step_s = base / (CLIENTS * STEPS)
    return {
        "ways": {
            name: {"seconds": sec, "ratio_to_one_at_a_time": sec / base}
            for name, sec in seconds.items()
        },
        "fresh_over_resident": seconds["fresh model per client task (peer simulators)"]
        / base,
        "cohort_gain": base / seconds["resident, cohort batching"],
        "cohort_max_relative_difference": max_relative(
            results["resident, one client at a time"],
            results["resident, cohort batching"],
        ),
        "swap_seconds": swap_s,
        "local_step_seconds": step_s,
        "swap_share_of_step": swap_s / step_s,
    }


def _timed(
    fn: Callable[[], list[Any]], repeats: int, warm: bool
) -> tuple[float, list[Any]]:
    """Median seconds of ``repeats`` calls (after one untimed call if ``warm``), last result."""
    if warm:
        fn()
    times, result = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def _skeleton_record(path: Path, skel: Any) -> dict[str, Any]:
    manifest = json.loads((path / "fedsim.json").read_text())
    return {
        "path": str(path),
        "dtype": skel.dtype,
        "lm_layers": skel.lm_layers,
        "vision_layers": skel.vision_layers,
        "image_tokens": skel.image_tokens,
        "vocab_size": skel.vocab_size,
        "parameters": manifest["parameters"],
        "weights_file_bytes": (path / "model.safetensors").stat().st_size,
    }


# ---------------------------------------------------------------------------------------------
# FLOPs and bytes per part of one local step


def _parts(model: Any) -> dict[str, torch.nn.Module]:
    """The parts costs are reported for: the first layer of each stack stands for every layer
    (all layers of a stack have one shape)."""
    inner = model.model
    vision = inner.vision_tower
    return {
        "vision_embeddings": vision.embeddings,
        "vision_layer": vision.encoder.layers[0],
        "projector": inner.multi_modal_projector,
        "lm_embed_tokens": inner.language_model.embed_tokens,
        "lm_layer": inner.language_model.layers[0],
        "lm_head": model.lm_head,
    }


@contextmanager
def _saved_bytes(parts: dict[str, torch.nn.Module]) -> Iterator[dict[str, int]]:
    """Bytes of the activations autograd saves for backward while inside each part (frozen
    weights excluded: they are resident anyway, counted as parameter bytes)."""
    counts = {name: 0 for name in parts}
    counts["other"] = 0
    stack: list[str] = []
    weights = {p.data_ptr() for m in parts.values() for p in m.parameters(recurse=True)}

    def enter(name: str) -> Callable[..., None]:
        def hook(module: Any, args: Any) -> None:
            stack.append(name)

        return hook

    def leave(module: Any, args: Any, output: Any) -> None:
        stack.pop()  # a hook's return value would replace the output: return None

    handles = []
    for name, module in parts.items():
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave))

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in weights:
            counts[stack[-1] if stack else "other"] += t.numel() * t.element_size()
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield counts
    finally:
        for h in handles:
            h.remove()


def _counted_step(
    backbone: Any,
    reader: Any,
    task: Any,
    w0: Any,
    settings: Any,
    parts: dict[str, Any],
) -> tuple[dict[str, int], int, list[int], dict[str, int]]:
    """One local step under torch's FLOP counter and the saved-tensor hooks: FLOPs by part,
    the total, the LM's input length and the saved activation bytes by part."""
    from torch.utils.flop_counter import FlopCounterMode

    from fedsim.algorithms.base import LocalTraining
    from fedsim.training import train_client

    model = backbone.model
    names = {id(m): n for n, m in parts.items()}
    module_names = {
        f"LlavaForConditionalGeneration.{qual}": names[id(m)]
        for qual, m in model.named_modules()
        if id(m) in names
    }
    counter = FlopCounterMode(display=False)
    seen: list[int] = []  # the LM's input length (image tokens expanded)

    def length(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        seen.append(int(kwargs["inputs_embeds"].shape[1]))

    hook = model.model.language_model.register_forward_pre_hook(
        length, with_kwargs=True
    )
    try:
        with counter, _saved_bytes(parts) as saved:
            train_client(backbone, reader, task, w0, {}, LocalTraining(), settings)
    finally:
        hook.remove()
    by_module = counter.get_flop_counts()
    flops = {
        part: int(sum(by_module.get(qual, {}).values()))
        for qual, part in module_names.items()
    }
    # Embeddings are lookups (0 FLOPs); the rest must be found, or the counter's module
    # names changed (another torch): say so rather than report 0.
    matmuls = ("vision_layer", "projector", "lm_layer", "lm_head")
    missing = [p for p in matmuls if not flops.get(p)]
    if missing:
        raise RuntimeError(
            f"bench real-shape: no FLOPs attributed to {missing} (counter saw "
            f"{sorted(by_module)[:8]})"
        )
    return flops, int(counter.get_total_flops()), seen, dict(saved)


def per_layer_costs(
    backbone: Any, reader: Any, task: Any, w0: Any, settings: Any
) -> dict[str, Any]:
    """FLOPs and bytes of one client's local step (``task``: 1 step of batch 1), by part."""
    model = backbone.model
    parts = _parts(model)
    flops, total, seen, saved = _counted_step(
        backbone, reader, task, w0, settings, parts
    )
    params = {
        n: sum(p.numel() * p.element_size() for p in m.parameters())
        for n, m in parts.items()
    }
    cfg = model.config
    lm_layers = cfg.text_config.num_hidden_layers
    vision_layers = cfg.vision_config.num_hidden_layers
    weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    activations = sum(saved.values())

    def full(value: float, per_lm: float, per_vision: float) -> float:
        # the skeleton's total with every layer replaced by LLaVA-1.5-7B's count
        return (
            value
            + (FULL_LM_LAYERS - lm_layers) * per_lm
            + (FULL_VISION_LAYERS - vision_layers) * per_vision
        )

    return {
        "what": "one client's local step: 1 step of batch 1 (576 image tokens + the caption "
        "or question), forward and backward as fedsim trains it; flops count multiply-adds "
        "as 2; the first layer of each stack stands for each of its layers",
        "sequence_tokens": seen[0],
        "flops_per_local_step": {**flops, "total": total},
        "parameter_bytes": {**params, "total": weights_bytes},
        "saved_activation_bytes_per_local_step": {**saved, "total": activations},
        "skeleton_layers": {"lm": lm_layers, "vision": vision_layers},
        "extrapolated_to_llava_1_5_7b": {
            "lm_layers": FULL_LM_LAYERS,
            "vision_layers": FULL_VISION_LAYERS,
            "flops_per_local_step": full(
                total, flops["lm_layer"], flops["vision_layer"]
            ),
            "parameter_bytes": full(
                weights_bytes, params["lm_layer"], params["vision_layer"]
            ),
            "saved_activation_bytes_per_local_step": full(
                activations, saved["lm_layer"], saved["vision_layer"]
            ),
            "how": "skeleton total + (32 − lm_layers) × lm_layer + (24 − vision_layers) × "
            "vision_layer, per field",
        },
    }


# ---------------------------------------------------------------------------------------------
# Memory of a run on the skeleton


def run_memory(
    path: Path, cache_dir: str | None, out: Path, console: Any
) -> dict[str, Any]:
    """``fedsim run`` on the skeleton (1 round, one worker): peak RSS of every process."""
    run_dir = out / "real-shape-run"
    cmd = run_command(run_dir, [*skeleton_sets(path, cache_dir), "rounds=1"])
    console.print("[bold]real shape memory[/bold]: fedsim run on the skeleton, 1 round")
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
        raise RuntimeError(f"bench real-shape: fedsim run failed: {tail}")
    peaks = json.loads((run_dir / "resources.json").read_text())["peak_rss_mb"]
    weights_mb = (path / "model.safetensors").stat().st_size / 2**20
    workers = {k: v for k, v in peaks.items() if "worker" in k.lower()}
    return {
        "peak_rss_mb": peaks,
        "weights_file_mb": weights_mb,
        "worker_peak_over_weights": {k: v / weights_mb for k, v in workers.items()},
        "run_seconds": time.perf_counter() - t0,
        "cohort_batch": CLIENTS,
        "batch": BATCH,
    }


def real_shape_table(r: dict[str, Any]) -> Table:
    sk = r["skeleton"]
    table = Table(
        title=f"real shape (bf16 skeleton: {sk['image_tokens']} image tokens, "
        f"{r['projector_params']:,} projector parameters, {sk['lm_layers']} LM / "
        f"{sk['vision_layers']} vision layers): {r['workload']['clients']} clients × "
        f"{r['workload']['steps']} step × batch {r['workload']['batch']}"
    )
    for col in ("way", "seconds", "ratio to one at a time"):
        table.add_column(col, justify="left" if col == "way" else "right")
    for name, w in r["ways"].items():
        table.add_row(
            name, f"{w['seconds']:.2f}", f"{w['ratio_to_one_at_a_time']:.2f}×"
        )
    mem = r["memory"]
    worst = max(mem["worker_peak_over_weights"].values(), default=float("nan"))
    pl = r["per_layer"]["flops_per_local_step"]
    table.caption = (
        f"swap {r['swap_seconds'] * 1e3:.1f} ms = {100 * r['swap_share_of_step']:.2f} % of a "
        f"local step ({r['local_step_seconds']:.2f} s); cohort gain {r['cohort_gain']:.2f}×; "
        f"worker peak RSS {worst:.2f}× the weights file ({mem['weights_file_mb']:.0f} MiB); "
        f"GFLOP per local step: LM layer {pl['lm_layer'] / 1e9:.0f}, vision layer "
        f"{pl['vision_layer'] / 1e9:.0f}, LM head {pl['lm_head'] / 1e9:.0f}, total "
        f"{pl['total'] / 1e9:.0f}"
    )
    return table
