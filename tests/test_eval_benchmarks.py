"""Benchmark evaluation end to end: export, the hf backend on the toy suite, `eval score`, vLLM."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from fedsim.config import load_config

TINY = [
    "data.num_scenes=1000",
    "data.eval_scenes=40",
    "rounds=3",
    "eval_every=0",
    "train.local_steps=4",
    "train.batch_size=8",
    "scenario.cohort_size=4",
]
BENCHES = ["pope", "mme", "mmbench", "mmvp"]
# A toy-sized vLLM engine (on the CPU build the memory share is of the machine's RAM).
TOY_ENGINE = {
    "gpu_memory_utilization": 0.15,
    "max_model_len": 128,
    "enforce_eager": True,
}


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory, toy_path, cache_dir, ray_session):
    """A short fedavg run on the toy backbone (its final projector is what gets evaluated)."""
    from fedsim.driver import run

    out = tmp_path_factory.mktemp("evalrun") / "run"
    cfg = load_config(None, [*TINY, f"cache_dir={cache_dir}"])
    run(cfg, out, console=Console(quiet=True), show_progress=False)
    return out


@pytest.fixture(scope="module")
def suite_root(toy_run, cache_dir):
    from fedsim.eval.toy_suite import ensure_toy_suite

    cfg = load_config(str(toy_run / "config.yaml"))
    return ensure_toy_suite(cache_dir, cfg.data.scene, images=cfg.eval.suite_images)


def _w0_file(run_dir):
    """W_0 of seed 0 saved beside the run, to evaluate instead of the final projector."""
    from fedsim.models.backbone import init_projector
    from fedsim.runio import save_weights

    bb = _in_run_backbone(run_dir)
    path = run_dir / "w0.safetensors"
    save_weights(path, init_projector(bb, 0))
    return path


def _in_run_backbone(run_dir):
    from fedsim.models.backbone import load_backbone, set_projector_
    from fedsim.models.toy_reference import reference_toy_backbone
    from fedsim.runio import load_weights

    bb = load_backbone(reference_toy_backbone())
    set_projector_(bb, load_weights(run_dir / "final" / "projector.safetensors"))
    return bb


@pytest.mark.slow
def test_export_reloads_with_transformers_and_answers_as_in_the_run(
    toy_run, tmp_path, cache_dir
):
    from safetensors import safe_open
    from transformers import LlavaForConditionalGeneration

    from fedsim.eval.generation import HFBackend
    from fedsim.eval.toy import evaluate_toy
    from fedsim.export import export_checkpoint
    from fedsim.models.backbone import load_backbone

    out = export_checkpoint(toy_run, tmp_path / "ckpt")
    # vLLM's llava loader names: language_model.*, vision_tower.vision_model.*, projector.
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    prefixes = (
        "language_model.model.",
        "language_model.lm_head.",
        "vision_tower.vision_model.",
        "multi_modal_projector.",
    )
    assert keys and all(k.startswith(prefixes) for k in keys)
    assert {k for k in keys if k.startswith("multi_modal_projector.")} == {
        f"multi_modal_projector.linear_{i}.{p}"
        for i in (1, 2)
        for p in ("weight", "bias")
    }
    # transformers reloads every tensor bit for bit: the backbone with the run's projector.
    reloaded = LlavaForConditionalGeneration.from_pretrained(out).state_dict()
    expected = _in_run_backbone(toy_run).model.state_dict()
    assert set(reloaded) == set(expected)
    assert all(torch.equal(reloaded[k], expected[k]) for k in expected)
    # The exported folder is a backbone fedsim itself loads, and it answers the held-out
    # scenes exactly as the run's own final evaluation did.
    import datasets

    from fedsim.prepare import prepare

    cfg = load_config(str(toy_run / "config.yaml"))
    rows = datasets.load_from_disk(str(prepare(cfg).eval_path))[:]
    bb = load_backbone(out)
    scores = evaluate_toy(HFBackend(bb, 100), rows, bb.caption_prompt, bb.qa_prompt)
    final = json.loads((toy_run / "eval.json").read_text())["final"]
    # Exact: the same weights, rows and kernels in one process on one machine (invariant 2).
    assert scores == pytest.approx(final, abs=0, rel=0)
    provenance = json.loads((out / "fedsim.json").read_text())["export"]
    assert provenance["algorithm"] == "fedavg" and provenance["rounds"] == 3
    # The weights are named by their tensors' digest, not by the file's bytes.
    from fedsim.runio import load_weights, weights_digest

    final_weights = load_weights(toy_run / "final" / "projector.safetensors")
    assert provenance["projector_digest"] == weights_digest(final_weights)


@pytest.mark.slow
def test_hf_backend_on_the_toy_suite_end_to_end(toy_run, suite_root):
    from fedsim.eval.answers import read_answers
    from fedsim.eval.suite import get, locate
    from fedsim.evaluate import evaluate_run
    from fedsim.runio import load_weights, weights_digest

    results = evaluate_run(toy_run, BENCHES, suite_root, backend="hf", batch_size=64)
    digest = weights_digest(load_weights(toy_run / "final" / "projector.safetensors"))
    assert set(results) == set(BENCHES)
    for bench in BENCHES:
        questions = get(bench).load(*locate(bench, suite_root))
        answers = read_answers(toy_run / "eval" / bench / "answers.jsonl")
        assert set(answers) == {q.question_id for q in questions}
        saved = json.loads((toy_run / "eval" / bench / "scores.json").read_text())
        assert saved["scores"] == results[bench]
        assert saved["projector_digest"] == digest
        assert saved["questions"] == len(questions)
    # The toy LM answers exactly "yes" or "no": POPE's accuracy is then the share of answers
    # equal to the label, counted here without the scorer.
    pope_q = get("pope").load(*locate("pope", suite_root))
    pope_a = read_answers(toy_run / "eval" / "pope" / "answers.jsonl")
    assert set(pope_a.values()) <= {"yes", "no"}
    hits = [pope_a[q.question_id] == q.meta["label"] for q in pope_q]
    assert results["pope"]["accuracy"] == pytest.approx(sum(hits) / len(hits))
    # Re-scoring the saved answer file through the CLI gives the same numbers.
    from fedsim.cli import app

    qpath, _ = locate("pope", suite_root)
    res = CliRunner().invoke(
        app,
        [
            "eval",
            "score",
            "pope",
            "--questions",
            str(qpath),
            "--predictions",
            str(toy_run / "eval" / "pope" / "answers.jsonl"),
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.output.strip().splitlines()[-1]) == results["pope"]
    # Answers come from the projector: the untrained W_0 answers differently (this
    # overwrites the run's eval/pope, so it comes last).
    w0 = _w0_file(toy_run)
    other = evaluate_run(toy_run, ["pope"], suite_root, projector=w0)
    assert other["pope"] != results["pope"]


def test_eval_score_errors_are_one_line(tmp_path):
    from fedsim.cli import app

    runner = CliRunner()
    res = runner.invoke(
        app,
        [
            "eval",
            "score",
            "nosuch",
            "--questions",
            str(tmp_path),
            "--predictions",
            str(tmp_path / "p.jsonl"),
        ],
    )
    assert res.exit_code == 2 and "unknown benchmark 'nosuch'" in res.output
    q = tmp_path / "coco_pope_random.json"
    q.write_text(
        '{"question_id": 1, "image": "a.jpg", "text": "Is there a cat?", "label": "yes"}\n'
        '{"question_id": 2, "image": "a.jpg", "text": "Is there a dog?", "label": "no"}\n'
    )
    p = tmp_path / "p.jsonl"
    p.write_text('{"question_id": 1, "text": "Yes"}\n')
    res = runner.invoke(
        app, ["eval", "score", "pope", "--questions", str(q), "--predictions", str(p)]
    )
    assert res.exit_code == 2 and "1 of 2 questions have no prediction" in res.output
    p.write_text('{"question_id": 1, "text": "Yes"}\nnot json\n')
    res = runner.invoke(
        app, ["eval", "score", "pope", "--questions", str(q), "--predictions", str(p)]
    )
    assert res.exit_code == 2 and f"{p}:2" in res.output


def _vllm_reason() -> str | None:
    try:
        import vllm  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"vllm is not importable here ({type(e).__name__}: {e})"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_vllm_reason() is not None, reason=str(_vllm_reason()))
def test_vllm_backend_matches_hf_and_swaps_projectors_in_place(
    toy_run, suite_root, tmp_path
):
    from fedsim.eval.generation import HFBackend, VLLMBackend
    from fedsim.eval.run import generate_answers
    from fedsim.eval.suite import get, locate
    from fedsim.export import export_checkpoint
    from fedsim.models.backbone import init_projector, set_projector_

    ckpt = export_checkpoint(toy_run, tmp_path / "ckpt")
    bb = _in_run_backbone(toy_run)
    questions = get("pope").load(*locate("pope", suite_root))[:120]
    hf = generate_answers(HFBackend(bb, 64), bb, "pope", questions, 64)
    engine = VLLMBackend(str(ckpt), dtype="float32", **TOY_ENGINE)
    assert generate_answers(engine, bb, "pope", questions, 64) == hf
    # A new projector swapped into the live engine answers as hf does with it.
    w = init_projector(bb, 123)
    set_projector_(bb, w)
    hf_new = generate_answers(HFBackend(bb, 64), bb, "pope", questions, 64)
    engine.load_projector(w)
    assert generate_answers(engine, bb, "pope", questions, 64) == hf_new
    assert hf_new != hf


def _vllm_python() -> str | None:
    """A Python whose environment has vLLM: $FEDSIM_VLLM_PYTHON, or this one if vllm imports."""
    import os

    env = os.environ.get("FEDSIM_VLLM_PYTHON")
    if env:
        return env
    return sys.executable if _vllm_reason() is None else None


@pytest.mark.slow
@pytest.mark.skipif(
    _vllm_python() is None,
    reason="no vLLM: not importable here and FEDSIM_VLLM_PYTHON is not set "
    "(scripts/setup_vllm_cpu.sh builds .venv-vllm)",
)
def test_vllm_evaluator_in_a_run_agrees_with_hf(
    tmp_path, toy_path, cache_dir, ray_session
):
    from fedsim.driver import run

    def go(name, extra):
        cfg = load_config(
            None, [*TINY, "eval_every=1", f"cache_dir={cache_dir}", *extra]
        )
        return run(
            cfg, tmp_path / name, console=Console(quiet=True), show_progress=False
        )

    hf = go("hf", [])
    vl = go(
        "vllm",
        [
            "eval.backend=vllm",
            f"eval.vllm_python={_vllm_python()}",
            "eval.vllm_args={gpu_memory_utilization: 0.15, max_model_len: 128, "
            "enforce_eager: true}",
        ],
    )
    # The evaluator never touches training: the same projector bits.
    assert all(torch.equal(hf.weights[k], vl.weights[k]) for k in hf.weights)
    # Every round's projector was swapped into the one engine and scored like hf's greedy
    # answers (fp32 on both; a near-tie may flip a token, hence the small tolerance).
    evals = [
        (a["eval"], b["eval"]) for a, b in zip(hf.history, vl.history) if "eval" in a
    ]
    assert len(evals) == 4  # round 0 and rounds 1-3
    for a, b in evals:
        for key in ("attr_mean", "yesno_acc"):
            assert abs(a[key] - b[key]) <= 0.05, (key, a[key], b[key])
    assert set(vl.benchmarks) == set(hf.benchmarks)


@pytest.mark.slow
def test_the_toy_suite_in_a_run_records_its_matching_rules(toy_run):
    """The toy LM answers multiple-choice items with captions, which VLMEvalKit's current
    rules (a67ace50) never read: the in-run toy suite scores with aca64dbb and says so."""
    from fedsim.eval.toy_suite import TOY_MATCHING

    benches = json.loads((toy_run / "eval.json").read_text())["benchmarks"]
    for bench in ("mmbench", "mmvp"):
        assert (
            benches[bench]["matching"]
            == f"vlmevalkit@{TOY_MATCHING}"
            == ("vlmevalkit@aca64dbb")
        )
    assert "matching" not in benches["pope"]  # the other scorers have no such rules
