"""Query-layer benchmark: get_candles, warm-up, replay and the incremental refresh.

Creates a dedicated database, loads 2 years of 1-minute candles for 3 symbols (~3.1M rows at
--scale 1) with COPY, refreshes the aggregates, measures, and drops the database.

    /tmp/venv/bin/python benchmarks/query.py [--scale 0.1] [--admin-url postgresql://...]

Figures are printed as ratios against the goals of issue 4 (ratio <= 1 meets the goal).
"""

from __future__ import annotations

import argparse
import io
import os
import random
import statistics
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kraken_hist import migrate, store  # noqa: E402
from kraken_hist.provider import HistoricalDataProvider  # noqa: E402
from kraken_hist.refresh import refresh_aggregates  # noqa: E402

UTC = timezone.utc
SYMBOLS = ("BTC/USD", "ETH/USD", "SOL/USD")
START = datetime(2023, 1, 2, tzinfo=UTC)
GOALS = {"stored_p50_ms": 5.0, "arbitrary_p50_ms": 50.0, "replay_per_s": 200_000.0, "refresh_day_s": 1.0}


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


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the 2-year data set (default 1)")
    parser.add_argument("--admin-url", default=os.environ.get("KRAKEN_HIST_TEST_ADMIN_URL",
                                                              "postgresql://postgres@127.0.0.1:5432/postgres"))
    parser.add_argument("--samples", type=int, default=40, help="timed calls per figure")
    args = parser.parse_args()

    minutes = max(20_000, int(2 * 365 * 1440 * args.scale))
    name = f"kh_bench_query_{os.getpid()}"
    info = psycopg.conninfo.conninfo_to_dict(args.admin_url)
    info["dbname"] = name
    url = f"postgresql://{info.get('user', 'postgres')}@{info.get('host', '127.0.0.1')}:{info.get('port', 5432)}/{name}"
    with psycopg.connect(args.admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        run(url, minutes, args.samples)
    finally:
        with psycopg.connect(args.admin_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def run(url: str, minutes: int, samples: int) -> None:
    print("note: figures taken on a shared machine (2 cores, other jobs running)")
    migrate.upgrade(url)
    began = time.perf_counter()
    with psycopg.connect(url) as conn:
        for n, symbol in enumerate(SYMBOLS):
            copy_minutes(conn, symbol, START, minutes, seed=n)
        conn.commit()
        conn.execute("ANALYZE candles")
        conn.commit()
        rows = conn.execute("SELECT count(*) FROM candles").fetchone()[0]
    print(f"loaded {rows:,} 1-minute candles ({len(SYMBOLS)} symbols x {minutes / 1440:.0f} days) "
          f"in {time.perf_counter() - began:.1f} s")
    began = time.perf_counter()
    full = refresh_aggregates(url, start=START)
    print(f"full refresh of all aggregates: {time.perf_counter() - began:.1f} s "
          f"({sum(full.written.values()):,} buckets)")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")

    end_of_data = START + timedelta(minutes=minutes)
    rng = random.Random(42)
    with HistoricalDataProvider(url) as provider:
        print("\nget_candles, 1,000 bars (p50 / p95 ms, ratio = p50 / goal; cpu = this process's CPU per call,"
              " the figure to trust under shared load)")
        for interval in (1, 5, 15, 30, 60, 240, 1440, 10080, 3, 45, 720):
            goal = GOALS["stored_p50_ms"] if interval in (1, 5, 15, 30, 60, 240, 1440, 10080) else GOALS["arbitrary_p50_ms"]
            span = timedelta(minutes=interval * 1000)
            times, cpu, bars = [], [], 0
            for _ in range(samples):
                latest_start = max(START, end_of_data - span)
                offset = rng.random() * (latest_start - START).total_seconds()
                start = START + timedelta(seconds=offset)
                symbol = rng.choice(SYMBOLS)
                t, c = time.perf_counter(), time.process_time()
                got = provider.get_candles(symbol, interval, start=start, end=end_of_data, limit=1000)
                times.append((time.perf_counter() - t) * 1000)
                cpu.append((time.process_time() - c) * 1000)
                bars = max(bars, len(got))
            p50, p95 = percentiles(times)
            kind = "stored" if goal == GOALS["stored_p50_ms"] else "arbitrary"
            print(f"  {interval:>6}m {kind:<9} {bars:>5} bars  p50 {p50:7.2f}  p95 {p95:7.2f}  "
                  f"ratio {p50 / goal:5.2f} (goal {goal:.0f} ms)  cpu p50 {statistics.median(cpu):6.2f}")

        print("\nget_warmup_data, 10 symbol/interval pairs")
        pairs = [(s, i, n) for s in SYMBOLS for i, n in ((1, 500), (60, 200), (45, 100))] + [("BTC/USD", 1440, 20)]
        days = int(minutes / 1440)
        t = time.perf_counter()
        for symbol, interval, periods in pairs:
            when = end_of_data - timedelta(days=rng.randint(0, max(0, days // 4)), minutes=rng.randint(0, 1439))
            assert len(provider.get_warmup_data(symbol, interval, periods, end=when)) == periods
        total = (time.perf_counter() - t) * 1000
        print(f"  {len(pairs)} warm-ups (20-500 periods) in {total:.1f} ms ({total / len(pairs):.2f} ms each)")

        count = 0
        replay_minutes = min(minutes, 400_000)
        t, c = time.perf_counter(), time.process_time()
        for _candle in provider.replay_candles("BTC/USD", 1, START, START + timedelta(minutes=replay_minutes)):
            count += 1
        rate = count / (time.perf_counter() - t)
        cpu_rate = count / (time.process_time() - c)
        print(f"\nreplay at speed 0: {count:,} candles at {rate:,.0f}/s  ratio {GOALS['replay_per_s'] / rate:5.2f} "
              f"(goal >= {GOALS['replay_per_s']:,.0f}/s; {cpu_rate:,.0f}/s of this process's CPU)")
        merged = 0
        t, c = time.perf_counter(), time.process_time()
        for _candle in provider.replay_candles(SYMBOLS, 1, START, START + timedelta(minutes=replay_minutes // 3)):
            merged += 1
        print(f"replay of {len(SYMBOLS)} symbols merged: {merged / (time.perf_counter() - t):,.0f}/s "
              f"({merged / (time.process_time() - c):,.0f}/s of CPU)")

    with psycopg.connect(url) as conn:
        for n, symbol in enumerate(SYMBOLS):
            copy_minutes(conn, symbol, end_of_data, 1440, seed=100 + n)
            store.record_candle_change(conn, symbol, end_of_data, end_of_data + timedelta(days=1))
        conn.commit()
    t = time.perf_counter()
    result = refresh_aggregates(url)
    seconds = time.perf_counter() - t
    print(f"\nrefresh after one new day of 1-minute data ({len(SYMBOLS)} symbols, all intervals): "
          f"{seconds * 1000:.0f} ms  ratio {seconds / GOALS['refresh_day_s']:5.2f} (goal {GOALS['refresh_day_s']:.0f} s; "
          f"{sum(result.written.values())} buckets written)")


if __name__ == "__main__":
    main()
