"""Predicted task cost in tokens (push scheduling's sort key)."""

from __future__ import annotations

import numpy as np

from fedsim.cost import TokenCost
from fedsim.data.scenes_dataset import ensure_scenes
from fedsim.data.synthetic import SceneSpec
from fedsim.models.spec import ModelSpec
from fedsim.rounds import cohorts
from fedsim.training import ClientTask, task_flags


def test_tokens_are_image_tokens_plus_the_text_each_row_trains_on(
    toy, toy_path, tmp_path
):
    import datasets

    path = ensure_scenes(tmp_path, SceneSpec(styles=("filled",)), 0, 5, 200)
    spec = ModelSpec(str(toy_path), None, "mlp2x_gelu", "float32", "cpu")
    cost = TokenCost(spec, path, qa_fraction=0.3)
    ds = datasets.load_from_disk(str(path))
    rows = np.arange(20, 52)
    flags = task_flags(0, 3, 7, len(rows), 0.3)
    assert flags.any() and not flags.all()
    expected = 0
    for r, f in zip(
        rows, flags
    ):  # one row at a time, with the backbone's own tokenizer
        row = ds[int(r)]
        text = f"{row['question']} {row['answer']}" if f else row["caption"]
        expected += toy.image_seq_length + len(
            toy.tokenizer(text, add_special_tokens=False)["input_ids"]
        )
    assert cost(7, 3, 0, rows) == expected
    assert cost(7, 3, 0, rows[:0]) == 0


def test_cohorts_follow_cost_then_client_id():
    def task(cid: int, cost: int) -> ClientTask:
        return ClientTask(cid, 1, 0, np.arange(4), (1e-3,), 4, cost=cost)

    tasks = [task(3, 50), task(1, 70), task(8, 50), task(5, 90), task(2, 10)]
    groups = cohorts(tasks, 2)
    assert [[t.client_id for t in g] for g in groups] == [[5, 1], [3, 8], [2]]
