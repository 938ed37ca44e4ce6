"""Reference images (image-to-image): sent as content parts, hashed into the item key."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from PIL import Image

from pipeline.simulator import Simulator
from tests.conftest import metadata, run, write_manifest


def picture(path: Path, size: tuple[int, int], colour: str) -> str:
    Image.new("RGB", size, colour).save(path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_reference_images_reach_the_provider_and_the_output_keeps_their_size(
    tmp_path: Path, sim: Simulator
) -> None:
    first, second = (
        picture(tmp_path / "a.png", (640, 480), "red"),
        picture(tmp_path / "b.jpg", (300, 200), "blue"),
    )
    jobs = [
        {"id": "edit", "prompt": "make it blue", "images": [str(tmp_path / "a.png"), "b.jpg"], "count": 2}
    ]
    manifest = write_manifest(tmp_path, jobs)
    assert run("run", manifest) == 0
    assert list(sim.stats.reference_images) == [first, second] * 2  # both parts, in order, exact bytes
    rows = metadata(tmp_path / "out")
    assert [(r["width"], r["height"]) for r in rows] == [(640, 480)] * 2  # no aspect ratio: input size
    assert {r["aspect_ratio"] for r in rows} == {None} and not any(r["aspect_ratio_mismatch"] for r in rows)


def test_an_aspect_ratio_still_applies_to_an_edit(tmp_path: Path, sim: Simulator) -> None:
    picture(tmp_path / "a.png", (640, 480), "red")
    manifest = write_manifest(
        tmp_path, [{"id": "e", "prompt": "x", "images": ["a.png"], "aspect_ratio": "16:9"}]
    )
    assert run("run", manifest) == 0
    assert [(r["width"], r["height"]) for r in metadata(tmp_path / "out")] == [(1344, 768)]


def test_changing_the_input_image_regenerates(tmp_path: Path, sim: Simulator) -> None:
    picture(tmp_path / "a.png", (64, 64), "red")
    manifest = write_manifest(tmp_path, [{"id": "e", "prompt": "x", "images": ["a.png"]}])
    assert run("run", manifest) == 0
    assert run("run", manifest) == 0
    assert sim.stats.generations == 1  # unchanged input: nothing to pay for
    new = picture(tmp_path / "a.png", (64, 64), "green")
    assert run("run", manifest) == 0
    assert sim.stats.generations == 2 and sim.stats.reference_images[-1] == new


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (None, "jobs[0].images[0]: no such file"),
        (lambda p: p.write_text("not an image"), "jobs[0].images[0]: cannot identify image file"),
    ],
    ids=["missing", "not an image"],
)
def test_bad_reference_images_are_manifest_errors(
    make: object, expected: str, tmp_path: Path, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    if callable(make):
        make(tmp_path / "a.png")
    manifest = write_manifest(tmp_path, [{"id": "e", "prompt": "x", "images": ["a.png"]}])
    assert run("run", manifest) == 2
    assert expected in capsys.readouterr().err and sim.stats.requests == 0


def test_a_reference_image_over_the_size_limit_is_refused(
    tmp_path: Path, sim: Simulator, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("pipeline.manifest.MAX_REFERENCE_BYTES", 100)
    picture(tmp_path / "a.png", (64, 64), "red")
    manifest = write_manifest(tmp_path, [{"id": "e", "prompt": "x", "images": ["a.png"]}])
    assert run("run", manifest) == 2
    assert "byte limit for a reference image" in capsys.readouterr().err
