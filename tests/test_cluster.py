"""The launcher's pure part: one exit code for a run of many workers."""

from __future__ import annotations

import pytest

from pipeline.cluster import combined_exit


@pytest.mark.parametrize(
    ("codes", "combined"),
    [
        ([0, 0, 0], 0),
        ([0, 1, 0], 1),
        ([1, 3, 0], 3),
        ([3, 74, 1], 74),
        ([0, 130, 74], 130),
        ([0, -9], 137),
        ([], 0),
    ],
)
def test_one_exit_code_for_the_whole_run(codes: list[int], combined: int) -> None:
    assert combined_exit(codes) == combined
