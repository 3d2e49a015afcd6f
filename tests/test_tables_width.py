"""Tables line up when cells hold wide (CJK) or combining characters: padding and cutting
count terminal columns (East Asian wide/fullwidth = 2, combining marks = 0), not len()."""

from __future__ import annotations

import unicodedata

from retire_cluster import tables
from retire_cluster.tables import format_table, task_detail
from retire_cluster.web.render import box_table, device_grid, key_values


def display_width(text: str) -> int:
    """The test's own measure (independent of the code under test)."""
    return sum(0 if unicodedata.combining(ch) else 2 if unicodedata.east_asian_width(ch) in "WF" else 1
               for ch in text)


def columns_of(line: str, word: str) -> int:
    """The display column where ``word`` starts in ``line``."""
    return display_width(line[: line.index(word)])


def test_display_width_counts_terminal_columns() -> None:
    pad = tables.pad
    display_width = tables.display_width
    assert display_width("pi-4") == 4
    assert display_width("東京の電話") == 10  # W: two columns each
    assert display_width("ＡＢ") == 4  # F (fullwidth Latin)
    assert display_width("cafe\u0301") == 4  # a combining acute accent takes no column
    assert display_width("한국") == 4
    assert pad("東京", 6) == "東京  " and pad("abc", 2) == "abc"


def test_cut_never_splits_a_wide_character_or_overflows() -> None:
    cut = tables.cut
    assert cut("東京の電話", 5) == "東京"  # 4 columns: a third character would make 6
    assert cut("東京の電話", 6) == "東京の"
    assert cut("東京の電話", 10) == "東京の電話"
    assert cut("東京の電話", 7, "...") == "東京..."
    assert cut("cafe\u0301 au lait", 4) == "cafe\u0301"  # the accent stays with its letter
    for width in range(12):
        assert display_width(cut("a東京bの電話", width)) <= width


def test_format_table_aligns_columns_with_wide_characters() -> None:
    text = format_table(["device", "status", "tasks"],
                        [["東京の電話", "online", "1/4"], ["nas", "offline", "0/2"], ["cafe\u0301", "online", "2/2"]])
    lines = text.splitlines()
    assert columns_of(lines[0], "status") == columns_of(lines[2], "online") == columns_of(lines[3], "offline")
    assert columns_of(lines[2], "online") == columns_of(lines[4], "online")
    assert columns_of(lines[0], "tasks") == columns_of(lines[2], "1/4") == columns_of(lines[3], "0/2")
    assert display_width(lines[1].split("  ")[0]) == display_width("東京の電話")  # the rule is as wide


def test_box_table_borders_line_up_with_wide_characters() -> None:
    text = box_table(["task", "message"], [["a1", "こんにちは世界"], ["b2", "hi"]])
    widths = {display_width(line) for line in text.splitlines()}
    assert len(widths) == 1, text
    rows = [line for line in text.splitlines() if line.startswith("|")]
    last_bar = {display_width(line[: line.rindex("|")]) for line in rows}
    inner_bar = {display_width(line[: line.index("|", 1)]) for line in rows}
    assert len(last_bar) == 1 and len(inner_bar) == 1, text


def test_key_values_and_task_detail_align_wide_values() -> None:
    pairs = key_values([("主机", "a"), ("status", "b")]).splitlines()
    assert columns_of(pairs[0], "a") == columns_of(pairs[1], "b")
    record = {"task_id": "t1", "task_type": "echo", "status": "completed", "attempt": 1,
              "attempts": [{"attempt": 1, "device_id": "東京の電話", "assigned_at": None, "outcome": "completed"},
                           {"attempt": 2, "device_id": "nas", "assigned_at": None, "outcome": "failed"}]}
    head, _, first, second = task_detail(record).splitlines()[-4:]
    assert columns_of(head, "assigned") == columns_of(first, "-") == columns_of(second, "-")
    assert columns_of(head, "outcome") == columns_of(first, "completed") == columns_of(second, "failed")


def test_device_grid_boxes_line_up_with_a_wide_device_id() -> None:
    devices = [{"device_id": "客厅的旧笔记本电脑-联想-2012年款", "status": "online"},
               {"device_id": "nas", "status": "offline"}]
    grid = device_grid(devices, columns=2)
    widths = {display_width(line) for line in grid.splitlines()}
    assert len(widths) == 1, grid
    first = grid.splitlines()[1]
    assert display_width(first.split("|")[1]) == display_width(first.split("|")[3])
