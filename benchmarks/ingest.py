"""Ingest benchmark: trades through DatabaseWriter.write_trade until durable, against the
fastest client COPY of the same rows into a bare table of the same shape and keys (on
TimescaleDB a hypertable chunked like ``trades``), measured in the same run.

    python benchmarks/ingest.py [--trades 1000000] [--latency-seconds 10] [--dense 300000] [--admin-url URL]

The limit is the faster of two client COPYs of rows encoded before the clock starts: text
(the rows as COPY text lines) and binary (the rows as COPY binary, made by the server), each
committed. Prints trades/s for both and the ratio, with build_candles off and on; the
write-to-commit latency p99 at 5,000 trades/s against the time to fill one batch (buffer size or
flush interval, whichever comes first) + the p99 of a client COPY-and-commit of such a batch; and the cost of one flush
of a 10,000-trade batch into a minute that already holds `--dense` trades: the writer's
(candles merged incrementally) against store.rebuild_candles of that minute, measured in
the same run. `--admin-url` chooses the server (plain PostgreSQL or TimescaleDB).
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import psycopg

from kraken_hist.storage import store
from kraken_hist.core.config import Settings
from kraken_hist.core.types import TradeRecord, TradeSource
from kraken_hist.storage.writer import DatabaseWriter
from kraken_hist.core.pairs import PAIR_MAP

from common import add_admin_url, create_like, flavour, machine_note, scratch_database

T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
COLUMNS = "symbol, trade_id, time, price, volume, side, ord_type, source"


def make_trades(count: int, first_id: int = 1) -> list[TradeRecord]:
    """Contiguous ids, ~20 trades a minute, prices at BTC/USD's decimals."""
    return [
        TradeRecord(symbol="BTC/USD", trade_id=i, time=T0 + timedelta(microseconds=i * 3_000_017),
                    price=Decimal("60000.0") + Decimal(i % 997) / 10, volume=Decimal("0.00123456"),
                    side="b", ord_type="l", source=TradeSource.WEBSOCKET)
        for i in range(first_id, first_id + count)
    ]


def encode(conn: psycopg.Connection, trades: list[TradeRecord]) -> dict[str, bytes]:
    """The rows as COPY text and as COPY binary, ready to send (made before any clock starts)."""
    text = "".join(f"{t.symbol}\t{t.trade_id}\t{t.time.isoformat()}\t{t.price}\t{t.volume}\t{t.side}\t"
                   f"{t.ord_type}\t{t.source.value}\n" for t in trades).encode()
    conn.execute("CREATE TEMP TABLE typed (LIKE trades)")
    with conn.cursor().copy(f"COPY typed ({COLUMNS}) FROM STDIN") as copy:
        copy.write(text)
    binary = io.BytesIO()
    with conn.cursor().copy(f"COPY typed ({COLUMNS}) TO STDOUT (FORMAT BINARY)") as copy:
        for block in copy:
            binary.write(block)
    conn.execute("DROP TABLE typed")
    conn.commit()
    return {"text": text, "binary": binary.getvalue()}


def client_copy(conn: psycopg.Connection, table: str, payload: bytes, kind: str) -> float:
    """Seconds to COPY `payload` into `table` and commit."""
    statement = f"COPY {table} ({COLUMNS}) FROM STDIN" + (" (FORMAT BINARY)" if kind == "binary" else "")
    start = time.perf_counter()
    with conn.transaction(), conn.cursor().copy(statement) as copy:
        for lo in range(0, len(payload), 1 << 20):
            copy.write(payload[lo:lo + (1 << 20)])
    return time.perf_counter() - start


def copy_limit(url: str, payloads: dict[str, bytes]) -> tuple[float, str, dict[str, float]]:
    """The limit: the faster client COPY (text or binary, best of two each) into a bare table
    shaped like ``trades``; returns (seconds, its kind, every kind's seconds)."""
    times: dict[str, float] = {}
    with psycopg.connect(url, autocommit=True) as conn:
        for kind in ("text", "binary"):
            best = float("inf")
            for _ in range(2):
                create_like(conn, "raw_trades")
                conn.execute("CHECKPOINT")
                best = min(best, client_copy(conn, "raw_trades", payloads[kind], kind))
            times[kind] = best
        conn.execute("DROP TABLE raw_trades")
    kind = min(times, key=times.__getitem__)
    return times[kind], kind, times


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
        return writer.get_stats() | {"interval_s": writer.trade_flush_interval, "buffer": writer.trade_buffer_size}
    finally:
        writer.stop()


def commit_p99(url: str, rows: int, repeats: int = 20) -> float:
    """p99 seconds of a client COPY-and-commit of `rows` trades (text, encoded beforehand) into
    a table shaped like ``trades``: the least a batch's commit adds to the latency."""
    batches = [make_trades(rows, first_id=20_000_000 + n * rows) for n in range(repeats)]
    with psycopg.connect(url, autocommit=True) as conn:
        create_like(conn, "commit_trades")
        payloads = [encode(conn, batch)["text"] for batch in batches]
        costs = sorted(client_copy(conn, "commit_trades", payload, "text") for payload in payloads)
        conn.execute("DROP TABLE commit_trades")
    return costs[min(len(costs) - 1, round(0.99 * (len(costs) - 1)))]


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
        store.rebuild_candles(conn, "BTC/USD", minute, minute + timedelta(minutes=1),
            decimals=PAIR_MAP["BTC/USD"].price_decimals)
        rebuild = time.perf_counter() - start
        conn.rollback()
    return {"flush_s": sorted(costs)[len(costs) // 2], "rebuild_s": rebuild, "stats": stats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trades", type=int, default=1_000_000)
    parser.add_argument("--latency-seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=int, default=5_000)
    parser.add_argument("--dense", type=int, default=300_000, help="trades already in the dense minute (0: skip)")
    add_admin_url(parser)
    args = parser.parse_args()

    with scratch_database(args.admin_url, "ingest") as url, tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        trades = make_trades(args.trades)
        with psycopg.connect(url) as conn:
            payloads = encode(conn, trades)
        print(f"{flavour(url)}; {args.trades:,} trades; {machine_note()}")
        for build_candles in (False, True):
            raw, kind, kinds = copy_limit(url, payloads)
            reset(url)
            elapsed, stats = writer_run(url, trades, build_candles, data_dir)
            assert stats["trades_written"] == args.trades, stats
            raw_rate, rate = args.trades / raw, args.trades / elapsed
            print(
                f"build_candles={build_candles!s:5}  limit: client COPY {raw_rate:>10,.0f}/s ({kind}; text "
                f"{args.trades / kinds['text']:,.0f}/s, binary {args.trades / kinds['binary']:,.0f}/s)   "
                f"writer {rate:>10,.0f}/s   ratio {rate / raw_rate:.2f}   write_trade loop {stats['producer_s']:.2f}s "
                f"of {elapsed:.2f}s   transactions={stats['flushes']} spooled={stats['spooled']} "
                f"merges={stats['merge_fallbacks']}"
            )
            reset(url)
        for build_candles in (False, True):
            stats = latency_run(url, args.rate, args.latency_seconds, build_candles, data_dir)
            # a batch is committed when the buffer is full or the interval is over, whichever comes first
            batch = min(stats["buffer"], int(args.rate * stats["interval_s"]))
            fill = batch / args.rate
            commit = commit_p99(url, batch)
            limit = (fill + commit) * 1000
            print(
                f"build_candles={build_candles!s:5}  {args.rate:,} trades/s for {args.latency_seconds:g}s: "
                f"latency p50 {stats['latency_p50_ms']} ms, p99 {stats['latency_p99_ms']} ms, "
                f"max {stats['latency_max_ms']} ms; limit {limit:.1f} ms (filling a {batch}-trade batch "
                f"{fill * 1000:.0f} ms + p99 client COPY-and-commit of it {commit * 1000:.1f} ms) -> p99/limit "
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


if __name__ == "__main__":
    main()
