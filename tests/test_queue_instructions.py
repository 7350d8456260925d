"""bench/queue_instructions.py's check (what CI runs): the comparison with the recorded
figure and the reading of the file, on figures; the counting under valgrind is not run here
(it takes minutes), .ci/run runs it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

# bench/ is not a package: its scripts import each other by name, from their own folder.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import queue_instructions
from queue_instructions import CHECK_WORKLOAD, RECORD_COMMAND, compare, read_recorded


def test_a_count_more_than_ten_percent_over_the_recorded_figure_fails() -> None:
    passed, verdict = compare(300_000, 330_001)
    assert not passed
    assert "+10.0%" in verdict and RECORD_COMMAND in verdict


def test_a_count_up_to_ten_percent_over_passes() -> None:
    assert compare(300_000, 330_000) == (
        True, "330,000 instructions per no-op task against 300,000 recorded (+10.0%): within 10%")
    assert compare(300_000, 300_000)[0]


def test_a_count_far_under_passes_and_asks_for_the_new_figure() -> None:
    passed, verdict = compare(300_000, 260_000)
    assert passed
    assert "-13.3%" in verdict and "under it" in verdict and RECORD_COMMAND in verdict


def test_the_recorded_figure_is_read_back(tmp_path: Path) -> None:
    path = tmp_path / "figure.json"
    row = {"agentd": "commit abc1234", "instructions_per_task": 312_000, "memset_per_task": 18_000,
           "per_task": [312_000], "transactions": [[34], [97]]}
    queue_instructions.write_recorded(path, row)
    recorded = read_recorded(path)
    assert recorded["instructions_per_task"] == 312_000
    assert recorded["workload"] == CHECK_WORKLOAD
    assert "commit abc1234" in recorded["measured"]
    assert RECORD_COMMAND in recorded["about"]


def test_the_file_in_the_repository_holds_a_figure_for_the_checks_workload() -> None:
    assert read_recorded(queue_instructions.RECORDED)["instructions_per_task"] > 0


@pytest.mark.parametrize(("content", "named"), [
    (None, "does not exist"),
    ("{not json", "cannot be read"),
    ('{"workload": {}}', "holds no `instructions_per_task`"),
])
def test_a_figure_that_cannot_be_compared_with_is_refused(tmp_path: Path, content: str | None,
                                                          named: str) -> None:
    path = tmp_path / "figure.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=named) as refused:
        read_recorded(path)
    assert RECORD_COMMAND in str(refused.value)


def test_a_figure_from_another_workload_names_both(tmp_path: Path) -> None:
    path = tmp_path / "figure.json"
    path.write_text(json.dumps({"instructions_per_task": 312_000,
                                "workload": {"tasks": [300, 900], "enqueue": "batch", "repeat": 1}}))
    with pytest.raises(ValueError, match=r"\[300, 900\].*\[1000, 3000\]"):
        read_recorded(path)
