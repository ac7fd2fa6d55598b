"""Progress lines for long loops (held-out evaluation, generation): a line every so many seconds,
none for a loop that finishes sooner. A loaded 2-core machine took 2-4.5 minutes per evaluation
with nothing printed, which reads as a hang."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger("fedllm")

EVERY_S = 20.0


class Progress:
    """Counts ``total`` items of work and logs how far it got, at most once every ``every`` seconds."""

    def __init__(
        self, what: str, total: int, unit: str, every: float = EVERY_S, clock: Callable[[], float] = time.monotonic
    ):
        self.what, self.total, self.unit, self.every, self.clock = what, total, unit, every, clock
        self.done = 0
        self.started = self.last = clock()

    def advance(self, count: int = 1) -> None:
        """``count`` more items done; logs a line if ``every`` seconds passed since the last one."""
        self.done += count
        now = self.clock()
        if now - self.last >= self.every and self.done < self.total:
            self.last = now
            log.info(
                "%s: %d of %d %s (%.0f%%) after %.0f s",
                self.what,
                self.done,
                self.total,
                self.unit,
                100 * self.done / self.total,
                now - self.started,
            )
