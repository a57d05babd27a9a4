"""The one back-off rule every retry loop uses: exponential, capped, jittered as asked."""

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kraken_hist.rules.backoff import Backoff

bases = st.floats(min_value=0.0, max_value=10.0)
caps = st.floats(min_value=0.0, max_value=120.0)
factors = st.floats(min_value=1.0, max_value=4.0)
attempts = st.integers(min_value=-3, max_value=10_000)


def test_doubles_from_the_base_until_the_cap() -> None:
    assert [Backoff(1.0, 10.0).delay(n) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]
    assert [Backoff(2.0, 60.0, factor=3.0).delay(n) for n in range(1, 5)] == [2, 6, 18, 54]


@given(bases, caps, factors, attempts, st.integers(min_value=0, max_value=2**32))
def test_every_jitter_stays_under_the_ceiling_and_the_cap(base, cap, factor, attempt, seed) -> None:
    rng = random.Random(seed)
    ceiling = Backoff(base, cap, factor).ceiling(attempt)
    assert 0 <= ceiling <= cap
    assert Backoff(base, cap, factor).delay(attempt) == ceiling
    assert ceiling / 2 <= Backoff(base, cap, factor, "half").delay(attempt, rng) <= ceiling
    assert 0 <= Backoff(base, cap, factor, "full").delay(attempt, rng) <= ceiling


@given(bases, caps, factors, st.integers(min_value=1, max_value=200))
def test_the_ceiling_never_shrinks_with_more_attempts(base, cap, factor, attempt) -> None:
    backoff = Backoff(base, cap, factor)
    assert backoff.ceiling(attempt) <= backoff.ceiling(attempt + 1)


def test_full_jitter_spreads_over_the_whole_range() -> None:
    rng = random.Random(1)
    delays = [Backoff(0.5, 5.0, jitter="full").delay(4, rng) for _ in range(400)]
    assert min(delays) < 0.4 and max(delays) > 3.6  # ceiling 4.0


@pytest.mark.parametrize("bad", [dict(base=-1, cap=1), dict(base=1, cap=-1), dict(base=1, cap=1, factor=0.5)])
def test_refuses_impossible_numbers(bad) -> None:
    with pytest.raises(ValueError):
        Backoff(**bad)
