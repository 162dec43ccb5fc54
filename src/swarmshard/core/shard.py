"""The unit of placement: a contiguous span of one model's blocks (exo's `Shard`, passed everywhere)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Shard:
    """Blocks ``[start, end)`` of model ``model_id`` that has ``n_blocks`` blocks in all."""

    model_id: str
    start: int
    end: int
    n_blocks: int

    def __post_init__(self) -> None:
        if not (0 <= self.start < self.end <= self.n_blocks):
            raise ValueError(
                f"invalid span {self.start}:{self.end} for model {self.model_id!r} "
                f"with {self.n_blocks} blocks (need 0 <= start < end <= {self.n_blocks})"
            )

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def is_first(self) -> bool:
        return self.start == 0

    @property
    def is_last(self) -> bool:
        return self.end == self.n_blocks

    def __str__(self) -> str:
        return f"{self.model_id}[{self.start}:{self.end}]"


def parse_span(text: str, n_blocks: int) -> tuple[int, int]:
    """Parse ``"10:20"`` (or ``":10"``, ``"20:"``) into ``(start, end)`` validated against ``n_blocks``."""
    if ":" not in text:
        raise ValueError(f"span {text!r} must look like START:END, e.g. 0:10")
    left, right = text.split(":", 1)
    try:
        start = int(left) if left.strip() else 0
        end = int(right) if right.strip() else n_blocks
    except ValueError as exc:
        raise ValueError(f"span {text!r} must hold integers, e.g. 0:10") from exc
    if not (0 <= start < end <= n_blocks):
        raise ValueError(f"span {text!r} is outside the model's {n_blocks} blocks")
    return start, end
