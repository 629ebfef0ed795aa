"""Shared fixtures: the bundled data sets' splits (loaded once per session) and a small
synthetic split for fast unit tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model_export.datasets import BasketData, load_instacart, load_uci
from model_export.evaluation import Split, make_split


@pytest.fixture(scope="session")
def uci_split() -> Split:
    return make_split(load_uci())


@pytest.fixture(scope="session")
def instacart_split() -> Split:
    return make_split(load_instacart())


def synthetic_data(n_users: int = 40, n_items: int = 30, seed: int = 0) -> BasketData:
    """Users who buy from two overlapping 'aisles', so co-occurrence carries signal."""
    rng = np.random.default_rng(seed)
    users = {}
    for u in range(n_users):
        aisle = rng.integers(0, 2)
        pool = np.arange(n_items // 2) + aisle * (n_items // 3)
        baskets = []
        for _ in range(rng.integers(2, 6)):
            size = int(rng.integers(2, 7))
            baskets.append(tuple(sorted(f"i{int(x):03d}" for x in
                                        rng.choice(pool, size, replace=False))))
        users[f"{u:04d}"] = baskets
    names = {f"i{i:03d}": f"item number {i}" for i in range(n_items)}
    return BasketData(name="synthetic", users=users, item_names=names)


@pytest.fixture
def small_split() -> Split:
    return make_split(synthetic_data())


CSV_OPTS = ["--user-col", "customer", "--item-col", "sku", "--time-col", "day",
            "--name-col", "title"]


def write_basket_csv(path: Path) -> Path:
    """A small retailer's export (60 customers), as a user would give it by path; CSV_OPTS
    name its columns."""
    data = synthetic_data(n_users=60, n_items=30, seed=2)
    lines = ["customer,sku,day,title"]
    for user, baskets in data.users.items():
        for day, basket in enumerate(baskets):
            lines += [f"{user},{item},2024-03-{day + 1:02d},{data.name_of(item)}"
                      for item in basket]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def basket_csv(tmp_path: Path) -> Path:
    return write_basket_csv(tmp_path / "shop.csv")
