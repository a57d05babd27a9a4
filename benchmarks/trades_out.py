"""Data out: trade reads and replay, volume bars over a year, export — each against a limit
measured in the same run.

Creates a scratch database, loads a year of one liquid pair (``--scale 1``: 10.5 M BTC/USD
trades, 20 a minute, about Kraken's recent rate, with their 1-minute candles), measures and
drops the database:

* trades read (``get_trades``, ``get_trades_df``, ``replay_trades`` at speed 0) of `--read-rows`
  rows, in rows/s, divided by a raw psycopg fetch of the same rows (``execute().fetchall()``
  of the same SELECT: tuples of Decimals and nothing else) — goal >= 0.7x;
* volume bars over the whole year (``get_bars``: in pieces at once on several connections), in
  seconds — goal <= 2 s — and as one query on one connection (``read_bars(...,
  parallel_span=None)``); for scale, against one plain scan summing the year's trade volumes
  (what any exact pass over the trades costs at least);
* ``export`` of `--export-days` days of trades to Parquet and CSV (monthly files) divided by a
  raw ``COPY (same query) TO STDOUT`` of the same rows, read and dropped — goal >= 0.5x.

    python benchmarks/trades_out.py                 # the full year (loading takes ~2 min)
    python benchmarks/trades_out.py --scale 0.05    # quick
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kraken_hist.storage import migrate
from kraken_hist.query.bars import BarKind, read_bars  # noqa: E402
from kraken_hist.query.export import copy_statement, export, plan_pieces  # noqa: E402
from kraken_hist.query.provider import HistoricalDataProvider  # noqa: E402
from kraken_hist.rules.sql import MINUTE_CANDLES_FROM_TRADES  # noqa: E402
from kraken_hist.query.trades_out import TRADES_SQL  # noqa: E402

UTC = timezone.utc
START = datetime(2024, 1, 1, tzinfo=UTC)
SYMBOL = "BTC/USD"
GOALS = {"read": 0.7, "bars_s": 2.0, "export": 0.5}

# A year of trades at 20 a minute: bursts of up to 5 trades share a timestamp, prices walk in
# 0.1 steps around 60k, volumes vary over three orders of magnitude (8 decimals).
_LOAD = """
INSERT INTO trades (symbol, trade_id, time, price, volume, side, ord_type, source)
SELECT %(symbol)s, g,
       %(start)s::timestamptz + ((g / 5) * 15 + (g * 7919 %% 3)) * interval '1 second'
                              + ((g / 5) * 104729 %% 1000000) * interval '1 microsecond',
       round((60000 + 5000 * sin(g / 200000.0) + (g * 31 %% 173) * 0.7)::numeric, 1),
       round(((g * 7919 %% 10007) / 10007.0 * 0.5 + 0.0001 * (g %% 3))::numeric, 8) + 0.00000001,
       CASE WHEN g %% 2 = 0 THEN 'b' ELSE 's' END, CASE WHEN g %% 3 = 0 THEN 'm' ELSE 'l' END, 'rest'
FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS g
"""


def build(admin_url: str, name: str, trades: int) -> str:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    info = psycopg.conninfo.conninfo_to_dict(admin_url)
    url = f"postgresql://{info.get('user', 'postgres')}@{info.get('host', '127.0.0.1')}:{info.get('port', 5432)}/{name}"
    migrate.upgrade(url)
    began = time.perf_counter()
    with psycopg.connect(url) as conn:
        step = 1_000_000
        for first in range(1, trades + 1, step):
            conn.execute(_LOAD, {"symbol": SYMBOL, "start": START, "first": first, "last": min(trades, first + step - 1)})
            conn.commit()
        end = conn.execute("SELECT max(time) + interval '1 second' FROM trades").fetchone()[0]
        conn.execute(
            f"INSERT INTO candles (symbol, time, open, high, low, close, vwap, volume, trades, source, updated_at) "
            f"SELECT %(symbol)s, minute, open, high, low, close, vwap, volume, trades, 'trades', now() "
            f"FROM ({MINUTE_CANDLES_FROM_TRADES}) built",
            {"symbol": SYMBOL, "start": START, "end": end, "decimals": 1},
        )
        conn.commit()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE trades")
        conn.execute("VACUUM ANALYZE candles")
    print(f"loaded {trades:,} trades and their candles in {time.perf_counter() - began:.0f} s", flush=True)
    return url


def best(samples: list[float]) -> float:
    return min(samples)


def timed(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        began = time.perf_counter()
        fn()
        out.append(time.perf_counter() - began)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the year of trades (default 1)")
    parser.add_argument("--read-rows", type=int, default=1_000_000, help="rows per trade read")
    parser.add_argument("--export-days", type=int, default=62, help="days of trades exported")
    parser.add_argument("--bar-volume", default="100,1000",
                        help="volume bar sizes in BTC, comma-separated (100: ~72 bars a day, 1000: ~7)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (the best is kept)")
    parser.add_argument("--admin-url", default=os.environ.get("KRAKEN_HIST_TEST_ADMIN_URL",
                                                              "postgresql://postgres@127.0.0.1:5432/postgres"))
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
    args = parser.parse_args()

    trades = max(100_000, int(10_500_000 * args.scale))
    name = f"kh_bench_out_{os.getpid()}"
    url = build(args.admin_url, name, trades)
    try:
        with psycopg.connect(url) as conn:
            first, last = conn.execute("SELECT min(time), max(time) FROM trades").fetchone()
            read_hi = conn.execute("SELECT time FROM trades WHERE trade_id = %s",
                                   (min(trades, args.read_rows),)).fetchone()[0]
        year_hi = last + timedelta(seconds=1)
        params = {"symbol": SYMBOL, "lo": first, "hi": read_hi}
        print(f"data: {trades:,} trades {first:%Y-%m-%d} .. {last:%Y-%m-%d}; reads of {args.read_rows:,} rows; "
              f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")

        def raw_fetch() -> int:
            with psycopg.connect(url, options="-c TimeZone=UTC") as conn:
                return len(conn.execute(TRADES_SQL, params).fetchall())

        with HistoricalDataProvider(url) as provider:
            rows = raw_fetch()
            limit = rows / best(timed(raw_fetch, args.repeat))
            figures = {
                "get_trades": lambda: sum(1 for _ in provider.get_trades(SYMBOL, first, read_hi)),
                "get_trades_df": lambda: len(provider.get_trades_df(SYMBOL, first, read_hi)),
                "get_trades_df exact": lambda: len(provider.get_trades_df(SYMBOL, first, read_hi, exact=True)),
                "replay_trades speed 0": lambda: sum(1 for _ in provider.replay_trades(SYMBOL, first, read_hi)),
            }
            print(f"\nraw psycopg fetch (limit): {limit:,.0f} rows/s")
            for label, fn in figures.items():
                assert fn() == rows, label
                rate = rows / best(timed(fn, args.repeat))
                print(f"  {label:<24} {rate:>11,.0f} rows/s  {rate / limit:.2f}x the limit (goal >= {GOALS['read']}x)")

            def one_query(size: Decimal) -> None:
                with psycopg.connect(url, autocommit=True, options="-c TimeZone=UTC") as conn:
                    read_bars(conn, SYMBOL, BarKind.VOLUME, size, first, year_hi, price_decimals=1, parallel_span=None)

            bar_runs = []
            for size in (Decimal(v) for v in args.bar_volume.split(",")):
                bars = provider.get_bars(SYMBOL, "volume", size, first, year_hi, include_forming=True)
                pieces, single = [], []
                for _ in range(args.repeat):  # alternating, so both see the same load
                    pieces += timed(lambda: provider.get_bars(SYMBOL, "volume", size, first, year_hi), 1)
                    single += timed(lambda: one_query(size), 1)
                bar_runs.append((size, len(bars), pieces, single))

        def scan() -> None:
            with psycopg.connect(url) as conn:
                conn.execute("SET jit = off")
                conn.execute("SELECT count(*), sum(volume) FROM trades WHERE symbol = %s AND time >= %s AND time < %s",
                             (SYMBOL, first, year_hi)).fetchone()

        scan_s = best(timed(scan, args.repeat))
        print(f"\nvolume bars over {(last - first).days + 1} days ({trades:,} trades); one plain scan summing the "
              f"trades' volume takes {scan_s:.2f} s")
        for size, count, bar_s, single_s in bar_runs:
            print(f"  every {size} BTC: {count:,} bars in {best(bar_s):.2f} s (median {statistics.median(bar_s):.2f} s; "
                  f"goal <= {GOALS['bars_s']} s), {best(bar_s) / scan_s:.2f}x the plain scan; one query on one "
                  f"connection {best(single_s):.2f} s (median {statistics.median(single_s):.2f} s)")

        export_hi = min(year_hi, first + timedelta(days=args.export_days))
        statement, fixed = copy_statement("trades", None)
        pieces = plan_pieces(first, export_hi, "month")
        piece_params = [fixed | {"symbol": SYMBOL, "lo": p.lo, "hi": p.hi} for p in pieces]

        def raw_copy() -> int:
            count = 0
            with psycopg.connect(url, autocommit=True, options="-c TimeZone=UTC") as conn:
                for p in piece_params:
                    with conn.cursor().copy(statement, p) as copy:
                        for data in copy:
                            count += bytes(data).count(b"\n")
            return count

        copy_rows = raw_copy()
        copy_rate = copy_rows / best(timed(raw_copy, args.repeat))
        print(f"\nexport of {copy_rows:,} trades ({len(pieces)} monthly files); raw COPY TO (limit): {copy_rate:,.0f} rows/s")
        with tempfile.TemporaryDirectory() as tmp:
            for fmt in ("parquet", "csv"):
                results = []

                def run() -> None:
                    results.append(export(url, SYMBOL, "trades", first, export_hi, Path(tmp) / fmt, fmt=fmt,
                                          partition="month"))

                rate = copy_rows / best(timed(run, args.repeat))
                assert results[-1].rows == copy_rows
                print(f"  {fmt:<8} {rate:>11,.0f} rows/s  {rate / copy_rate:.2f}x the limit (goal >= {GOALS['export']}x); "
                      f"{results[-1].bytes / 1e6:.0f} MB")
    finally:
        if not args.keep:
            with psycopg.connect(args.admin_url, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


if __name__ == "__main__":
    main()
