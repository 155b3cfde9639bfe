"""Round checkpoints on disk: round trip, atomic replacement, the newest N kept, config checks."""

from __future__ import annotations

import json
import os

import pytest
import torch

import fedsim.checkpoint as ck
from fedsim.checkpoint import (
    CheckpointError,
    RoundState,
    checkpoint_dirs,
    config_digest,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
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
    from fedsim.driver import cut_metrics

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
