"""Basket data: the bundled real data sets and a loader for a user's own CSV.

Every loader returns a :class:`BasketData`: users mapped to their baskets in time order, each
basket a tuple of distinct item keys (strings), plus item names where the data has them.
Reading needs pandas (the ``server``/``sim`` extras); a device never loads a data set.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import warnings
import zipfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import pandas as pd

__all__ = [
    "BUNDLED",
    "BasketData",
    "CsvColumns",
    "DataError",
    "load",
    "load_catalog",
    "load_csv",
    "load_instacart",
    "load_uci",
]


class DataError(ValueError):
    """A data file is missing, unreadable, empty, or lacks a column it needs."""


@dataclass(frozen=True)
class BasketData:
    """Users and their time-ordered baskets.

    ``users`` is ordered by ascending user id (numerically when every id is a number), and
    each user's baskets by time, ties broken by basket id: the order the evaluation protocol
    (DESIGN.md section 6) relies on.
    """

    name: str
    users: dict[str, list[tuple[str, ...]]]
    item_names: dict[str, str] = field(default_factory=dict)
    sha256: str = ""

    @property
    def n_baskets(self) -> int:
        return sum(len(b) for b in self.users.values())

    def name_of(self, item: str) -> str:
        return self.item_names.get(item, item)


@dataclass(frozen=True)
class CsvColumns:
    """Which columns of a user's CSV hold what. Without ``basket``, a basket is one user's
    items at one time value."""

    user: str
    item: str
    time: str
    basket: str | None = None
    name: str | None = None


# Non-product stock codes of UCI Online Retail (postage, manual fixes, fees, samples).
UCI_NON_PRODUCT_CODES = frozenset(
    {"POST", "M", "DOT", "BANK CHARGES", "C2", "PADS", "CRUK", "D", "AMAZONFEE", "B", "S", "m"}
)

_FILES = resources.files(__package__) / "files"
BUNDLED = {
    "uci": ("uci_online_retail.csv.gz",
            "737745256ddb4410bfe4e29f2dcb72329b7486e584837f1e84f9a07416cf7d45"),
    "instacart": ("instacart_sample.csv.gz",
                  "fcb304ea754fc1cc00681ade864f2aebe1acaa22e4bb07a98412d44bd62ffdd0"),
}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _bundled_path(name: str) -> tuple[Path, str]:
    filename, expected = BUNDLED[name]
    path = Path(str(_FILES / filename))
    if not path.is_file():  # an installed wheel: the data sets ship with the source only
        raise DataError(f"the bundled data set '{name}' is not installed ({path} is missing): "
                        "the data sets ship in the source repository, not the wheel; run "
                        "from a clone, or give --data PATH.csv")
    actual = file_sha256(path)
    if actual != expected:
        raise DataError(
            f"bundled data file {path} is corrupt: sha256 {actual}, expected {expected}"
        )
    return path, actual


SNIFF_BYTES = 64 << 10  # the start of a file its separator is told from
SEPARATORS = ",;\t|"  # the ones spreadsheets and databases export with


def _separator(start: bytes) -> str:
    """The field separator of a CSV that begins with ``start``: csv.Sniffer on its whole
    lines, restricted to SEPARATORS (comma when it cannot tell, as for one column)."""
    lines = start.decode("utf-8", errors="replace").splitlines()
    if len(start) == SNIFF_BYTES and len(lines) > 1:
        lines = lines[:-1]  # the last line is cut off
    try:
        return csv.Sniffer().sniff("\n".join(lines), delimiters=SEPARATORS).delimiter
    except csv.Error:
        return ","


def _read_csv(path: Path, usecols: list[str], dtype: dict[str, str] | None = None,
              index_col: int | None = None) -> pd.DataFrame:
    """Read a .csv, .csv.gz or .zip (holding one CSV) with clear errors. The separator
    (comma, semicolon, tab or bar) is told from the first SNIFF_BYTES of the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        if path.suffix == ".zip":
            with zipfile.ZipFile(path) as zf:
                members = [m for m in zf.namelist() if not m.endswith("/")]
                if len(members) != 1:
                    raise DataError(f"{path}: a .zip must hold exactly one CSV, found {members}")
                with zf.open(members[0]) as fh:
                    sep = _separator(fh.read(SNIFF_BYTES))
                with zf.open(members[0]) as fh:
                    header = pd.read_csv(fh, sep=sep, nrows=0, index_col=index_col).columns
                with zf.open(members[0]) as fh:
                    _check_columns(path, header, usecols)
                    frame = pd.read_csv(fh, sep=sep, usecols=usecols, dtype=dtype)
        else:
            with (gzip.open(path) if path.suffix == ".gz" else open(path, "rb")) as fh:
                sep = _separator(fh.read(SNIFF_BYTES))
            header = pd.read_csv(path, sep=sep, nrows=0, index_col=index_col).columns
            _check_columns(path, header, usecols)
            frame = pd.read_csv(path, sep=sep, usecols=usecols, dtype=dtype)
    except DataError:
        raise
    except pd.errors.EmptyDataError as exc:
        raise DataError(f"{path}: the file is empty") from exc
    except (OSError, UnicodeDecodeError, zipfile.BadZipFile, pd.errors.ParserError,
            EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: cannot read it as CSV ({exc})") from exc
    if frame.empty:
        raise DataError(f"{path}: the file has a header but no rows")
    return frame


def _check_columns(path: Path, header: pd.Index, needed: list[str]) -> None:
    missing = [c for c in needed if c not in header]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {missing}; the file has {list(map(str, header))}"
        )


def _sorted_user_ids(ids: list[str]) -> list[str]:
    """Ascending user ids: numerically when every id is a number, else as strings."""
    try:
        return sorted(ids, key=float)
    except ValueError:
        return sorted(ids)


def _group_baskets(frame: pd.DataFrame, name: str, sha256: str,
                   item_names: dict[str, str]) -> BasketData:
    """``frame`` has string columns user, basket, item and a sortable ``time`` column.

    A basket's time is the first time among its rows; one item counts once per basket.
    """
    frame = frame.drop_duplicates(["user", "basket", "item"])
    first_time = frame.groupby(["user", "basket"], sort=False)["time"].min().rename("btime")
    ordered = first_time.reset_index().sort_values(["user", "btime", "basket"], kind="stable")
    items_of = frame.groupby(["user", "basket"], sort=False)["item"].agg(tuple)
    by_user: dict[str, list[tuple[str, ...]]] = {}
    for user, basket in zip(ordered["user"], ordered["basket"], strict=True):
        by_user.setdefault(user, []).append(tuple(sorted(items_of[(user, basket)])))
    users = {u: by_user[u] for u in _sorted_user_ids(list(by_user))}
    if not users:
        raise DataError(f"{name}: no baskets left after cleaning")
    return BasketData(name=name, users=users, item_names=item_names, sha256=sha256)


def _most_frequent_names(items: pd.Series, names: pd.Series) -> dict[str, str]:
    pairs = pd.DataFrame({"item": items, "name": names}).dropna()
    pairs["name"] = pairs["name"].astype(str).str.strip()
    pairs = pairs[pairs["name"] != ""]
    counts = pairs.value_counts(["item", "name"]).reset_index()
    counts = counts.sort_values(["item", "count", "name"], ascending=[True, False, True])
    first = counts.drop_duplicates("item")
    return dict(zip(first["item"], first["name"], strict=True))


def load_uci(path: Path | None = None) -> BasketData:
    """UCI Online Retail: user = CustomerID, basket = InvoiceNo, cleaned per DESIGN.md 6."""
    if path is None:
        path, digest = _bundled_path("uci")
    else:
        digest = file_sha256(path)
    cols = ["InvoiceNo", "StockCode", "Description", "Quantity", "InvoiceDate", "CustomerID"]
    raw = _read_csv(path, cols, dtype={"InvoiceNo": "string", "StockCode": "string",
                                       "Description": "string", "CustomerID": "string"})
    keep = (
        raw["CustomerID"].notna()
        & ~raw["InvoiceNo"].str.startswith("C")
        & (raw["Quantity"] > 0)
        & ~raw["StockCode"].isin(UCI_NON_PRODUCT_CODES)
    )
    clean = raw[keep]
    frame = pd.DataFrame({
        "user": clean["CustomerID"].str.removesuffix(".0"),
        "basket": clean["InvoiceNo"],
        "item": clean["StockCode"],
        "time": pd.to_datetime(clean["InvoiceDate"]),
    })
    names = _most_frequent_names(clean["StockCode"], clean["Description"])
    return _group_baskets(frame, "uci", digest, names)


def load_instacart(path: Path | None = None) -> BasketData:
    """Instacart sample: user = user_id, basket = order_id, time = order_number."""
    if path is None:
        path, digest = _bundled_path("instacart")
    else:
        digest = file_sha256(path)
    raw = _read_csv(path, ["order_id", "user_id", "order_number", "product_id"],
                    dtype={"order_id": "string", "user_id": "string",
                           "product_id": "string"}, index_col=0)
    frame = pd.DataFrame({
        "user": raw["user_id"], "basket": raw["order_id"], "item": raw["product_id"],
        "time": raw["order_number"],
    })
    return _group_baskets(frame, "instacart", digest, {})


def _parse_time(column: pd.Series, origin: str) -> pd.Series:
    """Numbers sort as numbers, dates as dates; anything else is refused, naming the column
    and a value, since text would order a user's baskets alphabetically ("evening" before
    "morning") without a word.

    Dates are ISO 8601, or read with one format for the whole column, month-first or
    day-first, never guessed row by row: "05-01-2015" and "21-07-2015" in one column are
    both day-first (5 January, 21 July), where a per-row guess would read the first as
    1 May and put the user's baskets out of order. A column both readings parse, to
    different dates, is refused rather than guessed."""
    numeric = pd.to_numeric(column, errors="coerce")
    if numeric.notna().all():
        return numeric
    iso = pd.to_datetime(column, errors="coerce", format="ISO8601")
    if iso.notna().all():
        return iso
    parsed = []
    for dayfirst in (False, True):
        with warnings.catch_warnings():  # pandas warns when it falls back to dateutil
            warnings.simplefilter("ignore", UserWarning)
            parsed.append(pd.to_datetime(column, errors="coerce", dayfirst=dayfirst))
    readings = [dates for dates in parsed if dates.notna().all()]
    if len(readings) == 2 and not readings[0].equals(readings[1]):
        raise DataError(f"{origin}: the dates read both month-first and day-first (no day "
                        "above 12); write them as YYYY-MM-DD")
    if readings:
        return readings[0]
    neither = numeric.isna() & iso.isna() & parsed[0].isna() & parsed[1].isna()
    if neither.any():
        raise DataError(f"{origin}: the time column {column.name!r} must hold numbers or "
                        f"dates (YYYY-MM-DD), to order each user's baskets; "
                        f"{int(neither.sum()):,} of {len(column):,} values are neither, "
                        f"e.g. {column[neither].iloc[0]!r}")
    if numeric.notna().any():
        raise DataError(f"{origin}: the time column {column.name!r} mixes numbers and "
                        f"dates, e.g. {column[numeric.notna()].iloc[0]!r} and "
                        f"{column[numeric.isna()].iloc[0]!r}; use one or the other")
    raise DataError(f"{origin}: the time column {column.name!r} mixes date formats, e.g. "
                    f"{column[parsed[0].isna()].iloc[0]!r} and "
                    f"{column[parsed[1].isna()].iloc[0]!r}; write them as YYYY-MM-DD")


def load_csv(path: Path, columns: CsvColumns) -> BasketData:
    """A user's own basket CSV (.csv, .csv.gz or .zip)."""
    path = Path(path)
    wanted = [c for c in (columns.user, columns.item, columns.time, columns.basket,
                          columns.name) if c is not None]
    wanted = list(dict.fromkeys(wanted))
    raw = _read_csv(path, wanted, dtype={c: "string" for c in wanted})
    raw = raw.dropna(subset=[columns.user, columns.item, columns.time])
    if raw.empty:
        raise DataError(f"{path}: no row has a user, an item and a time")
    time = _parse_time(raw[columns.time], str(path))
    user = raw[columns.user].astype(str)
    basket = (raw[columns.basket].astype(str) if columns.basket
              else user + "\x1f" + raw[columns.time].astype(str))
    frame = pd.DataFrame({"user": user, "basket": basket,
                          "item": raw[columns.item].astype(str), "time": time})
    names = (_most_frequent_names(frame["item"], raw[columns.name])
             if columns.name else {})
    return _group_baskets(frame, path.name, file_sha256(path), names)


def load_catalog(path: Path, id_col: str, name_col: str | None = None) -> dict[str, str]:
    """An item catalog (.csv, .csv.gz or .zip, one row per item): item id -> name, in file
    order; an item without a name (or without ``name_col``) is named by its id. Raises
    DataError for a missing file or column, a row without an id, or an id listed twice."""
    path = Path(path)
    wanted = list(dict.fromkeys(c for c in (id_col, name_col) if c is not None))
    raw = _read_csv(path, wanted, dtype={c: "string" for c in wanted})
    ids = raw[id_col].str.strip()
    if ids.isna().any() or (ids == "").any():
        row = int(((ids.isna()) | (ids == "")).to_numpy().argmax())
        raise DataError(f"{path}: data row {row + 1} has no item id ({id_col})")
    repeated = ids[ids.duplicated()].unique().tolist()
    if repeated:
        raise DataError(f"{path}: {len(repeated)} item id(s) listed more than once in "
                        f"{id_col}, e.g. {repeated[:3]}")
    names = ids if name_col is None else raw[name_col].fillna("").str.strip()
    return {item: name or item for item, name in zip(ids, names, strict=True)}


def load(spec: str, columns: CsvColumns | None = None) -> BasketData:
    """``uci``, ``instacart``, or a path to a CSV described by ``columns``."""
    if spec == "uci":
        return load_uci()
    if spec == "instacart":
        return load_instacart()
    if columns is None:
        raise DataError(
            f"{spec!r} is not a bundled data set (uci, instacart); for a CSV path give "
            "--user-col, --item-col and --time-col"
        )
    return load_csv(Path(spec), columns)
