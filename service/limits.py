"""Per-user limits on what one caller may hold at once, so one tenant cannot starve others.

`PerKeyLimit` is a counting semaphore per key (a user id) that never blocks: a caller over
the limit is refused at once with `ResourceExhausted` naming the setting, rather than queued
on a thread that other users need. It has no threads of its own; the service core guards the
calls that hold a request thread for long (long-polls, over both front ends) with one:
`acquire` a place (False at once when the user holds them all: answer without waiting, or
raise `refusal()`), `release` it when done. `poll_threads` sizes the front ends' thread pools
for long-polls to match.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable

from tinker_jax.errors import ValidationError
from tinker_jax.service.errors import ResourceExhausted


def poll_threads(max_long_polls_per_user: int) -> int:
    """Request threads a front end keeps for long-polls, which hold one each: eight users at
    their limit, so one user never occupies more than an eighth of them. Thread pools start
    threads only as calls need them, so a large pool costs nothing idle."""
    return max(256, 8 * max_long_polls_per_user)


class PerKeyLimit:
    """At most `limit` concurrent holders per key; safe to use from many threads.

    `setting` is the configuration name of the limit and `what` says what is counted; both go
    into the refusal's message, so a client (or its operator) knows which limit it hit.
    """

    def __init__(self, limit: int, setting: str, what: str):
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise ValidationError(setting, f"expected an integer >= 1, got {limit!r}")
        self.limit = limit
        self.setting = setting
        self.what = what
        self._lock = threading.Lock()
        self._held: dict[Hashable, int] = {}  # only keys holding at least one

    def acquire(self, key: Hashable) -> bool:
        """Takes one of `key`'s places if one is free (True); False at once if not."""
        with self._lock:
            held = self._held.get(key, 0)
            if held >= self.limit:
                return False
            self._held[key] = held + 1
            return True

    def release(self, key: Hashable) -> None:
        """Gives back a place taken by `acquire`; RuntimeError if `key` holds none (a bug)."""
        with self._lock:
            held = self._held.get(key, 0)
            if held == 0:
                raise RuntimeError(f"{self.setting}: release of {key!r} without an acquire")
            if held == 1:
                del self._held[key]  # so the table holds only active keys
            else:
                self._held[key] = held - 1

    def held(self, key: Hashable) -> int:
        """How many places `key` holds now."""
        with self._lock:
            return self._held.get(key, 0)

    def refusal(self) -> ResourceExhausted:
        """The error for a caller over the limit (RESOURCE_EXHAUSTED: retry after a while)."""
        return ResourceExhausted(
            f"at most {self.limit} concurrent {self.what} per user ({self.setting}); "
            "wait for one to return, then retry"
        )
