"""The table of known models: image sizes validated before any request, sizes checked, prices used."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.item import item_fingerprint
from pipeline.presets import ASPECT_RATIOS, MODELS, expected_size, list_price
from pipeline.simulator import Simulator
from tests.conftest import assert_dataset_consistent, metadata, run, write_manifest

PRO = "gemini-3-pro-image-preview"
FLASH = "gemini-2.5-flash-image"


def test_table() -> None:
    assert expected_size(FLASH, "16:9", None) == ASPECT_RATIOS["16:9"] == (1344, 768)
    assert expected_size(PRO, "16:9", None) == expected_size(PRO, "16:9", "1K") == (1376, 768)
    assert expected_size(PRO, "16:9", "4K") == (5504, 3072)
    assert expected_size(PRO, "21:9", "2K") == (3168, 1344)
    assert expected_size("some-new-model", "1:1", None) is None
    assert expected_size(FLASH, None, None) is None  # an edit keeps its input's size
    assert (list_price(FLASH, None), list_price(PRO, "2K"), list_price(PRO, "4K")) == (0.039, 0.134, 0.24)
    assert list_price("some-new-model", None) == 0.039
    for spec in MODELS.values():
        assert all(set(ratios) == set(ASPECT_RATIOS) for ratios in spec.sizes.values())


BAD = {
    "flash takes no image_size": (
        FLASH,
        'defaults: {image_size: "2K"}\n',
        'defaults.image_size: "2K": gemini-2.5-flash-image takes no image_size',
    ),
    "a job's image_size on flash": (
        FLASH,
        "",
        'jobs[1].image_size: "4K": gemini-2.5-flash-image takes no image_size (only gemini-3-pro-image-preview do) (line 5)',
    ),
    "an unknown image size": (
        PRO,
        'defaults: {image_size: "8K"}\n',
        'defaults.image_size: "8K" is not one of "1K", "2K", "4K" (line 2)',
    ),
}


@pytest.mark.parametrize(("model", "top", "expected"), BAD.values(), ids=BAD.keys())
def test_image_size_validated_against_the_model(
    model: str, top: str, expected: str, tmp_path: Path, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "m.yaml"
    jobs = (
        '  - {id: a, prompt: x}\n  - {id: b, prompt: y, image_size: "4K"}\n'
        if not top
        else "  - {prompt: x}\n"
    )
    path.write_text(f"api: {{model: {model}}}\n{top}output: {tmp_path / 'out'}\njobs:\n{jobs}")
    assert run("run", path) == 2
    err = capsys.readouterr().err
    assert f"{path}: {expected}" in err, err
    assert sim.stats.requests == 0


def test_unknown_model_is_allowed_with_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "m.yaml"
    path.write_text("api: {model: imagen-9}\njobs:\n  - {prompt: x}\n")
    assert run("validate", path) == 0
    captured = capsys.readouterr()
    assert "valid: 1 jobs, 1 items" in captured.out
    assert captured.err.startswith(
        f"warning: {path}: api.model: imagen-9 is not in the table of known models"
    )


def test_image_size_is_part_of_the_fingerprint_only_when_set() -> None:
    assert item_fingerprint("x", "1:1", PRO) == item_fingerprint("x", "1:1", PRO, (), None)
    assert item_fingerprint("x", "1:1", PRO, (), "2K") != item_fingerprint("x", "1:1", PRO, (), "4K")


def test_pro_model_end_to_end_with_sizes_checked_and_priced(
    tmp_path: Path, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    jobs = [
        {"id": "one-k", "prompt": "a lighthouse", "aspect_ratio": "16:9"},
        {"id": "four-k", "prompt": "a harbour", "aspect_ratio": "16:9", "image_size": "4K", "count": 2},
    ]
    manifest = write_manifest(tmp_path, jobs, api={"model": PRO})
    assert run("run", manifest, "--dry-run", "--log-format", "json") == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["paid_requests"] == 3 and plan["cost_usd"] == round(0.134 + 2 * 0.24, 2)
    assert run("run", manifest, "--max-requests", "1") == 0  # the 1K image, full size
    sim.config.image_scale = 8  # then 4K pictures, small: the size check must notice
    assert run("run", manifest) == 0
    rows = {r["file_name"]: r for r in assert_dataset_consistent(tmp_path / "out")}
    one = rows["images/one-k_0.png"]
    assert (one["width"], one["height"], one["image_size"], one["model"]) == (1376, 768, None, PRO)
    assert not one["aspect_ratio_mismatch"]
    four = rows["images/four-k_0.png"]
    assert (four["width"], four["height"], four["image_size"]) == (5504 // 8, 3072 // 8, "4K")
    assert four["aspect_ratio_mismatch"]  # checked against the model's 4K size, 5504x3072
    assert "asked 16:9 at 4K (5504x3072)" in capsys.readouterr().err
    assert len(metadata(tmp_path / "out")) == sim.stats.generations == 3
