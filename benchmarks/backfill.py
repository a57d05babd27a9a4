"""Backfill benchmark through the real backfill path against the fake exchange (in its own
process, so its CPU is not ours), each figure against a limit of the same run.

1. Pacing: ``KrakenTradesBackfill.backfill_symbol`` pages through the fake's history while the
   fake limits us to N calls/s (a token bucket, like Kraken). Figure: Trades calls per second
   the backfill achieved / N, and the throttle answers the fake counted itself (need 0).
2. CPU per 1,000-trade page in this process (time.process_time: HTTP, JSON with Decimal,
   records, COPY, candle rebuild, cursor statements sent), unthrottled, against the same pages
   fetched and parsed by the bare REST client (what no backfill can avoid); the database's
   wall time per page is shown beside it (the server's CPU is not in our process time).

    python benchmarks/backfill.py [--pages 40] [--rate 5] [--calls 30] [--admin-url URL]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time

from kraken_hist.ingest.backfill import KrakenTradesBackfill
from kraken_hist.kraken.ratelimit import RateLimiter
from kraken_hist.kraken.rest_client import KrakenRestClient

from common import add_admin_url, flavour, machine_note, scratch_database

SYMBOL = "BTC/USD"
TRADES_PER_MINUTE = 20.0


def serve(conn, rate: float, days: float) -> None:
    """The fake exchange process: sends its URL, then answers "calls" with its own counters."""
    from kraken_hist.testing.fake_rest import FakeKrakenREST, demo_market

    market = demo_market([SYMBOL], days=days, trades_per_minute=TRADES_PER_MINUTE, seed=1, ahead=0)
    with FakeKrakenREST(market, rate_limit_per_second=rate or None) as fake:
        conn.send(fake.url)
        while True:
            command = conn.recv()
            if command == "calls":
                conn.send(dict(fake.calls))
            elif command == "reset":
                fake.reset_calls()
                conn.send("ok")
            else:
                return


class Fake:
    def __init__(self, rate: float, days: float) -> None:
        ctx = mp.get_context("spawn")
        self.control, child = ctx.Pipe()
        self.process = ctx.Process(target=serve, args=(child, rate, days), name="fake-kraken-rest", daemon=True)

    def __enter__(self) -> "Fake":
        self.process.start()
        self.url = self.control.recv()
        return self

    def calls(self) -> dict[str, int]:
        self.control.send("calls")
        return self.control.recv()

    def reset(self) -> None:
        self.control.send("reset")
        self.control.recv()

    def __exit__(self, *exc: object) -> None:
        self.control.send("stop")
        self.process.join(10)


def days_for(pages: int) -> float:
    return pages * 1000 / (TRADES_PER_MINUTE * 1440) / 0.97


def pacing(admin_url: str, rate: float, calls: int) -> None:
    with Fake(rate, days_for(calls + 2)) as fake, scratch_database(admin_url, "backfill_pace") as url:
        time.sleep(1.5)  # the fake's bucket fills after its start
        client = KrakenRestClient(fake.url, limiter=RateLimiter(1.0 / rate))
        fake.reset()
        with KrakenTradesBackfill(url, client) as job:
            began = time.monotonic()
            result = job.backfill_symbol(SYMBOL)
            elapsed = time.monotonic() - began
        client.close()
        counted = fake.calls()
    trades_calls = counted.get("Trades", 0)
    achieved = (trades_calls - 1) / elapsed  # calls are slots 1/N apart: n calls span n-1 intervals
    print(f"pacing: the backfill made {trades_calls} Trades calls ({result.pages} pages, {result.trades_fetched:,} "
          f"trades) in {elapsed:.1f} s = {achieved:.3f} calls/s; the fake's limit {rate:.2f} calls/s -> "
          f"{achieved / rate:.1%} of it (need >= 95%); throttle answers counted by the fake: "
          f"{counted.get('throttled', 0)} (need 0); all calls {counted.get('total', 0)}")


def cpu_per_page(admin_url: str, pages: int) -> None:
    with Fake(0, days_for(pages)) as fake, scratch_database(admin_url, "backfill_cpu") as url:
        client = KrakenRestClient(fake.url, limiter=RateLimiter(0))
        # the limit: the same pages fetched and parsed by the bare client, nothing stored
        cpu = time.process_time()
        since: str | None = None
        bare_pages = 0
        while True:
            page = client.get_trades(SYMBOL, since=since)
            bare_pages += 1
            if len(page.trades) < 1000 or page.last == since:
                break
            since = page.last
        bare_cpu = time.process_time() - cpu
        with KrakenTradesBackfill(url, client) as job:
            wall = time.perf_counter()
            cpu = time.process_time()
            result = job.backfill_symbol(SYMBOL)
            cpu = time.process_time() - cpu
            wall = time.perf_counter() - wall
        client.close()
        print(f"{flavour(url)}; {machine_note()}")
    full_pages = max(1, result.trades_fetched / 1000)
    per_page, bare_per_page = cpu / full_pages * 1000, bare_cpu / max(1, bare_pages - 1) * 1000
    print(f"cpu: {result.pages} pages, {result.trades_fetched:,} trades, {result.repairs} id-break repairs, "
          f"wall {wall:.2f} s ({result.trades_fetched / wall:,.0f} trades/s)")
    print(f"cpu: our process {per_page:.1f} ms per 1,000-trade page; limit: fetch and parse alone "
          f"{bare_per_page:.1f} ms -> ratio {per_page / bare_per_page:.2f}; wall per page incl. the fake and "
          f"PostgreSQL {wall / full_pages * 1000:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=40, help="size of the CPU run in 1,000-trade pages")
    parser.add_argument("--rate", type=float, default=5.0, help="the fake's limit N in calls/s")
    parser.add_argument("--calls", type=int, default=30, help="about this many Trades calls in the pacing run")
    add_admin_url(parser)
    args = parser.parse_args()
    cpu_per_page(args.admin_url, args.pages)
    pacing(args.admin_url, args.rate, args.calls)


if __name__ == "__main__":
    main()
