"""Image–text corpora from the files users have: LLaVA-Pretrain LCS-558K, COCO captions, Parquet,
saved Hugging Face datasets — and fedsim's synthetic scenes through the same path.

Every loader returns a memory-mapped Arrow dataset (``datasets``) with the columns

- ``image``: the image as a path (decoded lazily, one image at a time, when a row is read) or as
  embedded bytes; never the whole image set in RAM;
- ``caption``: the training target (LLaVA's stage-1 "plain" template: the image, then the caption);
- ``id``, ``dataset`` and metadata columns that partitioners split by: ``source`` (a domain key),
  ``supercategory`` (COCO), or any column of the input (``data.domain_key``).

Images are checked when the corpus is built: a missing file is reported with its path, and the
``data.bad_images`` policy decides: ``skip`` drops the row (counted in ``corpus.json``) or ``fail``
stops with the path. A file that exists but cannot be decoded is found when its row is read
(:class:`fedsim.data.rows.RowReader`), under the same policy. Built corpora are cached under a hash
of the inputs (file sizes and modification times included), written to a temporary folder and
renamed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsim.configtools import ConfigError, read_user_text
from fedsim.data.images import decode_image

CHUNK = 50_000


def _image_storage() -> Any:
    """``datasets.Image``'s storage type as a plain struct: ``save_to_disk`` would embed every
    image file into the Arrow data if the column were an Image feature."""
    import datasets

    return {"bytes": datasets.Value("binary"), "path": datasets.Value("string")}


class DataError(ConfigError):
    """Input data that cannot be used (missing files, bad images under the ``fail`` policy)."""


@dataclass(frozen=True)
class CorpusSpec:
    """One input corpus (``data.corpora`` items in the config).

    Attributes
    ----------
    format:
        ``lcs558k`` (LLaVA-Pretrain JSON), ``coco`` (captions JSON, optionally instances JSON),
        ``parquet`` (a file or folder of Parquet files) or ``hf`` (a folder saved with
        ``datasets.save_to_disk``).
    path:
        The JSON / Parquet / dataset folder.
    image_root:
        Folder the image paths are relative to (LCS-558K ``images/``, COCO ``train2017/``; for
        Parquet/hf when the image column holds relative paths).
    name:
        The ``dataset`` column value (default: the format).
    instances:
        COCO only: ``instances_train2017.json``, for each image's dominant supercategory.
    meta:
        LCS-558K only: ``blip_laion_cc_sbu_558k_meta.json``, merged by id (adds ``url``,
        ``blip_caption``).
    image_column, text_column:
        Parquet/hf: the columns holding the image (bytes, a dict with bytes/path, or a path) and
        the caption.
    domain_key, domain_regex:
        The ``source`` column: the value of ``domain_key`` (``image`` for the image path, or any
        record / metadata key such as ``url``), reduced to the first group of ``domain_regex``
        when given (e.g. ``https?://([^/]+)/`` for the host). Empty: no ``source`` column.
    limit:
        Keep only the first ``limit`` records (0 = all).
    """

    format: str
    path: str
    image_root: str = ""
    name: str = ""
    instances: str = ""
    meta: str = ""
    image_column: str = "image"
    text_column: str = "caption"
    domain_key: str = ""
    domain_regex: str = ""
    limit: int = 0


@dataclass
class CorpusInfo:
    """What building a corpus found (written as ``corpus.json`` beside the data)."""

    rows: int = 0
    records: int = 0
    missing_images: int = 0
    missing_examples: list[str] = field(default_factory=list)
    per_dataset: dict[str, int] = field(default_factory=dict)


# Where each expected input comes from (shown when it is missing).
HINTS = {
    (
        "lcs558k",
        "path",
    ): "blip_laion_cc_sbu_558k.json, huggingface.co/datasets/liuhaotian/LLaVA-Pretrain",
    ("lcs558k", "image_root"): "images.zip of LLaVA-Pretrain, unzipped",
    ("lcs558k", "meta"): "blip_laion_cc_sbu_558k_meta.json, same place",
    ("coco", "path"): "annotations/captions_train2017.json, cocodataset.org",
    ("coco", "instances"): "annotations/instances_train2017.json, cocodataset.org",
    ("coco", "image_root"): "train2017/, cocodataset.org",
}


def missing_files(
    specs: Iterable[CorpusSpec], prefix: str = "data.corpora"
) -> list[str]:
    """Every input file or folder named by ``specs`` that does not exist, with where to get it."""
    out = []
    for i, spec in enumerate(specs):
        for name in ("path", "image_root", "instances", "meta"):
            value = getattr(spec, name)
            if value and not Path(value).expanduser().exists():
                hint = HINTS.get((spec.format, name))
                out.append(
                    f"{prefix}[{i}].{name} {value!r}" + (f" ({hint})" if hint else "")
                )
    return out


def _need(path: str, what: str, hint: str = "") -> Path:
    p = Path(path).expanduser()
    if not path or not p.exists():
        raise DataError(f"{what}: {path!r} does not exist{hint}")
    return p


def _read_json(path: Path) -> Any:
    """A corpus JSON file; not UTF-8 or not JSON is a DataError naming it and the line."""

    text = read_user_text(path, error=DataError)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None


def _domain(value: Any, regex: str) -> str:
    text = "" if value is None else str(value)
    if regex:
        m = re.search(regex, text)
        return m.group(1) if m and m.groups() else (m.group(0) if m else "unknown")
    return text


def _image_entry(value: Any, root: Path | None) -> dict[str, Any]:
    """A ``datasets.Image`` storage entry from a path, bytes or a {bytes, path} dict."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return {"bytes": value["bytes"], "path": value.get("path")}
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return {"bytes": bytes(value), "path": None}
    if not value:
        return {"bytes": None, "path": None}
    # os.path, not pathlib: this runs once a row (pathlib took 25 s of 60 on LCS-558K).
    p = os.path.expanduser(str(value))
    if root is not None and not os.path.isabs(p):
        p = os.path.join(root, p)
    return {"bytes": None, "path": p}


def _lcs_records(spec: CorpusSpec) -> Iterator[dict[str, Any]]:
    path = _need(
        spec.path,
        "data.corpora: lcs558k path",
        " (blip_laion_cc_sbu_558k.json from huggingface.co/datasets/liuhaotian/LLaVA-Pretrain)",
    )
    root = _need(
        spec.image_root,
        "data.corpora: lcs558k image_root",
        " (the unzipped images/ folder)",
    )
    records = _read_json(path)
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of LLaVA records")
    meta: dict[str, dict[str, Any]] = {}
    if spec.meta:
        for m in _read_json(_need(spec.meta, "data.corpora: lcs558k meta")):
            meta[str(m.get("id"))] = m
    for i, rec in enumerate(records):
        if spec.limit and i >= spec.limit:
            break
        try:
            turns = rec["conversations"]
            caption = next(t["value"] for t in turns if t.get("from") == "gpt")
            prompt = next(t["value"] for t in turns if t.get("from") == "human")
            image = rec["image"]
        except (KeyError, StopIteration, TypeError):
            raise DataError(
                f"{path}: record {i} (id {rec.get('id') if isinstance(rec, dict) else '?'}) "
                "lacks image / conversations with a human and a gpt turn"
            ) from None
        merged = {**meta.get(str(rec.get("id")), {}), **rec}
        out = {
            "id": str(rec.get("id", i)),
            "image": _image_entry(image, root),
            "caption": caption.strip(),
            "prompt": prompt.replace("<image>", "").strip(),
        }
        if spec.domain_key:
            out["source"] = _domain(merged.get(spec.domain_key), spec.domain_regex)
        yield out


def _coco_records(spec: CorpusSpec) -> Iterator[dict[str, Any]]:
    path = _need(
        spec.path,
        "data.corpora: coco path",
        " (annotations/captions_train2017.json from cocodataset.org)",
    )
    root = _need(
        spec.image_root,
        "data.corpora: coco image_root",
        " (the train2017/ image folder)",
    )
    data = _read_json(path)
    try:
        files = {int(im["id"]): im["file_name"] for im in data["images"]}
        annotations = data["annotations"]
    except (KeyError, TypeError):
        raise DataError(
            f"{path}: not a COCO captions file (needs images and annotations)"
        ) from None
    supercat: dict[int, str] = {}
    if spec.instances:
        inst = _read_json(_need(spec.instances, "data.corpora: coco instances"))
        cat_super = {int(c["id"]): c["supercategory"] for c in inst["categories"]}
        per_image: dict[int, Counter[str]] = {}
        for a in inst["annotations"]:
            per_image.setdefault(int(a["image_id"]), Counter())[
                cat_super[int(a["category_id"])]
            ] += 1
        # The dominant supercategory (most objects; ties by name).
        supercat = {
            i: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0]
            for i, c in per_image.items()
        }
    for i, a in enumerate(
        sorted(annotations, key=lambda a: (int(a["image_id"]), int(a["id"])))
    ):
        if spec.limit and i >= spec.limit:
            break
        image_id = int(a["image_id"])
        if image_id not in files:
            raise DataError(
                f"{path}: caption {a.get('id')} refers to unknown image {image_id}"
            )
        out = {
            "id": str(a["id"]),
            "image": _image_entry(files[image_id], root),
            "caption": str(a["caption"]).strip(),
            "prompt": "",
        }
        if spec.instances:
            out["supercategory"] = supercat.get(image_id, "none")
        if spec.domain_key:
            out["source"] = _domain(
                files[image_id]
                if spec.domain_key == "image"
                else a.get(spec.domain_key),
                spec.domain_regex,
            )
        yield out


def _check_parquet(file: str) -> None:
    """Read a Parquet file's footer (cheap): a file that is not Parquet is a DataError naming
    it, not a multi-line Arrow/datasets error from the middle of a build."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pq.read_schema(file)
    except (pa.ArrowException, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(
            f"data.corpora: {file!r} is not a readable Parquet file ({first})"
        ) from None


def _table_records(spec: CorpusSpec) -> Iterator[dict[str, Any]]:
    import datasets

    path = _need(spec.path, f"data.corpora: {spec.format} path")
    if spec.format == "hf":
        try:
            ds = datasets.load_from_disk(str(path))
        except (OSError, ValueError) as e:  # FileNotFoundError for a non-dataset folder
            raise DataError(
                f"data.corpora: {str(path)!r} is not a dataset saved by "
                f"datasets.save_to_disk ({type(e).__name__})"
            ) from None
    else:
        files = (
            sorted(str(p) for p in path.glob("*.parquet"))
            if path.is_dir()
            else [str(path)]
        )
        if not files:
            raise DataError(f"data.corpora: no .parquet files in {str(path)!r}")
        for f in files:
            _check_parquet(f)
        ds = datasets.load_dataset("parquet", data_files=files, split="train")
    for col in (spec.image_column, spec.text_column):
        if col not in ds.column_names:
            raise DataError(
                f"data.corpora: {str(path)!r} has no column {col!r} (columns: {', '.join(ds.column_names)})"
            )
    if spec.image_column in ds.features and isinstance(
        ds.features[spec.image_column], datasets.Image
    ):
        ds = ds.cast_column(spec.image_column, datasets.Image(decode=False))
    root = Path(spec.image_root).expanduser() if spec.image_root else None
    keep = [
        c for c in ds.column_names if c not in (spec.image_column, spec.text_column)
    ]
    for i, row in enumerate(ds):
        if spec.limit and i >= spec.limit:
            break
        out = {
            "id": str(row.get("id", i)),
            "image": _image_entry(row[spec.image_column], root),
            "caption": str(row[spec.text_column]).strip(),
            "prompt": "",
        }
        if spec.domain_key:
            value = (
                row[spec.image_column]
                if spec.domain_key == "image"
                else row.get(spec.domain_key)
            )
            if isinstance(value, dict):
                value = value.get("path")
            out["source"] = _domain(value, spec.domain_regex)
        for c in keep:
            if c not in out and isinstance(row[c], (str, int, float, bool)):
                out[c] = row[c]
        yield out


_READERS = {
    "lcs558k": _lcs_records,
    "coco": _coco_records,
    "parquet": _table_records,
    "hf": _table_records,
}


def _stat(path: str) -> list[Any]:
    p = Path(path).expanduser() if path else None
    if p is None or not p.exists():
        return [path]
    if p.is_dir():
        return [
            path,
            sorted(
                (f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in p.iterdir()
            ),
        ]
    st = p.stat()
    return [path, st.st_size, st.st_mtime_ns]


def _check_decodes(img: dict[str, Any], name: str, record: str) -> None:
    """``bad_images: fail`` promises to stop on a bad image: decode each one while the corpus
    is built, before a run folder exists, rather than in a worker rounds later."""

    try:
        decode_image(img)
    except Exception as e:  # PIL raises several types for a broken file
        where = img["path"] or "(embedded bytes)"
        # PIL names the stream object ("<_io.BytesIO object at 0x…>"): no help to a user.
        first = re.sub(r" ?<[^>]*>", "", str(e).splitlines()[0] if str(e) else "")
        raise DataError(
            f"data.corpora ({name}): image {where!r} of record {record} cannot be "
            f"decoded ({first or type(e).__name__})"
        ) from None


def corpus_key(specs: Iterable[CorpusSpec], bad_images: str) -> str:
    """Cache key of a built corpus: the specs, their files' sizes and times, the policy."""
    payload = [
        {
            **spec.__dict__,
            "_files": [_stat(spec.path), _stat(spec.instances), _stat(spec.meta)],
        }
        for spec in specs
    ]
    blob = json.dumps([payload, bad_images, 1], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def open_corpus(path: Path) -> Any:
    """A built corpus with ``image`` as a lazily decoding ``datasets.Image`` column."""
    import datasets

    ds = datasets.load_from_disk(str(path))
    return ds.cast_column("image", datasets.Image())


def build_corpus(
    specs: list[CorpusSpec], out: Path, bad_images: str = "skip"
) -> CorpusInfo:
    """Read every spec, check images, write one Arrow dataset to ``out`` (atomically)."""
    import datasets

    if bad_images not in ("skip", "fail"):
        raise DataError(f"data.bad_images: must be skip or fail, got {bad_images!r}")
    # The build may run before a run's progress display (so that bad input is found
    # before the run folder exists): datasets' own bars would break the one-line errors.
    datasets.disable_progress_bars()
    for spec in specs:
        if spec.format not in _READERS:
            raise DataError(
                f"data.corpora: unknown format {spec.format!r} (known: {', '.join(_READERS)})"
            )
    info = CorpusInfo()
    columns: list[str] = []
    chunks: list[datasets.Dataset] = []
    buffer: list[dict[str, Any]] = []

    def flush() -> None:
        if buffer:
            chunks.append(datasets.Dataset.from_list(list(buffer)))
            buffer.clear()

    for spec in specs:
        name = spec.name or spec.format
        for rec in _READERS[spec.format](spec):
            info.records += 1
            img = rec["image"]
            if img["bytes"] is None and (
                not img["path"] or not os.path.exists(img["path"])
            ):
                info.missing_images += 1
                if bad_images == "fail":
                    raise DataError(
                        f"data.corpora ({name}): image {img['path']!r} of record {rec['id']} is missing"
                    )
                if len(info.missing_examples) < 10:
                    info.missing_examples.append(str(img["path"]))
                continue
            if bad_images == "fail":
                _check_decodes(img, name, rec["id"])
            rec["dataset"] = name
            for c in rec:
                if c not in columns:
                    columns.append(c)
            buffer.append(rec)
            info.per_dataset[name] = info.per_dataset.get(name, 0) + 1
            if len(buffer) >= CHUNK:
                flush()
    flush()
    if not chunks:
        raise DataError(
            "data.corpora: no usable records (every image missing, or empty inputs)"
        )
    # Align columns across corpora (a metadata column missing in one corpus is empty there).
    aligned = []
    for ds in chunks:
        for c in columns:
            if c not in ds.column_names:
                ds = ds.add_column(c, [""] * len(ds))
        aligned.append(
            ds.select_columns(columns).cast_column("image", _image_storage())
        )
    full = datasets.concatenate_datasets(aligned)
    info.rows = len(full)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out.parent))
    try:
        full.save_to_disk(str(tmp))
        (tmp / "corpus.json").write_text(json.dumps(info.__dict__, indent=2))
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return info


def ensure_corpus(
    cache_dir: Path, specs: list[CorpusSpec], bad_images: str = "skip"
) -> Path:
    """The folder of the built corpus for ``specs`` in ``cache_dir`` (built if missing)."""
    path = Path(cache_dir) / "corpora" / corpus_key(specs, bad_images)
    if not (path / "corpus.json").exists():
        build_corpus(specs, path, bad_images)
    return path


def read_info(path: Path) -> dict[str, Any]:
    p = Path(path) / "corpus.json"
    return json.loads(p.read_text()) if p.exists() else {}
