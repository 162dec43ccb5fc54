"""Per-session KV caches under a token budget: reserve on open, refuse clearly when full, free on close."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class CacheFull(RuntimeError):
    """A session asked for more cache tokens than the server has left."""


class UnknownSession(KeyError):
    """A step named a session this server does not hold (never opened, closed or expired)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown session"


@dataclass
class Session:
    session_id: str
    max_length: int
    batch_size: int
    cache: Any
    peer: str
    position: int = 0
    last_used: float = field(default_factory=time.monotonic)

    @property
    def reserved_tokens(self) -> int:
        return self.max_length * self.batch_size


class SessionCache:
    """Holds open sessions; the budget counts reserved tokens (max_length × batch) per session."""

    def __init__(self, capacity_tokens: int, make_cache: Callable[[], Any], clock: Callable[[], float] = time.monotonic):
        if capacity_tokens < 1:
            raise ValueError("cache capacity must be at least one token")
        self.capacity_tokens = capacity_tokens
        self._make_cache = make_cache
        self._clock = clock
        self._sessions: dict[str, Session] = {}

    @property
    def tokens_reserved(self) -> int:
        return sum(s.reserved_tokens for s in self._sessions.values())

    @property
    def tokens_left(self) -> int:
        return self.capacity_tokens - self.tokens_reserved

    def __len__(self) -> int:
        return len(self._sessions)

    def open(self, session_id: str, max_length: int, batch_size: int, peer: str) -> Session:
        if session_id in self._sessions:
            raise CacheFull(f"session {session_id} is already open on this server")
        need = max_length * batch_size
        if need > self.tokens_left:
            raise CacheFull(
                f"session needs {need} cache tokens (max_length {max_length} × batch {batch_size}) "
                f"but this server has {self.tokens_left} of {self.capacity_tokens} left"
            )
        session = Session(session_id, max_length, batch_size, self._make_cache(), peer, last_used=self._clock())
        self._sessions[session_id] = session
        return session

    def get(self, session_id: str) -> Session:
        try:
            session = self._sessions[session_id]
        except KeyError:
            raise UnknownSession(f"unknown session {session_id} (never opened, closed, or expired)") from None
        session.last_used = self._clock()
        return session

    def close(self, session_id: str) -> bool:
        return self._sessions.pop(session_id, None) is not None

    def expire_idle(self, idle_timeout: float) -> list[str]:
        """Free sessions unused for ``idle_timeout`` seconds (abandoned clients); returns their ids."""
        now = self._clock()
        expired = [sid for sid, s in self._sessions.items() if now - s.last_used > idle_timeout]
        for sid in expired:
            del self._sessions[sid]
        return expired
