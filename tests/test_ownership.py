"""The one-owner-per-second rule as pure functions, and its SQL twin against real PostgreSQL."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import psycopg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kraken_hist.rules import ranges as ranges
from kraken_hist.storage import ownership
from kraken_hist.storage import store
from kraken_hist.core.timeutils import since_cursor, to_unix_ns

UTC = timezone.utc
BASE = datetime(2025, 1, 1, tzinfo=UTC)
US = timedelta(microseconds=1)


def at(micros: int) -> datetime:
    return BASE + micros * US


instants = st.integers(min_value=0, max_value=20_000_000).map(at)  # 20 s around BASE, to the µs
spans = st.lists(st.tuples(instants, instants).map(sorted).map(tuple), max_size=6)


def is_whole_second(when: datetime) -> bool:
    return when.microsecond == 0


@given(window=st.tuples(instants, instants).map(sorted), trade_times=st.lists(instants, max_size=8), id_cov=spans)
def test_the_archive_claims_whole_seconds_the_id_family_does_not_own(window, trade_times, id_cov):
    owned = ownership.id_owned(trade_times, id_cov)
    claim = ownership.archive_claim(tuple(window), owned)
    assert claim == ranges.normalize(claim)
    assert all(is_whole_second(lo) and is_whole_second(hi) for lo, hi in claim)
    assert not ranges.intersect(claim, owned)  # never both owners
    for t in trade_times:  # a second holding an id-bearing trade is never the archive's
        assert not ownership.archive_owns(t, claim)
    # every whole second of the window that the id family leaves alone is claimed
    second = ownership.second_floor(window[0])
    while window[0] < window[1] and second < window[1]:
        mine = ownership.archive_keeps(second, owned)
        assert mine == ownership.archive_owns(second, claim)
        second += timedelta(seconds=1)


@given(times=st.lists(instants, max_size=10), cov=spans)
def test_owned_seconds_cover_their_evidence(times, cov):
    owned = ownership.id_owned(times, cov)
    assert all(is_whole_second(lo) and is_whole_second(hi) for lo, hi in owned)
    assert not ranges.subtract(cov, owned)  # coverage touching a second makes it the id family's
    for t in times:
        assert ranges.intersect([(t, t + US)], owned)


@given(lo=instants, hi=instants, archive=spans, by_id=spans)
def test_a_jump_is_explained_only_through_archive_time_and_only_when_all_of_it_is_known(lo, hi, archive, by_id):
    lo, hi = min(lo, hi), max(lo, hi)
    explained = ownership.hole_explained((lo, hi), archive, by_id)
    seconds = ownership.whole_seconds([(lo, hi)])
    if not ranges.intersect(seconds, archive):
        assert not explained
    else:
        assert explained == (not ranges.subtract(seconds, ranges.union(archive, by_id)))


def test_a_jump_inside_rest_coverage_alone_stays_a_hole():
    """Trades lost after REST covered them: coverage does not excuse a jump with no archive in it."""
    assert not ownership.hole_explained((at(1_500_000), at(4_200_000)), [], [(at(0), at(9_000_000))])


@given(when=instants)
def test_the_cursor_after_an_archive_starts_at_the_first_trade_at_or_after_its_end(when):
    cursor = int(since_cursor(when))
    assert cursor < to_unix_ns(when) and cursor + 1 == to_unix_ns(when)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(times=st.lists(instants, min_size=1, max_size=12), archive=spans)
def test_the_sql_rule_is_the_pure_rule(db_url, times, archive):
    """ARCHIVE_OWNED in SQL and archive_owns in Python agree on every trade."""
    claim = ownership.whole_seconds(archive)
    with psycopg.connect(db_url) as conn:
        conn.execute("DELETE FROM coverage")
        for lo, hi in claim:
            store.add_coverage(conn, "BTC/USD", "csv", lo, hi)
        conn.execute("CREATE TEMP TABLE probe (symbol text, time timestamptz)")
        with conn.cursor().copy("COPY probe (symbol, time) FROM STDIN") as copy:
            for t in times:
                copy.write_row(("BTC/USD", t))
        rows = conn.execute(
            f"SELECT time, {ownership.ARCHIVE_OWNED.format(alias='p')} FROM probe p ORDER BY time").fetchall()
        in_window = ownership.archive_touches(conn, "BTC/USD", min(times), max(times) + US)
        conn.rollback()
    assert [owned for _t, owned in rows] == [ownership.archive_owns(t, claim) for t, _o in rows]
    assert in_window == bool(ranges.intersect(claim, [(min(times), max(times) + US)]))
