"""How fast is gap detection over a year of 1-minute data for 10 symbols? (limit: 2 s)

Builds a scratch database with, per symbol, one trade and one 1-minute candle per minute
(``--scale 1`` = 365 days: 5.26 M trades and 5.26 M candles for 10 symbols), coverage for
all of it, then times ``GapFiller.detect_gaps()``:

1. on complete data (the common case: nothing to find);
2. after planting holes: trade-id holes in three symbols, deleted candles in one, an
   uncovered day between an id-less CSV range and REST data in another — and checks that
   exactly those are found.

Figures are printed as ratios against the 2 s limit and against a reference measured in the
same run (one plain ``count(*)`` scan of each table), so slow or busy machines can be judged.

    /tmp/venv/bin/python benchmarks/gaps.py --scale 0.1     # 36.5 days, quick
    /tmp/venv/bin/python benchmarks/gaps.py                 # the full year (loading takes ~1 min)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone

import psycopg
from psycopg import sql

from kraken_hist import migrate, store
from kraken_hist.gap_filler import GapFiller
from kraken_hist.pairs import DEFAULT_REGISTRY, Pair
from kraken_hist.types import GapKind

UTC = timezone.utc
START = datetime(2024, 1, 1, tzinfo=UTC)
LIMIT_SECONDS = 2.0

_LOAD_TRADES = """
INSERT INTO trades (symbol, trade_id, time, price, volume, side, ord_type, source)
SELECT %(symbol)s, m + 1, %(start)s::timestamptz + m * interval '1 minute' + interval '17 seconds',
       100 + (m %% 97), 0.5, 'b', 'l', 'rest'
FROM generate_series(0, %(minutes)s - 1) AS m
"""

_LOAD_CANDLES = """
INSERT INTO candles (symbol, time, open, high, low, close, vwap, volume, trades, source)
SELECT symbol, date_trunc('minute', time), price, price, price, price, price, volume, 1, 'trades'
FROM trades WHERE symbol = %(symbol)s
"""


def admin_connect(url: str) -> psycopg.Connection:
    return psycopg.connect(url, autocommit=True)


def build(admin_url: str, name: str, symbols: list[str], minutes: int) -> str:
    with admin_connect(admin_url) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    info = psycopg.conninfo.conninfo_to_dict(admin_url)
    url = f"postgresql://{info.get('user', 'postgres')}@{info.get('host', '127.0.0.1')}:{info.get('port', 5432)}/{name}"
    migrate.upgrade(url)
    end = START + timedelta(minutes=minutes)
    with psycopg.connect(url) as conn:
        for symbol in symbols:
            params = {"symbol": symbol, "start": START, "minutes": minutes}
            conn.execute(_LOAD_TRADES, params)
            conn.execute(_LOAD_CANDLES, params)
            store.add_coverage(conn, symbol, "rest", START, end)
            conn.commit()
            print(f"  loaded {symbol}: {minutes:,} trades and candles", flush=True)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE trades")
        conn.execute("VACUUM ANALYZE candles")
    return url


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
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of a year of 1-minute data (default 1)")
    parser.add_argument("--symbols", type=int, default=10, help="number of symbols (default 10)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per case; the median is shown")
    parser.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
    args = parser.parse_args(argv)

    minutes = max(1440, int(525_600 * args.scale))
    names = list(DEFAULT_REGISTRY.symbols())
    for extra in range(len(names), args.symbols):  # more pairs than the built-in table holds
        DEFAULT_REGISTRY.add(Pair(symbol=f"BENCH{extra}/USD", altname=f"BENCH{extra}USD",
                                  rest_key=f"BENCH{extra}USD", price_decimals=2))
    symbols = list(DEFAULT_REGISTRY.symbols())[: args.symbols]
    name = f"kh_bench_gaps_{uuid.uuid4().hex[:8]}"
    print(f"building {name}: {len(symbols)} symbols x {minutes:,} minutes "
          f"({len(symbols) * minutes:,} trades + as many candles)", flush=True)
    began = time.perf_counter()
    url = build(args.admin_url, name, symbols, minutes)
    print(f"  built in {time.perf_counter() - began:.1f} s")
    try:
        filler = GapFiller(url, symbols=symbols, rate_limit_delay=0)
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
    finally:
        if not args.keep:
            with admin_connect(args.admin_url) as conn:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    rows = len(symbols) * minutes
    print(f"\nreference: count(*) over trades and candles ({2 * rows:,} rows): {reference:.3f} s")
    for label, seconds in (("complete data", clean_seconds), ("with planted gaps", gaps_seconds)):
        print(f"detect_gaps, {label:<18} {seconds:.3f} s = {seconds / LIMIT_SECONDS:.2f} x the {LIMIT_SECONDS:.0f} s limit"
              f" = {seconds / reference:.1f} x the reference scan")
    print("found: " + ", ".join(f"{k.value} {counts[k]} (expected {expected[k]})" for k in GapKind))
    if counts != expected:
        print("FAIL: detection did not report exactly the planted gaps", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
