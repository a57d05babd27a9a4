"""How long to wait before trying again: one exponential back-off rule for every retry loop.

Every loop that retries (REST calls, the WebSocket reconnect, the writer's commits, the stream's
REST catch-up, gap-fill attempts, import chunks, refresh waits, the rate limiter's block after a
throttle answer) asks a :class:`Backoff` how long to wait; they differ only in their numbers and
in how much jitter spreads processes that failed together. Pure: the random source is passed in.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

Jitter = Literal["none", "half", "full"]


@dataclass(frozen=True, slots=True)
class Backoff:
    """``base · factor^(attempt-1)`` seconds, at most `cap`, for the 1-based `attempt`.

    Jitter: ``none`` waits exactly that; ``half`` waits uniformly in its upper half (a floor that
    still spreads a crowd); ``full`` waits uniformly in ``[0, ceiling]`` (spreads a crowd best;
    "Exponential Backoff And Jitter", AWS architecture blog)."""

    base: float
    cap: float
    factor: float = 2.0
    jitter: Jitter = "none"

    def __post_init__(self) -> None:
        if self.base < 0 or self.cap < 0 or self.factor < 1:
            raise ValueError(f"a back-off needs base >= 0, cap >= 0 and factor >= 1, got {self}")

    def ceiling(self, attempt: int) -> float:
        """The longest wait before retry `attempt` (1, 2, ...; 0 and below count as 1)."""
        exponent = min(max(attempt, 1) - 1, 64)  # far past any cap; keeps the float finite
        return min(self.cap, self.base * self.factor ** exponent)

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry `attempt`, jittered as configured."""
        ceiling = self.ceiling(attempt)
        if self.jitter == "none":
            return ceiling
        draw = (rng or random).random()
        return ceiling * draw if self.jitter == "full" else ceiling / 2 + ceiling / 2 * draw
