"""Live benchmark: trades pushed by the fake WebSocket server through a real socket, until committed.

    python benchmarks/live.py [--trades 300000] [--burst-per-minute 10000]
                              [--latency-seconds 65] [--rate 5000] [--admin-url URL]

The fake runs in its own process (so it does not share our GIL) and pushes trades as fast as
it can, in Kraken's real message shape: 1 to 3 trades a message (Kraken sends a message per
match, not batches of 100); this process runs KrakenWSClient → WebSocketDBIntegration →
DatabaseWriter into a fresh database. Prints, each against a limit measured in the same run:
- sustained trades/s from the first frame to the last row committed, against the same burst
  received by a bare KrakenWSClient whose callback only counts (the socket, the frames and
  their parsing: what no pipeline can beat), and the peak RSS growth (bounded memory). The
  burst's trades carry timestamps `--burst-per-minute` apart per minute, ending two minutes
  ago (a backlog being caught up); `--burst-per-minute 0` stamps them all with one instant,
  the worst case for the writer;
- end-to-end latency (exchange trade time → row visible in PostgreSQL, polled every 10 ms)
  p50/p99 at a steady rate, against the p99 delivery latency of the bare client (trade time →
  callback) at the same rate + the time to fill one batch (buffer or interval, whichever comes
  first) + the p99 of a client COPY-and-commit of such a batch; and the writer's own share
  (accepted → committed). The default run lasts over a minute: a minute's candle grows with the trades
  already in it, so a shorter run would only see the cheap start of a minute.
`--admin-url` chooses the server (plain PostgreSQL or TimescaleDB).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path

import psutil
import psycopg

from kraken_hist.core.config import Settings
from kraken_hist.ingest.live import WebSocketDBIntegration
from kraken_hist.core.timeutils import utcnow
from kraken_hist.storage.writer import DatabaseWriter
from kraken_hist.kraken.ws_client import KrakenWSClient

from common import add_admin_url, flavour, machine_note, scratch_database
from ingest import commit_p99

SYMBOL = "BTC/USD"
BUFFER = 1000  # the writer's trade buffer in the latency run
BARE_SYMBOL = "ETH/USD"  # the bare client's bursts: its own id sequence and clock


def messages(trades: list, rng) -> list:
    """`trades` cut into Kraken-sized messages: 1 to 3 trades each."""
    out, lo = [], 0
    while lo < len(trades):
        size = rng.choice((1, 1, 1, 2, 2, 3))
        out.append(trades[lo:lo + size])
        lo += size
    return out


def spread(trades: list, per_minute: int) -> list:
    """The same trades, ten to a timestamp, `per_minute` a minute, ending two minutes ago."""
    import dataclasses

    if per_minute <= 0:
        return trades
    step = timedelta(minutes=10 / per_minute)
    start = utcnow() - timedelta(minutes=2) - step * (len(trades) // 10 + 1)
    return [dataclasses.replace(t, time=start + step * (i // 10)) for i, t in enumerate(trades)]


def serve(conn: "mp.connection.Connection") -> None:
    """The fake exchange process: answers ("burst", n, per_minute) and ("steady", rate, seconds)."""
    import random

    from kraken_hist.testing.fake_ws import FakeKrakenWS, next_trades
    from kraken_hist.testing.market import FakeMarket

    market = FakeMarket({SYMBOL: [], BARE_SYMBOL: []})
    with FakeKrakenWS(market, heartbeat_interval=1.0, max_trades_per_frame=100) as server:
        conn.send(server.url)
        rng = random.Random(1)
        while True:
            command = conn.recv()
            if command[0] == "stop":
                return
            symbol = command[-1]
            server.wait_for_subscribers("trade", [symbol], timeout=30)
            if command[0] == "burst":
                # made before the clock starts: we measure the pipeline, not the fake's generator
                trades = spread(next_trades(market, symbol, command[1], rng=rng), command[2])
                market.append(symbol, trades)
                frames = messages(trades, rng)
                conn.send("ready")
                started = time.perf_counter()
                for frame in frames:
                    server.broadcast(symbol, frame)
                conn.send(time.perf_counter() - started)
            elif command[0] == "steady":
                rate, seconds = command[1], command[2]
                tick = 0.01
                per_tick = max(1, round(rate * tick))
                start = time.perf_counter()
                ticks = int(seconds / tick)
                for i in range(ticks):
                    for frame in messages(next_trades(market, symbol, per_tick, rng=rng), rng):
                        server.publish(symbol, frame)
                    delay = start + (i + 1) * tick - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                conn.send(ticks * per_tick)


def start_connected(client: KrakenWSClient) -> None:
    client.start()
    if not client.wait_connected(10):
        raise RuntimeError("client did not connect")


class Pipeline:
    """Client → integration → writer, as `kraken-hist stream` builds it."""

    def __init__(self, url: str, ws_url: str, data_dir: Path, flush_interval: float, buffer_size: int) -> None:
        self.writer = DatabaseWriter(url, trade_buffer_size=buffer_size, trade_flush_interval=flush_interval,
                                     settings=Settings(database_url=url, data_dir=data_dir), data_dir=data_dir)
        self.integration = WebSocketDBIntegration(self.writer, db_url=url, symbols=[SYMBOL],
                                                  progress_interval=max(1.0, flush_interval))
        self.client = KrakenWSClient(ws_url, [SYMBOL], ohlc_intervals=(), trade_snapshot=False,
                                     **self.integration.callbacks())

    def __enter__(self) -> "Pipeline":
        self.writer.start()
        self.integration.start()
        start_connected(self.client)
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.stop()
        self.integration.stop()
        self.writer.stop()


class BareClient:
    """KrakenWSClient alone, its callback only counting trades and their delivery latency:
    the socket, the frames and their parsing — the limit of any pipeline behind it."""

    def __init__(self, ws_url: str) -> None:
        self.count = 0
        self.latencies: list[float] = []
        self.client = KrakenWSClient(ws_url, [BARE_SYMBOL], ohlc_intervals=(), trade_snapshot=False,
                                     on_trade=self.on_trade)

    def on_trade(self, message) -> None:
        now = time.time()
        self.count += len(message.trades)
        self.latencies.extend(now - t.time.timestamp() for t in message.trades)

    def __enter__(self) -> "BareClient":
        start_connected(self.client)
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.stop()


def burst(control, count: int, per_minute: int, done, symbol: str = SYMBOL) -> tuple[float, float]:
    """Ask the fake for a burst; (seconds from its first frame until `done()`, its push seconds)."""
    control.send(("burst", count, per_minute, symbol))
    assert control.recv() == "ready"
    started = time.perf_counter()
    push_seconds = control.recv()
    while not done():
        time.sleep(0.01)
    return time.perf_counter() - started, push_seconds


def throughput(url: str, control, ws_url: str, data_dir: Path, count: int, per_minute: int) -> None:
    with BareClient(ws_url) as bare:
        limit_seconds, _push = burst(control, count, per_minute, lambda: bare.count >= count, BARE_SYMBOL)
    process = psutil.Process()
    with Pipeline(url, ws_url, data_dir, flush_interval=1.0, buffer_size=5_000) as pipe:
        base_rss = process.memory_info().rss
        peak = [base_rss]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.05):
                peak[0] = max(peak[0], process.memory_info().rss)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        seconds, push_seconds = burst(control, count, per_minute,
                                      lambda: pipe.writer.get_stats()["trades_written"] >= count)
        done.set()
        sampler.join()
        stats = pipe.writer.get_stats()
        client_state = pipe.client.state()
    rate, limit = count / seconds, count / limit_seconds
    density = f"{per_minute:,} a minute" if per_minute > 0 else "all at one instant"
    print(f"throughput: {count:,} trades ({density}, 1-3 a message) socket → committed in {seconds:.2f} s = "
          f"{rate:,.0f} trades/s (fake pushed them in {push_seconds:.2f} s = {count / push_seconds:,.0f}/s)")
    print(f"  limit: the bare client received the same burst at {limit:,.0f} trades/s -> ratio {rate / limit:.2f}  "
          f"(flushes {stats['flushes']}, spooled {stats['spooled']}, reconnects {client_state.reconnects})")
    print(f"  memory: peak RSS growth {(peak[0] - base_rss) / 2**20:.1f} MiB over {base_rss / 2**20:.0f} MiB "
          f"({(peak[0] - base_rss) / count:.0f} bytes per trade pushed)")


def latency(url: str, control, ws_url: str, data_dir: Path, rate: int, seconds: float, flush_interval: float) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        first_id = (conn.execute("SELECT coalesce(max(trade_id), 0) FROM trades").fetchone() or (0,))[0] + 1
    seen: list[tuple[float, int]] = []  # (wall time, max id visible)
    done = threading.Event()

    def poll() -> None:
        with psycopg.connect(url, autocommit=True) as poll_conn:
            while not done.wait(0.01):
                row = poll_conn.execute("SELECT max(trade_id) FROM trades WHERE symbol = %s", (SYMBOL,)).fetchone()
                seen.append((time.time(), row[0] or 0))

    with Pipeline(url, ws_url, data_dir, flush_interval=flush_interval, buffer_size=BUFFER) as pipe:
        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        control.send(("steady", rate, seconds, SYMBOL))
        sent = control.recv()
        last_id = first_id + sent - 1
        deadline = time.monotonic() + flush_interval + 10
        while (not seen or seen[-1][1] < last_id) and time.monotonic() < deadline:
            time.sleep(0.01)
        done.set()
        poller.join()
        writer_stats = pipe.writer.get_stats()
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute("SELECT trade_id, extract(epoch FROM time)::float8 FROM trades "
                            "WHERE symbol = %s AND trade_id >= %s ORDER BY trade_id", (SYMBOL, first_id)).fetchall()
    latencies = []
    index = 0
    for trade_id, traded_at in rows:
        while index < len(seen) and seen[index][1] < trade_id:
            index += 1
        if index == len(seen):
            break
        latencies.append(seen[index][0] - traded_at)
    latencies.sort()
    with BareClient(ws_url) as bare:  # the same rate, no pipeline: what delivery alone costs
        control.send(("steady", rate, min(seconds, 10.0), BARE_SYMBOL))
        bare_sent = control.recv()
        deadline = time.monotonic() + 10
        while bare.count < bare_sent and time.monotonic() < deadline:
            time.sleep(0.01)
        delivery = sorted(bare.latencies)
    delivery_p99 = delivery[min(len(delivery) - 1, int(len(delivery) * 0.99))]
    batch = min(BUFFER, int(rate * flush_interval))  # a batch goes when full or when the interval is over
    fill = batch / rate
    commit = commit_p99(url, batch)
    limit = delivery_p99 + fill + commit
    p50 = latencies[len(latencies) // 2]
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    print(f"latency at {rate:,} trades/s for {seconds:.0f} s ({len(latencies):,} of {sent:,} trades, "
          f"buffer {BUFFER}, flush interval {flush_interval} s):")
    print(f"  p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, max {latencies[-1] * 1000:.0f} ms; limit "
          f"{limit * 1000:.0f} ms (the bare client's p99 delivery {delivery_p99 * 1000:.0f} ms + filling a "
          f"{batch}-trade batch {fill * 1000:.0f} ms + p99 client COPY-and-commit of it {commit * 1000:.0f} ms); "
          f"p99/limit {p99 / limit:.2f}")
    print(f"  of which in the writer (accepted → committed): p50 {writer_stats.get('latency_p50_ms')} ms, "
          f"p99 {writer_stats.get('latency_p99_ms')} ms ({writer_stats['flushes']} flushes)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trades", type=int, default=300_000, help="trades in the throughput burst")
    parser.add_argument("--rate", type=int, default=5_000, help="steady rate for the latency run")
    parser.add_argument("--burst-per-minute", type=int, default=10_000,
                        help="trades per minute of the burst's timestamps (0: all at one instant)")
    parser.add_argument("--latency-seconds", type=float, default=65.0)
    parser.add_argument("--flush-interval", type=float, default=1.0)
    add_admin_url(parser)
    args = parser.parse_args()

    ctx = mp.get_context("spawn")
    control, child = ctx.Pipe()
    server = ctx.Process(target=serve, args=(child,), name="fake-kraken-ws", daemon=True)
    server.start()
    try:
        with scratch_database(args.admin_url, "live") as url, tempfile.TemporaryDirectory() as tmp:
            ws_url = control.recv()
            print(f"{flavour(url)}; {machine_note()}")
            throughput(url, control, ws_url, Path(tmp), args.trades, args.burst_per_minute)
            latency(url, control, ws_url, Path(tmp), args.rate, args.latency_seconds, args.flush_interval)
    finally:
        control.send(("stop",))
        server.join(10)


if __name__ == "__main__":
    main()
