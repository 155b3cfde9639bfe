"""Trackers (fedsim.tracking): what TensorBoard and MLflow hold, read back with their own
readers, equals metrics.jsonl; a failing tracker is one warning and changes nothing."""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from small_runs import small_run

from fedsim.config import load_config
from fedsim.configtools import ConfigError
from fedsim.tracking import Trackers, TrackingWarning, scalars

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")

UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing listens there


def _tb(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tracking" / "tensorboard"))
    acc.Reload()
    return acc


def _mlflow(run_dir: Path, uri: str | None = None):
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3's file store
    saved = json.loads((run_dir / "tracking" / "mlflow-run.json").read_text())
    client = MlflowClient(tracking_uri=uri or saved["uri"])
    return client, saved["run_id"]


def _records(n: int) -> list[dict]:
    """Round records as the loops write them: round 0's evaluation, then n rounds."""
    out = [
        {"round": 0, "wall_seconds": 0.5, "eval": {"attr_mean": 0.3, "yesno_acc": 0.5}}
    ]
    for r in range(1, n + 1):
        out.append(
            {
                "round": r,
                "clients": [1, 2],
                "samples": 32,
                "loss": 2.0 / r,
                "lr": 0.003,
                "update_norm": 0.1 * r,
                "rejected": [{"client": 2, "reason": "nan"}] if r == 2 else [],
                "algorithm": {"rank": {"linear_1.weight": 4}},
                "diagnostics": {"drift": 0.5, "eff_rank/linear_1.weight": 1.5},
                "sim_clock": 1.0 * r,
                "wall_seconds": 0.1,
                **({"eval": {"attr_mean": 0.9}} if r == n else {}),
            }
        )
    return out


def test_scalars_flatten_the_record():
    values = scalars(_records(2)[2])
    assert values["loss"] == 1.0 and values["rejected"] == 1.0
    assert values["diagnostics/eff_rank/linear_1.weight"] == 1.5
    assert values["algorithm/rank/linear_1.weight"] == 4.0
    assert values["eval/attr_mean"] == 0.9 and "clients" not in values


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "tracking.backends=[tensorbord]",
            "tracking.backends: 'tensorbord' is not one of",
        ),
        ("tracking.backends=tensorboard", "tracking.backends"),
        (
            "tracking.backends=[mlflow, mlflow]",
            "tracking.backends: 'mlflow' is listed twice",
        ),
        ("tracking.mlflow_uri=5", "tracking.mlflow_uri"),
        (
            "tracking.mlflow_uri=ftp://x",
            "tracking.mlflow_uri: 'ftp://x' is not an http(s)",
        ),
    ],
)
def test_bad_tracking_config_is_one_line_naming_the_field(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def _cfg(tmp_path: Path, *extra: str):
    return load_config(None, ["rounds=3", f"cache_dir={tmp_path / 'cache'}", *extra])


def test_both_backends_hold_the_records_and_a_resume_adds_no_duplicate(tmp_path):
    cfg = _cfg(tmp_path, "tracking.backends=[tensorboard, mlflow]")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "summary.md").write_text("# summary\n")
    records = _records(3)
    first = Trackers(cfg, run_dir, None)
    for rec in records[:3]:  # rounds 0-2 written, then the process "crashes"
        first.log(rec)
    first.close()

    class Restored:
        round = 1  # the checkpoint: rounds 2 and 3 run again

    again = Trackers.for_run(cfg, run_dir, Restored(), resume=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrackingWarning)
        for rec in records[2:]:
            again.log(rec)
        again.finish({"attr_mean": 0.9})

    client, run_id = _mlflow(run_dir)
    loss = client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in loss] == [(r, 2.0 / r) for r in (1, 2, 3)]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["algorithm"] == "fedavg" and run.data.tags["seed"] == "0"
    assert run.data.params["rounds"] == "3"
    assert "summary.md" in [a.path for a in client.list_artifacts(run_id)]

    acc = _tb(run_dir)
    tb_loss = [(e.step, e.value) for e in acc.Scalars("loss")]
    assert tb_loss == [
        (r, np.float32(2.0 / r)) for r in (1, 2, 3)
    ]  # purged, not doubled
    assert [e.step for e in acc.Scalars("eval/attr_mean")] == [0, 3]


def test_an_unreachable_mlflow_server_is_one_warning(tmp_path):
    cfg = _cfg(
        tmp_path, "tracking.backends=[mlflow]", f"tracking.mlflow_uri={UNREACHABLE}"
    )
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    trackers = Trackers(cfg, run_dir, None)
    with pytest.warns(TrackingWarning) as got:
        for rec in _records(3):
            trackers.log(rec)
        trackers.finish({})
    assert len(got) == 1 and "mlflow" in str(got[0].message)


@pytest.mark.slow
def test_a_run_streams_every_round_and_a_failing_tracker_changes_no_bit(
    tmp_path, ray_session, cache_dir, toy_path
):
    from fedsim.runio import MetricsLog, load_weights, weights_digest

    short = ["eval_every=1", "eval.benchmarks=[]"]
    tracked = tmp_path / "tracked"
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrackingWarning)
        result = small_run(
            tracked, cache_dir, *short, "tracking.backends=[tensorboard, mlflow]"
        )
    rounds = [r for r in MetricsLog(tracked / "metrics.jsonl").read() if r["round"] > 0]
    assert len(rounds) == 2

    client, run_id = _mlflow(tracked)
    ml_loss = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
    tb_loss = {e.step: e.value for e in _tb(tracked).Scalars("loss")}
    for r in rounds:
        assert ml_loss[r["round"]] == r["loss"]  # MLflow keeps the float64
        assert tb_loss[r["round"]] == np.float32(
            r["loss"]
        )  # TensorBoard stores float32
    final = result.final_eval
    for key in ("attr_mean", "yesno_acc"):
        ml = client.get_metric_history(run_id, f"eval/{key}")
        assert max(ml, key=lambda m: m.step).value == final[key]
        tb = _tb(tracked).Scalars(f"eval/{key}")
        assert tb[-1].value == np.float32(final[key])
    artifacts = [a.path for a in client.list_artifacts(run_id, "final")]
    assert "final/projector.safetensors" in artifacts

    failing = tmp_path / "failing"
    with pytest.warns(TrackingWarning) as got:
        small_run(
            failing,
            cache_dir,
            *short,
            "tracking.backends=[mlflow]",
            f"tracking.mlflow_uri={UNREACHABLE}",
        )
    assert len([w for w in got if issubclass(w.category, TrackingWarning)]) == 1
    assert (failing / "summary.md").is_file()
    assert MetricsLog(failing / "metrics.jsonl").read()[-1]["round"] == 2
    proj = "final/projector.safetensors"
    digest = weights_digest(load_weights(failing / proj))
    assert digest == weights_digest(load_weights(tracked / proj))


def test_compare_groups_its_runs_in_one_experiment_tagged(tmp_path):
    from fedsim.tracking import grouped

    cmp_dir = tmp_path / "cmp"
    with grouped(cmp_dir):
        for algo in ("fedavg", "fedprox"):
            for seed in (0, 1):
                cfg = _cfg(
                    tmp_path,
                    f"algorithm.name={algo}",
                    f"seed={seed}",
                    "tracking.backends=[mlflow]",
                )
                run_dir = cmp_dir / algo / f"seed-{seed}"
                run_dir.mkdir(parents=True)
                trackers = Trackers(cfg, run_dir, None)
                trackers.log(_records(1)[1])
                trackers.finish({})
    client, _ = _mlflow(cmp_dir / "fedavg" / "seed-0")
    assert client.tracking_uri.startswith((cmp_dir / "tracking" / "mlruns").as_uri())
    exp = client.get_experiment_by_name("fedsim compare cmp")
    runs = client.search_runs([exp.experiment_id])
    tags = sorted((r.data.tags["algorithm"], r.data.tags["seed"]) for r in runs)
    assert tags == [
        ("fedavg", "0"),
        ("fedavg", "1"),
        ("fedprox", "0"),
        ("fedprox", "1"),
    ]
    assert {r.info.run_name for r in runs} >= {"fedavg/seed-0", "fedprox/seed-1"}


def _wandb_records(path: Path) -> list:
    """The protobuf records of an offline ``.wandb`` file: a 7-byte W&B header, then the
    LevelDB log format (32 KiB blocks; records FULL, or FIRST/MIDDLE.../LAST pieces)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    raw, pos, out, piece = path.read_bytes(), 7, [], b""
    while pos + 7 <= len(raw):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left  # zero padding at a block's end
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        chunk, pos = raw[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # FULL, LAST
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(piece + chunk)
            out.append(rec)
            piece = b""
        elif kind in (2, 3):  # FIRST, MIDDLE
            piece += chunk
    return out


def test_wandb_offline_holds_every_round_once_across_a_resume(tmp_path):
    pytest.importorskip("wandb")
    cfg = _cfg(tmp_path, "tracking.backends=[wandb]")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    records = _records(3)
    first = Trackers(cfg, run_dir, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrackingWarning)
        for rec in records[:3]:
            first.log(rec)
        first.close()
        # W&B names an offline segment by the second it starts: a real resume (a new process,
        # Ray started again) is seconds later; here, wait so the two segments differ.
        time.sleep(1.1)
        again = Trackers(cfg, run_dir, 2)  # resumed after round 1's checkpoint
        for rec in records[2:]:
            again.log(rec)
        again.finish({"attr_mean": 0.9})
    losses = {}
    for f in sorted((run_dir / "tracking" / "wandb").glob("offline-run-*/run-*.wandb")):
        for rec in _wandb_records(f):
            if rec.WhichOneof("record_type") == "history":
                row = {
                    i.key or "/".join(i.nested_key): json.loads(i.value_json)
                    for i in rec.history.item
                }
                if "loss" in row:
                    assert row["_step"] not in losses, "a step logged twice"
                    losses[row["_step"]] = row["loss"]
    assert losses == {r: 2.0 / r for r in (1, 2, 3)}
