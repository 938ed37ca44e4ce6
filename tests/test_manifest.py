"""The manifest: every problem reported with file, place and line, exit 2, and no request made."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.manifest import derive_id, iter_items, load_manifest
from pipeline.simulator import Simulator
from tests.conftest import run

GOOD_JOB = '  - {id: ok, prompt: "a cat"}\n'
BAD = {
    "unknown top-level key": ("concurency: 3\njobs:\n" + GOOD_JOB, "concurency: unknown key (line 1)"),
    "unknown job key": ('jobs:\n  - {prompt: "x", size: 3}\n', "jobs[0].size: unknown key (line 2)"),
    "wrong type": (
        'concurrency: "eight"\njobs:\n' + GOOD_JOB,
        'concurrency: Input should be a valid integer, got "eight" (line 1)',
    ),
    "bad aspect ratio": (
        'jobs:\n  - {prompt: a}\n  - {prompt: b}\n  - {prompt: c}\n  - prompt: d\n    aspect_ratio: "7:3"\n',
        'jobs[3].aspect_ratio: "7:3" is not offered by gemini-2.5-flash-image (it takes 1:1, 2:3',
    ),
    "unquoted aspect ratio read as a number": ("jobs:\n  - {prompt: a, aspect_ratio: 16:9}\n", "quote it"),
    "empty prompt": ('jobs:\n  - {prompt: "   "}\n', 'jobs[0].prompt: must not be empty, got "   " (line 2)'),
    "missing prompt": (
        "jobs:\n  - {id: x}\n",
        "jobs[0]: needs either `prompt` or `prompts_file`, not both (line 2)",
    ),
    "count zero": (
        "jobs:\n  - {prompt: a, count: 0}\n",
        "jobs[0].count: Input should be greater than or equal to 1",
    ),
    "bad id characters": (
        'jobs:\n  - {id: "../etc", prompt: a}\n',
        'jobs[0].id: "../etc" must be 1-100 characters',
    ),
    "duplicate ids": (
        "jobs:\n  - {id: a, prompt: x}\n  - {id: a, prompt: y}\n",
        'jobs[1].id: "a" is also the id of jobs[0] (line 3)',
    ),
    "duplicate derived ids": ("jobs:\n  - {prompt: same}\n  - {prompt: same}\n", "derived from the prompt"),
    "no jobs": ("jobs: []\n", "jobs: List should have at least 1 item"),
    "not a mapping": ("- just\n- a list\n", "must be a mapping with a `jobs` list, got a list"),
    "not YAML": ("jobs: [unclosed\n", "not valid YAML"),
    "empty file": ("", "is empty"),
    "key in the manifest": (
        "api:\n  api_key: sk-live-123\njobs:\n" + GOOD_JOB,
        "api.api_key: API keys do not belong in the manifest",
    ),
    "aliases": ("a: &x [1, 2]\nb: *x\njobs:\n" + GOOD_JOB, "YAML aliases are not allowed"),
    "deep nesting": ("jobs:\n" + GOOD_JOB + "x: " + "[" * 200 + "]" * 200 + "\n", "nested"),
    "base_url not http": (
        "api: {base_url: ftp://x}\njobs:\n" + GOOD_JOB,
        "api.base_url: must be an http:// or https:// URL",
    ),
}


@pytest.mark.parametrize(("text", "expected"), BAD.values(), ids=BAD.keys())
def test_bad_manifest_exits_2_with_the_place(
    text: str, expected: str, tmp_path: Path, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert run("run", path, "--output", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"{path}: " in err and expected in err, err
    assert "Traceback" not in err and "sk-live-123" not in err
    assert sim.stats.requests == 0
    assert not (tmp_path / "out").exists()


def test_all_problems_reported_at_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        'concurrency: 0\njobs:\n  - {prompt: ""}\n  - {prompt: b, aspect_ratio: "7:3", count: -1}\n'
    )
    assert run("validate", path) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line.split(": ")[1] for line in lines] == [
        "concurrency",
        "jobs[0].prompt",
        "jobs[1].count",
        "jobs[1].aspect_ratio",  # by the model's catalog entry, after the fields
    ]


def test_cross_field_problems_come_with_the_field_problems(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Duplicate ids, unknown placeholders, missing files: in the same report as a bad field."""
    path = tmp_path / "bad.yaml"
    path.write_text(
        "concurrency: 0\n"
        "jobs:\n"
        '  - {id: a, prompt: x, aspect_ratio: "7:3"}\n'
        "  - {id: b, prompt: y}\n"
        "  - {id: b, prompt: z}\n"
        '  - {id: "{c}", prompt: "w {d}", count: 0, matrix: {c: [1]}}\n'
        "  - {id: e, prompt: v, images: [missing.png]}\n"
        "  - {prompts_file: nope.txt}\n"
    )
    assert run("validate", path) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line.split(": ")[1] for line in lines] == [
        "concurrency",
        "jobs[3].prompt",
        "jobs[3].count",
        "jobs[0].aspect_ratio",
        "jobs[5].prompts_file",
        "jobs[4].images[0]",
        "jobs[2].id",
    ], lines
    assert lines[-1].endswith('"b" is also the id of jobs[1] (line 5)')


def test_huge_manifest_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "huge.yaml"
    path.write_text("jobs:\n" + '  - {prompt: "x"}\n' * 400_000)
    assert run("validate", path) == 2
    assert "too large" in capsys.readouterr().err


def test_missing_key_env_is_a_manifest_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], sim: Simulator
) -> None:
    monkeypatch.delenv("IMAGE_API_KEY")
    path = tmp_path / "m.yaml"
    path.write_text("api: {api_key_env: MY_KEY}\njobs:\n" + GOOD_JOB)
    assert run("run", path) == 2
    assert "api.api_key_env: environment variable MY_KEY is not set" in capsys.readouterr().err
    assert sim.stats.requests == 0


def test_validate_prints_a_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "m.yaml"
    path.write_text("defaults: {count: 2}\njobs:\n  - {prompt: a}\n  - {prompt: b, count: 3}\n")
    assert run("validate", path) == 0
    assert capsys.readouterr().out.strip() == f"{path}: valid: 2 jobs, 5 items"


def test_demo_manifest_is_valid_and_varied() -> None:
    manifest = load_manifest(Path("jobs/demo.yaml"))
    items = list(iter_items(manifest))
    assert 10 <= len(manifest.jobs) <= 16
    assert len({i.aspect_ratio for i in items}) >= 5
    assert any(any("\u4e00" <= ch <= "\u9fff" for ch in i.prompt) for i in items)
    assert any((job.count or 1) > 1 for job in manifest.jobs)


def test_items_and_fingerprints(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(
        'defaults: {aspect_ratio: "3:2"}\njobs:\n  - {id: a, prompt: cat, count: 2}\n  - {prompt: dog}\n'
    )
    items = list(iter_items(load_manifest(path)))
    assert [(i.id, i.index, i.aspect_ratio) for i in items] == [
        ("a", 0, "3:2"),
        ("a", 1, "3:2"),
        (derive_id("dog"), 0, "3:2"),
    ]
    assert items[0].fingerprint == items[1].fingerprint
    path.write_text("jobs:\n  - {id: a, prompt: cat, count: 2}\n")  # aspect ratio back to 1:1
    changed = next(iter_items(load_manifest(path)))
    assert changed.fingerprint != items[0].fingerprint


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("A cute kitten!", "a-cute-kitten-"),
        ("一只熊猫", "p-"),
        ("  spaces   everywhere ", "spaces-everywhere-"),
    ],
)
def test_derived_ids_are_readable_stable_and_safe(prompt: str, expected: str) -> None:
    ident = derive_id(prompt)
    assert ident.startswith(expected) and ident == derive_id(prompt)
    assert all(c.isalnum() or c in "._-" for c in ident) and len(ident) <= 100


MATRIX_JOB = """jobs:
  - id: "{animal}-{style}"
    prompt: "A {animal} painted in {style} style"
    matrix: {animal: [cat, fox, owl], style: [watercolor, pixel art, ukiyo-e]}
    aspect_ratio: "4:5"
"""


def test_validate_counts_the_expanded_jobs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(MATRIX_JOB.replace('"4:5"', '"4:5"\n    count: 2'))
    assert run("validate", path) == 0
    assert capsys.readouterr().out.strip() == f"{path}: valid: 9 jobs, 18 items"


def test_matrix_expands_to_the_cartesian_product(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(MATRIX_JOB)
    manifest = load_manifest(path)
    items = list(iter_items(manifest))
    assert manifest.total_items == 9 == len(items)
    assert items[1].id == "cat-pixel-art" and items[1].prompt == "A cat painted in pixel art style"
    assert [i.id for i in items][-3:] == ["owl-watercolor", "owl-pixel-art", "owl-ukiyo-e"]
    assert {i.aspect_ratio for i in items} == {"4:5"}


MATRIX_BAD = {
    "unknown placeholder in the prompt": (
        'jobs:\n  - {id: "{a}", prompt: "x {b}", matrix: {a: [1, 2]}}\n',
        'jobs[0].prompt: uses b, not in `matrix`, got "x {b}" (line 2)',
    ),
    "placeholder without a matrix": (
        'jobs:\n  - {id: "{a}", prompt: x}\n',
        "jobs[0].id: uses a, not in `matrix`",
    ),
    "duplicate expanded ids": (
        'jobs:\n  - {id: "same", prompt: "x {a}", matrix: {a: [1, 2]}}\n',
        'jobs[0].id: "same" is also the id of jobs[0]',
    ),
    "expanded id too long": (
        'jobs:\n  - {id: "{a}", prompt: "x {a}", matrix: {a: ["' + "y" * 120 + '"]}}\n',
        "must be 1-100 characters",
    ),
    "empty matrix values": (
        'jobs:\n  - {prompt: "x {a}", matrix: {a: []}}\n',
        "jobs[0].matrix.a: List should have at least 1 item",
    ),
    "bad template": ('jobs:\n  - {prompt: "x {a", matrix: {a: [1]}}\n', "bad template"),
}


@pytest.mark.parametrize(("text", "expected"), MATRIX_BAD.values(), ids=MATRIX_BAD.keys())
def test_matrix_problems(
    text: str, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(text)
    assert run("validate", path) == 2
    assert expected in capsys.readouterr().err


def test_shipped_schema_is_current_and_manifests_point_to_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert run("schema") == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(Path("jobs/manifest.schema.json").read_text())
    assert {"jobs", "concurrency", "api", "defaults"} <= set(printed["properties"])
    assert printed["additionalProperties"] is False
    for manifest in Path("jobs").glob("*.yaml"):
        assert manifest.read_text().startswith("# yaml-language-server: $schema=manifest.schema.json\n")
