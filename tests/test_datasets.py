"""Loaders: the bundled sets' published statistics, and a user's own CSV with clear errors."""

from __future__ import annotations

import gzip
import zipfile
from pathlib import Path

import pytest

from fedcart.model_export.datasets import (
    BUNDLED,
    CsvColumns,
    DataError,
    file_sha256,
    load,
    load_csv,
    load_instacart,
    load_uci,
)

COLUMNS = CsvColumns(user="shopper", item="sku", time="when", name="label")
ROWS = [
    ("shopper", "sku", "when", "label"),
    ("10", "apple", "2024-01-02", "Apple"),
    ("10", "pear", "2024-01-02", "Pear"),
    ("10", "apple", "2024-01-02", "Apple"),  # counted once per basket
    ("10", "milk", "2024-01-01", "Milk"),
    ("9", "milk", "2024-01-05", "Milk"),
    ("9", "bread", "2024-01-05", "Bread"),
]


def write_csv(path: Path, rows: list[tuple[str, ...]]) -> Path:
    path.write_text("\n".join(",".join(r) for r in rows) + "\n")
    return path


def test_uci_matches_published_cleaning() -> None:
    data = load_uci()
    # DESIGN.md 6 drops non-product codes on top of the data README's "clean" baskets.
    assert len(data.users) == 4335
    assert data.n_baskets == 18405
    assert data.name_of("85123A") == "WHITE HANGING HEART T-LIGHT HOLDER"
    first_user = next(iter(data.users))
    assert first_user == "12346"  # ascending numeric ids
    assert all(len(set(b)) == len(b) for bs in data.users.values() for b in bs)


def test_instacart_matches_data_readme() -> None:
    data = load_instacart()
    assert len(data.users) == 593
    assert data.n_baskets == 15183
    assert list(data.users)[:3] == ["1", "2", "3"]  # numeric, not string, order
    baskets_per_user = sorted(len(b) for b in data.users.values())
    assert baskets_per_user[0] == 9 and baskets_per_user[-1] == 99


def test_bundled_files_match_their_recorded_hashes() -> None:
    from fedcart.model_export.datasets import _FILES  # the installed package data

    for filename, digest in BUNDLED.values():
        assert file_sha256(Path(str(_FILES / filename))) == digest


def test_csv_groups_by_user_and_time(tmp_path: Path) -> None:
    data = load_csv(write_csv(tmp_path / "b.csv", ROWS), COLUMNS)
    assert list(data.users) == ["9", "10"]
    assert data.users["10"] == [("milk",), ("apple", "pear")]
    assert data.name_of("pear") == "Pear"


@pytest.mark.parametrize("packing", ["gz", "zip"])
def test_csv_compressed(tmp_path: Path, packing: str) -> None:
    text = "\n".join(",".join(r) for r in ROWS) + "\n"
    if packing == "gz":
        path = tmp_path / "b.csv.gz"
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path = tmp_path / "b.zip"
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("baskets.csv", text)
    assert load_csv(path, COLUMNS).users["10"] == [("milk",), ("apple", "pear")]


def test_csv_basket_column_splits_same_time(tmp_path: Path) -> None:
    rows = [("u", "i", "t", "order"), ("1", "a", "5", "x"), ("1", "b", "5", "y")]
    data = load_csv(write_csv(tmp_path / "b.csv", rows),
                    CsvColumns(user="u", item="i", time="t", basket="order"))
    assert data.users["1"] == [("a",), ("b",)]


def test_csv_missing_column_is_named(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "b.csv", ROWS)
    with pytest.raises(DataError, match=r"missing column\(s\) \['customer'\]"):
        load_csv(path, CsvColumns(user="customer", item="sku", time="when"))


def test_csv_empty_and_unreadable(tmp_path: Path) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        load_csv(empty, COLUMNS)
    header_only = write_csv(tmp_path / "h.csv", ROWS[:1])
    with pytest.raises(DataError, match="no rows"):
        load_csv(header_only, COLUMNS)
    broken = tmp_path / "broken.csv.gz"
    broken.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DataError, match="cannot read"):
        load_csv(broken, COLUMNS)
    with pytest.raises(DataError, match="no such file"):
        load_csv(tmp_path / "absent.csv", COLUMNS)


def test_load_spec_needs_columns_for_a_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="--user-col"):
        load(str(tmp_path / "x.csv"))


def test_csv_day_first_dates_keep_their_order(tmp_path: Path) -> None:
    # 21-02 can only be day-first, so the whole column is: 5 Jan, 21 Feb, 10 Mar. Read row
    # by row, 05-01 and 10-03 would be 1 May and 3 Oct and the last basket would be wrong.
    rows = [("u", "i", "t"), ("1", "jan", "05-01-2015"), ("1", "mar", "10-03-2015"),
            ("1", "feb", "21-02-2015")]
    data = load_csv(write_csv(tmp_path / "b.csv", rows), CsvColumns(user="u", item="i", time="t"))
    assert data.users["1"] == [("jan",), ("feb",), ("mar",)]


def test_csv_ambiguous_dates_are_refused(tmp_path: Path) -> None:
    rows = [("u", "i", "t"), ("1", "a", "05-01-2015"), ("1", "b", "03-02-2015")]
    with pytest.raises(DataError, match="YYYY-MM-DD"):
        load_csv(write_csv(tmp_path / "b.csv", rows), CsvColumns(user="u", item="i", time="t"))
