"""DatabaseWriter when PostgreSQL goes away: a private embedded server this module stops and starts."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest

from kraken_hist import migrate
from kraken_hist.config import Settings
from kraken_hist.embedded import start_embedded, stop_embedded
from kraken_hist.spool import Spool, encode_block
from kraken_hist.types import CandleRecord, CandleSource, TradeRecord, TradeSource
from kraken_hist.writer import DatabaseWriter

pytestmark = pytest.mark.slow

T0 = datetime(2024, 5, 1, 9, 0, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def embedded():
    """A private PostgreSQL (unix socket in its data dir): (data_dir, url).

    Not under pytest's tmp dir: that is private to root, and as root the server runs as
    another user whose pg_ctl must reach the data directory."""
    data_dir = Path(tempfile.mkdtemp(prefix="kh-writer-pg-"))
    data_dir.chmod(0o755)
    url = start_embedded(data_dir, database="kh_writer")
    try:
        migrate.upgrade(url)
        yield data_dir, url
    finally:
        stop_embedded(data_dir)
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
def fresh(embedded):
    data_dir, url = embedded
    start_embedded(data_dir, database="kh_writer")  # in case a failed test left it stopped
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("TRUNCATE trades, candles, candle_changes, sync_status")
    return data_dir, url


def trade(trade_id: int) -> TradeRecord:
    return TradeRecord(symbol="BTC/USD", trade_id=trade_id, time=T0 + timedelta(milliseconds=trade_id * 150),
                       price=Decimal("60000.0") + trade_id % 7, volume=Decimal("0.5"), side="s", ord_type="m",
                       source=TradeSource.WEBSOCKET)


def candle(minute: int, close: int) -> CandleRecord:
    return CandleRecord(symbol="SOL/USD", time=T0 + timedelta(minutes=minute), open=Decimal(100), high=Decimal(100000),
                        low=Decimal(50), close=Decimal(close), volume=Decimal(1), vwap=None, trades=1,
                        source=CandleSource.WS_OHLC)


def counts(url: str) -> tuple[int, int]:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT count(*), count(DISTINCT trade_id) FROM trades").fetchone()


def test_database_going_away_mid_stream_loses_and_doubles_nothing(fresh, tmp_path):
    data_dir, url = fresh
    total = 3_000
    writer = DatabaseWriter(url, trade_buffer_size=50, trade_flush_interval=0.1, candle_flush_interval=0.1,
                            settings=Settings(database_url=url, data_dir=tmp_path), connect_timeout=1.0,
                            max_retry_delay=0.5)
    writer.start()
    sent = threading.Event()

    def produce() -> None:
        for i in range(1, total + 1):
            writer.write_trade(trade(i))
            if i % 10 == 0:
                writer.write_trade(trade(i - 5))  # re-sent (a reconnect snapshot)
            if i % 100 == 0:
                writer.write_candle(candle(i // 1000, i))  # the running candle, re-sent
            time.sleep(0.0007)
        sent.set()

    producer = threading.Thread(target=produce)
    producer.start()
    time.sleep(0.6)
    stop_embedded(data_dir)
    time.sleep(1.0)
    assert writer.get_stats()["trades_accepted"] > 0
    start_embedded(data_dir, database="kh_writer")
    producer.join()
    assert writer.flush(timeout=60)
    stats = writer.get_stats()
    assert writer.stop()

    assert counts(url) == (total, total)
    with psycopg.connect(url) as conn:
        closes = conn.execute("SELECT time, close FROM candles WHERE symbol = 'SOL/USD' ORDER BY time").fetchall()
    assert closes == [(T0 + timedelta(minutes=m), Decimal(c)) for m, c in ((0, 900), (1, 1900), (2, 2900), (3, 3000))]
    assert stats["retries"] > 0 and stats["spooled"] > 0 and stats["replayed"] == stats["spooled"]
    assert stats["trades_written"] == total
    assert stats["trades_written"] + stats["trades_duplicate"] == stats["trades_accepted"]
    assert not list((tmp_path / "spool").glob("slot-*/*.spool"))  # drained and removed


CHILD = textwrap.dedent(
    """
    import sys, time
    from datetime import datetime, timedelta, timezone
    from decimal import Decimal
    from kraken_hist.config import Settings
    from kraken_hist.types import TradeRecord, TradeSource
    from kraken_hist.writer import DatabaseWriter

    url, data_dir, total = sys.argv[1], sys.argv[2], int(sys.argv[3])
    t0 = datetime(2024, 5, 1, 9, 0, tzinfo=timezone.utc)
    w = DatabaseWriter(url, trade_buffer_size=100, trade_flush_interval=0.1,
                       settings=Settings(database_url=url, data_dir=data_dir), connect_timeout=0.5)
    w.start()
    for i in range(1, total + 1):
        w.write_trade(TradeRecord(symbol="BTC/USD", trade_id=i, time=t0 + timedelta(milliseconds=i * 150),
                                  price=Decimal("60000.0") + i % 7, volume=Decimal("0.5"), side="s",
                                  ord_type="m", source=TradeSource.WEBSOCKET))
    w.update_sync_status("BTC/USD", "ws_trades", t0 + timedelta(hours=1), last_trade_id=total)
    while w.get_stats()["spool_pending"] < total + 1:
        time.sleep(0.05)
    print("SPOOLED", flush=True)
    time.sleep(600)
    """
)


def test_a_killed_writer_s_spool_is_replayed_by_the_next_writer(fresh, tmp_path):
    data_dir, url = fresh
    total = 25_000  # more than the in-memory cap
    stop_embedded(data_dir)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KRAKEN_HIST_")}
    child = subprocess.Popen([sys.executable, "-c", CHILD, url, str(tmp_path), str(total)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        assert child.stdout.readline().strip() == "SPOOLED"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
    # A torn last block, as a kill in the middle of a write leaves it, is dropped on recovery.
    segments = sorted((tmp_path / "spool" / "slot-0").glob("*.spool"))
    assert segments
    torn = encode_block("T", 1, {"BTC/USD": [999999, 999999, [28578780]]},
                        b"BTC/USD\t999999\t2024-05-01 09:00:00.000000+00\t1\t1\t\\N\t\\N\tws\n")
    with segments[-1].open("ab") as handle:
        handle.write(torn[:-7])

    start_embedded(data_dir, database="kh_writer")
    with DatabaseWriter(url, settings=Settings(database_url=url, data_dir=tmp_path)) as writer:
        assert writer.get_stats()["recovered"] == total + 1
        assert writer.flush(timeout=60)
        stats = writer.get_stats()
    assert counts(url) == (total, total)
    assert stats["replayed"] == total + 1 and stats["trades_written"] == total and stats["syncs_written"] == 1
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT last_trade_id FROM sync_status WHERE data_type = 'ws_trades'").fetchone() == (total,)


def test_spool_slots_belong_to_one_process_at_a_time(tmp_path):
    first = Spool.open_free_slot(tmp_path)
    second = Spool.open_free_slot(tmp_path)
    try:
        assert (first.directory.name, second.directory.name) == ("slot-0", "slot-1")
    finally:
        first.close()
        second.close()
    again = Spool.open_free_slot(tmp_path)
    assert again.directory.name == "slot-0"
    again.close()


def test_stop_while_the_database_is_down_spools_and_returns(fresh, tmp_path):
    data_dir, url = fresh
    stop_embedded(data_dir)
    try:
        writer = DatabaseWriter(url, settings=Settings(database_url=url, data_dir=tmp_path), connect_timeout=0.3)
        writer.start()
        for i in range(1, 301):
            writer.write_trade(trade(i))
        assert writer.flush(timeout=0.5) is False
        assert writer.stop(timeout=1.0) is False
        assert Path(tmp_path / "spool" / "slot-0").is_dir()
    finally:
        start_embedded(data_dir, database="kh_writer")
    with DatabaseWriter(url, settings=Settings(database_url=url, data_dir=tmp_path)) as again:
        assert again.flush(timeout=30)
    assert counts(url) == (300, 300)
