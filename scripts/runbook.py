"""The numbers of docs/how-to/runbook-llava-7b.md, recomputed from what they trace back to.

Sources, and nothing else:

- the architecture: LLaVA-1.5-7B (CLIP ViT-L/14-336 + mlp2x_gelu + Vicuna-7B v1.5) built from
  transformers configs on the meta device (no weights, no download): parameter counts; FLOPs of
  one vision layer, one LM layer (forward, and the backward that carries the projector's
  gradient: input gradients only, the LM is frozen), the LM head and the projector, counted by
  ``torch.utils.flop_counter.FlopCounterMode``; bytes saved for the backward pass (saved-tensor
  hooks), all on meta tensors;
- the scenario presets in ``scenarios/`` and the config defaults (``fedsim.config``);
- measured JSON in ``docs/bench/``: ``h200-device-notes.json`` (the H200's bf16 matrix rate and
  copy bandwidth as measured on this workplace's H200 machines), ``h200-gpu-b16--no-tf32.json``
  (fedsim's local step on an H200 at toy size: the per-pass floor of the step loop), and, once a
  GPU session has run ``scripts/gpu_check.sh``, ``h200-gpu-check.json`` (one Vicuna-7B layer and
  one CLIP-L layer timed on the H200) and ``cpu-2core-llava-shape.json`` (the skeleton's
  measured layers on CPU); rows that need a file not yet there say so.

    .venv/bin/python scripts/runbook.py           # print the generated blocks
    .venv/bin/python scripts/runbook.py --write   # write them into the page
    .venv/bin/python scripts/runbook.py --check   # exit 1 if the page differs (tests do this)
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "how-to" / "runbook-llava-7b.md"
BENCH = ROOT / "docs" / "bench"
PRESETS = ("lcs558k-iid", "lcs558k-source", "coco-dirichlet", "mixed-powerlaw")
# The one assumption that is not read from a file: text tokens per stage-1 example (the plain
# template's "<image>\n" and a short BLIP/COCO caption). The 576 image tokens dominate: ±32
# text tokens move the FLOPs per example by about ±5 % (the table shows the sensitivity).
TEXT_TOKENS = 32
IMAGE_TOKENS = 576
GIB = 2**30
BLOCK = re.compile(r"(<!-- runbook:([a-z-]+) -->\n)(.*?)(<!-- /runbook -->)", re.S)


def _json(name: str) -> dict[str, Any] | None:
    path = BENCH / name
    return json.loads(path.read_text()) if path.is_file() else None


def architecture() -> dict[str, Any]:
    """Parameter counts, FLOPs and saved bytes of LLaVA-1.5-7B's parts (meta device)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    from fedsim.gpu_check import CLIP_L_336, VICUNA_7B

    vc = CLIPVisionConfig(**CLIP_L_336, num_hidden_layers=24, projection_dim=768)
    tc = LlamaConfig(**VICUNA_7B, num_hidden_layers=32)
    cfg = LlavaConfig(
        vision_config=vc,
        text_config=tc,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        image_token_index=32000,
    )
    cfg._attn_implementation = "eager"
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(cfg).to(torch.bfloat16)
    model.requires_grad_(False)
    inner = model.model
    vision, proj, lm = (
        inner.vision_tower,
        inner.multi_modal_projector,
        inner.language_model,
    )
    for sub in (vision, lm):
        sub.config._attn_implementation = "eager"
    # transformers moved CLIP's parts up a level (CLIPVisionModel.vision_model before 5.2x).
    vm = getattr(vision, "vision_model", vision)

    def n_params(m: Any) -> int:
        return sum(p.numel() for p in m.parameters())

    T = IMAGE_TOKENS + TEXT_TOKENS
    out: dict[str, Any] = {
        "params": {
            "vision_tower": n_params(vision),
            "projector": n_params(proj),
            "language_model": n_params(lm) + n_params(model.lm_head),
        },
        "layers": {"vision": vc.num_hidden_layers, "lm": tc.num_hidden_layers},
        "tokens": {"image": IMAGE_TOKENS, "text": TEXT_TOKENS, "lm": T},
    }

    weights = {id(p) for p in model.parameters()}

    def count(fn: Any) -> tuple[int, int]:
        """(FLOPs, bytes saved for backward) of ``fn()`` on meta tensors; the frozen weights
        the backward reads are the resident ones, not saved copies, and are left out."""
        saved: list[int] = []

        def pack(t: Any) -> Any:
            base = t._base if t._base is not None else t
            if id(base) not in weights:
                saved.append(t.numel() * t.element_size())
            return t

        with FlopCounterMode(display=False) as fc:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                fn()
        return fc.get_total_flops(), sum(saved)

    with torch.device("meta"):
        px = torch.zeros(1, 3, 336, 336, dtype=torch.bfloat16)
        h = torch.zeros(1, IMAGE_TOKENS + 1, 1024, dtype=torch.bfloat16)
        with torch.no_grad():
            emb, _ = count(lambda: vm.embeddings(px))
            vlayer, _ = count(lambda: _clip_layer(vm.encoder.layers[0], h))
        feats = torch.zeros(1, IMAGE_TOKENS, 1024, dtype=torch.bfloat16)
        proj.requires_grad_(True)
        p_fwd, p_saved = count(lambda: proj(feats))
        p_all, _ = count(lambda: proj(feats).float().sum().backward())
        proj.requires_grad_(False)
        x = torch.zeros(1, T, 4096, dtype=torch.bfloat16, requires_grad=True)
        pos = torch.arange(T)[None]
        rope = lm.rotary_emb(x, pos)
        layer = lm.layers[0]
        l_fwd, l_saved = count(lambda: layer(x, position_embeddings=rope))
        l_all, _ = count(
            lambda: layer(x, position_embeddings=rope).float().sum().backward()
        )
        labels = torch.zeros(T, dtype=torch.long)

        def head() -> Any:
            # HF's loss: fp32 log-softmax over every position (image ones are labelled -100,
            # but their logits are computed all the same).
            logits = model.lm_head(x).float().view(T, -1)
            return torch.nn.functional.cross_entropy(logits, labels)

        hd_fwd, hd_saved = count(head)
        hd_all, _ = count(lambda: head().backward())
    out["flops"] = {
        "vision_embeddings": emb,
        "vision_layer": vlayer,
        "projector_fwd": p_fwd,
        "projector_fwd_bwd": p_all,
        "lm_layer_fwd": l_fwd,
        "lm_layer_fwd_bwd": l_all,
        "lm_head_fwd": hd_fwd,
        "lm_head_fwd_bwd": hd_all,
    }
    out["saved_bytes"] = {
        "projector": p_saved,
        "lm_layer": l_saved,
        "lm_head": hd_saved,
    }
    return out


def _clip_layer(layer: Any, h: Any) -> Any:
    """A CLIP encoder layer on ``h``; older versions also take a causal mask argument."""
    from fedsim.gpu_check import _takes_causal

    return layer(h, None, None) if _takes_causal(layer) else layer(h, None)


def presets() -> dict[str, Any]:
    """Clients, cohort and the training/eval settings each preset runs with."""
    from fedsim.config import load_config

    rows = {}
    for name in PRESETS:
        c = load_config(str(ROOT / "scenarios" / f"{name}.yaml"))
        rows[name] = {
            "clients": c.scenario.num_clients,
            "cohort": c.scenario.cohort_size,
            "rounds": c.rounds,
            "eval_every": c.eval_every,
            "at_start": c.eval.at_start,
            "local_steps": c.train.local_steps,
            "batch": c.train.batch_size,
            "cohort_batch": c.train.cohort_batch,
            "eval_scenes": c.data.eval_scenes,
            "eval_batch": c.eval.batch_size,
            "max_new_tokens": c.eval.max_new_tokens,
            "dtype": c.model.dtype,
        }
    return rows


# --- the tables ---------------------------------------------------------------------------------


def _g(x: float, unit: str = "") -> str:
    """Three significant digits, thousands spaced."""
    if x == 0:
        return f"0{unit}"
    digits = max(0, 2 - int(math.floor(math.log10(abs(x)))))
    return f"{x:,.{digits}f}".replace(",", " ") + unit


def compute() -> dict[str, Any]:
    """Every number of the page (a dict the tables are rendered from)."""
    arch = architecture()
    notes = _json("h200-device-notes.json")
    toy = _json("h200-gpu-b16--no-tf32.json")
    assert notes is not None and toy is not None, "docs/bench/: the H200 files"
    f, p = arch["flops"], arch["params"]
    nv, nl = arch["layers"]["vision"], arch["layers"]["lm"]
    per_ex = {
        "vision (frozen, forward)": f["vision_embeddings"] + nv * f["vision_layer"],
        "projector (forward + backward)": f["projector_fwd_bwd"],
        "LM (frozen: forward + input gradients)": nl * f["lm_layer_fwd_bwd"]
        + f["lm_head_fwd_bwd"],
    }
    train_flops = sum(per_ex.values())
    rate = notes["bf16_matmul_tflops"] * 1e12
    bw = notes["copy_gb_per_s"] * 1e9
    step_floor = toy["training"]["local_step_seconds"]
    weights_bytes = 2 * sum(p.values())  # bf16
    proj_n = p["projector"]
    # Per client in a cohort pass: fp32 projector, its gradient and AdamW's two moments.
    client_state = 16 * proj_n
    act = (
        nl * arch["saved_bytes"]["lm_layer"]
        + arch["saved_bytes"]["lm_head"]
        + arch["saved_bytes"]["projector"]
    )
    pre = presets()
    d = pre[PRESETS[0]]
    examples_per_client = d["local_steps"] * d["batch"]
    # What fits beside the weights on one H200: examples per pass (cohort_batch × batch).
    free = notes["memory_mib"] * 2**20 - weights_bytes
    fit = int(free // (act + client_state / d["batch"]))
    cb_fit = max(1, min(d["cohort"], fit // d["batch"]))
    return {
        "arch": arch,
        "per_example": per_ex,
        "train_flops": train_flops,
        "rate": rate,
        "bw": bw,
        "notes": notes,
        "step_floor": step_floor,
        "weights_bytes": weights_bytes,
        "client_state": client_state,
        "act": act,
        "presets": pre,
        "examples_per_client": examples_per_client,
        "fit_examples": fit,
        "cohort_batch_fit": cb_fit,
        "gpu_check": _json("h200-gpu-check.json"),
        "skeleton": _json("cpu-2core-llava-shape.json"),
    }


def table_architecture(c: dict[str, Any]) -> str:
    a = c["arch"]
    p, f = a["params"], a["flops"]
    rows = [
        "| part | parameters | bf16 bytes | FLOPs per example (one layer × layers) |",
        "|---|---:|---:|---|",
    ]
    nv, nl = a["layers"]["vision"], a["layers"]["lm"]
    rows.append(
        f"| CLIP ViT-L/14-336 | {p['vision_tower']:,} | {_g(2 * p['vision_tower'] / 1e9, ' GB')} "
        f"| {_g(f['vision_layer'] / 1e9)} G × {nv} + {_g(f['vision_embeddings'] / 1e9)} G "
        f"(patches) = {_g(c['per_example']['vision (frozen, forward)'] / 1e12)} T forward |"
    )
    rows.append(
        f"| mlp2x_gelu projector | {p['projector']:,} | {_g(2 * p['projector'] / 1e6, ' MB')} "
        f"| {_g(f['projector_fwd'] / 1e9)} G forward, {_g(f['projector_fwd_bwd'] / 1e9)} G "
        "with backward |"
    )
    rows.append(
        f"| Vicuna-7B v1.5 (+ LM head) | {p['language_model']:,} "
        f"| {_g(2 * p['language_model'] / 1e9, ' GB')} "
        f"| ({_g(f['lm_layer_fwd'] / 1e9)} G forward + "
        f"{_g((f['lm_layer_fwd_bwd'] - f['lm_layer_fwd']) / 1e9)} G input gradients) × {nl} + "
        f"{_g(f['lm_head_fwd_bwd'] / 1e9)} G head = "
        f"{_g(c['per_example']['LM (frozen: forward + input gradients)'] / 1e12)} T |"
    )
    total = sum(p.values())
    rows.append(
        f"| **LLaVA-1.5-7B** | **{total:,}** | **{_g(c['weights_bytes'] / 1e9, ' GB')}** "
        f"| **{_g(c['train_flops'] / 1e12)} TFLOP per training example** |"
    )
    return "\n".join(rows) + "\n"


def _pass_seconds(c: dict[str, Any], examples: int) -> float:
    return examples * c["train_flops"] / c["rate"] + c["step_floor"]


def table_memory(c: dict[str, Any]) -> str:
    d = c["presets"][PRESETS[0]]
    cb, b = d["cohort_batch"], d["batch"]
    rows = [
        "| per worker (one resident backbone) | arithmetic | bytes |",
        "|---|---|---:|",
        f"| frozen weights, bf16 | 2 B × {sum(c['arch']['params'].values()):,} "
        f"| {_g(c['weights_bytes'] / 1e9, ' GB')} |",
        f"| one client's projector state (fp32 weights, gradient, AdamW m and v) "
        f"| 16 B × {c['arch']['params']['projector']:,} "
        f"| {_g(c['client_state'] / 1e6, ' MB')} |",
        f"| activations saved for backward, per example (bf16, eager attention) "
        f"| {c['arch']['layers']['lm']} × {_g(c['arch']['saved_bytes']['lm_layer'] / 1e6)} MB "
        f"+ head {_g(c['arch']['saved_bytes']['lm_head'] / 1e6)} MB "
        f"+ projector {_g(c['arch']['saved_bytes']['projector'] / 1e6)} MB "
        f"| {_g(c['act'] / 1e9, ' GB')} |",
    ]
    need = c["weights_bytes"] + cb * c["client_state"] + cb * b * c["act"]
    rows.append(
        f"| default pass: cohort_batch {cb} × batch {b} = {cb * b} examples "  # the config's
        f"| weights + {cb} states + {cb * b} × activations | **{_g(need / 1e9, ' GB')}** |"
    )
    n = c["cohort_batch_fit"]
    mem = c["notes"]["memory_mib"] * 2**20
    fit = c["weights_bytes"] + n * c["client_state"] + n * b * c["act"]
    rows.append(
        f"| what fits one H200 ({_g(mem / 1e9, ' GB')}): cohort_batch {n} × batch {b} "
        f"| ({_g(mem / 1e9, ' GB')} − weights) ÷ (activations + state ÷ {b}) "
        f"= {c['fit_examples']} examples | **{_g(fit / 1e9, ' GB')}** |"
    )
    rows.append(
        f"| workers per H200 | {_g(mem / 1e9, ' GB')} ÷ {_g(fit / 1e9, ' GB')} "
        f"| **{int(mem // fit)}** |"
    )
    return "\n".join(rows) + "\n"


def measured_pass_seconds(c: dict[str, Any], examples: int) -> float | None:
    """One pass of ``examples`` from the layers timed on the H200 (the gpu check's
    ``roofline`` part), or None before that file exists: 32 LM layers and 24 vision layers
    at their measured seconds per example, the rest (patch embedding, projector, head) at the
    matrix rate, plus the per-pass floor."""
    g = c.get("gpu_check") or {}
    roof = g.get("parts", {}).get("roofline", {})
    lay = roof.get("layers")
    if roof.get("status") != "ok" or not lay or lay.get("shape") != "llava-1.5-7b":
        return None
    a = c["arch"]
    assert lay["lm_tokens"] == a["tokens"]["lm"], "timed at another text length"
    nv, nl = a["layers"]["vision"], a["layers"]["lm"]
    f = a["flops"]
    per_example = (
        nl * lay["lm_layer"]["seconds"] + nv * lay["vision_layer"]["seconds"]
    ) / lay["batch"]
    rest = f["vision_embeddings"] + f["projector_fwd_bwd"] + f["lm_head_fwd_bwd"]
    return examples * (per_example + rest / c["rate"]) + c["step_floor"]


def table_round(c: dict[str, Any]) -> str:
    rows = [
        "| preset | clients (a round) | examples a round | passes a round "
        "| s per round, 1 GPU | with the timed layers | 8 GPUs | s per evaluation "
        "| run: rounds, evaluations | run on 8 GPUs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    n = c["cohort_batch_fit"]
    for name, d in c["presets"].items():
        clients = d["cohort"]
        ex = clients * c["examples_per_client"]
        groups = math.ceil(clients / n)
        passes = groups * d["local_steps"]
        per_pass = _pass_seconds(c, n * d["batch"])
        one = passes * per_pass + c["agg"]
        eight = math.ceil(groups / 8) * d["local_steps"] * per_pass + c["agg"]
        evals = d["rounds"] // d["eval_every"] + (1 if d["at_start"] else 0)
        ev = c["eval_seconds"][name]
        run = d["rounds"] * eight + evals * ev
        timed = measured_pass_seconds(c, n * d["batch"])
        timed_s = "not yet measured" if timed is None else _g(passes * timed + c["agg"])
        rows.append(
            f"| {name} | {d['clients']} ({clients}) | {clients} × {d['local_steps']} × "
            f"{d['batch']} = {ex:,} | {groups} × {d['local_steps']} = {passes} "
            f"| {_g(one)} | {timed_s} | {_g(eight)} | {_g(ev)} | {d['rounds']}, {evals} "
            f"| {_g(run / 60)} min |"
        )
    return "\n".join(rows) + "\n"


def _eval_seconds(c: dict[str, Any]) -> None:
    """Per preset: one in-run evaluation (every held-out scene: a caption of up to
    ``max_new_tokens`` tokens and a yes/no answer of 3), prefill compute + decode bandwidth."""
    f = c["arch"]["flops"]
    nl = c["arch"]["layers"]["lm"]
    prefill = c["per_example"]["vision (frozen, forward)"] + f["projector_fwd"]
    prefill += nl * f["lm_layer_fwd"] + f["lm_head_fwd"]
    c["prefill_flops"] = prefill
    out = {}
    for name, d in c["presets"].items():
        prompts = 2 * d["eval_scenes"]
        batches = 2 * math.ceil(d["eval_scenes"] / d["eval_batch"])
        # Decoding: each step of each batch reads the weights once (batch ≤ 100: bound by
        # bandwidth, not compute); caption batches run max_new_tokens steps, yes/no ones 3.
        steps = (batches // 2) * (d["max_new_tokens"] + 3)
        out[name] = prompts * prefill / c["rate"] + steps * c["weights_bytes"] / c["bw"]
        c.setdefault("eval_detail", {})[name] = (prompts, steps)
    c["eval_seconds"] = out


def _aggregation(c: dict[str, Any]) -> None:
    """FedAvg's server half for a cohort, bound by bandwidth: read each fp32 delta once,
    read and write the fp32 accumulator once per client."""
    d = c["presets"][PRESETS[0]]
    n = c["arch"]["params"]["projector"]
    c["agg_bytes"] = d["cohort"] * 3 * 4 * n
    c["agg"] = c["agg_bytes"] / c["bw"]


def table_inputs(c: dict[str, Any]) -> str:
    notes = c["notes"]
    rows = [
        "| input | value | source |",
        "|---|---:|---|",
        f"| H200 bf16 matrix rate | {_g(notes['bf16_matmul_tflops'])} TFLOP/s "
        f"| `docs/bench/h200-device-notes.json` ({notes['source_short']}) |",
        f"| H200 copy bandwidth | {_g(notes['copy_gb_per_s'])} GB/s "
        f"| `docs/bench/h200-device-notes.json` |",
        f"| fedsim's local step at toy size on an H200 (the step loop's floor per pass) "
        f"| {_g(c['step_floor'] * 1e3)} ms | `docs/bench/h200-gpu-b16--no-tf32.json` "
        "(training.local_step_seconds) |",
        f"| text tokens per example | {TEXT_TOKENS} | an assumption (the plain template's "
        "`<image>` line and a short caption), the only one; the "
        f"{IMAGE_TOKENS} image tokens dominate (last line of the arithmetic below) |",
    ]
    g = c["gpu_check"]
    if g and g.get("parts", {}).get("roofline", {}).get("status") == "ok":
        lay = g["parts"]["roofline"]["layers"]
        rows.append(
            f"| one Vicuna-7B layer, forward + input gradients, batch {lay['batch']} "
            f"| {_g(lay['lm_layer']['seconds'] * 1e3)} ms ({_g(lay['lm_layer']['tflops'])} "
            "TFLOP/s) | `docs/bench/h200-gpu-check.json` |"
        )
    else:
        rows.append(
            "| one Vicuna-7B layer and one CLIP-L layer timed on the H200 "
            "| **not yet measured** | `docs/bench/h200-gpu-check.json`, written by "
            "`scripts/gpu_check.sh` (part `roofline`) in a session lent a GPU |"
        )
    if c["skeleton"] is None:
        rows.append(
            "| the skeleton's measured FLOPs and bytes per layer (CPU) "
            "| **not yet measured** | `docs/bench/cpu-2core-llava-shape.json` "
            "(`fedsim bench` with the LLaVA-1.5-shaped skeleton) |"
        )
    else:
        pl = c["skeleton"]["real_shape"]["per_layer"]
        ex = pl["extrapolated_to_llava_1_5_7b"]
        sk = pl["skeleton_layers"]
        rows.append(
            "| the skeleton's local step, counted in a real step on CPU "
            f"({sk['lm']} LM and {sk['vision']} vision layers, {pl['sequence_tokens']} "
            f"tokens, fused attention) and extrapolated to {ex['lm_layers']} + "
            f"{ex['vision_layers']} layers: FLOPs; activations saved per example "
            f"| {_g(ex['flops_per_local_step'] / 1e12)} TFLOP; "
            f"{_g(ex['saved_activation_bytes_per_local_step'] / 1e9)} GB "
            "| `docs/bench/cpu-2core-llava-shape.json` (a cross-check of the counts "
            "below: other text length, attention that saves no probabilities) |"
        )
    return "\n".join(rows) + "\n"


def table_arithmetic(c: dict[str, Any]) -> str:
    d = c["presets"][PRESETS[0]]
    n = c["cohort_batch_fit"]
    ex = n * d["batch"]
    prompts, steps = c["eval_detail"][PRESETS[0]]
    lines = [
        f"- one pass of {n} client{'s' if n > 1 else ''} × {d['batch']} examples: {ex} × "
        f"{_g(c['train_flops'] / 1e12)} TFLOP ÷ {_g(c['rate'] / 1e12)} TFLOP/s + "
        f"{_g(c['step_floor'] * 1e3)} ms = {_g(_pass_seconds(c, ex))} s "
        "(at the full matrix rate: a lower bound);",
        f"- FedAvg over {d['cohort']} clients: {d['cohort']} × 3 × 4 B × "
        f"{c['arch']['params']['projector']:,} = {_g(c['agg_bytes'] / 1e9, ' GB')} ÷ "
        f"{_g(c['bw'] / 1e9)} GB/s = {_g(c['agg'] * 1e3)} ms a round;",
        f"- one evaluation ({d['eval_scenes']} scenes, batch {d['eval_batch']}): "
        f"prefill {prompts} prompts × {_g(c['prefill_flops'] / 1e12)} TFLOP ÷ "
        f"{_g(c['rate'] / 1e12)} TFLOP/s + decode {steps} steps × "
        f"{_g(c['weights_bytes'] / 1e9, ' GB')} ÷ {_g(c['bw'] / 1e9)} GB/s "
        f"= {_g(c['eval_seconds'][PRESETS[0]])} s;",
        f"- text length: {TEXT_TOKENS} ± 32 tokens changes the LM's share by "
        f"±{_g(100 * 32 / (IMAGE_TOKENS + TEXT_TOKENS))} %.",
    ]
    return "\n".join(lines) + "\n"


TABLES = {
    "inputs": table_inputs,
    "architecture": table_architecture,
    "memory": table_memory,
    "rounds": table_round,
    "arithmetic": table_arithmetic,
}


def blocks() -> dict[str, str]:
    """Every generated block of the page, by name."""
    c = compute()
    _aggregation(c)
    _eval_seconds(c)
    return {name: fn(c) for name, fn in TABLES.items()}


def fill(page: str, generated: dict[str, str]) -> str:
    """``page`` with every ``<!-- runbook:NAME -->`` … ``<!-- /runbook -->`` block replaced."""
    names = [m.group(2) for m in BLOCK.finditer(page)]
    if sorted(names) != sorted(generated):
        raise SystemExit(f"{PAGE}: blocks {names}, expected {sorted(generated)}")
    return BLOCK.sub(lambda m: m.group(1) + generated[m.group(2)] + m.group(4), page)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", action="store_true", help="Write the page.")
    ap.add_argument("--check", action="store_true", help="Exit 1 if the page differs.")
    args = ap.parse_args()
    generated = blocks()
    if not (args.write or args.check):
        for name, text in generated.items():
            print(f"<!-- runbook:{name} -->\n{text}")
        return 0
    page = PAGE.read_text()
    new = fill(page, generated)
    if args.check:
        if new != page:
            print(
                f"{PAGE}: out of date (run scripts/runbook.py --write)", file=sys.stderr
            )
            return 1
        return 0
    PAGE.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
