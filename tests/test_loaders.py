"""Corpus loaders on fixture files in the real formats, made here from synthetic scenes."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedsim.data.export import export_scenes
from fedsim.data.loaders import CorpusSpec, DataError, build_corpus, ensure_corpus
from fedsim.data.scenes_dataset import ensure_scenes
from fedsim.data.synthetic import SceneSpec

SPEC = SceneSpec(styles=("filled", "outline"))


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    import datasets

    path = ensure_scenes(tmp_path_factory.mktemp("scenes"), SPEC, 0, 9, 60)
    return datasets.load_from_disk(str(path))


def _load(path: Path):
    from fedsim.data.loaders import open_corpus

    return open_corpus(path)


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def test_lcs558k_rows_images_and_source(scenes, tmp_path):
    files = export_scenes(scenes, tmp_path / "lcs", "lcs558k")
    # The real schema: a JSON list of {id, image, conversations: [human, gpt]}.
    first = json.loads(Path(files["path"]).read_text())[0]
    assert set(first) >= {"id", "image", "conversations"}
    assert [t["from"] for t in first["conversations"]] == ["human", "gpt"]
    spec = CorpusSpec(format="lcs558k", domain_key="source", **files)
    info = build_corpus([spec], tmp_path / "out")
    ds = _load(tmp_path / "out")
    assert info.rows == len(ds) == 60 and info.missing_images == 0
    assert ds["caption"] == scenes["caption"]
    assert ds["prompt"][0] == "Render a clear and concise summary of the photo."
    assert ds["source"] == [
        f"{b}+{s}" for b, s in zip(scenes["background"], scenes["style"])
    ]
    assert set(ds["dataset"]) == {"lcs558k"}
    for i in (0, 33, 59):
        assert np.array_equal(_pixels(ds[i]["image"]), _pixels(scenes[i]["image"]))
    # Images stay files on disk: the Arrow table holds their paths, not their bytes.
    import datasets

    raw = ds.cast_column("image", datasets.Image(decode=False))[0]["image"]
    assert raw["bytes"] is None and raw["path"].endswith(".png")


def test_lcs558k_meta_merge_and_domain_regex(scenes, tmp_path):
    files = export_scenes(scenes.select(range(6)), tmp_path / "lcs", "lcs558k")
    records = json.loads(Path(files["path"]).read_text())
    hosts = ["laion.ai", "cc.example", "sbu.example"]
    meta = [
        {"id": r["id"], "url": f"https://{hosts[i % 3]}/img/{i}.jpg"}
        for i, r in enumerate(records)
    ]
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    spec = CorpusSpec(
        format="lcs558k",
        meta=str(tmp_path / "meta.json"),
        domain_key="url",
        domain_regex=r"https?://([^/]+)/",
        **files,
    )
    build_corpus([spec], tmp_path / "out")
    assert _load(tmp_path / "out")["source"] == [hosts[i % 3] for i in range(6)]


def test_coco_captions_with_dominant_supercategory(tmp_path):
    root = tmp_path / "train2017"
    root.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, format="JPEG")
        (root / name).write_bytes(buf.getvalue())
    captions = {
        "images": [
            {"id": 1, "file_name": "a.jpg"},
            {"id": 2, "file_name": "b.jpg"},
            {"id": 3, "file_name": "c.jpg"},
        ],
        "annotations": [
            {"id": 7, "image_id": 2, "caption": "a dog on a sofa "},
            {"id": 5, "image_id": 1, "caption": "two cats"},
            {"id": 6, "image_id": 1, "caption": "cats sleeping"},
            {"id": 9, "image_id": 3, "caption": "an empty room"},
        ],
    }
    instances = {
        "categories": [
            {"id": 1, "name": "cat", "supercategory": "animal"},
            {"id": 2, "name": "couch", "supercategory": "furniture"},
            {"id": 3, "name": "dog", "supercategory": "animal"},
        ],
        "annotations": [
            {"image_id": 1, "category_id": 1},
            {"image_id": 1, "category_id": 1},
            {"image_id": 1, "category_id": 2},
            {"image_id": 2, "category_id": 3},
            {"image_id": 2, "category_id": 2},
        ],
    }
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    spec = CorpusSpec(
        format="coco",
        path=str(tmp_path / "captions.json"),
        image_root=str(root),
        instances=str(tmp_path / "instances.json"),
    )
    build_corpus([spec], tmp_path / "out")
    ds = _load(tmp_path / "out")
    # One row per caption, by (image id, caption id); trailing spaces stripped.
    assert ds["caption"] == [
        "two cats",
        "cats sleeping",
        "a dog on a sofa",
        "an empty room",
    ]
    # image 1: animal 2 vs furniture 1; image 2: a 1-1 tie → by name; image 3: no objects.
    assert ds["supercategory"] == ["animal", "animal", "animal", "none"]


def test_parquet_keeps_metadata_columns(scenes, tmp_path):
    files = export_scenes(scenes, tmp_path / "pq", "parquet")
    spec = CorpusSpec(format="parquet", domain_key="background", **files)
    build_corpus([spec], tmp_path / "out")
    ds = _load(tmp_path / "out")
    assert ds["caption"] == scenes["caption"]
    assert ds["shape"] == scenes["shape"] and ds["source"] == scenes["background"]
    assert np.array_equal(_pixels(ds[5]["image"]), _pixels(scenes[5]["image"]))
    bad = CorpusSpec(format="parquet", text_column="text", **files)
    with pytest.raises(DataError, match="no column 'text'"):
        build_corpus([bad], tmp_path / "bad")


def test_missing_image_skip_counts_and_fail_names_the_path(scenes, tmp_path):
    files = export_scenes(scenes.select(range(10)), tmp_path / "lcs", "lcs558k")
    missing = Path(files["image_root"]) / "00000" / "000000003.png"
    missing.unlink()
    spec = CorpusSpec(format="lcs558k", **files)
    info = build_corpus([spec], tmp_path / "skip", "skip")
    assert info.rows == 9 and info.missing_images == 1
    assert info.missing_examples == [str(missing)]
    assert (
        json.loads((tmp_path / "skip" / "corpus.json").read_text())["missing_images"]
        == 1
    )
    with pytest.raises(DataError, match=str(missing)):
        build_corpus([spec], tmp_path / "fail", "fail")
    assert not (tmp_path / "fail").exists()  # nothing half-written


def test_missing_inputs_say_what_to_put_where(tmp_path):
    spec = CorpusSpec(
        format="lcs558k", path=str(tmp_path / "nope.json"), image_root="x"
    )
    with pytest.raises(DataError, match="blip_laion_cc_sbu_558k.json"):
        build_corpus([spec], tmp_path / "out")


def test_mixture_of_corpora_and_cache(scenes, tmp_path):
    a = export_scenes(scenes.select(range(20)), tmp_path / "a", "lcs558k")
    b = export_scenes(scenes.select(range(20, 50)), tmp_path / "b", "parquet")
    specs = [
        CorpusSpec(format="lcs558k", name="lcs", **a),
        CorpusSpec(format="parquet", name="pq", **b),
    ]
    path = ensure_corpus(tmp_path / "cache", specs)
    ds = _load(path)
    assert ds["dataset"] == ["lcs"] * 20 + ["pq"] * 30
    assert ds["caption"] == scenes["caption"][:50]
    assert ensure_corpus(tmp_path / "cache", specs) == path  # built once


def test_unreadable_image_skip_and_fail(scenes, tmp_path, toy):
    from fedsim.data.rows import RowReader

    files = export_scenes(scenes.select(range(8)), tmp_path / "lcs", "lcs558k")
    broken = Path(files["image_root"]) / "00000" / "000000002.png"
    broken.write_bytes(b"this is not a png")
    build_corpus([CorpusSpec(format="lcs558k", **files)], tmp_path / "out")
    import datasets

    ds = datasets.load_from_disk(str(tmp_path / "out"))
    data, pixels, kept = RowReader.of_dataset(ds, None, "skip").read([0, 1, 2, 3], toy)
    assert kept == [0, 1, 3] and pixels.shape[0] == 3
    assert data["caption"] == [scenes["caption"][i] for i in (0, 1, 3)]
    with pytest.raises(DataError, match=str(broken)):
        RowReader.of_dataset(ds, None, "fail").read([0, 1, 2, 3], toy)


@pytest.mark.slow
def test_a_run_on_a_corpus_in_the_lcs558k_format(
    scenes, tmp_path, toy_path, cache_dir, ray_session
):
    """The loaders in the main path: a toy run trains on exported scenes read as LCS-558K."""
    import json as _json

    import datasets
    from rich.console import Console

    from fedsim.config import load_config
    from fedsim.driver import run

    big = datasets.load_from_disk(str(ensure_scenes(tmp_path / "s", SPEC, 0, 1, 400)))
    files = export_scenes(big, tmp_path / "lcs", "lcs558k")
    broken = Path(files["image_root"]) / "00000" / "000000005.png"
    broken.write_bytes(b"corrupt")
    gone = Path(files["image_root"]) / "00000" / "000000007.png"
    gone.unlink()  # missing at build: skipped and counted there
    corpus = {"format": "lcs558k", "domain_key": "source", **files}
    cfg = load_config(
        None,
        [
            f"cache_dir={cache_dir}",
            f"data.corpora=[{_json.dumps(corpus)}]",
            "data.eval_scenes=20",
            "rounds=2",
            "eval_every=0",
            "eval.at_start=false",
            "train.local_steps=2",
            "train.batch_size=4",
            "scenario.num_clients=6",
            "scenario.cohort_size=6",
            "scenario.partition=domain",
            "scenario.label=source",
        ],
    )
    r = run(cfg, tmp_path / "run", console=Console(quiet=True), show_progress=False)
    assert all(rec["num_clients"] == 6 and rec["rejected"] == [] for rec in r.history)
    # Two rounds × 6 clients × 2 steps × 4 rows = 96 rows read; the corrupt one, if drawn,
    # is skipped and counted instead of being trained on.
    bad = sum(rec["bad_images"] for rec in r.history)
    assert sum(rec["samples"] for rec in r.history) == 96 - bad
    # The corpus (400 records, one image missing) is summarised in the first round's record.
    assert r.history[0]["corpus"]["rows"] == 399
    assert r.history[0]["corpus"]["missing_images"] == 1
    # ... and in summary.md, which names the corpus, not the scenario's own data.
    summary = (tmp_path / "run" / "summary.md").read_text()
    assert summary.startswith(
        "# fedsim run: fedavg on lcs558k (toy-iid scenario settings)"
    )
    assert (
        f"- data: lcs558k ({files['path']}); 399 rows, domain split by source"
        in summary
    )
    assert (
        f"images missing when the corpus was built: 1 (rows skipped; e.g. {gone})"
        in summary
    )
    assert f"images that did not decode in training: {bad} (rows skipped)" in summary


def test_a_bad_image_a_worker_finds_is_its_one_line():
    """The driver gets a worker's DataError wrapped in a RayTaskError (the worker's whole
    traceback as text); the run shows the cause's one line. A bug keeps its traceback."""
    from ray.exceptions import RayTaskError

    from fedsim.driver import worker_input_error

    cause = DataError("image /data/x.png: cannot be decoded (truncated)")
    wrapped = RayTaskError("BackboneWorker.train", "Traceback ...\n  14 lines\n", cause)
    as_cause = wrapped.as_instanceof_cause()  # what ray.get raises in the driver
    assert isinstance(as_cause, DataError) and "\n" in str(as_cause)
    assert worker_input_error(as_cause) is cause
    bug = RayTaskError(
        "f", "Traceback ...", ZeroDivisionError("x")
    ).as_instanceof_cause()
    assert worker_input_error(bug) is None
