"""The GPU check (``scripts/gpu_check.sh``): what a lent NVIDIA machine should measure, in one
command of at most ten minutes, into one JSON file.

Parts, each in its own process under its own time cap (a part that runs over is stopped and
recorded as ``timeout``; the JSON is rewritten after every part, so what finished is kept):

- ``machine``  — the interpreter, torch/transformers/vllm versions, the GPU and its memory.
- ``roofline`` — the device's bf16 matrix-product rate and copy bandwidth, and one frozen
  Vicuna-7B decoder layer (forward + input gradients) and one CLIP ViT-L/14-336 encoder layer
  (forward) timed at LLaVA-1.5 shapes, with their FLOPs counted
  (:class:`torch.utils.flop_counter.FlopCounterMode`): what the runbook
  (``docs/how-to/runbook-llava-7b.md``) extrapolates to 32 + 24 layers.
- ``cohort``   — ``fedsim bench --sections training --device cuda``: resident one client at a
  time, cohort batching, a fresh model per task.
- ``aggregation`` — ``benchmarks/fedcmp_aggregation.py --device cuda``: FedAvg and Fed-CMP
  (rank 256; ``basis`` power, and sketch with float32 and bfloat16 products) on 50 client
  deltas at LLaVA-1.5-7B projector size, each in its own process.
- ``vllm``     — the vLLM backend against hf on the toy suite (answers equal, generation
  speed ratio), then a projector swapped into the live engine (answers equal hf's again).

``--dry-run`` prints the plan (commands, caps, interpreters) and checks the arguments, the files
and, in each interpreter, the modules each part needs, without running any workload: it passes
on a machine without a GPU and says which parts would be skipped and why. ``--device cpu`` runs
every part at toy sizes on the CPU (the fallbacks: the hf half of the vLLM part, aggregation of
a few clients), so the code paths run where no GPU is lent.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
AGG_SCRIPT = ROOT / "benchmarks" / "fedcmp_aggregation.py"
PARTS = ("machine", "roofline", "cohort", "aggregation", "vllm")
# Seconds each part may take on the GPU machine. With the set-up (about 30 s: a venv over the
# image's packages and an editable install) they sum to under ten minutes.
CAPS = {"machine": 30, "roofline": 60, "cohort": 120, "aggregation": 150, "vllm": 180}
CPU_CAP_FACTOR = 3
# What each part imports (module names); ``vllm`` is looked up in the vLLM interpreter.
NEEDS = {
    "machine": ("torch",),
    "roofline": ("torch", "transformers"),
    "cohort": ("torch", "transformers", "datasets", "safetensors", "typer"),
    "aggregation": ("torch", "rich"),
    "vllm": ("torch", "transformers", "datasets", "fedsim", "vllm"),
}
# LLaVA-1.5-7B: Vicuna-7B v1.5 (Llama) and CLIP ViT-L/14-336 (577 tokens: 576 patches + CLS).
VICUNA_7B: dict[str, Any] = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
    max_position_embeddings=4096,
)
CLIP_L_336: dict[str, Any] = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
)

NARROW_LM: dict[str, Any] = dict(
    hidden_size=256, intermediate_size=688, num_attention_heads=4
)
NARROW_LM["num_key_value_heads"] = 4
NARROW_VISION: dict[str, Any] = dict(
    hidden_size=64, intermediate_size=256, num_attention_heads=4
)


class CheckError(Exception):
    """Bad arguments: one line, exit code 2."""


# --- the plan ---------------------------------------------------------------------------------


def part_command(name: str, args: argparse.Namespace, part_out: Path) -> list[str]:
    """The command line of part ``name`` (its own process)."""
    py = args.vllm_python if name == "vllm" else sys.executable
    cmd = [py, "-m", "fedsim.gpu_check", "--part", name, "--part-out", str(part_out)]
    return cmd + ["--device", args.device, "--cache-dir", str(args.cache_dir)]


def missing_modules(python: str, modules: tuple[str, ...]) -> list[str]:
    """The modules of ``modules`` that ``python`` cannot find (without importing them)."""
    if python == sys.executable:
        return [m for m in modules if importlib.util.find_spec(m) is None]
    code = (
        "import importlib.util, json, sys; "
        "print(json.dumps([m for m in sys.argv[1:] if importlib.util.find_spec(m) is None]))"
    )
    try:
        done = subprocess.run(
            [python, "-c", code, *modules], capture_output=True, text=True, timeout=60
        )
    except OSError as e:
        return [f"(interpreter {python} does not start: {e})"]
    if done.returncode != 0:
        return [f"(interpreter {python} failed: {done.stderr.strip()[-200:]})"]
    return list(json.loads(done.stdout.strip().splitlines()[-1]))


def cuda_count() -> int:
    """GPUs torch sees in this interpreter (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def file_checks() -> dict[str, str]:
    """The files the parts read, checked now: the aggregation script and the toy backbone
    (every file of the shipped reference against its recorded size and SHA-256)."""
    from fedsim.models.toy_reference import reference_toy_backbone

    return {
        "aggregation_script": str(AGG_SCRIPT.relative_to(ROOT)),
        "toy_backbone": str(reference_toy_backbone()),
    }


def plan(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Per part: its command, cap, interpreter, and what blocks it (missing modules or GPU)."""
    gpus = cuda_count() if args.device == "cuda" else 0
    out: dict[str, dict[str, Any]] = {}
    for name in args.parts:
        py = args.vllm_python if name == "vllm" else sys.executable
        needs = NEEDS[name]
        if args.device == "cpu" and name == "vllm":  # the hf half runs without vLLM
            needs = tuple(m for m in needs if m != "vllm")
        missing = missing_modules(py, needs)
        blocked = []
        if missing:
            blocked.append(f"{py} lacks {', '.join(missing)}")
        if args.device == "cuda" and name != "machine" and gpus == 0:
            blocked.append("no CUDA device is visible to torch")
        out[name] = {
            # On the CPU the imports alone can take a minute on a busy machine.
            "cap_s": CAPS[name] * (1 if args.device == "cuda" else CPU_CAP_FACTOR),
            "python": py,
            "command": part_command(name, args, args.work_dir / f"{name}.json"),
            "would_skip": "; ".join(blocked) or None,
        }
    return out


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="scripts/gpu_check.sh",
        description="The GPU check: parts in their own processes, one JSON.",
    )
    ap.add_argument("--dry-run", action="store_true", help="Plan and checks only.")
    ap.add_argument(
        "--device", default="cuda", help="cuda (default) or cpu (toy sizes)."
    )
    ap.add_argument("--parts", default=",".join(PARTS), help="Comma-separated parts.")
    ap.add_argument(
        "--out",
        type=Path,
        default=Path("runs/gpu-check/gpu-check.json"),
        help="JSON file.",
    )
    ap.add_argument(
        "--budget",
        type=float,
        default=None,
        help="Seconds for all parts (default 570 on cuda, 3x the caps' sum on cpu).",
    )
    ap.add_argument(
        "--vllm-python",
        default=sys.executable,
        help="Interpreter with vLLM and fedsim.",
    )
    ap.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="Parts' files, logs and data cache (default: gpu-check-work/ beside --out).",
    )
    ap.add_argument("--cache-dir", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--part", help=argparse.SUPPRESS)
    ap.add_argument("--part-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.device not in ("cuda", "cpu"):
        raise CheckError(f"--device {args.device!r}: use cuda or cpu")
    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise CheckError(f"--parts {args.parts!r}: use some of {', '.join(PARTS)}")
    args.parts = parts
    if args.budget is None:
        args.budget = (
            570.0 if args.device == "cuda" else CPU_CAP_FACTOR * sum(CAPS.values())
        )
    if not args.budget > 0:
        raise CheckError(f"--budget {args.budget}: must be > 0 seconds")
    if args.part is None:
        if args.out.exists() and args.out.is_dir():
            raise CheckError(f"--out {args.out}: is a folder (give a .json file)")
        if (
            shutil.which(args.vllm_python) is None
            and not Path(args.vllm_python).is_file()
        ):
            raise CheckError(f"--vllm-python {args.vllm_python!r}: no such interpreter")
        if not AGG_SCRIPT.is_file():
            raise CheckError(f"{AGG_SCRIPT}: missing (the aggregation part runs it)")
    if args.work_dir is None:
        args.work_dir = args.out.parent / "gpu-check-work"
    if args.cache_dir is None:
        args.cache_dir = args.work_dir / "cache"
    return args


# --- the driver -------------------------------------------------------------------------------


def _write(path: Path, record: dict[str, Any]) -> None:
    """Write-then-rename, so a killed check leaves the last complete JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(path)


def run_parts(args: argparse.Namespace, record: dict[str, Any]) -> None:
    """Each planned part in its own process, capped; the JSON rewritten after each."""
    start = time.monotonic()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    for name, p in record["plan"].items():
        left = args.budget - (time.monotonic() - start)
        cap = min(p["cap_s"], left)
        if p["would_skip"]:
            record["parts"][name] = {"status": "skipped", "reason": p["would_skip"]}
        elif cap < 5:
            record["parts"][name] = {"status": "skipped", "reason": "budget spent"}
        else:
            print(f"[gpu-check] {name} (cap {cap:.0f} s)", flush=True)
            record["parts"][name] = run_one(p["command"], cap, args.work_dir, name)
        print(f"[gpu-check] {name}: {record['parts'][name]['status']}", flush=True)
        _write(args.out, record)


def run_one(cmd: list[str], cap: float, folder: Path, name: str) -> dict[str, Any]:
    """One part's process: its JSON, or ``timeout`` / ``failed`` with the last error line."""
    part_out = Path(cmd[cmd.index("--part-out") + 1])
    part_out.unlink(missing_ok=True)
    log = folder / f"{name}.log"
    t0 = time.monotonic()
    with open(log, "w") as f:
        try:
            # A new session, so the whole group (vLLM's, torch's children) is stopped at the cap.
            proc = subprocess.Popen(
                cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
            )
            rc = proc.wait(timeout=cap)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            rc = None
    seconds = time.monotonic() - t0
    result: dict[str, Any] = {}
    if part_out.is_file():
        result = json.loads(part_out.read_text())
    lines = [x for x in log.read_text().splitlines() if x.strip()]
    if rc is None:
        result.update(status="timeout", cap_s=cap)
    elif rc != 0:
        result.update(status="failed", error=lines[-1] if lines else f"exit {rc}")
    if rc != 0:  # the log's end travels in the one JSON (the logs may not come back)
        result["log_tail"] = lines[-20:]
    result.setdefault("status", "ok")
    result["seconds"] = seconds
    result["log"] = str(log)
    return result


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except CheckError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.part:
        return run_part(args)
    record: dict[str, Any] = {
        "settings": {
            "device": args.device,
            "parts": list(args.parts),
            "budget_s": args.budget,
            "dry_run": args.dry_run,
            "python": sys.executable,
            "vllm_python": args.vllm_python,
        },
        "plan": plan(args),
        "parts": {},
    }
    try:
        record["files"] = file_checks()
    except Exception as e:  # the reference's own one-line error (ReferenceError)
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, p in record["plan"].items():
        skip = f"  [would skip: {p['would_skip']}]" if p["would_skip"] else ""
        print(
            f"[gpu-check] {name} (cap {p['cap_s']} s): {' '.join(p['command'])}{skip}"
        )
    if args.dry_run:
        _write(args.out, record)
        print(f"[gpu-check] dry run: plan written to {args.out}")
        return 0
    run_parts(args, record)
    print(f"[gpu-check] wrote {args.out}")
    return 0


# --- the parts (each runs in its own process: ``--part NAME``) ---------------------------------


def run_part(args: argparse.Namespace) -> int:
    """Run part ``args.part``; its JSON goes to ``--part-out``. Exit 0 also when skipped."""
    fn: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
        "machine": part_machine,
        "roofline": part_roofline,
        "cohort": part_cohort,
        "aggregation": part_aggregation,
        "vllm": part_vllm,
    }
    assert args.part_out is not None, "--part-out"
    result = fn[args.part](args)
    _write(args.part_out, result)
    return 0


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


def part_machine(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "datasets": _version("datasets"),
        "ray": _version("ray"),
        "vllm": _version("vllm"),
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        prop = torch.cuda.get_device_properties(0)
        info.update(
            gpu=prop.name,
            gpu_memory_gib=prop.total_memory / 2**30,
            multiprocessors=prop.multi_processor_count,
            cuda=torch.version.cuda,
        )
    if shutil.which("nvidia-smi"):
        done = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
        info["nvidia_smi"] = done.stdout.strip()
    return info


def _time(fn: Callable[[], Any], device: str, repeats: int) -> float:
    """Median seconds of ``fn`` after one warm-up."""
    import statistics

    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def part_roofline(args: argparse.Namespace) -> dict[str, Any]:
    """The device's GEMM rate and copy bandwidth; one LM layer and one vision layer timed."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    dev = args.device
    gpu = dev == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    n = 8192 if gpu else 512
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    mm_s = _time(lambda: a @ b, dev, 10 if gpu else 2)
    nbytes = (2 * 2**30) if gpu else (64 * 2**20)
    src = torch.empty(nbytes // 4, device=dev, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    copy_s = _time(lambda: dst.copy_(src), dev, 10 if gpu else 2)
    out: dict[str, Any] = {
        "device": dev,
        "dtype": str(dtype).removeprefix("torch."),
        "matmul": {"n": n, "seconds": mm_s, "tflops": 2 * n**3 / mm_s / 1e12},
        # a copy reads and writes every byte
        "copy": {
            "bytes": nbytes,
            "seconds": copy_s,
            "gb_per_s": 2 * nbytes / copy_s / 1e9,
        },
    }
    # LLaVA-1.5 shapes: batch 16, 576 image + 32 text tokens through the LM; 577 through CLIP.
    # On the CPU (the fallback) the same layers on few tokens: the code path, not the numbers.
    batch, image, text = (16, 576, 32) if gpu else (1, 24, 8)
    out["layers"] = _layer_times(dev, dtype, batch, image, text, FlopCounterMode)
    return out


def _layer_times(
    dev: str, dtype: Any, batch: int, image: int, text: int, counter: Any
) -> dict[str, Any]:
    """One frozen decoder layer of Vicuna-7B (forward and the input gradients the projector's
    gradient flows through) and one CLIP-L/336 encoder layer (forward, no gradient)."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer
    from transformers.models.llama.modeling_llama import (
        LlamaDecoderLayer,
        LlamaRotaryEmbedding,
    )

    torch.manual_seed(0)
    gpu = dev == "cuda"
    # On the CPU (the fallback) narrow layers of the same kind: the code path, not the numbers.
    lm_shape = VICUNA_7B if gpu else {**VICUNA_7B, **NARROW_LM}
    vision_shape = CLIP_L_336 if gpu else {**CLIP_L_336, **NARROW_VISION}
    lcfg = LlamaConfig(**lm_shape, num_hidden_layers=1)
    lcfg._attn_implementation = "sdpa"
    layer = LlamaDecoderLayer(lcfg, 0).to(dev, dtype).requires_grad_(False)
    rope = LlamaRotaryEmbedding(lcfg).to(dev)
    seq = image + text
    repeats = 5 if gpu else 1
    width = lm_shape["hidden_size"]
    x = torch.randn(batch, seq, width, device=dev, dtype=dtype, requires_grad=True)
    pos = torch.arange(seq, device=dev)[None].expand(batch, -1)
    cos_sin = rope(x, pos)

    def lm_step() -> None:
        y = layer(x, position_embeddings=cos_sin, position_ids=pos)
        y = y[0] if isinstance(y, tuple) else y
        y.float().square().mean().backward()
        x.grad = None

    with counter(display=False) as fc:
        lm_step()
    lm_flops = fc.get_total_flops()
    lm_s = _time(lm_step, dev, repeats)
    vcfg = CLIPVisionConfig(**vision_shape)
    vcfg._attn_implementation = "sdpa"
    vlayer = CLIPEncoderLayer(vcfg).to(dev, dtype).requires_grad_(False)
    v = torch.randn(
        batch, image + 1, vision_shape["hidden_size"], device=dev, dtype=dtype
    )

    def vision_step() -> None:
        with torch.no_grad():
            if _takes_causal(vlayer):
                vlayer(v, None, None)
            else:
                vlayer(v, None)

    with counter(display=False) as fc:
        vision_step()
    v_flops = fc.get_total_flops()
    v_s = _time(vision_step, dev, repeats)
    return {
        "shape": "llava-1.5-7b" if gpu else "narrow (CPU fallback)",
        "batch": batch,
        "lm_tokens": seq,
        "vision_tokens": image + 1,
        "lm_layer": {
            "flops": lm_flops,
            "seconds": lm_s,
            "tflops": lm_flops / lm_s / 1e12,
        },
        "vision_layer": {
            "flops": v_flops,
            "seconds": v_s,
            "tflops": v_flops / v_s / 1e12,
        },
    }


def _takes_causal(layer: Any) -> bool:
    """Older CLIPEncoderLayer.forward takes (hidden, attention_mask, causal_attention_mask)."""
    import inspect

    return "causal_attention_mask" in inspect.signature(layer.forward).parameters


def part_cohort(args: argparse.Namespace) -> dict[str, Any]:
    """``fedsim bench --sections training`` on the device; its training section."""
    gpu = args.device == "cuda"
    folder = args.part_out.parent / "bench-cohort"
    shutil.rmtree(folder, ignore_errors=True)
    sizes = ["--clients", "10", "--steps", "8", "--batch", "4", "--repeats", "3"]
    if not gpu:
        sizes = ["--clients", "2", "--steps", "2", "--batch", "2", "--repeats", "1"]
    cmd = [sys.executable, "-m", "fedsim.cli", "bench", "--sections", "training"]
    cmd += ["--device", args.device, "--no-tf32", "--out", str(folder), *sizes]
    # Only the workload's rows are read; fewer scenes keep a fresh machine's data build short.
    cmd += ["--set", f"cache_dir={args.cache_dir}", "--set", "data.num_scenes=2000"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
        raise SystemExit(f"fedsim bench failed: {tail}")
    bench = json.loads((folder / "bench.json").read_text())
    return {
        "command": cmd[1:],
        "machine": bench["machine"],
        "training": bench["training"],
    }


#: The aggregation part's rows: FedAvg, Fed-CMP as configured by default (``basis: power``),
#: and its two-pass sketch with float32 and with bfloat16 products, and with the block SRHT
#: first pass (on cuda the transform's torch reference: log₂ n elementwise stages).
AGG_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "fedavg": ("fedavg", {}),
    "fedcmp": ("fedcmp", {}),
    "fedcmp_sketch": ("fedcmp", {"basis": "sketch"}),
    "fedcmp_sketch_bf16": ("fedcmp", {"basis": "sketch", "sketch_dtype": "bfloat16"}),
    "fedcmp_sketch_srht_bf16": (
        "fedcmp",
        {"basis": "sketch", "sketch_dtype": "bfloat16", "sketch_map": "srht"},
    ),
}


def part_aggregation(args: argparse.Namespace) -> dict[str, Any]:
    """FedAvg and Fed-CMP (:data:`AGG_VARIANTS`) at LLaVA-1.5-7B projector size, each in its
    own process."""
    gpu = args.device == "cuda"
    clients, rank = ("50", "256") if gpu else ("2", "8")
    rows: dict[str, Any] = {}
    for name, (algo, params) in AGG_VARIANTS.items():
        cmd = [
            sys.executable,
            str(AGG_SCRIPT),
            "--worker",
            algo,
            "--device",
            args.device,
            "--params",
            json.dumps(params),
        ]
        cmd += ["--clients", clients, "--rank", rank, "--threads", str(os.cpu_count())]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
            rows[name] = {"status": "failed", "error": tail[0] if tail else "?"}
        else:
            rows[name] = json.loads(done.stdout.strip().splitlines()[-1])
    out: dict[str, Any] = {"clients": int(clients), "rank": int(rank), "rows": rows}
    base = rows["fedavg"].get("seconds_round2")
    if base:
        out["ratios_to_fedavg"] = {
            name: r["seconds_round2"] / base
            for name, r in rows.items()
            if "seconds_round2" in r
        }
    return out


def part_vllm(args: argparse.Namespace) -> dict[str, Any]:
    """vLLM against hf on the toy suite, then a projector swapped into the live engine."""
    gpu = args.device == "cuda"
    try:
        import vllm  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        reason = f"vllm is not importable in {sys.executable} ({type(e).__name__}: {e})"
        if gpu:
            raise SystemExit(reason) from None
        # The CPU fallback: the hf half runs, so the comparison's code path is exercised.
        return {"vllm": {"status": "skipped", "reason": reason}, **_hf_half(args, 16)}
    return _vllm_vs_hf(args)


def _toy(args: argparse.Namespace) -> tuple[Any, Any, Any, Path]:
    """The toy backbone on the device, its questions (toy suite) and the suite's folder."""
    import torch

    from fedsim.config import load_config
    from fedsim.eval.suite import get, locate
    from fedsim.eval.toy_suite import ensure_toy_suite
    from fedsim.models.backbone import load_backbone
    from fedsim.models.toy_reference import reference_toy_backbone

    cfg = load_config(None)
    root = ensure_toy_suite(
        args.cache_dir, cfg.data.scene, images=cfg.eval.suite_images
    )
    bb = load_backbone(
        reference_toy_backbone(), device=args.device, dtype=torch.float32
    )
    questions = {b: get(b).load(*locate(b, root)) for b in cfg.eval.benchmarks}
    return cfg, bb, questions, root


def _answers(backend: Any, bb: Any, questions: dict[str, Any]) -> tuple[dict, float]:
    """Every benchmark's greedy answers and the seconds they took."""
    from fedsim.eval.run import generate_answers

    t0 = time.perf_counter()
    out = {b: generate_answers(backend, bb, b, q, 64) for b, q in questions.items()}
    return out, time.perf_counter() - t0


def _hf_half(args: argparse.Namespace, limit: int | None) -> dict[str, Any]:
    from fedsim.eval.generation import HFBackend

    _, bb, questions, _ = _toy(args)
    if limit is not None:
        questions = {b: q[:limit] for b, q in questions.items()}
    hf = HFBackend(bb, 64)
    _answers(hf, bb, {b: q[:4] for b, q in questions.items()})  # warm-up
    answers, seconds = _answers(hf, bb, questions)
    n = sum(len(a) for a in answers.values())
    return {"hf": {"questions": n, "seconds": seconds, "answers_per_s": n / seconds}}


def _vllm_vs_hf(args: argparse.Namespace) -> dict[str, Any]:
    from fedsim.eval.generation import HFBackend, VLLMBackend
    from fedsim.export import write_checkpoint
    from fedsim.models.backbone import init_projector, load_backbone, set_projector_
    from fedsim.models.toy_reference import reference_toy_backbone

    _, bb, questions, _ = _toy(args)
    hf = HFBackend(bb, 64)
    _answers(hf, bb, {b: q[:4] for b, q in questions.items()})  # warm-up
    hf_a, hf_s = _answers(hf, bb, questions)
    # Exported from a CPU copy of the same shipped weights (what VLLMEvaluator does too).
    cpu = load_backbone(reference_toy_backbone(), device="cpu")
    ckpt = write_checkpoint(
        cpu, args.part_out.parent / "toy-ckpt", {"purpose": "gpu check"}
    )
    del cpu
    t0 = time.perf_counter()
    engine = VLLMBackend(
        str(ckpt),
        dtype="float32",
        gpu_memory_utilization=0.2,
        max_model_len=128,
        enforce_eager=True,
    )
    start_s = time.perf_counter() - t0
    _answers(engine, bb, {b: q[:4] for b, q in questions.items()})  # warm-up
    vl_a, vl_s = _answers(engine, bb, questions)
    # A new projector: into hf's resident model, and swapped into the live engine.
    w = init_projector(bb, 1)
    set_projector_(bb, w)
    hf_b, _ = _answers(hf, bb, questions)
    t0 = time.perf_counter()
    engine.load_projector(w)  # raises unless the engine's projector computes w's output
    swap_s = time.perf_counter() - t0
    vl_b, _ = _answers(engine, bb, questions)
    n = sum(len(a) for a in hf_a.values())

    def equal(x: dict, y: dict) -> int:
        return sum(a == b for k in x for a, b in zip(x[k], y[k]))

    return {
        "questions": n,
        "equal_before_swap": equal(hf_a, vl_a),
        "equal_after_swap": equal(hf_b, vl_b),
        "changed_by_swap": n - equal(hf_a, hf_b),
        "hf_seconds": hf_s,
        "vllm_seconds": vl_s,
        "vllm_speedup_over_hf": hf_s / vl_s,
        "engine_start_seconds": start_s,
        "swap_seconds": swap_s,
        "vllm": _version("vllm"),
    }


if __name__ == "__main__":
    sys.exit(main())
