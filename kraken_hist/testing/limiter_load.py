"""N real processes calling the fake exchange at once: does the rate limit hold across them?

Each child process is an ordinary :class:`KrakenRestClient` with its own limiter — the
shared one in Redis (``--limiter redis``) or a per-process one (``--limiter process``, what
every process had before) — calling ``Trades`` for its pairs as fast as the limiter lets it.
The fake exchange counts per IP (all children are 127.0.0.1) and answers ``EGeneral:Too many
requests`` past its rate. The parent reports the combined call rate and the throttles seen::

    python -m kraken_hist.testing.limiter_load --processes 8 --rate 5 --seconds 20
    python -m kraken_hist.testing.limiter_load --processes 8 --rate 5 --seconds 20 --limiter process
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from kraken_hist.core.errors import ExchangeTransientError

PAIRS = ("BTC/USD", "ETH/USD")
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/15"


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadReport:
    processes: int
    limit_per_second: float  # the fake exchange's sustained rate per IP
    calls: int  # calls that reached the exchange, all processes together
    throttled: int  # throttle answers the exchange gave
    seconds: float  # first call sent to last call sent
    rate: float  # calls per second over that span
    max_in_window: int  # most calls sent within any one second
    sent: tuple[float, ...]  # arrival times at the exchange (or send times), sorted

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__ if name != "sent"}  # type: ignore[attr-defined]


class _Recording:
    """A limiter proxy that notes when each call was let through."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.sent: list[float] = []

    def acquire(self, pair: str | None = None) -> float:
        waited = self.inner.acquire(pair)
        self.sent.append(time.time())
        return waited

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def run_child(args: argparse.Namespace) -> dict[str, Any]:
    """One process: `calls` Trades calls (or until `until`), paced by its limiter."""
    from kraken_hist.kraken.ratelimit import RateLimiter, RedisRateLimiter, limiter_namespace, shared_limiter
    from kraken_hist.kraken.rest_client import KrakenRestClient

    backoff = {"backoff_initial": args.backoff, "backoff_max": max(args.backoff, args.backoff * 8)}
    limiter: Any
    if args.limiter == "redis":
        limiter = shared_limiter(args.redis_url, args.namespace or limiter_namespace(args.rest_url, "load"),
                                 args.interval, args.pair_interval)
        limiter.backoff_initial, limiter.backoff_max = backoff["backoff_initial"], backoff["backoff_max"]
        assert isinstance(limiter, RedisRateLimiter)
    else:
        limiter = RateLimiter(args.interval, pair_interval=args.pair_interval, **backoff)
    recording = _Recording(limiter)
    pairs = args.pairs.split(",")
    throttled = failed = 0
    delay = args.start_at - time.time()
    if delay > 0:
        time.sleep(delay)
    with KrakenRestClient(args.rest_url, limiter=recording, max_retries=args.max_retries,  # type: ignore[arg-type]
                          retry_base_delay=0.05) as client:
        i = 0
        while i < args.calls and (args.until is None or time.time() < args.until):
            try:
                client.get_trades(pairs[i % len(pairs)], count=20)
            except ExchangeTransientError:
                failed += 1
            i += 1
        throttled = client.stats().throttled
    return {"pid": os.getpid(), "sent": recording.sent, "throttled": throttled, "failed": failed}


def _child_argv(args: argparse.Namespace, index: int, out: Path) -> list[str]:
    pairs = args.pairs if args.pairs else PAIRS[index % len(PAIRS)]
    argv = [sys.executable, "-m", "kraken_hist.testing.limiter_load", "child", "--rest-url", args.rest_url, "--redis-url", args.redis_url,
            "--limiter", args.limiter, "--interval", str(args.interval), "--calls", str(args.calls),
            "--pairs", pairs, "--start-at", str(args.start_at), "--backoff", str(args.backoff),
            "--max-retries", str(args.max_retries), "--out", str(out)]
    if args.pair_interval is not None:
        argv += ["--pair-interval", str(args.pair_interval)]
    if args.namespace:
        argv += ["--namespace", args.namespace]
    if args.until is not None:
        argv += ["--until", str(args.until)]
    return argv


def run_load(rest_url: str, *, processes: int, interval: float, calls: int, limiter: str = "redis",
             redis_url: str = DEFAULT_REDIS_URL, namespace: str | None = None, pairs: str | None = None,
             pair_interval: float | None = None, seconds: float | None = None, backoff: float = 2.0,
             max_retries: int = 6, start_delay: float = 1.5, timeout: float = 300.0) -> list[dict[str, Any]]:
    """Start `processes` children against `rest_url` at the same instant; their results."""
    start_at = time.time() + start_delay
    args = argparse.Namespace(rest_url=rest_url, redis_url=redis_url, limiter=limiter, interval=interval,
                              calls=calls, pairs=pairs, start_at=start_at, backoff=backoff,
                              max_retries=max_retries, pair_interval=pair_interval, namespace=namespace,
                              until=None if seconds is None else start_at + seconds)
    with tempfile.TemporaryDirectory(prefix="kh-load-") as tmp:
        outs = [Path(tmp) / f"child-{i}.json" for i in range(processes)]
        children = [subprocess.Popen(_child_argv(args, i, out)) for i, out in enumerate(outs)]
        try:
            for child in children:
                child.wait(timeout=timeout)
        finally:
            for child in children:
                if child.poll() is None:
                    child.kill()
                    child.wait()
        failed = [c.returncode for c in children if c.returncode != 0]
        if failed:
            raise RuntimeError(f"{len(failed)} load process(es) failed: exit codes {failed}")
        return [json.loads(out.read_text()) for out in outs]


def record_arrivals(fake: Any) -> list[float]:
    """Note when each request reaches `fake` (a FakeKrakenREST): the times its limit judges."""
    arrivals: list[float] = []
    handle = fake.handle

    def noted(path: str, query: dict[str, list[str]], ip: str) -> Any:
        arrivals.append(time.time())
        return handle(path, query, ip)

    fake.handle = noted
    return arrivals


def summarize(results: list[dict[str, Any]], *, limit_per_second: float, throttled: int,
              arrivals: list[float] | None = None) -> LoadReport:
    """Combined figures: of `arrivals` at the exchange when given, else of the children's send
    times (`throttled`: as the exchange counted)."""
    sent = sorted(arrivals if arrivals is not None else (t for r in results for t in r["sent"]))
    span = sent[-1] - sent[0] if len(sent) > 1 else 0.0
    most, j = 0, 0
    for i, t in enumerate(sent):
        while sent[j] < t - 1.0:
            j += 1
        most = max(most, i - j + 1)
    return LoadReport(processes=len(results), limit_per_second=limit_per_second, calls=len(sent),
                      throttled=throttled, seconds=round(span, 3),
                      rate=round((len(sent) - 1) / span, 3) if span > 0 else 0.0, max_in_window=most,
                      sent=tuple(sent))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    child = sub.add_parser("child", help="(internal) one calling process")
    child.add_argument("--rest-url", required=True)
    child.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    child.add_argument("--namespace")
    child.add_argument("--limiter", choices=("redis", "process"), default="redis")
    child.add_argument("--interval", type=float, required=True)
    child.add_argument("--pair-interval", type=float)
    child.add_argument("--calls", type=int, required=True)
    child.add_argument("--pairs", default=",".join(PAIRS))
    child.add_argument("--start-at", type=float, default=0.0)
    child.add_argument("--until", type=float)
    child.add_argument("--backoff", type=float, default=2.0)
    child.add_argument("--max-retries", type=int, default=6)
    child.add_argument("--out", required=True)
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--rate", type=float, default=5.0, help="the fake exchange's calls/s per IP")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--limiter", choices=("redis", "process"), default="redis")
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    args = parser.parse_args(argv)
    if args.command == "child":
        Path(args.out).write_text(json.dumps(run_child(args)))
        return

    import uuid

    from kraken_hist.testing.fake_rest import FakeKrakenREST
    from kraken_hist.testing.history import generate_trades
    from kraken_hist.testing.market import FakeMarket

    start = datetime(2024, 1, 1, tzinfo=timezone.utc)
    market = FakeMarket({p: generate_trades(p, start, start + timedelta(minutes=30), seed=i)
                         for i, p in enumerate(PAIRS)})
    with FakeKrakenREST(market, rate_limit_per_second=args.rate, burst=2.0) as fake:
        arrivals = record_arrivals(fake)
        results = run_load(fake.url, processes=args.processes, interval=1.0 / args.rate, calls=10**9,
                           limiter=args.limiter, redis_url=args.redis_url, seconds=args.seconds,
                           namespace=f"kraken_hist:ratelimit:load-{uuid.uuid4().hex[:8]}")
        report = summarize(results, limit_per_second=args.rate, throttled=fake.calls["throttled"],
                           arrivals=arrivals)
    print(json.dumps(report.to_dict(), indent=2))


if __name__ == "__main__":
    main()
