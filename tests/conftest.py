"""Shared fixtures: the shipped toy backbone, the user's cache, small datasets, one Ray session."""

from __future__ import annotations

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """The user's fedsim cache (so a backbone built by `make run` is reused, and vice versa)."""
    from fedsim.runio import default_cache_dir

    path = default_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def toy_path() -> Path:
    """The default toy backbone: the reference shipped in the package, checked by SHA-256."""
    from fedsim.models.toy_reference import reference_toy_backbone

    return reference_toy_backbone()


@pytest.fixture(scope="session")
def toy(toy_path: Path):
    from fedsim.models.backbone import load_backbone

    return load_backbone(toy_path)


@pytest.fixture(scope="session")
def ray_session():
    """One private local Ray for the whole session (2 CPUs, as on the CI machine).

    ``address="local"`` as the driver does: a bare ``ray.init()`` joins any Ray already running
    on the machine (RAY_ADDRESS, or a live GCS found by process scan), and then refuses
    ``num_cpus`` (a CI run on a machine with another user's Ray failed every Ray test so).
    """
    import ray

    if not ray.is_initialized():
        import logging

        from fedsim.raystart import loopback_only

        with loopback_only():
            ray.init(
                address="local",
                num_cpus=2,
                include_dashboard=False,
                logging_level=logging.ERROR,
            )
    yield ray
    ray.shutdown()
