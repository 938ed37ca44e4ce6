"""The model catalog: data shipped in the package and extended by a manifest; ratios and sizes
validated before any request, sizes checked, prices used, lifecycles warned about."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import pytest

from pipeline.catalog import Model, ModelEntry, shipped, strip_version
from pipeline.item import item_fingerprint
from pipeline.manifest import lifecycle_warnings
from pipeline.simulator import Simulator
from tests.conftest import assert_dataset_consistent, failures, metadata, run, write_manifest

PRO = "gemini-3-pro-image"
FLASH = "gemini-2.5-flash-image"
NANO2 = "gemini-3.1-flash-image"


def model(name: str) -> Model:
    found = shipped().find(name)
    assert found is not None, name
    return found


def test_the_shipped_catalog() -> None:
    for name in (
        FLASH,
        NANO2,
        PRO,
        "gemini-3-pro-image-preview",
        "gemini-3.1-flash-lite-image",
        "gpt-image-2",
    ):
        entry = model(name).entry
        assert entry.source and entry.as_of and entry.protocols, name
    assert model(FLASH).expected("16:9", None) == (1344, 768)
    assert model(PRO).expected("16:9", None) == model(PRO).expected("16:9", "1K") == (1376, 768)
    assert model(PRO).expected("21:9", "2K") == (3168, 1344) and model(PRO).expected("16:9", "4K") == (
        5504,
        3072,
    )
    assert len(model(NANO2).aspect_ratios) == 14 and model(NANO2).image_sizes == ["512", "1K", "2K", "4K"]
    assert model("gemini-3.1-flash-lite-image").image_sizes == ["1K"]
    assert (model(FLASH).price(None), model(PRO).price("2K"), model(PRO).price("4K")) == (0.039, 0.134, 0.24)
    assert (model(NANO2).price("512"), model(NANO2).price(None), model(NANO2).price("4K", "batch")) == (
        0.045,
        0.067,
        0.0755,
    )
    assert model(FLASH).price(None, "flex") == 0.0195
    preview = model("gemini-3-pro-image-preview")  # its GA model's fields, a lifecycle of its own
    assert preview.expected("16:9", "4K") == (5504, 3072) and preview.entry.replacement == PRO
    assert model("nano-banana-2").name == NANO2 and model("models/gemini-3-pro-image-001").name == PRO
    assert shipped().find("some-new-model") is None


@pytest.mark.parametrize(
    ("name", "ratio", "size", "pixels", "matches"),
    [
        (FLASH, "16:9", None, (1344, 768), True),  # exact, where published
        (FLASH, "16:9", None, (1024, 1024), False),  # a relay that ignores the ratio
        (FLASH, None, None, (640, 480), None),  # an edit keeps its input's size: nothing to check
        (NANO2, "8:1", "1K", (2896, 362), True),  # no table: the ratio within 3%, the area in 1K's band
        (NANO2, "8:1", "1K", (2048, 256), True),
        (NANO2, "8:1", "2K", (2896, 362), False),  # a 1K area for 2K
        (NANO2, "1:4", "512", (256, 1024), True),
        (NANO2, "16:9", "1K", (1024, 1024), False),
        ("gpt-image-2", "1:1", None, (1024, 1024), True),
        ("gpt-image-2", "5:2", None, (1600, 640), True),  # any ratio within 1:3..3:1
    ],
)
def test_the_size_check(
    name: str, ratio: str | None, size: str | None, pixels: tuple[int, int], matches: bool | None
) -> None:
    assert model(name).size_matches(ratio, size, *pixels) is matches


@pytest.mark.parametrize(
    ("name", "ratio", "takes"),
    [
        (NANO2, "1:8", True),
        (NANO2, "3:5", False),
        (FLASH, "1:4", False),
        ("gpt-image-2", "5:2", True),
        ("gpt-image-2", "4:1", False),
    ],
)
def test_ratios_by_the_model(name: str, ratio: str, takes: bool) -> None:
    assert model(name).takes_ratio(ratio) is takes


def test_lifecycle_warnings_are_pure() -> None:
    preview = model("gemini-3-pro-image-preview")
    assert lifecycle_warnings("m.yaml: api.model", preview, date(2026, 12, 4)) == [
        "m.yaml: api.model: gemini-3-pro-image-preview's announced shutdown (2026-06-25) has passed:"
        " use gemini-3-pro-image"
    ]
    assert lifecycle_warnings("x", preview, date(2026, 6, 1)) == [
        "x: gemini-3-pro-image-preview's announced shutdown (2026-06-25) is within 30 days: use gemini-3-pro-image"
    ]
    assert lifecycle_warnings("x", preview, date(2026, 5, 1)) == []  # more than 30 days away
    assert lifecycle_warnings("x", model(NANO2), date(2026, 12, 4)) == []


def test_version_suffixes() -> None:
    assert [strip_version(n) for n in ("models/gemini-3-pro-image-001", "gpt-image-2-2026-03-01", NANO2)] == [
        PRO,
        "gpt-image-2",
        NANO2,
    ]
    assert shipped().same_model(PRO, "gemini-3-pro-image-001") and shipped().same_model(
        NANO2, "nano-banana-2"
    )
    assert not shipped().same_model("gemini-3-pro-image-preview", PRO)  # re-routed to another model


BAD = {
    "flash takes no image_size": (
        FLASH,
        'defaults: {image_size: "2K"}\n',
        'defaults.image_size: "2K": gemini-2.5-flash-image takes no image_size',
    ),
    "a job's image_size on flash": (
        FLASH,
        "",
        'jobs[1].image_size: "4K": gemini-2.5-flash-image takes no image_size (line 5)',
    ),
    "an image size the model has not": (
        PRO,
        'defaults: {image_size: "512"}\n',
        'defaults.image_size: "512" is not one of 1K, 2K, 4K',
    ),
    "not a size at all": (
        PRO,
        'defaults: {image_size: "big"}\n',
        'defaults.image_size: "big" is not a size such as "1K" (line 2)',
    ),
    "a ratio flash does not offer": (
        FLASH,
        'defaults: {aspect_ratio: "8:1"}\n',
        'defaults.aspect_ratio: "8:1" is not offered by gemini-2.5-flash-image (it takes 1:1, 2:3',
    ),
    "an unquoted ratio": (
        NANO2,
        "defaults: {aspect_ratio: 16:9}\n",
        "(quote it: YAML reads 16:9 unquoted as a number)",
    ),
}


@pytest.mark.parametrize(("name", "top", "expected"), BAD.values(), ids=BAD.keys())
def test_ratios_and_sizes_validated_against_the_model(
    name: str, top: str, expected: str, tmp_path: Path, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "m.yaml"
    jobs = (
        '  - {id: a, prompt: x}\n  - {id: b, prompt: y, image_size: "4K"}\n'
        if not top
        else "  - {prompt: x}\n"
    )
    path.write_text(f"api: {{model: {name}}}\n{top}output: {tmp_path / 'out'}\njobs:\n{jobs}")
    assert run("run", path) == 2
    err = capsys.readouterr().err
    assert expected in err, err
    assert sim.stats.requests == 0


def test_nano_banana_2_ratios_and_sizes_validate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = tmp_path / "prompts.jsonl"
    rows.write_text(
        '{"prompt": "a tall tower", "aspect_ratio": "1:8"}\n{"prompt": "a wide bay", "aspect_ratio": "3:5"}\n'
    )
    jobs = [
        {"prompt": "a long train", "aspect_ratio": "8:1", "image_size": "512"},
        {"prompt": "a tall tree", "aspect_ratio": "1:4", "image_size": "4K"},
        {"prompts_file": "prompts.jsonl"},
    ]
    path = write_manifest(tmp_path, jobs, api={"model": NANO2})
    assert run("validate", path) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        f'{rows}: line 2: aspect_ratio: "3:5" is not offered by gemini-3.1-flash-image (it takes'
        " 1:1, 2:3, 3:2, 3:4, 4:3, 4:5, 5:4, 9:16, 16:9, 21:9, 1:4, 4:1, 1:8, 8:1)"
    ]
    rows.write_text('{"prompt": "a tall tower", "aspect_ratio": "1:8"}\n')
    assert run("validate", path) == 0


def test_an_unknown_model_is_allowed_with_one_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "m.yaml"
    path.write_text('api: {model: imagen-9}\njobs:\n  - {prompt: x, aspect_ratio: "7:3", image_size: "3K"}\n')
    assert run("validate", path) == 0
    captured = capsys.readouterr()
    assert "valid: 1 jobs, 1 items" in captured.out
    assert captured.err.strip().splitlines() == [
        f"warning: {path}: api.model: imagen-9 is not in the model catalog (`pipeline models`): any W:H ratio"
        " and image size are passed through, sizes are not checked, and its price is unknown: set"
        " price_per_image, or describe it under models:"
    ]
    assert run("run", path, "--dry-run") == 0
    assert "price unknown for 1 of them" in capsys.readouterr().out


def test_a_model_described_in_the_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    models = {
        "acme-image-9": {
            "aspect_ratios": ["1:1", "3:2", "2:3"],
            "image_sizes": ["1K", "2K"],
            "sizes": {"1K": {"1:1": "1024x1024"}},
            "price_per_image": {"1K": 0.05, "2K": 0.08},
        }
    }
    jobs = [
        {"id": "a", "prompt": "x", "image_size": "2K", "count": 2},
        {"id": "b", "prompt": "y", "image_size": "1K"},
    ]
    path = write_manifest(tmp_path, jobs, api={"model": "acme-image-9"}, models=models)
    assert run("run", path, "--dry-run", "--log-format", "json") == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["cost_usd"] == round(2 * 0.08 + 0.05, 2) and captured.err == ""
    (tmp_path / "bad").mkdir()
    bad = write_manifest(
        tmp_path / "bad",
        [{"prompt": "x", "aspect_ratio": "16:9"}],
        api={"model": "acme-image-9"},
        models=models,
    )
    assert run("validate", bad) == 2
    assert 'jobs[0].aspect_ratio: "16:9" is not offered by acme-image-9' in capsys.readouterr().err
    assert run("models", path) == 0 and "acme-image-9" in capsys.readouterr().out
    assert ModelEntry.model_validate(models["acme-image-9"]).sizes["1K"]["1:1"] == "1024x1024"


def test_pipeline_models_lists_the_catalog(capsys: pytest.CaptureFixture[str]) -> None:
    assert run("models") == 0
    listed = capsys.readouterr().out
    assert (
        NANO2 in listed
        and "gemini-3-pro-image-preview" in listed
        and "announced shutdown 2026-06-25 (passed)" in listed
    )
    assert run("models", "--json") == 0
    entries = json.loads(capsys.readouterr().out)
    assert entries[NANO2]["image_sizes"] == ["512", "1K", "2K", "4K"] and entries["gpt-image-2"][
        "protocols"
    ] == ["openai-images"]


def test_a_retired_model_is_a_warning_at_validate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_manifest(tmp_path, [{"prompt": "x"}], api={"model": "gemini-3-pro-image-preview"})
    assert run("validate", path) == 0
    assert (
        "gemini-3-pro-image-preview's announced shutdown (2026-06-25) has passed: use gemini-3-pro-image"
        in (capsys.readouterr().err)
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
    err = capsys.readouterr().err
    assert err.count("asked 16:9 at 4K (5504x3072)") == 1  # once per provider, with a count
    assert len(metadata(tmp_path / "out")) == sim.stats.generations == 3


def test_nano_banana_2_end_to_end(tmp_path: Path, sim: Simulator) -> None:
    jobs = [{"id": "w", "prompt": "a wide shore", "aspect_ratio": "8:1", "image_size": "512"}]
    manifest = write_manifest(tmp_path, jobs, api={"model": NANO2})
    assert run("run", manifest) == 0
    [row] = assert_dataset_consistent(tmp_path / "out")
    assert row["width"] / row["height"] == pytest.approx(8, rel=0.03) and not row["aspect_ratio_mismatch"]


def test_a_relay_that_ignores_the_ratio_is_reported_once_or_disabled(
    tmp_path: Path, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    sim.config.ignore_aspect_ratio = True
    jobs = [{"id": "r", "prompt": "a ridge", "aspect_ratio": "16:9", "count": 8}]
    keep = write_manifest(tmp_path, jobs, concurrency=2)
    assert run("run", keep, "--log-format", "json") == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sum(e["event"] == "item_warning" for e in events) == 1
    assert events[-1]["size_mismatches"] == {"default": 8}
    assert all(row["aspect_ratio_mismatch"] for row in metadata(tmp_path / "out"))
    (tmp_path / "strict").mkdir()
    strict = write_manifest(tmp_path / "strict", jobs, concurrency=1, on_size_mismatch="fail")
    assert run("run", strict, "--quiet") == 3  # five in a row, none matching: misconfigured
    assert "misconfigured: 5 images in a row of another size" in capsys.readouterr().err
    out = tmp_path / "strict" / "out"
    assert not list((out / "images").iterdir())  # none kept
    sim.config.ignore_aspect_ratio = False  # the relay fixed: a plain rerun makes them all
    assert run("run", strict, "--quiet") == 0 and len(metadata(out)) == 8


def test_a_retired_model_disables_its_provider_and_another_finishes(
    tmp_path: Path, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    sim.config.retired_models = ("gemini-3-pro-image-preview",)  # OpenAI's model_not_found, deprecated
    providers = [
        {"name": "old", "base_url": sim.base_url, "model": "gemini-3-pro-image-preview"},
        {"name": "new", "base_url": sim.base_url, "priority": 2},
    ]
    jobs = [{"id": "t", "prompt": "a tower", "count": 6}]
    manifest = write_manifest(tmp_path, jobs, providers=providers, model=PRO, concurrency=1)
    assert run("run", manifest, "--quiet") == 0
    err = capsys.readouterr().err
    assert "provider old disabled for the rest of the run: model gemini-3-pro-image-preview is retired" in err
    assert "the catalog's replacement: gemini-3-pro-image" in err
    assert {row["provider"] for row in metadata(tmp_path / "out")} == {"new"} and sim.stats.generations == 6
    assert sim.stats.faults["retired"] == 1  # disabled at the first answer


@pytest.mark.usefixtures("gemini_key")
def test_googles_404_for_a_shut_down_model_is_exit_3_with_items_resumable(
    tmp_path: Path, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    sim.config.retired_models = (NANO2 + "-preview",)
    providers = [
        {"name": "google", "protocol": "gemini", "base_url": sim.origin, "model": NANO2 + "-preview"}
    ]
    manifest = write_manifest(
        tmp_path, [{"prompt": "a preview", "count": 5}], providers=providers, model=NANO2
    )
    assert run("run", manifest, "--quiet") == 3
    assert "the catalog's replacement: gemini-3.1-flash-image" in capsys.readouterr().err
    assert sim.stats.requests <= 5 and metadata(tmp_path / "out") == [] and failures(tmp_path / "out") == []
    providers[0]["model"] = NANO2  # pointed at the replacement: the same items, all made
    manifest = write_manifest(
        tmp_path, [{"prompt": "a preview", "count": 5}], providers=providers, model=NANO2
    )
    assert run("run", manifest, "--quiet") == 0 and len(metadata(tmp_path / "out")) == 5


def test_a_relay_that_serves_another_model_is_recorded_and_priced_by_it(
    tmp_path: Path, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    sim.config.served_model = NANO2  # a relay that re-routes the retired id to its replacement
    manifest = write_manifest(tmp_path, [{"id": "s", "prompt": "a sail", "count": 4}])
    assert run("run", manifest, "--log-format", "json") == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["event"] for e in events].count("provider_rerouted") == 1
    summary = events[-1]["providers"]["default"]
    assert summary["served_by_other_models"] == {NANO2: 4} and summary["cost_usd"] == round(4 * 0.067, 4)
    assert {(row["model"], row["served_model"]) for row in metadata(tmp_path / "out")} == {(FLASH, NANO2)}
    assert run("status", manifest, "--json") == 0
    assert json.loads(capsys.readouterr().out)["done_by_model"] == {NANO2: 4}  # counted by served model
    assert run("report", manifest) == 0
    assert f"model {NANO2}" in (tmp_path / "out" / "report.html").read_text()
    sim.config.served_model = "gemini-2.5-flash-image-001"  # a version suffix is the same model
    again = (
        write_manifest(tmp_path / "again", [{"prompt": "a keel"}])
        if (tmp_path / "again").mkdir() is None
        else None
    )
    assert again is not None and run("run", again, "--log-format", "json") == 0
    assert "provider_rerouted" not in capsys.readouterr().out


@pytest.fixture
def gemini_key(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.conftest import KEY

    monkeypatch.setenv("GEMINI_API_KEY", KEY)
