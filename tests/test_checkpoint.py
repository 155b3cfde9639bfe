"""Round checkpoints on disk: round trip, atomic replacement, the newest N kept, config checks."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

import fedsim.checkpoint as ck
from fedsim.checkpoint import (
    CheckpointError,
    DamagedCheckpoint,
    RoundState,
    checkpoint_dirs,
    config_digest,
    latest_checkpoint,
    load_checkpoint,
    remove_temp_leftovers,
    save_checkpoint,
    temp_leftovers,
)
from fedsim.data.streams import Cursor
from fedsim.runio import MetricsLog


def _state(rnd: int) -> RoundState:
    g = torch.Generator().manual_seed(rnd)
    return RoundState(
        round=rnd,
        weights={"linear_1.weight": torch.randn(4, 3, generator=g)},
        server_state={"m/linear_1.weight": torch.randn(4, 3, generator=g)},
        clients={
            7: {"c/linear_1.weight": torch.randn(4, 3, generator=g)},
            2: {"exp_avg": torch.randn(5, generator=g), "step": torch.tensor(3.0)},
        },
        cursors=[Cursor(0, 4), Cursor(2, 1), Cursor()],
        sim_clock=12.5 + rnd,
        final_eval={"attr_mean": 0.5},
        metrics_lines=rnd + 1,
    )


def _equal(a: RoundState, b: RoundState) -> None:
    assert (a.round, a.cursors, a.sim_clock, a.final_eval, a.metrics_lines) == (
        b.round,
        b.cursors,
        b.sim_clock,
        b.final_eval,
        b.metrics_lines,
    )
    for x, y in [(a.weights, b.weights), (a.server_state, b.server_state)]:
        assert set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x)
    assert set(a.clients) == set(b.clients)
    for c in a.clients:
        assert set(a.clients[c]) == set(b.clients[c])
        assert all(torch.equal(a.clients[c][k], b.clients[c][k]) for k in a.clients[c])


def test_round_trip_bit_for_bit(tmp_path):
    state = _state(3)
    path = save_checkpoint(tmp_path, state, "d" * 64, keep=2)
    assert path.name == "round-000003"
    _equal(load_checkpoint(path, "d" * 64), state)


def test_empty_server_and_client_state_round_trip(tmp_path):
    # FedAvg keeps no server state and no client state: empty files must still load.
    state = _state(1)
    state.server_state, state.clients = {}, {}
    _equal(load_checkpoint(save_checkpoint(tmp_path, state, "d", keep=1), "d"), state)


def test_newest_n_kept(tmp_path):
    for r in range(1, 6):
        save_checkpoint(tmp_path, _state(r), "d", keep=2)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == [
        "round-000004",
        "round-000005",
    ]


def test_crash_mid_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, _state(1), "d", keep=2)
    real = ck.save_weights

    def failing(path, weights, metadata=None):
        if path.name == "clients.safetensors":
            raise OSError(28, "No space left on device")
        real(path, weights, metadata)

    monkeypatch.setattr(ck, "save_weights", failing)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, _state(2), "d", keep=2)
    assert latest_checkpoint(tmp_path).name == "round-000001"
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["round-000001"]
    _equal(load_checkpoint(latest_checkpoint(tmp_path), "d"), _state(1))


def test_a_kill_while_pruning_leaves_nothing_that_stays(tmp_path, monkeypatch):
    """Killed while the oldest checkpoint is being deleted (state.json already gone): what is
    left is a temporary that resume removes, never a round folder nothing lists again (seen
    once in the SIGKILL resume test)."""
    import shutil

    save_checkpoint(tmp_path, _state(1), "d", keep=1)
    real = shutil.rmtree

    def killed(path, ignore_errors=False):
        (Path(path) / "state.json").unlink()  # the deletion had begun …
        raise KeyboardInterrupt  # … when the process was stopped

    monkeypatch.setattr(ck.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, _state(2), "d", keep=1)
    monkeypatch.setattr(ck.shutil, "rmtree", real)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["round-000002"]
    leftovers = temp_leftovers(tmp_path)
    assert [p.name for p in leftovers] == [f".round-000001.tmp-old-{os.getpid()}"]
    remove_temp_leftovers(tmp_path)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["round-000002"]


def test_half_written_folder_of_a_killed_process_is_not_a_checkpoint(tmp_path):
    save_checkpoint(tmp_path, _state(1), "d", keep=2)
    # What SIGKILL during the write of round 2 leaves: the temporary folder, no state.json.
    tmp = tmp_path / "checkpoints" / ".round-000002.tmp-4242"
    tmp.mkdir()
    (tmp / "projector.safetensors").write_bytes(b"\x00" * 10)
    # A final-named folder without state.json (cannot happen with rename, but be strict).
    (tmp_path / "checkpoints" / "round-000003").mkdir()
    assert latest_checkpoint(tmp_path).name == "round-000001"


def test_another_config_or_format_is_refused(tmp_path):
    path = save_checkpoint(tmp_path, _state(1), "a" * 64, keep=1)
    with pytest.raises(CheckpointError, match="another config"):
        load_checkpoint(path, "b" * 64)
    meta = json.loads((path / "state.json").read_text())
    meta["format"] = 99
    (path / "state.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format 99"):
        load_checkpoint(path)


def test_digest_ignores_where_the_run_runs_but_not_what_it_computes():
    base = {"seed": 0, "rounds": 5, "ray": {"workers": 2}}
    assert config_digest(base) == config_digest({**base, "ray": {"workers": 8}})
    assert config_digest(base) != config_digest({**base, "rounds": 6})


def test_metrics_cut_back_to_the_checkpoint(tmp_path):
    from fedsim.checkpoint import cut_metrics

    log = MetricsLog(tmp_path / "metrics.jsonl")
    for r in range(4):
        log.append({"round": r})
    with open(log.path, "a") as f:
        f.write('{"round": 4, "lo')  # cut short by the crash
    assert [json.loads(x)["round"] for x in log.read_lines()] == [0, 1, 2, 3]
    cut_metrics(tmp_path, 2, 3)
    assert log.path.read_text() == '{"round": 0}\n{"round": 1}\n{"round": 2}\n'
    entry = json.loads((tmp_path / "resumes.jsonl").read_text())
    assert entry["resumed_after_round"] == 2 and entry["dropped_rounds"] == [3]
    log.append({"round": 3})  # appending goes on after the cut, on a line of its own
    assert [r["round"] for r in log.read()] == [0, 1, 2, 3]


# --- verification before a resume changes anything -------------------------------------------


def _snapshot(root) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()
    }


def _interrupted_run(tmp_path, rounds_saved=(1, 2), rounds=4):
    """A run folder as a kill after the last of ``rounds_saved`` leaves it."""
    from fedsim.config import config_to_yaml_data, load_config
    from fedsim.runio import write_yaml

    cfg = load_config(None, [f"rounds={rounds}", "checkpoint_keep=5"])
    data = config_to_yaml_data(cfg)
    write_yaml(tmp_path / "config.yaml", data)
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.append({"round": 0})
    for r in rounds_saved:
        log.append({"round": r})
        state = _state(r)
        state.metrics_lines = r + 1
        save_checkpoint(tmp_path, state, config_digest(data), keep=5)
    return cfg


def test_checksums_recorded_and_an_altered_file_is_damage(tmp_path):
    path = save_checkpoint(tmp_path, _state(1), "d", keep=1)
    meta = json.loads((path / "state.json").read_text())
    assert set(meta["files"]) == set(ck.WEIGHT_FILES)
    f = path / "server_state.safetensors"
    assert meta["files"][f.name] == hashlib.sha256(f.read_bytes()).hexdigest()
    data = bytearray(f.read_bytes())
    data[-1] ^= 0x01  # one bit of one tensor: still a valid safetensors file
    f.write_bytes(bytes(data))
    with pytest.raises(
        DamagedCheckpoint, match="server_state.safetensors does not match"
    ):
        load_checkpoint(path, "d")


def test_damaged_newest_checkpoint_falls_back_to_the_previous_and_says_so(tmp_path):
    from rich.console import Console

    from fedsim.checkpoint import find_checkpoint

    cfg = _interrupted_run(tmp_path)
    newest = tmp_path / "checkpoints" / "round-000002" / "clients.safetensors"
    newest.write_bytes(newest.read_bytes()[:40])  # cut short
    console = Console(record=True, width=400)
    before = _snapshot(tmp_path)
    restored = find_checkpoint(cfg, tmp_path, console)
    _equal(restored, _interrupted_state(1))
    said = console.export_text()
    assert "damaged" in said and "round-000002" in said and "round-000001" in said
    assert _snapshot(tmp_path) == before  # finding changes nothing


def _interrupted_state(r: int) -> RoundState:
    state = _state(r)
    state.metrics_lines = r + 1
    return state


def test_every_checkpoint_damaged_is_an_error(tmp_path):
    from fedsim.checkpoint import find_checkpoint
    from fedsim.runio import RunError

    cfg = _interrupted_run(tmp_path)
    for p in checkpoint_dirs(tmp_path):
        (p / "projector.safetensors").write_bytes(b"")
    with pytest.raises(RunError, match="every checkpoint is damaged"):
        find_checkpoint(cfg, tmp_path)


@pytest.mark.parametrize(
    "damage, message",
    [
        ("round-beyond", "checkpoint of round 2, the run has rounds 1–1"),
        ("garbage-metrics", "metrics.jsonl line 2 is not a JSON object"),
        ("short-metrics", "metrics.jsonl has 1 complete lines"),
    ],
)
def test_failed_resume_checks_change_no_byte(tmp_path, damage, message):
    from fedsim.driver import resume_run
    from fedsim.runio import RunError

    _interrupted_run(tmp_path)
    log = tmp_path / "metrics.jsonl"
    if damage == "round-beyond":
        text = (tmp_path / "config.yaml").read_text().replace("rounds: 4", "rounds: 1")
        (tmp_path / "config.yaml").write_text(text)
        # A config with rounds=1 wrote the checkpoint of round 2 (state.json altered)
        for p in checkpoint_dirs(tmp_path):
            meta = json.loads((p / "state.json").read_text())
            meta["config_digest"] = _digest_of(tmp_path)
            (p / "state.json").write_text(json.dumps(meta))
    elif damage == "garbage-metrics":
        lines = log.read_text().splitlines()
        lines[1] = "not json at all"
        log.write_text("\n".join(lines) + "\n")
    else:
        log.write_text('{"round": 0}\n')
    (tmp_path / "checkpoints" / ".round-000003.tmp-999").mkdir()
    before = _snapshot(tmp_path)
    with pytest.raises(RunError, match=message):
        resume_run(tmp_path, show_progress=False)
    assert _snapshot(tmp_path) == before
    assert (tmp_path / "checkpoints" / ".round-000003.tmp-999").is_dir()
    assert not (tmp_path / "resumes.jsonl").exists()


def _digest_of(run_dir) -> str:
    from fedsim.config import config_to_yaml_data, load_config

    cfg = load_config(str(run_dir / "config.yaml"))
    return config_digest(config_to_yaml_data(cfg))


def test_resume_cleans_the_temporaries_of_killed_writes(tmp_path):
    from fedsim.checkpoint import cut_metrics, temp_leftovers

    _interrupted_run(tmp_path)
    (tmp_path / "final").mkdir()
    kept = tmp_path / "final" / "projector.safetensors"
    kept.write_bytes(b"a finished file")
    leftovers = [
        tmp_path / "checkpoints" / ".round-000003.tmp-4242",
        tmp_path / "final" / ".projector.safetensors.k2j4_x9a",
        tmp_path / ".metrics.jsonl.ab12cd34",
    ]
    leftovers[0].mkdir()
    (leftovers[0] / "projector.safetensors").write_bytes(b"\0")
    for p in leftovers[1:]:
        p.write_bytes(b"half")
    assert temp_leftovers(tmp_path) == sorted(leftovers)
    cut_metrics(tmp_path, 2, 3)
    assert not any(p.exists() for p in leftovers)
    assert kept.read_bytes() == b"a finished file"
    assert [p.name for p in checkpoint_dirs(tmp_path)] == [
        "round-000001",
        "round-000002",
    ]


def test_digest_leaves_out_cache_dir_and_ray_but_threads_per_worker():
    base = {
        "seed": 0,
        "cache_dir": "/a",
        "ray": {"workers": 2, "threads_per_worker": 1},
    }
    same = {**base, "cache_dir": "/b", "ray": {"workers": 8, "threads_per_worker": 1}}
    assert config_digest(base) == config_digest(same)
    other = {**base, "ray": {"workers": 2, "threads_per_worker": 2}}
    assert config_digest(base) != config_digest(other)


def test_checkpoints_of_the_old_digest_still_resume():
    from fedsim.checkpoint import accepted_digests

    data = {"seed": 0, "cache_dir": "/a", "ray": {"workers": 2}}
    # What checkpoints carried before cache_dir left the digest: everything but ray.
    old = hashlib.sha256(
        json.dumps({"seed": 0, "cache_dir": "/a"}, sort_keys=True).encode()
    ).hexdigest()
    assert old in accepted_digests(data)
    assert config_digest(data) in accepted_digests(data)
    # A section added later and left out of the digest (tracking.*) changes neither.
    tracked = {**data, "tracking": {"backends": ["mlflow"], "mlflow_uri": None}}
    assert accepted_digests(tracked) == accepted_digests(data)


def test_equal_tensors_have_one_weights_digest_whatever_the_file(tmp_path):
    from fedsim.runio import file_sha256, save_weights, weights_digest

    w = _state(1).weights
    save_weights(tmp_path / "a.safetensors", w, {"algorithm": "fedavg", "seed": "0"})
    save_weights(tmp_path / "b.safetensors", w, {"seed": "0", "rounds": "2"})
    a, b = (load_checkpoint_weights(tmp_path / n) for n in ("a", "b"))
    assert file_sha256(tmp_path / "a.safetensors") != file_sha256(
        tmp_path / "b.safetensors"
    )
    assert weights_digest(a) == weights_digest(b) == weights_digest(w)
    changed = {k: v.clone() for k, v in w.items()}
    changed["linear_1.weight"][0, 0] += 1e-6
    assert weights_digest(changed) != weights_digest(w)
    # The dtype is part of what the digest names, not only the bytes.
    assert weights_digest({"x": torch.zeros(2)}) != weights_digest(
        {"x": torch.zeros(2, dtype=torch.int32)}
    )


def load_checkpoint_weights(stem):
    from fedsim.runio import load_weights

    return load_weights(stem.with_suffix(".safetensors"))


def test_resume_may_move_the_cache_and_the_workers(tmp_path):
    """--set cache_dir=… on resume was documented as allowed and always refused (digest)."""
    from fedsim.checkpoint import find_checkpoint
    from fedsim.config import load_config

    _interrupted_run(tmp_path)
    moved = ["cache_dir=/elsewhere", "ray.workers=7", "ray.task_retries=0"]
    cfg = load_config(str(tmp_path / "config.yaml"), moved)
    assert find_checkpoint(cfg, tmp_path).round == 2
    threads = load_config(str(tmp_path / "config.yaml"), ["ray.threads_per_worker=2"])
    with pytest.raises(CheckpointError, match="another config"):
        find_checkpoint(threads, tmp_path)


def test_checkpoints_from_before_a_field_existed_resume_at_its_default():
    """A run checkpointed by a version without scenario.caption_styles (etc.) resumes while the
    new fields keep their earlier behaviour, and not once one of them changes it."""
    from fedsim.checkpoint import accepted_digests
    from fedsim.config import config_to_yaml_data, load_config

    now = config_to_yaml_data(load_config(None, []))
    before = {k: dict(v) if isinstance(v, dict) else v for k, v in now.items()}
    for section, name in (
        ("scenario", "noisy_clients"),
        ("scenario", "caption_noise"),
        ("scenario", "caption_styles"),
        ("data", "eval_split"),
        ("train", "diagnostics"),
    ):
        del before[section][name]
    assert config_digest(before) != config_digest(now)
    assert config_digest(before) in accepted_digests(now)
    styled = config_to_yaml_data(load_config(None, ["scenario.caption_styles=2"]))
    assert config_digest(before) not in accepted_digests(styled)
