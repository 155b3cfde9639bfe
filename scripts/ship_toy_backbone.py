"""Ship a built toy backbone as the package's reference: copy it and rewrite its hash table.

    python scripts/ship_toy_backbone.py ~/.cache/fedsim/backbones/toy-<key>

Copies the folder to fedsim/models/toy-reference/ (replacing what is there) and rewrites the
generated table in fedsim/models/toy_reference.py with every file's size and SHA-256. Run it
only with a build that passed its skill gates (``fedsim backbones build toy`` says so).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from fedsim.runio import file_sha256  # noqa: E402

DEST = ROOT / "fedsim" / "models" / "toy-reference"
MODULE = ROOT / "fedsim" / "models" / "toy_reference.py"


def main(src: Path) -> None:
    manifest = json.loads((src / "fedsim.json").read_text())
    if not manifest.get("gates", {}).get("passed"):
        sys.exit(
            f"error: {src}: the build did not pass its skill gates; not shipping it"
        )
    if DEST.exists():
        shutil.rmtree(DEST)
    shutil.copytree(src, DEST)
    files = sorted(p for p in DEST.rglob("*") if p.is_file())
    # The layout ruff format gives the table, so that shipping leaves nothing to reformat.
    rows = "".join(
        f'    "{p.relative_to(DEST).as_posix()}": (\n'
        f"        {p.stat().st_size},\n"
        f'        "{file_sha256(p)}",\n'
        "    ),\n"
        for p in files
    )
    table = f"REFERENCE_FILES: dict[str, tuple[int, str]] = {{\n{rows}}}\n"
    text = MODULE.read_text()
    text = re.sub(
        r"REFERENCE_FILES: dict\[str, tuple\[int, str\]\] = \{.*?\n?\}\n",
        lambda _: table,
        text,
        count=1,
        flags=re.S,
    )
    MODULE.write_text(text)
    total = sum(p.stat().st_size for p in files)
    print(f"shipped {len(files)} files, {total / 2**20:.2f} MiB, from {src} to {DEST}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]).expanduser())
