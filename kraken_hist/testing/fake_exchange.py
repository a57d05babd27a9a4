"""One fake Kraken exchange: REST and WebSocket v2 serving ONE market, in one process.

The REST server (:mod:`.fake_rest`) and the WebSocket server (:mod:`.fake_ws`) read the same
:class:`~.market.FakeMarket`, whose generated history ends now; a publisher thread then makes
new trades every second and sends them to WebSocket subscribers, so a trade seen on the stream
is the trade REST returns (same id, time, price) and a stream's REST catch-up continues the
same id sequence. Run it alone::

    python -m kraken_hist.testing.fake_exchange            # REST :8080, WebSocket :8081

and point kraken-hist at it with the two lines it prints. ``kraken-hist demo`` starts one in
its own process, with its own database.
"""

from __future__ import annotations

import argparse
import logging
import random
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Sequence

from kraken_hist.core.timeutils import to_unix_seconds
from kraken_hist.testing.fake_rest import FakeKrakenREST, demo_market
from kraken_hist.testing.fake_ws import FakeKrakenWS
from kraken_hist.testing.market import FakeMarket

logger = logging.getLogger(__name__)


class FakeExchange:
    """REST and WebSocket on one market; new trades published every `publish_interval` seconds."""

    def __init__(
        self,
        symbols: Sequence[str] = ("BTC/USD",),
        *,
        days: float = 1.0,
        trades_per_minute: float = 20.0,
        trades_per_second: float = 2.0,
        publish_interval: float = 1.0,
        seed: int = 1,
        rate_limit: float | None = None,
        host: str = "127.0.0.1",
        rest_port: int = 0,
        ws_port: int = 0,
    ) -> None:
        self.market: FakeMarket = demo_market(list(symbols), days=days, trades_per_minute=trades_per_minute,
                                              seed=seed, ahead=0)
        self.rest = FakeKrakenREST(self.market, rate_limit_per_second=rate_limit, host=host, port=rest_port)
        self.ws = FakeKrakenWS(self.market, host=host, port=ws_port)
        self.trades_per_second = trades_per_second
        self.publish_interval = publish_interval
        self._rng = random.Random(seed)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def rest_url(self) -> str:
        return self.rest.url

    @property
    def ws_url(self) -> str:
        return self.ws.url

    def env(self) -> dict[str, str]:
        """The ``KRAKEN_HIST_*`` variables that point kraken-hist at this exchange."""
        return {"KRAKEN_HIST_REST_URL": self.rest_url, "KRAKEN_HIST_WS_URL": self.ws_url}

    def start(self) -> "FakeExchange":
        self.rest.start()
        self.ws.start()
        self._stop.clear()
        if self.trades_per_second > 0:
            self._thread = threading.Thread(target=self._publish_loop, name="fake-exchange-publisher", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self.ws.stop()
        self.rest.stop()

    def __enter__(self) -> "FakeExchange":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _publish_loop(self) -> None:
        mean = self.trades_per_second * self.publish_interval
        while not self._stop.wait(self.publish_interval):
            for symbol in self.market.symbols():
                count = max(1, round(self._rng.expovariate(1 / mean))) if mean > 0 else 1
                self.ws.publish_new(symbol, count, rng=self._rng)

    def write_time_and_sales(self, symbol: str, start: datetime, end: datetime, directory: Path) -> Path:
        """The market's trades in ``[start, end)`` as a Kraken Time and Sales file
        (``XBTUSD.csv``: no header, ``timestamp,price,volume``, whole seconds)."""
        listing = self.market.universe.get(self.market.canonical(symbol))
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{listing.altname}.csv"
        with path.open("w", encoding="ascii") as out:
            for trade in self.market.trades(listing.symbol, start, end):
                out.write(f"{int(to_unix_seconds(trade.time))},{trade.price},{trade.volume}\n")
        return path


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m kraken_hist.testing.fake_exchange``: serve one generated market on REST and WebSocket."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--rest-port", type=int, default=8080)
    parser.add_argument("--ws-port", type=int, default=8081)
    parser.add_argument("--symbols", default="BTC/USD,ETH/USD", help="comma-separated pairs (default %(default)s)")
    parser.add_argument("--days", type=float, default=1.0, help="days of history before now (default %(default)s)")
    parser.add_argument("--trades-per-minute", type=float, default=20.0, help="of the history (default %(default)s)")
    parser.add_argument("--trades-per-second", type=float, default=2.0,
                        help="new live trades per second per pair (default %(default)s)")
    parser.add_argument("--rate-limit", type=float, default=1.0, help="REST calls per second per IP; 0 = unlimited")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    exchange = FakeExchange(
        [s.strip() for s in args.symbols.split(",") if s.strip()], days=args.days,
        trades_per_minute=args.trades_per_minute, trades_per_second=args.trades_per_second, seed=args.seed,
        rate_limit=args.rate_limit or None, host=args.host, rest_port=args.rest_port, ws_port=args.ws_port,
    )
    with exchange:
        print(f"fake Kraken on one market ({', '.join(exchange.market.symbols())}): "
              f"REST {exchange.rest_url}, WebSocket {exchange.ws_url}", flush=True)
        print("point kraken-hist at it:", flush=True)
        for name, value in exchange.env().items():
            print(f"  export {name}={value}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
