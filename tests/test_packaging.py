"""algorithms/, scenarios/ and eval/ install under the fedsim namespace, in a wheel too."""

import subprocess
import sys
import zipfile
from pathlib import Path

import fedsim.algorithms
import fedsim.eval.toy
import fedsim.scenarios
from fedsim.models.toy_reference import REFERENCE_FILES

ROOT = Path(__file__).resolve().parents[1]


def test_editable_namespace_maps_the_top_level_folders():
    assert Path(fedsim.algorithms.__file__).parent == ROOT / "algorithms"
    assert Path(fedsim.eval.toy.__file__).parent == ROOT / "eval"
    assert "toy-iid" in fedsim.scenarios.presets()


def test_wheel_layout(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("fedsim-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in (
        "fedsim/cli.py",
        "fedsim/algorithms/fedavg.py",
        "fedsim/algorithms/base.py",
        "fedsim/scenarios/toy-iid.yaml",
        "fedsim/eval/toy.py",
        *(f"fedsim/models/toy-reference/{rel}" for rel in REFERENCE_FILES),
    ):
        assert required in names
    assert REFERENCE_FILES  # the shipped toy backbone goes into the wheel, every file
    top_level = {n.split("/")[0] for n in names}
    assert not top_level & {"algorithms", "scenarios", "eval", "tests"}
