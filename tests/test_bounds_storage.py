"""Impossible values end to end: never stored, never moving a resume point or coverage.

CSV imports against PostgreSQL (a file with impossible lines gives the database a file of
its good lines alone gives), a REST backfill from the fake exchange serving impossible rows
(refused, the rest stored, no endless stepping back), and the WebSocket client counting the
items it refuses while the others of the frame go on.
"""

from __future__ import annotations

import random
import re
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
import pytest

from kraken_hist.storage import store
from kraken_hist.ingest.backfill import KrakenTradesBackfill
from kraken_hist.ingest.archive.formats import TIME_OUT_OF_RANGE, StrictModeError
from kraken_hist.ingest.archive.importer import BulkCSVImporter
from kraken_hist.kraken.ratelimit import RateLimiter
from kraken_hist.kraken.rest_client import KrakenRestClient
from kraken_hist.testing.fake_rest import FakeKrakenREST
from kraken_hist.testing.fake_ws import FakeKrakenWS
from kraken_hist.testing.history import generate_trades
from kraken_hist.testing.market import FakeMarket, ManualClock
from kraken_hist.core.timeutils import utcnow
from kraken_hist.kraken.ws_client import KrakenWSClient
from kraken_hist.kraken.ws_parsing import TradeMessage

from .helpers import snapshot

UTC = timezone.utc
SYMBOL = "BTC/USD"
Y2100 = 4_102_444_800


def state(url: str) -> dict[str, list[tuple]]:
    """What an import or a backfill writes (trades, candles, coverage, the resume points)."""
    full = snapshot(url)
    return {"trades": full["trades"], "candles": full["candles"], "coverage": full["coverage"],
            "sync": [row for row in full["sync"] if row[1] == "trades"]}  # the resume points, not the import log


def good_lines(seed: int = 5, minutes: int = 90, start: int = 1_700_000_000) -> list[str]:
    rng = random.Random(seed)
    second, out = start, []
    for _ in range(minutes * 4):
        second += rng.choice((0, 1, 13, 29))
        out.append(f"{second},{rng.randint(300_000, 310_000) / 10},{rng.randrange(1, 10**8) / 10**8:.8f}\n")
    return out


# --------------------------------------------------------------------------- CSV

@pytest.mark.parametrize("writers", [1, 2])
def test_impossible_csv_lines_are_reported_and_the_database_is_that_of_the_good_lines(
        db_url: str, other_db_url: str, tmp_path: Path, writers: int) -> None:
    good = good_lines()
    lines = list(good)
    lines.insert(0, "0,100,1\n")  # line 1: epoch 0
    lines.insert(150, f"{Y2100},100,1\n")  # line 151: the year 2100, mid-file
    lines.insert(200, f"{good[198].split(',')[0]},100,1e99\n")  # line 201: a volume too wide for exact sums
    lines.append(f"{Y2100 + 60},100,1\n")  # the last line: 2100 again, where a resume point would follow it
    (tmp_path / "bad").mkdir()
    (tmp_path / "good").mkdir()
    bad_file = tmp_path / "bad" / "XBTUSD.csv"
    bad_file.write_text("".join(lines))
    good_file = tmp_path / "good" / "XBTUSD.csv"
    good_file.write_text("".join(good))

    result = BulkCSVImporter(db_url, chunk_size=64, writers=writers).import_csv_file(bad_file)
    BulkCSVImporter(other_db_url, chunk_size=64, writers=writers).import_csv_file(good_file)

    assert result.bad_by_reason == {TIME_OUT_OF_RANGE: 3, "volume": 1}
    assert [(b.line, b.reason) for b in result.bad_examples] == [
        (1, TIME_OUT_OF_RANGE), (151, TIME_OUT_OF_RANGE), (201, "volume"), (len(lines), TIME_OUT_OF_RANGE)]
    assert "volume 1E+99 is too large" in result.bad_examples[2].message
    assert result.imported == len(good) and result.lines == len(lines)
    last_good = datetime.fromtimestamp(int(good[-1].split(",")[0]), UTC)
    assert result.last_time == last_good
    mine, theirs = state(db_url), state(other_db_url)
    assert mine == theirs
    (sync,) = mine["sync"]
    assert sync[2] <= last_good + timedelta(seconds=1)  # the resume point is not in 2100


def test_a_file_of_impossible_times_moves_no_resume_point(db_url: str, tmp_path: Path) -> None:
    before = datetime(2025, 1, 1, tzinfo=UTC)
    with psycopg.connect(db_url) as conn:
        store.write_sync_status(conn, SYMBOL, "trades", last_time=before, cursor="1735689599999999999",
                                last_trade_id=42)
    untouched = state(db_url)
    path = tmp_path / "XBTUSD.csv"
    path.write_text(f"{Y2100},100,1\n{Y2100 + 1},100,1\n4102444900,1,1\n")
    result = BulkCSVImporter(db_url).import_csv_file(path)
    assert (result.imported, result.bad, result.bad_by_reason) == (0, 3, {TIME_OUT_OF_RANGE: 3})
    assert result.first_time is None and result.last_time is None
    assert state(db_url) == untouched

    headered = tmp_path / "h" / "XBTUSD.csv"
    headered.parent.mkdir()
    headered.write_text("price,volume,time,buy/sell,market/limit,misc,trade_id\n"
                        f"100.5,0.1,{Y2100}.25,b,l,,7000\n100.5,0.1,12.5,b,l,,7001\n")
    result = BulkCSVImporter(db_url).import_csv_file(headered)
    assert [(b.line, b.reason) for b in result.bad_examples] == [(2, TIME_OUT_OF_RANGE), (3, TIME_OUT_OF_RANGE)]
    assert state(db_url) == untouched


def test_strict_import_fails_at_the_impossible_line_and_stores_nothing(db_url: str, tmp_path: Path) -> None:
    lines = good_lines(minutes=30)
    lines.insert(70, f"{Y2100},100,1\n")
    path = tmp_path / "XBTUSD.csv"
    path.write_text("".join(lines))
    empty = state(db_url)
    with pytest.raises(StrictModeError) as info:
        BulkCSVImporter(db_url, chunk_size=16, strict=True).import_csv_file(path)
    assert (info.value.bad.line, info.value.bad.reason) == (71, TIME_OUT_OF_RANGE)
    assert state(db_url) == empty


# --------------------------------------------------------------------------- REST

START = datetime(2025, 2, 3, tzinfo=UTC)


class TamperedREST(FakeKrakenREST):
    """The fake exchange, with some fields of some trades replaced by impossible values in its
    Trades answers (as a broken upstream would send them); ``last`` stays the real one."""

    _ROW = re.compile(r'\["([^"]*)","([^"]*)",([0-9.]+),("[bs]","[ml]","",)(\d+)\]')

    def __init__(self, market: FakeMarket, tamper: dict[int, dict[str, str]], **options: Any) -> None:
        super().__init__(market, **options)
        self.tamper = tamper

    def _trades(self, params: dict[str, str]) -> bytes:
        def replace(match: re.Match) -> str:
            price, volume, when, middle, trade_id = match.groups()
            spoil = self.tamper.get(int(trade_id), {})
            price = spoil.get("price", f'"{price}"')
            volume = spoil.get("volume", f'"{volume}"')
            return f'[{price},{volume},{spoil.get("time", when)},{middle}{trade_id}]'

        return self._ROW.sub(replace, super()._trades(params).decode()).encode()


def test_rest_backfill_refuses_impossible_trades_stores_the_rest_and_does_not_loop(db_url: str) -> None:
    history = generate_trades(SYMBOL, START, START + timedelta(minutes=60), seed=5, trades_per_minute=30)
    ids = [t.trade_id for t in history]
    tamper: dict[int, dict[str, str]] = {}
    for trade_id in ids[300:390]:  # more than a page of consecutive impossible times: whole pages refused
        tamper[trade_id] = {"time": f"{Y2100}.5"}
    tamper[ids[40]] = {"price": '"Infinity"'}
    tamper[ids[41]] = {"volume": "NaN"}
    tamper[ids[500]] = {"time": "0"}
    tamper[ids[501]] = {"price": '"0"'}
    tamper[ids[-1]] = {"time": f"{Y2100}"}  # the newest trade: the backfill must still end
    clock = ManualClock(START + timedelta(hours=2))
    with TamperedREST(FakeMarket({SYMBOL: history}, clock=clock), tamper) as fake:
        client = KrakenRestClient(fake.url, limiter=RateLimiter(0, backoff_initial=0.02, backoff_max=0.1),
                                  retry_base_delay=0.01, timeout=(2.0, 2.0))
        with KrakenTradesBackfill(db_url, client, page_size=40) as job:
            done = threading.Event()
            outcome: dict[str, Any] = {}

            def run() -> None:
                try:
                    outcome["result"] = job.backfill_symbol(SYMBOL)
                except BaseException as exc:  # reported below
                    outcome["error"] = exc
                done.set()

            worker = threading.Thread(target=run, daemon=True)
            worker.start()
            assert done.wait(60), f"the backfill did not end ({fake.calls['Trades']} Trades calls)"
            calls = fake.calls["Trades"]
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    kept = [t for t in history if t.trade_id not in tamper]
    stored = state(db_url)
    assert [row[1] for row in stored["trades"]] == [t.trade_id for t in kept]
    assert result.trades_stored == len(kept) and result.caught_up
    pages = len(history) // 40 + 1
    assert calls <= pages + 2 * result.repairs + 5  # no endless stepping back over refused ids
    (sync,) = stored["sync"]
    assert sync[2] <= history[-1].time and sync[3] is not None and int(sync[3]) < Y2100 * 10**9


# --------------------------------------------------------------------------- WebSocket

def test_ws_client_counts_and_logs_refused_items_and_delivers_the_rest(caplog: pytest.LogCaptureFixture) -> None:
    now = utcnow()
    market = FakeMarket({SYMBOL: generate_trades(SYMBOL, now - timedelta(minutes=5), now, seed=3)})
    delivered: list[TradeMessage] = []
    with FakeKrakenWS(market, heartbeat_interval=0.2) as server:
        client = KrakenWSClient(server.url, [SYMBOL], on_trade=delivered.append, heartbeat_timeout=1.0,
                                ack_timeout=1.0, backoff_base=0.05, backoff_cap=0.2, poll_interval=0.05)
        with client:
            assert client.wait_connected(5)
            server.wait_for_subscribers("trade", [SYMBOL])
            stamp = now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            items = [(9_000_001, "83744.3", stamp), (9_000_002, "NaN", stamp), (9_000_003, "1.5", "2100-01-01T00:00:00Z"),
                     (9_000_004, "83744.4", stamp)]
            frame = '{"channel":"trade","type":"update","data":[%s]}' % ",".join(
                f'{{"symbol":"{SYMBOL}","side":"buy","price":{price},"qty":0.5,"ord_type":"limit",'
                f'"trade_id":{trade_id},"timestamp":"{when}"}}' for trade_id, price, when in items)
            with caplog.at_level("WARNING", logger="kraken_hist.kraken.ws_client"):
                server.send_malformed([frame])
                deadline = time.monotonic() + 10
                while client.state().refused_items < 2 and time.monotonic() < deadline:
                    time.sleep(0.02)
                seen = client.state()
    assert seen.refused_items == 2 and seen.malformed == 0
    got = [t.trade_id for m in delivered for t in m.trades if t.trade_id >= 9_000_000]
    assert got == [9_000_001, 9_000_004]
    refused = [m.refused for m in delivered if m.refused]
    assert [[r.trade_id for r in group] for group in refused] == [[9_000_002, 9_000_003]]
    warnings = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert any("trade 9000002): price nan is not a finite number" in w for w in warnings)
    assert any("trade 9000003): timestamp 2100-01-01T00:00:00Z is after now" in w for w in warnings)
