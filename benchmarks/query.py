"""Query-layer benchmark: get_candles, warm-up, replay and the aggregate refresh, each against a
limit measured in the same run on the same server.

Creates a scratch database, loads 2 years of 1-minute candles for 3 symbols (~3.1M rows at
--scale 1) with COPY, refreshes the aggregates, measures, and drops the database.

    python benchmarks/query.py [--scale 0.1] [--admin-url postgresql://...] [--samples 40]

Limits (ratio = ours / limit, so 1.0 is "as fast as the limit"):
- reads (get_candles, get_warmup_data): a raw psycopg fetch of the same rows — the rows the
  provider returned, selected by their bucket-time bounds from the same relation (for
  intervals computed on the fly, the same aggregate written by hand), as plain tuples;
  goal <= 1.2;
- replay: raw psycopg streaming of the same rows (``Cursor.stream``), as tuples;
- the full refresh of all seven intervals: one INSERT ... SELECT of the 5-minute aggregate of
  every 1-minute candle into a keyed table (reading every minute once and writing the
  largest level once: what no refresh can avoid);
- the refresh after one new day: the same INSERT for that day's minutes.
On TimescaleDB the compression policy is removed for the run (the periodic refresh would
otherwise compress the data set's old chunks in the middle of the measurements).
`--admin-url` chooses the server: plain PostgreSQL or TimescaleDB.
"""

from __future__ import annotations

import argparse
import io
import random
import statistics
import time
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

import psycopg

from kraken_hist.storage import migrate

from kraken_hist.storage import store
from kraken_hist.core.intervals import Interval
from kraken_hist.query.provider import HistoricalDataProvider
from kraken_hist.storage.refresh import refresh_aggregates

from common import add_admin_url, flavour, has_timescaledb, machine_note, scratch_database

UTC = timezone.utc
SYMBOLS = ("BTC/USD", "ETH/USD", "SOL/USD")
START = datetime(2023, 1, 2, tzinfo=UTC)
COLUMNS = "symbol, time, open, high, low, close, volume, vwap, trades"

# What no refresh can avoid: every minute read once, the 5-minute level written once.
_LIMIT_TABLE = """
CREATE TABLE limit_5m (symbol text, time timestamptz, open numeric, high numeric, low numeric, close numeric,
                       vwap numeric, volume numeric, trades bigint, vwap_volume numeric, vwap_notional numeric,
                       PRIMARY KEY (symbol, time))
"""
_LIMIT_INSERT = """
INSERT INTO limit_5m
SELECT symbol, date_bin('5 minutes', time, '1970-01-01T00:00:00Z'),
       (array_agg(open ORDER BY time))[1], max(high), min(low), (array_agg(close ORDER BY time DESC))[1],
       sum(vwap * volume) / NULLIF(sum(volume) FILTER (WHERE vwap IS NOT NULL), 0), sum(volume), sum(trades),
       sum(volume) FILTER (WHERE vwap IS NOT NULL), sum(vwap * volume)
FROM candles WHERE time >= %s AND time < %s GROUP BY 1, 2
"""

# Buckets of an interval computed on the fly, by hand (what the provider's query computes).
_RAW_AGGREGATE = """
SELECT symbol, date_bin(%(stride)s, time, %(origin)s) AS b,
       (array_agg(open ORDER BY time))[1], max(high), min(low), (array_agg(close ORDER BY time DESC))[1],
       sum(volume), sum({notional}) / NULLIF(sum({weight}), 0), sum(trades)
FROM {relation} WHERE symbol = %(symbol)s AND time >= %(lo)s AND time < %(hi)s
GROUP BY 1, 2 ORDER BY 2
"""


def copy_minutes(conn: psycopg.Connection, symbol: str, first: datetime, minutes: int, seed: int) -> None:
    """COPY `minutes` consecutive 1-minute candles (a random walk; ~3% quiet minutes left out)."""
    rng = random.Random(seed)
    price = 20_000.0 + rng.random() * 1000
    base = int(first.timestamp())
    with conn.cursor().copy(
        "COPY candles (symbol, time, open, high, low, close, vwap, volume, trades, source) FROM STDIN"
    ) as copy:
        buf = io.StringIO()
        for i in range(minutes):
            step = rng.gauss(0, 5)
            o, c = price, max(1.0, price + step)
            price = c
            if rng.random() < 0.03:
                continue
            h, low = max(o, c) + rng.random() * 3, max(0.5, min(o, c) - rng.random() * 3)
            when = datetime.fromtimestamp(base + 60 * i, UTC).isoformat()
            buf.write(f"{symbol}\t{when}\t{o:.1f}\t{h:.1f}\t{low:.1f}\t{c:.1f}\t{(o + c) / 2:.1f}\t"
                      f"{rng.random() * 3:.8f}\t{rng.randint(1, 60)}\ttrades\n")
            if i % 50_000 == 0:
                copy.write(buf.getvalue())
                buf = io.StringIO()
        copy.write(buf.getvalue())


def p50(samples: list[float]) -> float:
    return statistics.median(samples)


def raw_rows(raw: psycopg.Connection, iv: Interval, symbol: str, lo: datetime, hi: datetime) -> list[tuple]:
    """The rows of `symbol` at `iv` with bucket start in [lo, hi], by plain psycopg."""
    if iv.is_stored:
        return raw.execute(f"SELECT {COLUMNS} FROM {iv.relation} WHERE symbol = %s AND time >= %s AND time <= %s "
                           "ORDER BY time", (symbol, lo, hi)).fetchall()
    source = iv.source_interval()
    minute = source.minutes == 1
    query = _RAW_AGGREGATE.format(relation=source.relation, notional="vwap * volume" if minute else "vwap_notional",
                                  weight="volume) FILTER (WHERE vwap IS NOT NULL" if minute else "vwap_volume")
    return raw.execute(query, {"stride": iv.delta, "origin": iv.origin, "symbol": symbol, "lo": lo,
                               "hi": hi + iv.delta}).fetchall()


def timed(call: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = call()
    return time.perf_counter() - start, out


def limit_pass(url: str, lo: datetime, hi: datetime, *, fresh: bool) -> float:
    with psycopg.connect(url, autocommit=True) as conn:
        if fresh:
            conn.execute("DROP TABLE IF EXISTS limit_5m")
            conn.execute(_LIMIT_TABLE)
        conn.execute("CHECKPOINT")
        start = time.perf_counter()
        conn.execute(_LIMIT_INSERT, (lo, hi))
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the 2-year data set (default 1)")
    add_admin_url(parser)
    parser.add_argument("--samples", type=int, default=40, help="timed calls per figure")
    args = parser.parse_args()
    minutes = max(20_000, int(2 * 365 * 1440 * args.scale))
    with scratch_database(args.admin_url, "query") as url:
        run(url, minutes, args.samples)


def run(url: str, minutes: int, samples: int) -> None:
    print(f"{flavour(url)}; {machine_note()}")
    if migrate.apply_compress_after(url, 0) is None and has_timescaledb(url):
        # (the periodic refresh would compress the old chunks of this data set in the middle of
        # the measurements: the same work as on plain PostgreSQL is measured, compression apart)
        print("TimescaleDB compression policy removed for this run")
    began = time.perf_counter()
    with psycopg.connect(url) as conn:
        for n, symbol in enumerate(SYMBOLS):
            copy_minutes(conn, symbol, START, minutes, seed=n)
        conn.commit()
        conn.execute("ANALYZE candles")
        conn.commit()
        rows = conn.execute("SELECT count(*) FROM candles").fetchone()[0]
    end_of_data = START + timedelta(minutes=minutes)
    print(f"loaded {rows:,} 1-minute candles ({len(SYMBOLS)} symbols x {minutes / 1440:.0f} days) "
          f"in {time.perf_counter() - began:.1f} s")
    limit = limit_pass(url, START, end_of_data, fresh=True)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CHECKPOINT")
    seconds, _full = timed(lambda: refresh_aggregates(url, start=START))
    print(f"full refresh of all seven intervals: {seconds:.2f} s; limit (one INSERT of the 5m aggregate of every "
          f"minute) {limit:.2f} s -> ratio {seconds / limit:.2f}")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")

    rng = random.Random(42)
    with HistoricalDataProvider(url) as provider, \
            psycopg.connect(url, autocommit=True, options="-c TimeZone=UTC") as raw:
        print("\nget_candles, 1,000 bars: p50 ms of the provider and of a raw psycopg fetch of the same rows "
              "(ratio goal <= 1.2); cpu = this process's CPU per call")
        for interval in (1, 5, 15, 30, 60, 240, 1440, 10080, 3, 45, 720):
            iv = Interval(interval)
            span = timedelta(minutes=interval * 1000)
            ours, theirs, cpu, bars = [], [], [], 0
            for _ in range(samples):
                latest_start = max(START, end_of_data - span)
                start = START + timedelta(seconds=rng.random() * (latest_start - START).total_seconds())
                symbol = rng.choice(SYMBOLS)
                c = time.process_time()
                t, got = timed(lambda: provider.get_candles(symbol, interval, start=start, end=end_of_data, limit=1000))
                cpu.append((time.process_time() - c) * 1000)
                r, rows_ = timed(lambda: raw_rows(raw, iv, symbol, got[0].time, got[-1].time))
                assert len(rows_) == len(got), (interval, len(rows_), len(got))
                ours.append(t * 1000)
                theirs.append(r * 1000)
                bars = max(bars, len(got))
            kind = "stored" if iv.is_stored else "on the fly"
            print(f"  {interval:>6}m {kind:<10} {bars:>5} bars  provider {p50(ours):7.2f}  raw {p50(theirs):7.2f}  "
                  f"ratio {p50(ours) / p50(theirs):5.2f}  cpu {p50(cpu):6.2f}")

        print("\nget_warmup_data (periods ending at a random time in the last quarter): p50 ms, provider vs raw")
        days = int(minutes / 1440)
        for interval, periods in ((1, 500), (5, 200), (60, 200), (45, 100), (1440, 20)):
            iv = Interval(interval)
            ours, theirs = [], []
            for _ in range(samples):
                symbol = rng.choice(SYMBOLS)
                when = end_of_data - timedelta(days=rng.randint(0, max(0, days // 4)), minutes=rng.randint(0, 1439))
                t, got = timed(lambda: provider.get_warmup_data(symbol, interval, periods, end=when))
                r, rows_ = timed(lambda: raw_rows(raw, iv, symbol, got[0].time, got[-1].time))
                assert len(got) == periods == len(rows_), (interval, len(got), len(rows_))
                ours.append(t * 1000)
                theirs.append(r * 1000)
            print(f"  {periods:>4} x {iv.label():>3}  provider {p50(ours):7.2f}  raw {p50(theirs):7.2f}  "
                  f"ratio {p50(ours) / p50(theirs):5.2f}")

        replay_minutes = min(minutes, 400_000)
        hi = START + timedelta(minutes=replay_minutes)
        t, count = timed(lambda: sum(1 for _ in provider.replay_candles("BTC/USD", 1, START, hi)))
        with psycopg.connect(url, autocommit=True, options="-c TimeZone=UTC") as stream_conn:
            r, raw_count = timed(lambda: sum(1 for _ in stream_conn.cursor().stream(
                f"SELECT {COLUMNS} FROM candles WHERE symbol = %s AND time >= %s AND time < %s ORDER BY time",
                ("BTC/USD", START, hi))))
        assert raw_count == count
        print(f"\nreplay at speed 0: {count:,} candles at {count / t:,.0f}/s; raw psycopg stream of the same rows "
              f"{count / r:,.0f}/s -> ratio {t / r:.2f}")
        t, merged = timed(lambda: sum(1 for _ in provider.replay_candles(SYMBOLS, 1, START,
                                                                          START + timedelta(minutes=replay_minutes // 3))))
        print(f"replay of {len(SYMBOLS)} symbols merged: {merged / t:,.0f}/s")

    with psycopg.connect(url) as conn:
        for n, symbol in enumerate(SYMBOLS):
            copy_minutes(conn, symbol, end_of_data, 1440, seed=100 + n)
            store.record_candle_change(conn, symbol, end_of_data, end_of_data + timedelta(days=1))
        conn.commit()
    seconds, _result = timed(lambda: refresh_aggregates(url))
    limit = limit_pass(url, end_of_data, end_of_data + timedelta(days=1), fresh=False)
    print(f"\nrefresh after one new day of 1-minute data ({len(SYMBOLS)} symbols, all intervals): "
          f"{seconds * 1000:.0f} ms; limit (one INSERT of that day's 5m aggregate) {limit * 1000:.0f} ms "
          f"-> ratio {seconds / limit:.2f}")


if __name__ == "__main__":
    main()
