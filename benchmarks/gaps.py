"""How fast is gap detection over 10 symbols at real densities, against reading the data once?

Builds a scratch database where the liquid pairs (``--liquid``, default 3) trade 10 to 50
times a minute (Kraken's BTC/USD and ETH/USD run at that order) and the others once a minute,
with contiguous ids, 1-minute candles built from the trades and coverage for all of it
(``--scale 0.1`` = 36.5 days: ~4.7 M trades of the liquid pairs), then times
``GapFiller.detect_gaps()``:

1. on complete data (the common case: nothing to find);
2. after planting holes: trade-id holes in three symbols, deleted candles in one, an
   uncovered day between an id-less CSV range and REST data in another — and checks that
   exactly those are found.

The limit, measured in the same run: one plain ``count(*)`` scan of ``trades`` and of
``candles`` (what merely reading the data once costs on this server).

    python benchmarks/gaps.py --scale 0.02     # a week, quick
    python benchmarks/gaps.py [--admin-url URL]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import datetime, timedelta, timezone

import psycopg

from kraken_hist.storage import store
from kraken_hist.gaps.filler import GapFiller
from kraken_hist.core.pairs import Pair, PairRegistry
from kraken_hist.core.types import GapKind

from common import add_admin_url, flavour, machine_note, scratch_database

UTC = timezone.utc
START = datetime(2024, 1, 1, tzinfo=UTC)

# `per_minute(m)` trades in minute m (10-50 for a liquid pair: a hash of m), spread over the
# minute, with contiguous ids from 1.
_LOAD_TRADES = """
INSERT INTO trades (symbol, trade_id, time, price, volume, side, ord_type, source)
SELECT %(symbol)s, row_number() OVER (ORDER BY m, k),
       %(start)s::timestamptz + m * interval '1 minute' + (k * 59.0 / n) * interval '1 second',
       100 + ((m + k) %% 97), 0.5, 'b', 'l', 'rest'
FROM (SELECT m, CASE WHEN %(liquid)s THEN 10 + abs(hashint4(m)) %% 41 ELSE 1 END AS n
      FROM generate_series(0, %(minutes)s - 1) AS m) minutes,
     LATERAL generate_series(1, n) AS k
"""

_LOAD_CANDLES = """
INSERT INTO candles (symbol, time, open, high, low, close, vwap, volume, trades, source)
SELECT symbol, date_trunc('minute', time), min(price), max(price), min(price), max(price), min(price), sum(volume),
       count(*), 'trades'
FROM trades WHERE symbol = %(symbol)s GROUP BY 1, 2
"""


def build(url: str, symbols: list[str], minutes: int, liquid: int) -> int:
    """Load the data; returns the number of trades."""
    end = START + timedelta(minutes=minutes)
    with psycopg.connect(url) as conn:
        for n, symbol in enumerate(symbols):
            params = {"symbol": symbol, "start": START, "minutes": minutes, "liquid": n < liquid}
            rows = conn.execute(_LOAD_TRADES, params).rowcount
            conn.execute(_LOAD_CANDLES, params)
            store.add_coverage(conn, symbol, "rest", START, end)
            conn.commit()
            print(f"  loaded {symbol}: {rows:,} trades, {rows / minutes:.1f} a minute", flush=True)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE trades")
        conn.execute("VACUUM ANALYZE candles")
        return conn.execute("SELECT count(*) FROM trades").fetchone()[0]  # type: ignore[index]


def plant_gaps(url: str, symbols: list[str], minutes: int) -> dict[GapKind, int]:
    """Holes of every kind; returns how many of each detection must report."""
    day = timedelta(days=1)
    span = max(3, minutes // 1440)
    with psycopg.connect(url) as conn:
        for symbol in symbols[1:4]:
            for k in range(3):
                lo = (k + 1) * minutes // 4
                conn.execute("DELETE FROM trades WHERE symbol = %s AND trade_id BETWEEN %s AND %s",
                             (symbol, lo, lo + 10 * (k + 1)))
        candle_symbol = symbols[4 % len(symbols)]
        for k in range(2):
            at = START + timedelta(minutes=(k + 1) * minutes // 3)
            conn.execute("DELETE FROM candles WHERE symbol = %s AND time >= %s AND time < %s",
                         (candle_symbol, at, at + timedelta(minutes=30)))
        # symbol 0: its first days came from an id-less CSV, and REST started a day later
        csv_symbol = symbols[0]
        csv_end = START + (span // 3) * day
        conn.execute("UPDATE trades SET trade_id = -trade_id, source = 'csv' WHERE symbol = %s AND time < %s",
                     (csv_symbol, csv_end + day))
        conn.execute("DELETE FROM coverage WHERE symbol = %s", (csv_symbol,))
        store.add_coverage(conn, csv_symbol, "csv", START, csv_end)
        first_rest = conn.execute("SELECT min(time) FROM trades WHERE symbol = %s AND trade_id > 0",
                                  (csv_symbol,)).fetchone()[0]
        store.add_coverage(conn, csv_symbol, "rest", first_rest, START + timedelta(minutes=minutes))
        conn.commit()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE trades")
        conn.execute("VACUUM ANALYZE candles")
    return {GapKind.TRADE_IDS: 9, GapKind.CANDLES: 2, GapKind.UNCOVERED: 1}


def timed(fn, repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        began = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times), result


def reference_scan(url: str) -> float:
    """One plain count(*) over each table: what merely reading the data costs here."""
    with psycopg.connect(url) as conn:
        conn.execute("SET jit = off")
        began = time.perf_counter()
        conn.execute("SELECT count(*) FROM trades").fetchone()
        conn.execute("SELECT count(*) FROM candles").fetchone()
        return time.perf_counter() - began


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=0.1, help="fraction of a year (default 0.1: 36.5 days)")
    parser.add_argument("--symbols", type=int, default=10, help="number of symbols (default 10)")
    parser.add_argument("--liquid", type=int, default=3, help="of which trade 10-50 times a minute (default 3)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per case; the median is shown")
    add_admin_url(parser)
    args = parser.parse_args(argv)

    minutes = max(1440, int(525_600 * args.scale))
    registry = PairRegistry()
    for extra in range(len(registry.symbols()), args.symbols):  # more pairs than the built-in table holds
        registry.add(Pair(symbol=f"BENCH{extra}/USD", altname=f"BENCH{extra}USD",
                          rest_key=f"BENCH{extra}USD", price_decimals=2))
    symbols = registry.symbols()[: args.symbols]
    with scratch_database(args.admin_url, "gaps") as url:
        print(f"{flavour(url)}; {machine_note()}")
        print(f"building: {len(symbols)} symbols x {minutes:,} minutes ({args.liquid} liquid)", flush=True)
        began = time.perf_counter()
        trades = build(url, symbols, minutes, args.liquid)
        print(f"  built in {time.perf_counter() - began:.1f} s")
        filler = GapFiller(url, symbols=symbols, rate_limit_delay=0, registry=registry)
        filler.start()
        reference = min(reference_scan(url) for _ in range(args.repeat))
        clean_seconds, clean = timed(lambda: filler.detect_gaps(), args.repeat)
        if clean:
            print(f"FAIL: complete data reported {len(clean)} gaps", file=sys.stderr)
            return 1
        expected = plant_gaps(url, symbols, minutes)
        gaps_seconds, found = timed(lambda: filler.detect_gaps(), args.repeat)
        counts = {kind: sum(1 for g in found if g.kind is kind) for kind in GapKind}
        filler.stop()
    print(f"\nlimit: count(*) over trades and candles ({trades:,} trades, {len(symbols) * minutes:,} minutes): "
          f"{reference:.3f} s")
    for label, seconds in (("complete data", clean_seconds), ("with planted gaps", gaps_seconds)):
        print(f"detect_gaps, {label:<18} {seconds:.3f} s -> ratio {seconds / reference:.2f}")
    expected = {kind: expected.get(kind, 0) for kind in GapKind}
    print("found: " + ", ".join(f"{k.value} {counts[k]} (expected {expected[k]})" for k in GapKind))
    if counts != expected:
        print("FAIL: detection did not report exactly the planted gaps", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
