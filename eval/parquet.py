"""Reading lmms-eval's Parquet releases of the benchmarks.

lmms-eval (EvolvingLMMs-Lab/lmms-eval, ``lmms_eval/tasks/<task>/*.yaml`` ``dataset_path``)
evaluates from Hugging Face datasets saved by ``datasets`` as Parquet shards
(``data/<split>-0000k-of-0000n.parquet`` in ``lmms-lab/MME``, ``lmms-lab/MMVet``, ...). An
``Image`` feature is stored as a struct ``{bytes, path}`` (``Sequence(Image)``: a list of
them), the encoded file as it was uploaded. These helpers find the shards, iterate rows
with their row numbers (so an error can name file, row and column), and take the encoded
bytes out of an image cell; each benchmark module maps the columns to its
:class:`~fedsim.eval.benchmark.Question` objects.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from fedsim.eval.benchmark import BenchmarkError, string_cell

#: Rows converted to Python objects at a time (image bytes included).
BATCH_ROWS = 64

Row = dict[str, Any]


def parquet_files(path: Path) -> list[Path]:
    """``[path]`` for a ``.parquet`` file, a folder's ``*.parquet`` shards (sorted), or
    ``[]`` when ``path`` is neither."""
    path = Path(path)
    if path.is_file():
        return [path] if path.suffix == ".parquet" else []
    if path.is_dir():
        return sorted(p for p in path.glob("*.parquet") if p.is_file())
    return []


def iter_rows(
    files: Sequence[Path],
    required: Sequence[str],
    optional: Sequence[str] = (),
    heavy: Sequence[str] = ("image",),
    keep: Callable[[Row], bool] | None = None,
) -> Iterator[tuple[Path, int, Row]]:
    """``(file, row, {column: value})`` for every row of ``files``, rows numbered from 0.

    Parameters
    ----------
    required:
        Columns every file must have (a missing one is a :class:`BenchmarkError` naming
        the file).
    optional:
        Columns read when present; absent ones are absent from the row dict.
    heavy:
        Columns converted to Python only for kept rows (images, video frames).
    keep:
        Sees the other columns; rows it rejects are skipped (their numbers still count).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    for path in files:
        try:
            reader = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as e:
            raise BenchmarkError(f"{path}: not a readable Parquet file ({e})") from None
        names = reader.schema_arrow.names
        missing = [c for c in required if c not in names]
        if missing:
            raise BenchmarkError(
                f"{path}: Parquet column(s) {missing} missing (columns: {names})"
            )
        columns = [c for c in dict.fromkeys([*required, *optional]) if c in names]
        light = [c for c in columns if c not in heavy]
        n = 0
        try:
            for batch in reader.iter_batches(batch_size=BATCH_ROWS, columns=columns):
                rows = batch.select(light).to_pylist()
                lazy = {c: batch.column(c) for c in columns if c in heavy}
                for i, row in enumerate(rows):
                    if keep is None or keep(row):
                        for c, values in lazy.items():
                            row[c] = values[i].as_py()
                        yield path, n, row
                    n += 1
        except (pa.ArrowException, OSError) as e:
            raise BenchmarkError(
                f"{path}: row {n}: not a readable Parquet file ({e})"
            ) from None


def image_bytes(value: Any, path: Path, n: int, column: str = "image") -> bytes:
    """The encoded image in a ``datasets`` Image cell (``{bytes, path}``, or raw bytes)."""
    data = value.get("bytes") if isinstance(value, Mapping) else value
    if not isinstance(data, bytes) or not data:
        raise BenchmarkError(f"{path}: row {n}: column {column!r} holds no image bytes")
    return data


def string(row: Row, column: str, path: Path, n: int) -> str:
    """``row[column]`` when it is a string; otherwise an error naming file, row, column."""
    return string_cell(row, column, f"{path}: row {n}")


def first_column(names: Sequence[str], files: Sequence[Path]) -> str:
    """The first of ``names`` (spellings of one column) that the first file has."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        have = pq.read_schema(files[0]).names
    except (pa.ArrowException, OSError) as e:
        raise BenchmarkError(f"{files[0]}: not a readable Parquet file ({e})") from None
    for name in names:
        if name in have:
            return name
    raise BenchmarkError(
        f"{files[0]}: Parquet column {' / '.join(map(repr, names))} missing "
        f"(columns: {have})"
    )
