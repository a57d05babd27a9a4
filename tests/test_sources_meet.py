"""Archive, REST backfill, stream writer and gap fill meeting on one symbol: one trade, one row.

The truth is the fake exchange's generated history; the database must hold, per second,
exactly the history's (price, volume) multiset — whatever order the paths ran in, and when
they run at the same time — and ``gaps`` must find nothing afterwards.
"""

from __future__ import annotations

import threading
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator

import psycopg
import pytest

from kraken_hist.storage import store
from kraken_hist.rules.candles import candles_from_trades
from kraken_hist.ingest.backfill import KrakenTradesBackfill
from kraken_hist.ingest.archive.importer import BulkCSVImporter
from kraken_hist.gaps.filler import GapFiller
from kraken_hist.kraken.ratelimit import RateLimiter
from kraken_hist.kraken.rest_client import KrakenRestClient
from kraken_hist.testing.fake_rest import FakeKrakenREST
from kraken_hist.testing.history import generate_trades
from kraken_hist.testing.market import FakeMarket, ManualClock
from kraken_hist.core.types import HistoricalTrade, TradeRecord, TradeSource
from kraken_hist.storage.writer import DatabaseWriter

UTC = timezone.utc
SYMBOL = "BTC/USD"
START = datetime(2025, 3, 3, tzinfo=UTC)
M = timedelta(minutes=1)


@pytest.fixture(scope="module")
def history() -> list[HistoricalTrade]:
    return generate_trades(SYMBOL, START, START + 150 * M, seed=23, trades_per_minute=40)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START + 70 * M)


@pytest.fixture
def fake(history: list[HistoricalTrade], clock: ManualClock) -> Iterator[FakeKrakenREST]:
    with FakeKrakenREST(FakeMarket({SYMBOL: history}, clock=clock)) as server:
        yield server


def client(fake: FakeKrakenREST) -> KrakenRestClient:
    return KrakenRestClient(fake.url, limiter=RateLimiter(0, backoff_initial=0.02, backoff_max=0.1),
                            retry_base_delay=0.01, timeout=(2.0, 2.0))


def backfill(db_url: str, fake: FakeKrakenREST, since: datetime | None = None, until: datetime | None = None) -> None:
    with KrakenTradesBackfill(db_url, client(fake)) as job:
        job.backfill_symbol(SYMBOL, since=since, until=until)


def write_csv(path: Path, trades: list[HistoricalTrade]) -> Path:
    """Kraken's Time and Sales layout: whole seconds, price, volume; no header, no id."""
    path.write_text("".join(f"{int(t.time.timestamp())},{t.price},{t.volume}\n" for t in trades))
    return path


def between(trades: list[HistoricalTrade], lo: datetime, hi: datetime) -> list[HistoricalTrade]:
    return [t for t in trades if lo <= t.time < hi]


def per_second(rows: list[tuple]) -> Counter:
    return Counter((when.replace(microsecond=0), price.normalize(), volume.normalize()) for when, price, volume in rows)


def stored_per_second(db_url: str) -> Counter:
    with psycopg.connect(db_url) as conn:
        return per_second(conn.execute("SELECT time, price, volume FROM trades WHERE symbol = %s", (SYMBOL,)).fetchall())


def expected_per_second(trades: list[HistoricalTrade]) -> Counter:
    return per_second([(t.time, t.price, t.volume) for t in trades])


def stored_candles(db_url: str) -> dict[datetime, tuple]:
    with psycopg.connect(db_url) as conn:
        rows = conn.execute("SELECT time, open, high, low, close, vwap, volume, trades FROM candles "
                            "WHERE symbol = %s AND source = 'trades'", (SYMBOL,)).fetchall()
    return {row[0]: row[1:] for row in rows}


def expected_candles(trades: list[HistoricalTrade]) -> dict[datetime, tuple]:
    return {c.time: (c.open, c.high, c.low, c.close, c.vwap, c.volume, c.trades) for c in candles_from_trades(trades)}


def detected_gaps(db_url: str, fake: FakeKrakenREST, clock: ManualClock) -> list:
    with GapFiller(db_url, client=client(fake), clock=clock, sleep=lambda s: None) as filler:
        return filler.detect_gaps(min_gap_minutes=0)


def fill_gaps(db_url: str, fake: FakeKrakenREST, clock: ManualClock) -> None:
    with GapFiller(db_url, client=client(fake), clock=clock, sleep=lambda s: None) as filler:
        report = filler.fill_all_gaps(min_gap_minutes=0)
    assert report.failed == 0, report.to_dict()


def assert_exact(db_url: str, truth: list[HistoricalTrade]) -> None:
    stored, expected = stored_per_second(db_url), expected_per_second(truth)
    assert stored - expected == Counter(), "stored twice or never traded"
    assert expected - stored == Counter(), "missing"
    assert stored_candles(db_url) == expected_candles(truth)


def test_an_archive_ending_after_rest_data_is_never_doubled(db_url, fake, clock, history, tmp_path):
    """The issue's first report: backfill the last half hour, import an archive reaching past
    it, backfill again, gap fill: every second exactly once, nothing left to fill."""
    backfill(db_url, fake, since=START + 40 * M)  # REST: [40, 70) minutes
    clock.set(START + 100 * M)
    archive = write_csv(tmp_path / "XBTUSD.csv", between(history, START + 50 * M, START + 90 * M))
    result = BulkCSVImporter(db_url, chunk_size=300).import_csv_file(archive)
    assert result.covered > 0 and result.imported > 0
    with psycopg.connect(db_url) as conn:
        status = store.read_sync_status(conn, SYMBOL, "trades")
    assert status is not None and status["last_trade_id"] is None  # the frontier after the file is not known yet

    calls = fake.calls["Trades"]
    backfill(db_url, fake)  # resumes at the file's end: the first Kraken id after it
    archive_ids = [t.trade_id for t in between(history, START + 70 * M, START + 90 * M)]
    assert fake.calls["Trades"] - calls <= 2 + len(between(history, START + 90 * M, START + 100 * M)) // 1000
    fill_gaps(db_url, fake, clock)
    assert detected_gaps(db_url, fake, clock) == []
    truth = between(history, START + 40 * M, START + 100 * M)
    assert_exact(db_url, truth)
    with psycopg.connect(db_url) as conn:
        refetched = conn.execute("SELECT count(*) FROM trades WHERE symbol = %s AND trade_id = ANY(%s)",
                                 (SYMBOL, archive_ids[len(archive_ids) // 10:])).fetchone()[0]
    assert refetched == 0  # the archive's trades were not fetched again by id


def test_an_archive_overlapping_rest_at_its_start_and_ending_after_it(db_url, fake, clock, history, tmp_path):
    clock.set(START + 60 * M)
    backfill(db_url, fake, since=START + 20 * M)  # REST: [20, 60)
    archive = write_csv(tmp_path / "XBTUSD.csv", between(history, START, START + 80 * M))
    clock.set(START + 90 * M)
    BulkCSVImporter(db_url, chunk_size=500, writers=1).import_csv_file(archive)
    BulkCSVImporter(db_url, chunk_size=500).import_csv_file(archive)  # a re-import changes nothing
    backfill(db_url, fake)
    fill_gaps(db_url, fake, clock)
    assert [g for g in detected_gaps(db_url, fake, clock) if g.start >= START + M] == []
    assert_exact(db_url, between(history, START, START + 90 * M))


def test_import_and_backfill_at_the_same_time(db_url, fake, clock, history, tmp_path):
    """Two paths on one symbol at once (two Celery tasks, two terminals): the per-symbol lock
    and the ownership rule keep every second single."""
    clock.set(START + 120 * M)
    archive = write_csv(tmp_path / "XBTUSD.csv", between(history, START, START + 120 * M))
    errors: list[BaseException] = []

    def run(job) -> None:
        try:
            job()
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    jobs = [lambda: BulkCSVImporter(db_url, chunk_size=200).import_csv_file(archive),
            lambda: backfill(db_url, fake, since=START + 30 * M)]
    threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    stored, expected = stored_per_second(db_url), expected_per_second(between(history, START, START + 120 * M))
    assert stored - expected == Counter()  # nothing doubled, whoever won each second
    backfill(db_url, fake)
    fill_gaps(db_url, fake, clock)
    assert_exact(db_url, between(history, START, START + 120 * M))


def test_the_stream_writer_leaves_archive_seconds_alone(db_url, history, tmp_path):
    """A stream catching up through archive-owned time (REST pages handed to the writer)
    stores only the seconds the archive does not own."""
    archive = write_csv(tmp_path / "XBTUSD.csv", between(history, START, START + 30 * M))
    BulkCSVImporter(db_url).import_csv_file(archive)
    with DatabaseWriter(db_url, trade_flush_interval=0.05, data_dir=tmp_path / "spool") as writer:
        for t in between(history, START + 20 * M, START + 40 * M):
            writer.write_trade(TradeRecord.from_trade(t, TradeSource.WEBSOCKET))
        assert writer.flush(timeout=30)
    assert_exact(db_url, between(history, START, START + 40 * M))


# --- every order, and two at once with kills ------------------------------------------------

ARCHIVE_END = START + 80 * M  # the archive overlaps REST data at its start and ends after it
REST_SINCE = START + 20 * M
NOW = START + 90 * M


@pytest.mark.parametrize("order", ["IBG", "IGB", "BIG", "BGI", "GIB", "GBI"])
def test_every_order_of_import_backfill_and_gap_fill(order, db_url, fake, clock, history, tmp_path):
    clock.set(NOW)
    archive = write_csv(tmp_path / "XBTUSD.csv", between(history, START, ARCHIVE_END))
    steps = {"I": lambda: BulkCSVImporter(db_url, chunk_size=400).import_csv_file(archive),
             "B": lambda: backfill(db_url, fake, since=REST_SINCE),
             "G": lambda: fill_gaps(db_url, fake, clock)}
    for step in order:
        steps[step]()
    backfill(db_url, fake)
    fill_gaps(db_url, fake, clock)
    assert detected_gaps(db_url, fake, clock) == []
    assert_exact(db_url, between(history, START, NOW))


def test_import_and_backfill_killed_at_random_moments_while_both_run(db_url, fake, clock, history, tmp_path):
    """Two processes on one symbol, one of them SIGKILLed anywhere; then both run again to the
    end: the database is exact (nothing doubled, nothing lost) and ``gaps`` finds nothing."""
    import os
    import random
    import signal
    import subprocess
    import sys
    import time

    clock.set(NOW)
    archive = write_csv(tmp_path / "XBTUSD.csv", between(history, START, ARCHIVE_END))
    env = {key: value for key, value in os.environ.items() if not key.startswith("KRAKEN_HIST_")}
    env.update(KRAKEN_HIST_DATABASE_URL=db_url, KRAKEN_HIST_REST_URL=fake.url, KRAKEN_HIST_REST_MIN_INTERVAL="0",
               KRAKEN_HIST_DATA_DIR=str(tmp_path / "data"))
    cli = [sys.executable, "-m", "kraken_hist"]
    commands = {"import": cli + ["import", str(archive), "--chunk-size", "300"],
                "backfill": cli + ["backfill", "BTC/USD", "--since", REST_SINCE.isoformat(), "--no-progress"]}
    rng = random.Random(13)
    kills = 0
    for victim in ("import", "backfill"):
        with psycopg.connect(db_url) as conn:  # each round from an empty database
            conn.execute("TRUNCATE trades, candles, coverage, sync_status, candle_changes")
        running = {name: subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                   for name, command in commands.items()}
        deadline = time.monotonic() + 60
        while not stored_per_second(db_url) and time.monotonic() < deadline:
            time.sleep(0.01)  # until one of them stores
        time.sleep(rng.uniform(0, 0.05))  # then anywhere: fetching, parsing, COPY, candles, commit
        if running[victim].poll() is None:
            running[victim].send_signal(signal.SIGKILL)
            kills += 1
        for name, process in running.items():
            _out, err = process.communicate(timeout=120)
            assert process.returncode in (0, -signal.SIGKILL), (name, err.decode()[-2000:])
        assert stored_per_second(db_url) - expected_per_second(between(history, START, NOW)) == Counter()
        for command in commands.values():  # both again, to the end
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr[-2000:]
        fill_gaps(db_url, fake, clock)
        assert detected_gaps(db_url, fake, clock) == []
        assert_exact(db_url, between(history, START, NOW))
    assert kills >= 1  # (a victim may finish first; the other round still ran both at once)


def test_stream_import_backfill_and_gap_fill_all_at_once(db_url, settings, tmp_path):
    """The four paths together on one symbol: a fresh stream (with its REST catch-up) while an
    archive of the past hour is imported and a backfill runs, new trades arriving, then gap fill."""
    from kraken_hist.testing.fake_ws import FakeKrakenWS
    from kraken_hist.core.timeutils import floor_minute, utcnow

    from .helpers import streaming, wait_for

    now = utcnow()
    start = floor_minute(now - 60 * M)
    market = FakeMarket({SYMBOL: generate_trades(SYMBOL, start, now, seed=31, trades_per_minute=30)})
    archive = write_csv(tmp_path / "XBTUSD.csv", market.trades(SYMBOL, start, now - 2 * M))
    errors: list[BaseException] = []

    def run(job) -> None:
        try:
            job()
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    with FakeKrakenREST(market) as rest, FakeKrakenWS(market, heartbeat_interval=0.2) as ws:
        with streaming(db_url, settings, rest.url, ws.url, SYMBOL):
            ws.wait_for_subscribers("trade", [SYMBOL])
            jobs = [lambda: BulkCSVImporter(db_url, chunk_size=250).import_csv_file(archive),
                    lambda: backfill(db_url, rest, since=start + 20 * M)]
            threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
            for thread in threads:
                thread.start()
            for _ in range(5):
                ws.publish_new(SYMBOL, 20)
            for thread in threads:
                thread.join(timeout=120)
            truth = market.trades(SYMBOL, start, None)
            wait_for(lambda: sum(stored_per_second(db_url).values()) >= len(truth), what="the stream")
    assert not errors, errors
    assert stored_per_second(db_url) - expected_per_second(truth) == Counter()
    with FakeKrakenREST(market) as rest:
        with GapFiller(db_url, client=client(rest), clock=utcnow, sleep=lambda s: None) as filler:
            assert filler.fill_all_gaps(min_gap_minutes=0).failed == 0
            assert filler.detect_gaps(min_gap_minutes=0) == []
    assert_exact(db_url, market.trades(SYMBOL, start, None))
