"""Whole-market benchmark: many pairs on one stream, and one archive holding many pairs.

    python benchmarks/whole_market.py [--pairs 500] [--trades 200000] [--rate 5000]
                                      [--archive-pairs 200] [--archive-rows 2000000] [--admin-url URL]

1. **Stream.** The fake WebSocket server (its own process) pushes `--trades` trades at Kraken's
   real message shape — one to three trades a message, each message one pair, round robin over
   `--pairs` pairs — through a real socket into ``KrakenWSClient → WebSocketDBIntegration →
   DatabaseWriter``. The limit is the same pipeline in the same run fed the same number of
   trades, in the same message shape, for one pair: trades/s socket → committed, and p99 latency
   (trade time → row visible, polled every 10 ms) at a steady `--rate`. Goal: ≥ 0.8× the
   single-pair throughput.
2. **Archive.** A zip of `--archive-pairs` Time and Sales members (`--archive-rows` rows in all)
   imported with ``kraken-hist import``'s importer, against the fastest way to store the same
   rows: server-side ``COPY trades`` of the same rows from a file (the same table, keys and
   indexes, into a fresh database). Goal: ≥ 0.6×.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import os
import random
import tempfile
import threading
import time
import urllib.parse
import uuid
import zipfile
from datetime import datetime, timezone
from pathlib import Path

import psycopg
from psycopg import sql

from kraken_hist.storage import migrate
from kraken_hist.core.config import Settings
from kraken_hist.ingest.archive.formats import synthetic_trade_id
from kraken_hist.ingest.archive.importer import BulkCSVImporter
from kraken_hist.ingest.live import WebSocketDBIntegration
from kraken_hist.storage.pair_store import PairResolver, store_asset_pairs
from kraken_hist.testing.universe import default_universe
from kraken_hist.core.timeutils import utcnow
from kraken_hist.storage.writer import DatabaseWriter
from kraken_hist.kraken.ws_client import KrakenWSClient

ADMIN_URL = os.environ.get("KRAKEN_HIST_TEST_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
STREAM_GOAL = 0.8
ARCHIVE_GOAL = 0.6


def url_for(admin_url: str, name: str) -> str:
    parts = urllib.parse.urlsplit(admin_url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + name))


class Database:
    """A fresh migrated database holding the fake's pair table (dropped at exit)."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.name = f"kh_bench_{uuid.uuid4().hex[:8]}"
        self.url = url_for(admin_url, self.name)

    def __enter__(self) -> "Database":
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.name)))
        migrate.upgrade(self.url)
        with psycopg.connect(self.url, autocommit=True) as conn:
            store_asset_pairs(conn, default_universe().asset_pairs(), now=utcnow())
        PairResolver(self.url).load()
        return self

    def __exit__(self, *exc: object) -> None:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(self.name)))


# --------------------------------------------------------------------------- 1. the stream

def serve(conn: "mp.connection.Connection", symbols: list[str]) -> None:
    """The fake exchange process: ("burst", n) pushes n trades; ("steady", rate, seconds)."""
    from kraken_hist.testing.fake_ws import FakeKrakenWS, next_trades
    from kraken_hist.testing.market import FakeMarket

    market = FakeMarket({s: [] for s in symbols}, universe=default_universe())
    rng = random.Random(1)
    with FakeKrakenWS(market, heartbeat_interval=1.0) as server:
        conn.send(server.url)
        while True:
            command = conn.recv()
            if command[0] == "stop":
                return
            server.wait_for_subscribers("trade", symbols, timeout=60)
            if command[0] == "burst":
                # messages made before the clock starts: the pipeline is measured, not the generator
                messages, left, index = [], command[1], 0
                while left > 0:
                    symbol = symbols[index % len(symbols)]
                    trades = next_trades(market, symbol, min(left, rng.randint(1, 3)), rng=rng)
                    market.append(symbol, trades)
                    messages.append((symbol, trades))
                    left -= len(trades)
                    index += 1
                conn.send("ready")
                started = time.perf_counter()
                for symbol, trades in messages:
                    server.broadcast(symbol, trades)
                conn.send(time.perf_counter() - started)
            elif command[0] == "steady":
                rate, seconds = command[1], command[2]
                tick, sent, index = 0.01, 0, 0
                start = time.perf_counter()
                for i in range(int(seconds / tick)):
                    budget = max(1, round(rate * tick))
                    while budget > 0:
                        symbol = symbols[index % len(symbols)]
                        count = min(budget, rng.randint(1, 3))
                        server.publish(symbol, next_trades(market, symbol, count, rng=rng))
                        budget -= count
                        sent += count
                        index += 1
                    delay = start + (i + 1) * tick - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                conn.send(sent)


class Pipeline:
    """Client → integration → writer, as `kraken-hist stream` builds it."""

    def __init__(self, url: str, ws_url: str, data_dir: Path, symbols: list[str], flush_interval: float) -> None:
        self.writer = DatabaseWriter(url, trade_buffer_size=5_000, trade_flush_interval=flush_interval,
                                     settings=Settings(database_url=url, data_dir=data_dir), data_dir=data_dir)
        self.integration = WebSocketDBIntegration(self.writer, db_url=url, symbols=symbols,
                                                  progress_interval=max(1.0, flush_interval))
        self.client = KrakenWSClient(ws_url, symbols, ohlc_intervals=(), trade_snapshot=False,
                                     **self.integration.callbacks())

    def __enter__(self) -> "Pipeline":
        self.writer.start()
        self.integration.start()
        self.client.start()
        if not self.client.wait_connected(60):
            raise RuntimeError("client did not connect")
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.stop()
        self.integration.stop()
        self.writer.stop()


def stream_run(admin_url: str, symbols: list[str], trades: int, rate: int, seconds: float) -> tuple[float, float]:
    """(trades/s socket → committed, p99 latency s) for `symbols` on one connection."""
    parent, child = mp.Pipe()
    server = mp.Process(target=serve, args=(child, symbols), daemon=True)
    server.start()
    ws_url = parent.recv()
    try:
        with Database(admin_url) as db, tempfile.TemporaryDirectory() as tmp:
            with Pipeline(db.url, ws_url, Path(tmp), symbols, flush_interval=1.0) as pipe:
                parent.send(("burst", trades))
                assert parent.recv() == "ready"
                started = time.perf_counter()
                parent.recv()
                while pipe.writer.get_stats()["trades_written"] < trades:
                    time.sleep(0.05)  # polling is not free: it takes the writer lock
                throughput = trades / (time.perf_counter() - started)
                p99 = steady_latency(db.url, parent, rate, seconds, pipe) if seconds > 0 else float("nan")
    finally:
        parent.send(("stop",))
        server.join(10)
    return throughput, p99


def steady_latency(url: str, control, rate: int, seconds: float, pipe: Pipeline) -> float:
    with psycopg.connect(url, autocommit=True) as conn:
        before = conn.execute("SELECT count(*) FROM trades").fetchone()[0]
    seen: list[tuple[float, int]] = []
    done = threading.Event()

    def poll() -> None:
        with psycopg.connect(url, autocommit=True) as poll_conn:
            while not done.wait(0.01):
                seen.append((time.time(), poll_conn.execute("SELECT count(*) FROM trades").fetchone()[0] - before))

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    control.send(("steady", rate, seconds))
    sent = control.recv()
    deadline = time.monotonic() + 15
    while (not seen or seen[-1][1] < sent) and time.monotonic() < deadline:
        time.sleep(0.01)
    done.set()
    poller.join()
    with psycopg.connect(url, autocommit=True) as conn:
        times = [row[0] for row in conn.execute(
            "SELECT extract(epoch FROM time)::float8 FROM (SELECT time FROM trades ORDER BY time DESC LIMIT %s) t "
            "ORDER BY 1", (sent,))]
    latencies, index = [], 0
    for k, traded_at in enumerate(times, start=1):  # the k-th trade is visible once k rows are
        while index < len(seen) and seen[index][1] < k:
            index += 1
        if index == len(seen):
            break
        latencies.append(seen[index][0] - traded_at)
    latencies.sort()
    return latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] if latencies else float("nan")


# --------------------------------------------------------------------------- 2. the archive

def make_archive(path: Path, symbols: list[str], rows: int) -> list[tuple[str, int, str, str]]:
    """A Trading History zip of `symbols` (`rows` lines in all); returns the same rows as
    (symbol, unix second, price, volume) for the limit's COPY."""
    universe = default_universe()
    rng = random.Random(7)
    per_pair = max(1, rows // len(symbols))
    start = int(datetime(2024, 1, 1, tzinfo=timezone.utc).timestamp())
    out = []
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for symbol in symbols:
            listing = universe.get(symbol)
            quantum = 10 ** listing.price_decimals
            tick = int(listing.start_price * quantum) or 1
            lines = io.StringIO()
            second = start
            for _ in range(per_pair):
                second += rng.choice((0, 0, 1, 1, 2, 5, 30))
                tick = max(1, tick + rng.randint(-2, 2))
                price = f"{tick / quantum:.{listing.price_decimals}f}"
                volume = f"{rng.randint(1, 50_000_000) / 1e8:.8f}"
                lines.write(f"{second},{price},{volume}\n")
                out.append((symbol, second, price, volume))
            archive.writestr(f"TimeAndSales_Combined/{listing.altname}.csv", lines.getvalue())
    return out


def copy_limit(admin_url: str, rows: list[tuple[str, int, str, str]], tmp: Path) -> float:
    """Seconds for server-side COPY of the same rows into ``trades`` (same keys and indexes)."""
    path = tmp / "rows.tsv"
    ordinals: dict[tuple[str, int], int] = {}
    with open(path, "w") as handle:
        for symbol, second, price, volume in rows:
            ordinal = ordinals[(symbol, second)] = ordinals.get((symbol, second), -1) + 1
            when = datetime.fromtimestamp(second, timezone.utc).isoformat()
            handle.write(f"{symbol}\t{synthetic_trade_id(second, ordinal)}\t{when}\t{price}\t{volume}\t\\N\t\\N\tcsv\n")
    os.chmod(tmp, 0o755)
    os.chmod(path, 0o644)
    with Database(admin_url) as db, psycopg.connect(db.url, autocommit=True) as conn:
        conn.execute("CHECKPOINT")
        started = time.perf_counter()
        conn.execute(sql.SQL("COPY trades (symbol, trade_id, time, price, volume, side, ord_type, source) FROM {}")
                     .format(sql.Literal(str(path))))
        return time.perf_counter() - started


def archive_run(admin_url: str, symbols: list[str], rows: int) -> tuple[float, float, int]:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        archive = tmp / "Kraken_Trading_History.zip"
        data = make_archive(archive, symbols, rows)
        limit = copy_limit(admin_url, data, tmp)
        with Database(admin_url) as db:
            with psycopg.connect(db.url, autocommit=True) as conn:
                conn.execute("CHECKPOINT")
            importer = BulkCSVImporter(db.url, resolver=PairResolver(db.url))
            started = time.perf_counter()
            results = importer.import_archive(archive)
            seconds = time.perf_counter() - started
        stored = sum(r.imported for r in results)
        assert stored == len(data) and all(r.ok for r in results), [r.reason for r in results if not r.ok]
    return seconds, limit, len(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=500)
    parser.add_argument("--trades", type=int, default=200_000)
    parser.add_argument("--rate", type=int, default=5_000)
    parser.add_argument("--latency-seconds", type=float, default=20.0)
    parser.add_argument("--repeat", type=int, default=3, help="stream rounds (one pair, then many, each round)")
    parser.add_argument("--archive-pairs", type=int, default=200)
    parser.add_argument("--archive-rows", type=int, default=2_000_000)
    parser.add_argument("--admin-url", default=ADMIN_URL)
    parser.add_argument("--only", choices=("stream", "archive"), help="run one of the two parts")
    args = parser.parse_args()
    universe = default_universe()
    many = universe.symbols(listed_only=True)
    if len(many) < args.pairs:  # a bigger fake market than the default 400
        from kraken_hist.testing import universe as module

        universe = module._DEFAULT = module.generate_universe(args.pairs)
        many = universe.symbols(listed_only=True)
    many = many[: args.pairs]

    if args.only != "archive":
        stream_part(args, many)
    if args.only != "stream":
        archive_part(args, many)


def stream_part(args: argparse.Namespace, many: list[str]) -> None:
    # Rounds alternate one pair and many, so a busy moment of the machine does not fall on one
    # side only; the best round of each is compared (latency: first round only).
    rates: dict[int, list[float]] = {1: [], len(many): []}
    p99s: dict[int, float] = {}
    for round_ in range(args.repeat):
        for symbols in (["BTC/USD"], many):
            rate, p99 = stream_run(args.admin_url, symbols, args.trades, args.rate,
                                   args.latency_seconds if round_ == 0 else 0)
            rates[len(symbols)].append(rate)
            p99s.setdefault(len(symbols), p99)
    one_rate, all_rate = max(rates[1]), max(rates[len(many)])
    one_p99, all_p99 = p99s[1], p99s[len(many)]
    ratios = sorted(b / a for a, b in zip(rates[1], rates[len(many)]))
    print(f"stream, 1-3 trades a message, {args.trades:,} trades socket → committed "
          f"(best of {args.repeat} alternating rounds):")
    print("  rounds, trades/s (1 pair / many): "
          + ", ".join(f"{a:,.0f} / {b:,.0f}" for a, b in zip(rates[1], rates[len(many)])))
    print(f"  1 pair:         {one_rate:,.0f} trades/s, p99 latency {one_p99 * 1000:.0f} ms at {args.rate:,}/s")
    print(f"  {len(many)} pairs:      {all_rate:,.0f} trades/s, p99 latency {all_p99 * 1000:.0f} ms at {args.rate:,}/s")
    print(f"  ratio of the best rounds {all_rate / one_rate:.2f}, median ratio of a round "
          f"{ratios[len(ratios) // 2]:.2f} (goal ≥ {STREAM_GOAL})")


def archive_part(args: argparse.Namespace, many: list[str]) -> None:
    seconds, limit, count = archive_run(args.admin_url, many[: args.archive_pairs], args.archive_rows)
    print(f"archive of {min(args.archive_pairs, len(many))} pairs, {count:,} rows: import {seconds:.2f} s = "
          f"{count / seconds:,.0f} rows/s; server-side COPY of the same rows {limit:.2f} s = {count / limit:,.0f} rows/s")
    print(f"  ratio {limit / seconds:.2f} (goal ≥ {ARCHIVE_GOAL})")


if __name__ == "__main__":
    main()
