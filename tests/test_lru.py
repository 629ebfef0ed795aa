"""The device's LRU cache (fedcart.lru): bounded, least recently used out first."""

from __future__ import annotations

import pytest

from fedcart.lru import Lru


def test_the_least_recently_used_entry_goes_first() -> None:
    cache: Lru[str, int] = Lru(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # now b is the least recently used
    cache.put("c", 3)
    assert (cache.get("a"), cache.get("b"), cache.get("c"), len(cache)) == (1, None, 3, 2)


def test_get_or_make_makes_an_entry_once() -> None:
    cache: Lru[int, list[int]] = Lru(1)
    made: list[int] = []

    def make() -> list[int]:
        made.append(1)
        return made

    first = cache.get_or_make(7, make)
    assert cache.get_or_make(7, make) is first and len(made) == 1
    cache.get_or_make(8, lambda: [8])  # evicts 7
    assert cache.get(7) is None


def test_a_cache_holds_at_least_one_entry() -> None:
    with pytest.raises(ValueError, match="at least one entry"):
        Lru(0)
