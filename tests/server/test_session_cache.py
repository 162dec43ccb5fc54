"""KV-cache budget: sessions reserve tokens, are refused clearly when full, freed on close or idle."""

from __future__ import annotations

import pytest

from swarmshard.server.cache import CacheFull, SessionCache, UnknownSession


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_budget_refuse_and_free():
    cache = SessionCache(100, dict)
    cache.open("s1", 60, 1, "peer")
    assert cache.tokens_left == 40
    with pytest.raises(CacheFull, match="needs 50 cache tokens.*40 of 100 left"):
        cache.open("s2", 25, 2, "peer")
    cache.close("s1")
    cache.open("s2", 25, 2, "peer")
    assert cache.tokens_left == 50
    with pytest.raises(CacheFull, match="already open"):
        cache.open("s2", 1, 1, "peer")


def test_unknown_and_idle_sessions():
    clock = Clock()
    cache = SessionCache(100, dict, clock=clock)
    with pytest.raises(UnknownSession, match="unknown session nope"):
        cache.get("nope")
    cache.open("a", 10, 1, "p")
    cache.open("b", 10, 1, "p")
    clock.now = 50
    cache.get("b")
    clock.now = 70
    assert cache.expire_idle(60) == ["a"]
    assert len(cache) == 1 and cache.tokens_left == 90
