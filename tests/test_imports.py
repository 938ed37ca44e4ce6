"""Leaf modules stay leaves: what importing a module loads, in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import PYTHON


def loaded_by(module: str) -> set[str]:
    code = f"import sys, json, {module}; print(json.dumps(sorted(sys.modules)))"
    found = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    return set(json.loads(found.stdout))


@pytest.mark.parametrize(
    "module", ["pipeline.item", "pipeline.locations", "pipeline.retry", "pipeline.events"]
)
def test_leaf_modules_import_nothing_of_ours_but_errors(module: str) -> None:
    ours = {name for name in loaded_by(module) if name.startswith("pipeline.")}
    assert ours <= {module, "pipeline.errors"}


def test_the_manifest_loads_neither_aiohttp_nor_pillow_nor_the_state() -> None:
    loaded = loaded_by("pipeline.manifest")
    assert not {"aiohttp", "PIL", "pipeline.state", "pipeline.storage", "pipeline.download"} & loaded


def test_a_run_does_not_import_the_simulator() -> None:
    loaded = loaded_by("pipeline.cli, pipeline.runner, pipeline.batch, pipeline.run")
    assert "pipeline.simulator" not in loaded and "psycopg" not in loaded
