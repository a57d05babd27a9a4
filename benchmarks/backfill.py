"""Backfill benchmark against the fake exchange (run in its own process, so its CPU is not ours).

1. Pacing: the fake limits us to N calls/s (token bucket, like Kraken); the client paced at
   1/N s must reach >= 95 % of N with zero throttle answers.
2. CPU per 1,000-trade page in the client process (time.process_time: HTTP, JSON with
   Decimal, records, COPY, candle rebuild and cursor statements sent), limit 20 ms; parse
   alone and the database wall time per page are shown apart (the server's own CPU is not in
   the client's process time).

    /tmp/venv/bin/python benchmarks/backfill.py [--pages 40] [--rate 5] [--calls 30] [--db-url URL]
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
import uuid
from datetime import timedelta

import psycopg
import requests

from kraken_hist import migrate
from kraken_hist.backfill import KrakenTradesBackfill
from kraken_hist.parsing import loads, parse_trades_result
from kraken_hist.ratelimit import RateLimiter
from kraken_hist.rest_client import KrakenRestClient

ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
TRADES_PER_MINUTE = 20.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_fake(rate: float, days: float) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "kraken_hist.testing.fake_rest", "--port", str(port), "--rate-limit", str(rate),
         "--days", str(days), "--symbols", "BTC/USD", "--trades-per-minute", str(TRADES_PER_MINUTE)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            requests.get(url + "/0/public/SystemStatus", timeout=1)
            return process, url
        except requests.ConnectionError:
            time.sleep(0.1)
    process.kill()
    raise SystemExit("the fake exchange did not start")


def pacing(rate: float, calls: int) -> None:
    process, url = start_fake(rate, days=0.01)
    try:
        time.sleep(1.5)  # let the fake's bucket fill after our start-up probe
        client = KrakenRestClient(url, limiter=RateLimiter(1.0 / rate), max_retries=0)
        began = time.monotonic()
        for _ in range(calls):
            client.get_server_time()
        elapsed = time.monotonic() - began
        throttled = client.stats().throttled
        client.close()
    finally:
        process.kill()
        process.wait()
    achieved = (calls - 1) / elapsed  # calls are slots 1/N apart: n calls span n-1 intervals
    print(f"pacing: limit {rate:.2f} calls/s, achieved {achieved:.3f} calls/s = {achieved / rate:.1%} of the "
          f"limit (need >= 95%), throttle answers {throttled} (need 0)")


def cpu_per_page(pages: int, db_url: str | None) -> None:
    days = pages * 1000 / (TRADES_PER_MINUTE * 1440) / 0.98
    process, url = start_fake(0, days=days)
    name = None
    if db_url is None:
        name = f"kh_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        db_url = ADMIN_URL.rsplit("/", 1)[0] + "/" + name
        migrate.upgrade(db_url)
    try:
        raw = requests.get(url + "/0/public/Trades", params={"pair": "XBTUSD", "since": 0}, timeout=10).content
        began = time.process_time()
        for _ in range(20):
            page = parse_trades_result(loads(raw)["result"], "BTC/USD")
        parse_ms = (time.process_time() - began) / 20 * 1000
        client = KrakenRestClient(url, limiter=RateLimiter(0))
        with KrakenTradesBackfill(db_url, client) as job:
            since = page.trades[0].time - timedelta(seconds=1)
            wall = time.perf_counter()
            cpu = time.process_time()
            result = job.backfill_symbol("BTC/USD", since=since)
            cpu = time.process_time() - cpu
            wall = time.perf_counter() - wall
        client.close()
    finally:
        process.kill()
        process.wait()
        if name is not None:
            with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    full_pages = max(1, result.trades_fetched / 1000)
    per_page = cpu / full_pages * 1000
    print(f"cpu: {result.pages} pages, {result.trades_fetched} trades, {result.repairs} id-break repairs, "
          f"wall {wall:.2f} s ({result.trades_fetched / wall:.0f} trades/s)")
    print(f"cpu: client process CPU {per_page:.1f} ms per 1,000-trade page = {per_page / 20:.0%} of the 20 ms "
          f"limit (parse alone {parse_ms:.1f} ms; wall per page incl. fake + PostgreSQL "
          f"{wall / full_pages * 1000:.1f} ms)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=40, help="size of the CPU run in 1,000-trade pages")
    parser.add_argument("--rate", type=float, default=5.0, help="the fake's limit N in calls/s")
    parser.add_argument("--calls", type=int, default=30, help="calls in the pacing run")
    parser.add_argument("--db-url", help="a migrated database to use (default: a temporary one on 127.0.0.1)")
    args = parser.parse_args()
    pacing(args.rate, args.calls)
    cpu_per_page(args.pages, args.db_url)


if __name__ == "__main__":
    main()
