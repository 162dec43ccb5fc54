"""Failed servers are banned for a time that doubles with each failure."""

from __future__ import annotations

from swarmshard.client.session import BanList


def test_backoff_doubles_and_expires():
    bans = BanList(base_seconds=10, max_seconds=25)
    assert bans.ban("a", now=0) == 10
    assert bans.active(now=5) == {"a"} and bans.active(now=11) == set()
    assert bans.ban("a", now=20) == 20
    assert bans.ban("a", now=50) == 25  # capped
    assert bans.active(now=74) == {"a"} and bans.active(now=76) == set()
