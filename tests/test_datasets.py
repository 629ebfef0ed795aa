"""Loaders: the bundled sets' published statistics, and a user's own CSV with clear errors."""

from __future__ import annotations

import gzip
import zipfile
from pathlib import Path

import pytest

from fedcart.data.datasets import (
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
    from fedcart.data.datasets import _FILES  # the installed package data

    for filename, digest in BUNDLED.values():
        assert file_sha256(Path(str(_FILES / filename))) == digest


def test_a_wheel_without_the_data_sets_says_where_they_are(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fedcart.data.datasets as datasets

    monkeypatch.setattr(datasets, "_FILES", tmp_path)  # an install without the files
    with pytest.raises(datasets.DataError, match="ship in the source repository, not the wheel"):
        load_uci()


def test_csv_groups_by_user_and_time(tmp_path: Path) -> None:
    data = load_csv(write_csv(tmp_path / "b.csv", ROWS), COLUMNS)
    assert list(data.users) == ["9", "10"]
    assert data.users["10"] == [("milk",), ("apple", "pear")]
    assert data.name_of("pear") == "Pear"


def packed(tmp_path: Path, text: str, packing: str) -> Path:
    """``text`` as a file a user would give: plain .csv, .csv.gz, or a .zip holding it."""
    if packing == "csv":
        path = tmp_path / "b.csv"
        path.write_text(text)
    elif packing == "gz":
        path = tmp_path / "b.csv.gz"
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path = tmp_path / "b.zip"
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("baskets.csv", text)
    return path


@pytest.mark.parametrize("packing", ["gz", "zip"])
def test_csv_compressed(tmp_path: Path, packing: str) -> None:
    path = packed(tmp_path, "\n".join(",".join(r) for r in ROWS) + "\n", packing)
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


@pytest.mark.parametrize("separator", [";", "\t", "|", ","])
@pytest.mark.parametrize("packing", ["csv", "gz", "zip"])
def test_csv_separator_is_detected(tmp_path: Path, separator: str, packing: str) -> None:
    """Spreadsheets in many locales export with semicolons, databases with tabs: the
    separator is told from the file's first lines (a name holding a comma included)."""
    rows = [*ROWS, ("11", "jam", "2024-01-03", '"Jam, strawberry"')]
    path = packed(tmp_path, "\n".join(separator.join(r) for r in rows) + "\n", packing)
    data = load_csv(path, COLUMNS)
    assert data.users["10"] == [("milk",), ("apple", "pear")]
    assert data.name_of("jam") == "Jam, strawberry"


def test_separator_is_read_from_the_start_of_a_large_file(tmp_path: Path) -> None:
    """Only the first SNIFF_BYTES are sniffed, and a line they cut off does not count."""
    from fedcart.data.datasets import SNIFF_BYTES

    rows = [("shopper", "sku", "when")] + [
        (str(u), f"item{u % 7}", f"2024-01-{1 + u % 28:02d}") for u in range(SNIFF_BYTES // 10)]
    path = tmp_path / "big.csv"
    path.write_text("\n".join(";".join(r) for r in rows) + "\n")
    assert path.stat().st_size > SNIFF_BYTES
    data = load_csv(path, CsvColumns(user="shopper", item="sku", time="when"))
    assert len(data.users) == SNIFF_BYTES // 10


def test_csv_text_time_column_is_one_clear_error(tmp_path: Path) -> None:
    rows = [("u", "i", "t"), ("1", "a", "morning"), ("1", "b", "evening"),
            ("2", "c", "noon")]
    path = write_csv(tmp_path / "b.csv", rows)
    with pytest.raises(DataError) as caught:
        load_csv(path, CsvColumns(user="u", item="i", time="t"))
    message = str(caught.value)
    assert "\n" not in message
    assert "time column 't'" in message and "'morning'" in message
    assert "3 of 3 values are neither" in message


def test_csv_time_column_mixing_numbers_and_dates_is_refused(tmp_path: Path) -> None:
    rows = [("u", "i", "t"), ("1", "a", "3"), ("1", "b", "2024-01-02")]
    path = write_csv(tmp_path / "b.csv", rows)
    with pytest.raises(DataError, match=r"time column 't' mixes numbers and dates, e\.g\. "
                                        r"'3' and '2024-01-02'"):
        load_csv(path, CsvColumns(user="u", item="i", time="t"))
