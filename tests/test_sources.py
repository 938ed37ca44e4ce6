"""Prompt files: three formats, row overrides, every problem with file and line, flat memory."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest

from pipeline.manifest import derive_id, iter_items, load_manifest
from pipeline.simulator import Simulator
from tests.conftest import assert_dataset_consistent, run


def manifest_with(tmp_path: Path, name: str, text: str, job: str = "", top: str = "") -> Path:
    (tmp_path / name).write_text(text, encoding="utf-8")
    path = tmp_path / "m.yaml"
    path.write_text(
        f'{top}defaults: {{aspect_ratio: "3:2"}}\njobs:\n  - prompts_file: {name}\n{job}', encoding="utf-8"
    )
    return path


def test_txt_one_prompt_a_line(tmp_path: Path) -> None:
    path = manifest_with(tmp_path, "p.txt", "a red fox\n\n# a comment\n一只猫\n", "    count: 2\n")
    items = [(i.id, i.index, i.prompt, i.aspect_ratio) for i in iter_items(load_manifest(path))]
    assert items == [
        (derive_id("a red fox"), 0, "a red fox", "3:2"),
        (derive_id("a red fox"), 1, "a red fox", "3:2"),
        (derive_id("一只猫"), 0, "一只猫", "3:2"),
        (derive_id("一只猫"), 1, "一只猫", "3:2"),
    ]
    assert load_manifest(path).total_items == 4


def test_csv_with_columns_and_row_overrides(tmp_path: Path) -> None:
    text = 'key,text,aspect_ratio,count\nfox,"a fox, running",16:9,\nowl,an owl,,3\n'
    path = manifest_with(tmp_path, "p.csv", text, "    id_field: key\n    prompt_field: text\n")
    items = [(i.id, i.index, i.prompt, i.aspect_ratio) for i in iter_items(load_manifest(path))]
    assert items == [
        ("fox", 0, "a fox, running", "16:9"),
        ("owl", 0, "an owl", "3:2"),
        ("owl", 1, "an owl", "3:2"),
        ("owl", 2, "an owl", "3:2"),
    ]


def test_jsonl_with_numeric_ids(tmp_path: Path) -> None:
    rows = [
        {"id": 7, "prompt": "seven"},
        {"id": "eight", "prompt": "eight", "aspect_ratio": "9:16", "count": 2},
    ]
    path = manifest_with(
        tmp_path, "p.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n", "    id_field: id\n"
    )
    items = [(i.id, i.index, i.aspect_ratio) for i in iter_items(load_manifest(path))]
    assert items == [("7", 0, "3:2"), ("eight", 0, "9:16"), ("eight", 1, "9:16")]


BAD_ROWS = {
    "not JSON": ('{"prompt": "a"}\n{"prompt": \n', "p.jsonl: line 2: not valid JSON"),
    "not an object": ('["a"]\n', "p.jsonl: line 1: must be a JSON object"),
    "no prompt": ('{"id": "a"}\n', "p.jsonl: line 1: prompt: must be a non-empty string"),
    "blank prompt": ('{"prompt": "  "}\n', "p.jsonl: line 1: prompt: must be a non-empty string"),
    "bad id": ('{"id": "a/b", "prompt": "x"}\n', "p.jsonl: line 1: id: 'a/b' must be 1-100 characters"),
    "aspect ratio the model does not offer": (
        '{"prompt": "x", "aspect_ratio": "7:3"}\n',
        'p.jsonl: line 1: aspect_ratio: "7:3" is not offered by gemini-2.5-flash-image',
    ),
    "not an aspect ratio": (
        '{"prompt": "x", "aspect_ratio": "wide"}\n',
        "p.jsonl: line 1: aspect_ratio: 'wide' is not a W:H ratio",
    ),
    "bad count": (
        '{"prompt": "x", "count": 0}\n',
        "p.jsonl: line 1: count: must be a whole number of at least 1",
    ),
    "duplicate id": (
        '{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n',
        'p.jsonl: line 2: id "a" is also the id of',
    ),
}


@pytest.mark.parametrize(("text", "expected"), BAD_ROWS.values(), ids=BAD_ROWS.keys())
def test_bad_rows_are_reported_with_file_and_line(
    text: str, expected: str, tmp_path: Path, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    path = manifest_with(tmp_path, "p.jsonl", text, "    id_field: id\n")
    assert run("run", path, "--output", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert expected in err and str(tmp_path / "p.jsonl") in err, err
    assert sim.stats.requests == 0


def test_duplicate_ids_across_an_inline_job_and_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "p.txt").write_text("a cat\n")
    path = tmp_path / "m.yaml"
    path.write_text(f'jobs:\n  - {{id: "{derive_id("a cat")}", prompt: other}}\n  - prompts_file: p.txt\n')
    assert run("validate", path) == 2
    assert "p.txt: line 1: id" in capsys.readouterr().err


def test_missing_file_and_misused_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "m.yaml"
    path.write_text("jobs:\n  - prompts_file: nope.txt\n")
    assert run("validate", path) == 2
    assert "jobs[0].prompts_file: no such file" in capsys.readouterr().err
    path.write_text("jobs:\n  - {prompt: a, id_field: x}\n  - {prompts_file: a.pdf}\n")
    assert run("validate", path) == 2
    err = capsys.readouterr().err
    assert "jobs[0]: `id_field` and `prompt_field` go with `prompts_file`" in err
    assert "jobs[1].prompts_file: String should match pattern" in err


def test_a_prompts_file_job_runs_end_to_end(tmp_path: Path, sim: Simulator) -> None:
    path = manifest_with(tmp_path, "p.txt", "one\ntwo\nthree\n", top=f"output: {tmp_path / 'out'}\n")
    assert run("run", path) == 0
    rows = assert_dataset_consistent(tmp_path / "out")
    assert sorted(r["prompt"] for r in rows) == ["one", "three", "two"]
    assert {(r["width"], r["height"]) for r in rows} == {(1248, 832)}


def _peak_bytes(path: Path) -> int:
    tracemalloc.start()
    try:
        manifest = load_manifest(path)
        for _ in iter_items(manifest):
            pass
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_validation_and_expansion_memory_does_not_grow_with_the_file(tmp_path: Path) -> None:
    peaks = []
    for rows in (5_000, 50_000):
        lines = "".join(
            json.dumps({"id": f"row-{n}", "prompt": f"prompt number {n}"}) + "\n" for n in range(rows)
        )
        peaks.append(_peak_bytes(manifest_with(tmp_path, f"p{rows}.jsonl", lines, "    id_field: id\n")))
    assert peaks[1] < 1.5 * peaks[0], peaks
