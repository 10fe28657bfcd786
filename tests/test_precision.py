"""precision auto's timing: a slow first call or a busy moment must not decide it."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

from dcgan.precision import fastest


def _timed_call(seconds: float, extra: dict[int, float], counter: itertools.count) -> Callable[[], None]:
    """A call that takes `seconds`, plus `extra[i]` when it is the i-th call made through `counter`."""

    def call() -> None:
        time.sleep(seconds + extra.get(next(counter), 0.0))

    return call


def test_fastest_ignores_the_first_call() -> None:
    counter = itertools.count()
    calls = {
        "slow": _timed_call(0.006, {}, counter),
        "fast": _timed_call(0.002, {1: 0.2}, counter),  # call 1 is fast's untimed first call
    }
    best = fastest(calls, rounds=1)
    assert best["fast"] < 0.004 < best["slow"]


def test_a_busy_moment_slows_both_calls_not_one() -> None:
    """Six calls in a row made slow (both calls' first three rounds): each still keeps a fast round.

    Timed one after the other (all of one, then all of the other), as the timing was before, the
    same stretch of slow calls would have covered every timed call of one of them.
    """
    counter = itertools.count()
    busy = {i: 0.03 for i in range(2, 8)}  # after the two untimed first calls
    calls = {"float32": _timed_call(0.006, busy, counter), "bfloat16": _timed_call(0.002, busy, counter)}
    best = fastest(calls, rounds=7)
    assert best["bfloat16"] < 0.004 < best["float32"] < 0.02
