"""A misbehaving exchange (issue 14): answers too big or too slow, cursors that do not advance,
ids that jump inside a page, an impossible ``last``, refused trades that must not become
permanent holes. Each ends in a clear error or exact data, never a hang or a loop."""

from __future__ import annotations

import logging
import socket
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from kraken_hist.ingest.backfill import KrakenTradesBackfill
from kraken_hist.ingest.backfill.pages import MAX_IDLE_PAGES
from kraken_hist.core.errors import ExchangePermanentError, ExchangeTransientError
from kraken_hist.gaps.filler import GapFiller
from kraken_hist.ingest.live import WebSocketDBIntegration
from kraken_hist.kraken.rest_parsing import TradesPage
from kraken_hist.kraken.ratelimit import RateLimiter
from kraken_hist.kraken.rest_client import KrakenRestClient
from kraken_hist.core.timeutils import to_unix_ns, utcnow
from kraken_hist.core.types import GapKind, HistoricalTrade, Refused, TradeSource
from kraken_hist.storage.writer import DatabaseWriter
from kraken_hist.kraken.ws_parsing import TradeMessage

from .helpers import read

UTC = timezone.utc
SYMBOL = "BTC/USD"
T0 = datetime(2025, 2, 3, tzinfo=UTC)


# --------------------------------------------------------------------------- HTTP reads

class _Hostile(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        mode = self.server.mode  # type: ignore[attr-defined]
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            if mode == "declared":
                self.send_header("Content-Length", str(240 * 2**20))
            elif mode == "trickle":
                self.send_header("Content-Length", "100")
            self.end_headers()
            if mode == "trickle":
                for _ in range(100):
                    self.wfile.write(b" ")
                    self.wfile.flush()
                    time.sleep(1.0)
            else:
                block = b" " * 65536
                for _ in range(240 * 16):  # 240 MB, no length announced
                    self.wfile.write(block)
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            pass

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def hostile() -> Iterator[Callable[[str], str]]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hostile)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def url(mode: str) -> str:
        server.mode = mode  # type: ignore[attr-defined]
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield url
    server.shutdown()
    server.server_close()


def client_for(url: str, **options: Any) -> KrakenRestClient:
    return KrakenRestClient(url, limiter=RateLimiter(0.0), max_retries=0, **options)


def test_an_answer_of_240_mb_is_an_error_after_at_most_the_cap(hostile: Callable[[str], str]) -> None:
    with client_for(hostile("declared")) as client:
        with pytest.raises(ExchangePermanentError, match="larger than the 16,777,216 bytes allowed"):
            client.get_server_time()
    tracemalloc.start()
    try:
        began = time.monotonic()
        with client_for(hostile("huge")) as client:
            with pytest.raises(ExchangePermanentError, match="larger than the 16,777,216 bytes allowed"):
                client.get_server_time()
        _now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 40 * 2**20, f"peak {peak / 2**20:.1f} MB"
    assert time.monotonic() - began < 10


def test_a_trickling_server_times_out_at_the_deadline(hostile: Callable[[str], str]) -> None:
    began = time.monotonic()
    with client_for(hostile("trickle"), deadline=2.0, timeout=(2.0, 5.0)) as client:
        with pytest.raises(ExchangeTransientError, match="no complete answer within 2 s"):
            client.get_server_time()
    assert 2.0 <= time.monotonic() - began < 4.5  # the deadline plus at most one byte's wait


def test_a_malformed_time_answer_is_a_clear_error() -> None:
    from kraken_hist.kraken.rest_parsing import ParseError, parse_server_time

    with pytest.raises(ParseError, match="bad Time result"):
        parse_server_time({"unixtime": "soon"})


# --------------------------------------------------------------------------- paging

def trade(trade_id: int, when: datetime | None = None) -> HistoricalTrade:
    return HistoricalTrade(symbol=SYMBOL, trade_id=trade_id, time=when or T0 + timedelta(seconds=trade_id),
                           price=Decimal("100.5"), volume=Decimal("0.1"), side="b", ord_type="l")


class Pages:
    """A REST client stub serving `answer(since)`; records the cursors asked for."""

    def __init__(self, answer: Callable[[str], TradesPage]) -> None:
        self.answer = answer
        self.calls: list[str] = []

    def get_trades(self, symbol: str, since: Any = None, count: int = 1000) -> TradesPage:
        self.calls.append(str(since))
        return self.answer(str(since))

    def fetch_trades_page(self, symbol: str, since: Any) -> TradesPage:  # the live stream's fetcher
        return self.get_trades(symbol, since)

    def get_server_time(self) -> datetime:
        return utcnow()

    def close(self) -> None:
        pass


def kraken_like(history: list[HistoricalTrade], omit_once: set[int] = frozenset(), refuse: set[int] = frozenset(),
                last: Callable[[str, list[HistoricalTrade]], str] | None = None) -> Callable[[str], TradesPage]:
    """Pages as Kraken serves them: the trades after `since`; `omit_once` left out of the first
    answer only; `refuse` served as refused rows; `last` overrides the cursor."""
    served = {"n": 0}

    def answer(since: str) -> TradesPage:
        served["n"] += 1
        rows = [t for t in history if to_unix_ns(t.time) > int(since)][:1000]
        if served["n"] == 1:
            rows = [t for t in rows if t.trade_id not in omit_once]
        cursor = str(to_unix_ns(rows[-1].time)) if rows else since
        if last is not None:
            cursor = last(since, rows)
        return TradesPage(symbol=SYMBOL, trades=[t for t in rows if t.trade_id not in refuse], last=cursor,
                          refused=tuple(Refused(t.trade_id, f"trade {t.trade_id}: price Infinity is not a finite "
                                                             "number", t.time) for t in rows if t.trade_id in refuse))

    return answer


def pages_of(db_url: str, answer: Callable[[str], TradesPage], **kwargs: Any) -> tuple[list[list[int]], Pages]:
    client = Pages(answer)
    with KrakenTradesBackfill(db_url, client, refresh=False) as job:  # type: ignore[arg-type]
        return [[t.trade_id for t in p.trades] for p in job.fetch_all_trades(SYMBOL, **kwargs)], client


def test_a_cursor_moving_one_nanosecond_a_page_is_an_error_not_a_loop(db_url: str) -> None:
    history = [trade(i) for i in range(1, 21)]  # full pages of 20, the same trades again and again

    def answer(since: str) -> TradesPage:
        last = to_unix_ns(history[-1].time) if since == "0" else int(since) + 1
        return TradesPage(symbol=SYMBOL, trades=list(history), last=str(last))

    client = Pages(answer)
    with KrakenTradesBackfill(db_url, client, refresh=False, page_size=20) as job:  # type: ignore[arg-type]
        pages = job.fetch_all_trades(SYMBOL)
        assert [t.trade_id for t in next(pages).trades] == list(range(1, 21))
        with pytest.raises(ExchangeTransientError, match="paging does not advance"):
            next(pages)
    assert len(client.calls) == 1 + MAX_IDLE_PAGES


def test_ids_missing_inside_one_answer_are_refetched_exactly(db_url: str, caplog: pytest.LogCaptureFixture) -> None:
    history = [trade(i) for i in range(1, 10)]
    with caplog.at_level(logging.WARNING, logger="kraken_hist.ingest.backfill"):
        pages, _client = pages_of(db_url, kraken_like(history, omit_once={4, 5, 6}))
    assert [i for page in pages for i in page] == list(range(1, 10))  # nothing lost, nothing twice
    assert any("jump from 3 to 7 inside the page" in r.getMessage() for r in caplog.records)


def test_ids_kraken_itself_skips_are_logged_and_stay_a_hole(db_url: str, caplog: pytest.LogCaptureFixture) -> None:
    history = [trade(i) for i in (1, 2, 3, 7, 8, 9)]
    with caplog.at_level(logging.WARNING, logger="kraken_hist.ingest.backfill"):
        pages, client = pages_of(db_url, kraken_like(history))
    assert pages == [[1, 2, 3], [7, 8, 9]] and len(client.calls) < 12
    messages = [r.getMessage() for r in caplog.records]
    assert any("jump from 3 to 7" in m for m in messages) and any("skipped trade ids 4..6" in m for m in messages)


def test_an_impossible_last_cursor_is_never_handed_on(db_url: str, caplog: pytest.LogCaptureFixture) -> None:
    history = [trade(i) for i in (1, 2, 3)]
    far = str(4_102_444_800 * 10**9)  # 2100-01-01

    def last(since: str, rows: list[HistoricalTrade]) -> str:
        return far if rows else since

    client = Pages(kraken_like(history, last=last))
    with KrakenTradesBackfill(db_url, client, refresh=False) as job:  # type: ignore[arg-type]
        pages = list(job.fetch_all_trades(SYMBOL))
    assert [p.last for p in pages] == [str(to_unix_ns(history[-1].time) - 1)]
    assert all(far not in call for call in client.calls)
    only_refused = Pages(kraken_like(history, refuse={1, 2, 3}, last=last))
    with KrakenTradesBackfill(db_url, only_refused, refresh=False) as job:  # type: ignore[arg-type]
        with pytest.raises(ExchangeTransientError, match="last cursor .* is after now"):
            list(job.fetch_all_trades(SYMBOL))


# --------------------------------------------------------------------------- refused trades

def test_a_refused_trade_is_recorded_and_is_no_gap_to_fill(db_url: str) -> None:
    history = [trade(i) for i in range(1, 30)]
    client = Pages(kraken_like(history, refuse={12, 13}))
    with KrakenTradesBackfill(db_url, client, refresh=False) as job:  # type: ignore[arg-type]
        result = job.backfill_symbol(SYMBOL, since=T0)
    assert result.trades_stored == 27 and result.caught_up
    assert read(db_url, "SELECT trade_id, source, reason LIKE '%Infinity%' FROM refused_trades ORDER BY 1") == [
        (12, "rest", True), (13, "rest", True)]
    with GapFiller(db_url, client=client) as filler:  # type: ignore[arg-type]
        (scan,) = filler.scan()
        assert [g for g in scan.gaps if g.kind is GapKind.TRADE_IDS] == []
        assert [(g.kind, g.first_missing_id, g.last_missing_id) for g in scan.refused] == [(GapKind.REFUSED, 12, 13)]
        calls = len(client.calls)
        report = filler.fill_all_gaps()
    assert report.failed == 0 and len(client.calls) == calls  # nothing fetched again


def test_a_refused_id_already_missing_is_accounted_for_by_gap_fill(db_url: str) -> None:
    history = [trade(i) for i in range(1, 30)]
    with KrakenTradesBackfill(db_url, Pages(kraken_like(history)), refresh=False) as job:  # type: ignore[arg-type]
        job.store_trades(SYMBOL, [t for t in history if t.trade_id not in (12, 13)], source=TradeSource.REST)
    client = Pages(kraken_like(history, refuse={12, 13}))
    with GapFiller(db_url, client=client) as filler:  # type: ignore[arg-type]
        (gap,) = [g for g in filler.detect_gaps() if g.kind is GapKind.TRADE_IDS]
        fill = filler.fill_gap(gap)
        assert fill.status == "filled", fill.reason
        assert [g for g in filler.detect_gaps() if g.kind is GapKind.TRADE_IDS] == []
    assert [row[0] for row in read(db_url, "SELECT trade_id FROM refused_trades ORDER BY 1")] == [12, 13]


def test_the_live_stream_places_refused_trades_and_never_fetches_them_forever(db_url: str) -> None:
    history = [trade(i, utcnow() - timedelta(seconds=60 - i)) for i in range(1, 40)]
    rest = Pages(kraken_like(history, refuse={21}))
    rest.page_size = 1000  # type: ignore[attr-defined]
    with KrakenTradesBackfill(db_url, rest, refresh=False) as job:  # type: ignore[arg-type]
        job.store_trades(SYMBOL, history[:5], cursor=str(to_unix_ns(history[4].time)))  # the stored record: 1..5
    with DatabaseWriter(db_url, trade_flush_interval=0.05) as writer:
        integration = WebSocketDBIntegration(writer, db_url=db_url, rest=rest, symbols=[SYMBOL], progress_interval=60,
                                             retry_cap=0.1)
        integration.start()
        try:
            # the stream delivers 1..19, refuses 20 by value itself, and misses 21 (REST refuses it)
            integration.on_trade(TradeMessage(snapshot=False, trades=tuple(history[5:19])))
            integration.on_trade(TradeMessage(snapshot=False, trades=(), refused=(
                Refused(20, "trade frame item 0 (BTC/USD trade 20): price nan is not a finite number", None, SYMBOL),)))
            integration.on_trade(TradeMessage(snapshot=False, trades=tuple(history[21:30])))
            deadline = time.monotonic() + 10
            while integration.open_holes() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert integration.open_holes() == {}
            calls = len(rest.calls)
            integration.persist_progress()
            time.sleep(0.3)
            assert len(rest.calls) == calls  # nothing left to fetch
        finally:
            integration.stop()
    stats = integration.stats()
    assert stats.refused == 2 and stats.frontier[SYMBOL] == 39  # REST's page ran on to the newest trade
    assert read(db_url, "SELECT trade_id, source FROM refused_trades ORDER BY 1") == [(20, "ws"), (21, "rest")]
    assert read(db_url, "SELECT last_trade_id FROM sync_status WHERE data_type = 'trades'") == [(39,)]
    stored = [row[0] for row in read(db_url, "SELECT trade_id FROM trades ORDER BY 1")]
    assert stored == [i for i in range(1, 40) if i not in (20, 21)]
