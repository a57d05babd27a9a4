"""Ingest benchmark: trades through DatabaseWriter.write_trade until durable, against a raw
psycopg COPY of the same rows into a bare table of the same shape and keys, in the same run.

    /tmp/venv/bin/python benchmarks/ingest.py [--trades 1000000] [--latency-seconds 10] [--dense 300000]

Prints trades/s for both and the ratio (goal >= 0.7), with build_candles off and on, the
write-to-commit latency p99 at 5,000 trades/s against the flush interval + 250 ms, and the cost
of one flush of a 10,000-trade batch into a minute that already holds `--dense` trades: the
writer's (candles merged incrementally) against store.rebuild_candles of that minute, the
per-flush cost without the incremental path, measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import urllib.parse
import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import psycopg
from psycopg import sql

from kraken_hist import migrate, store
from kraken_hist.config import Settings
from kraken_hist.types import TradeRecord, TradeSource
from kraken_hist.writer import DatabaseWriter

T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)


def make_trades(count: int, first_id: int = 1) -> list[TradeRecord]:
    """Contiguous ids, ~20 trades a minute, prices at BTC/USD's decimals."""
    return [
        TradeRecord(symbol="BTC/USD", trade_id=i, time=T0 + timedelta(microseconds=i * 3_000_017),
                    price=Decimal("60000.0") + Decimal(i % 997) / 10, volume=Decimal("0.00123456"),
                    side="b" if i % 2 else "s", ord_type="l", source=TradeSource.WEBSOCKET)
        for i in range(first_id, first_id + count)
    ]


def url_for(admin_url: str, name: str) -> str:
    """`admin_url` (a postgresql:// URL) pointed at database `name`."""
    parts = urllib.parse.urlsplit(admin_url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + name))


def raw_copy(url: str, trades: list[TradeRecord]) -> float:
    """The limit: one client COPY (binary) into a bare keyed table of the same shape."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS raw_trades")
        conn.execute("CREATE TABLE raw_trades (LIKE trades INCLUDING ALL)")  # same columns, checks, keys
        rows = [(t.symbol, t.trade_id, t.time, t.price, t.volume, t.side, t.ord_type, t.source.value) for t in trades]
        start = time.perf_counter()
        with conn.transaction(), conn.cursor().copy(
            "COPY raw_trades (symbol, trade_id, time, price, volume, side, ord_type, source) FROM STDIN (FORMAT BINARY)"
        ) as copy:
            copy.set_types(["text", "int8", "timestamptz", "numeric", "numeric", "text", "text", "text"])
            for row in rows:
                copy.write_row(row)
        elapsed = time.perf_counter() - start
        conn.execute("DROP TABLE raw_trades")
    return elapsed


def reset(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("TRUNCATE trades, candles, candle_changes, sync_status")
        conn.execute("CHECKPOINT")


def writer_run(url: str, trades: list[TradeRecord], build_candles: bool, data_dir: Path) -> tuple[float, dict]:
    writer = DatabaseWriter(url, trade_buffer_size=DatabaseWriter.MAX_TRADE_BUFFER_SIZE, trade_flush_interval=1.0,
                            settings=Settings(database_url=url, data_dir=data_dir), build_candles=build_candles)
    writer.start()
    try:
        start = time.perf_counter()
        for record in trades:
            writer.write_trade(record)
        produced = time.perf_counter() - start
        assert writer.flush(timeout=3600)
        elapsed = time.perf_counter() - start
        stats = writer.get_stats() | {"producer_s": produced}
    finally:
        writer.stop()
    return elapsed, stats


def latency_run(url: str, rate: int, seconds: float, build_candles: bool, data_dir: Path) -> dict:
    """Pace writes at `rate`/s with the default buffer size and interval; p99 write→commit."""
    trades = make_trades(int(rate * seconds), first_id=10_000_000)
    writer = DatabaseWriter(url, settings=Settings(database_url=url, data_dir=data_dir), build_candles=build_candles)
    writer.start()
    try:
        start = time.perf_counter()
        for n, record in enumerate(trades):
            due = start + n / rate
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            writer.write_trade(record)
        assert writer.flush(timeout=600)
        return writer.get_stats() | {"interval_s": writer.trade_flush_interval}
    finally:
        writer.stop()


def dense_run(url: str, dense: int, data_dir: Path, batch: int = 10_000) -> dict:
    """A minute holding `dense` trades, written by the writer in `batch`-trade flushes; the
    last flushes' commit time against rebuilding that minute (what each flush used to cost)."""
    minute = T0 + timedelta(days=30)
    step = 50_000_000 // (dense + 5 * batch)  # µs between trades: all inside the minute

    def trades(first: int, count: int) -> list[TradeRecord]:
        return [TradeRecord(symbol="BTC/USD", trade_id=i, time=minute + timedelta(microseconds=i * step),
                            price=Decimal("60000.0") + Decimal(i % 997) / 10, volume=Decimal("0.00123456"),
                            side="b", ord_type="l", source=TradeSource.WEBSOCKET) for i in range(first, first + count)]

    writer = DatabaseWriter(url, trade_buffer_size=batch, trade_flush_interval=60.0,
                            settings=Settings(database_url=url, data_dir=data_dir))
    writer.start()
    try:
        for record in trades(0, dense):
            writer.write_trade(record)
        assert writer.flush(timeout=3600)
        costs = []
        for n in range(5):
            records = trades(dense + n * batch, batch)
            for record in records:
                writer.write_trade(record)
            start = time.perf_counter()
            assert writer.flush(timeout=600)
            costs.append(time.perf_counter() - start)
        stats = writer.get_stats()
    finally:
        writer.stop()
    with psycopg.connect(url) as conn:
        start = time.perf_counter()
        store.rebuild_candles(conn, "BTC/USD", minute, minute + timedelta(minutes=1))
        rebuild = time.perf_counter() - start
        conn.rollback()
    return {"flush_s": sorted(costs)[len(costs) // 2], "rebuild_s": rebuild, "stats": stats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trades", type=int, default=1_000_000)
    parser.add_argument("--latency-seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=int, default=5_000)
    parser.add_argument("--dense", type=int, default=300_000, help="trades already in the dense minute (0: skip)")
    parser.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()

    name = f"kh_bench_ingest_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(args.admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = url_for(args.admin_url, name)
    try:
        migrate.upgrade(url)
        trades = make_trades(args.trades)
        with tempfile.TemporaryDirectory() as tmp:
            data_dir = Path(tmp)
            print(f"{args.trades:,} trades; load average {'/'.join(f'{x:.2f}' for x in os.getloadavg())} "
                  f"on {os.cpu_count()} CPUs at start")
            for build_candles in (False, True):
                raw = raw_copy(url, trades)
                reset(url)
                elapsed, stats = writer_run(url, trades, build_candles, data_dir)
                assert stats["trades_written"] == args.trades, stats
                raw_rate, rate = args.trades / raw, args.trades / elapsed
                print(
                    f"build_candles={build_candles!s:5}  raw COPY {raw_rate:>10,.0f}/s   writer {rate:>10,.0f}/s   "
                    f"ratio {rate / raw_rate:.2f} (goal >= 0.70)   write_trade loop {stats['producer_s']:.2f}s of "
                    f"{elapsed:.2f}s   transactions={stats['flushes']} spooled={stats['spooled']} "
                    f"merges={stats['merge_fallbacks']}"
                )
                reset(url)
            for build_candles in (False, True):
                stats = latency_run(url, args.rate, args.latency_seconds, build_candles, data_dir)
                limit = stats["interval_s"] * 1000 + 250
                print(
                    f"build_candles={build_candles!s:5}  {args.rate:,} trades/s for {args.latency_seconds:g}s: "
                    f"latency p50 {stats['latency_p50_ms']} ms, p99 {stats['latency_p99_ms']} ms, "
                    f"max {stats['latency_max_ms']} ms; limit {limit:.0f} ms -> p99/limit "
                    f"{stats['latency_p99_ms'] / limit:.2f}"
                )
                reset(url)
            if args.dense:
                dense = dense_run(url, args.dense, data_dir)
                s = dense["stats"]
                print(
                    f"dense minute ({args.dense:,} trades stored): a 10,000-trade flush takes "
                    f"{dense['flush_s'] * 1000:.0f} ms (median of 5, candles_incremental={s['candles_incremental']} "
                    f"fallback={s['candles_fallback']}); rebuilding that minute alone takes "
                    f"{dense['rebuild_s'] * 1000:.0f} ms -> flush/rebuild {dense['flush_s'] / dense['rebuild_s']:.2f}"
                )
    finally:
        with psycopg.connect(args.admin_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


if __name__ == "__main__":
    main()
