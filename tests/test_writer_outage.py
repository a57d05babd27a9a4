"""DatabaseWriter when PostgreSQL goes away: a private embedded server this module stops and starts.

Also: a spool belongs to one database (replayed there only, refused elsewhere, held while the
database cannot be asked), and stopping with the database down is quick (writer and
``kraken-hist stream``)."""

from __future__ import annotations

import json
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

from kraken_hist.storage import migrate
from kraken_hist.core.config import Settings
from kraken_hist.storage.embedded import start_embedded, stop_embedded
from kraken_hist.storage.writer.spool import Spool
from kraken_hist.storage.writer.spool_claim import claim
from kraken_hist.storage.writer.spool_format import encode_block
from kraken_hist.storage.writer.spool_labels import LABEL_FILE, DatabaseIdentity, SpoolOwnerError, describe_url
from kraken_hist.core.types import CandleRecord, CandleSource, TradeRecord, TradeSource
from kraken_hist.storage.writer import DatabaseWriter

from .helpers import LIVE_SYMBOLS as SYMBOLS, StreamProcess

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


@pytest.fixture(scope="module")
def embedded_b(embedded):
    """A second database on the private server (same system identifier, another oid)."""
    data_dir, _ = embedded
    url = start_embedded(data_dir, database="kh_writer_b")
    migrate.upgrade(url)
    return url


@pytest.fixture
def fresh(embedded):
    data_dir, url = embedded
    start_embedded(data_dir, database="kh_writer")  # in case a failed test left it stopped
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("TRUNCATE trades, candles, candle_changes, sync_status")
    return data_dir, url


@pytest.fixture
def fresh_b(fresh, embedded_b):
    with psycopg.connect(embedded_b, autocommit=True) as conn:
        conn.execute("TRUNCATE trades, candles, candle_changes, sync_status")
    return embedded_b


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
    from kraken_hist.core.config import Settings
    from kraken_hist.core.types import TradeRecord, TradeSource
    from kraken_hist.storage.writer import DatabaseWriter

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


# ---------------------------------------------------------------- a spool belongs to one database

def writer_for(url: str, data_dir: Path, **kwargs) -> DatabaseWriter:
    kwargs = {"trade_buffer_size": 5_000, "trade_flush_interval": 60.0, **kwargs}
    return DatabaseWriter(url, settings=Settings(database_url=url, data_dir=data_dir), **kwargs)


def stored(url: str) -> tuple[list[int], int | None, list[tuple]]:
    """Trade ids, the ws_trades sync status' last_trade_id, the SOL/USD candles (time, close)."""
    with psycopg.connect(url) as conn:
        ids = [r[0] for r in conn.execute("SELECT trade_id FROM trades ORDER BY trade_id")]
        status = conn.execute("SELECT last_trade_id FROM sync_status WHERE data_type = 'ws_trades'").fetchone()
        closes = conn.execute("SELECT time, close FROM candles WHERE symbol = 'SOL/USD' ORDER BY time").fetchall()
    return ids, status[0] if status else None, closes


def write_some(writer: DatabaseWriter, ids: range) -> None:
    for i in ids:
        writer.write_trade(trade(i))
        if i % 100 == 0:
            writer.write_candle(candle(i // 1000, i))
    writer.update_sync_status("BTC/USD", "ws_trades", T0 + timedelta(hours=1), last_trade_id=ids[-1])


def spool_files(data_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(data_dir)): p.read_bytes() for p in (data_dir / "spool").glob("slot-*/*")
            if p.name != ".lock"}


def spool_left_by_a_writer_of(data_dir: Path, url: str, server: Path, ids: range) -> dict[str, bytes]:
    """A writer of `url` accepts `ids`, its server stops, and it stops: its spool (the server stays down)."""
    writer = writer_for(url, data_dir)
    writer.start()
    write_some(writer, ids)
    stop_embedded(server)
    assert writer.stop() is False
    assert writer.get_stats()["spool_pending"] == len(ids) + len(ids) // 100 + 1
    files = spool_files(data_dir)
    assert any(name.endswith(".spool") for name in files)
    return files


def test_a_spool_is_replayed_only_into_the_database_it_belongs_to(fresh, db_url, tmp_path):
    server, url_a = fresh
    spooled = spool_left_by_a_writer_of(tmp_path, url_a, server, range(1, 301))
    start_embedded(server, database="kh_writer")
    label = json.loads(spooled["spool/slot-0/" + LABEL_FILE])["database"]
    assert label["system_identifier"] and label["database_oid"] and label["description"] == describe_url(url_a)

    # KRAKEN_HIST_DATABASE_URL now names another database (here another server): refused, nothing touched
    with pytest.raises(SpoolOwnerError) as refused:
        writer_for(db_url, tmp_path).start()
    message = str(refused.value)
    assert "\n" not in message
    for part in (describe_url(url_a), describe_url(db_url), str(tmp_path / "spool" / "slot-0"), "KRAKEN_HIST_DATABASE_URL"):
        assert part in message
    assert stored(db_url) == ([], None, [])
    assert spool_files(tmp_path) == spooled

    with writer_for(url_a, tmp_path) as again:  # its own database: replayed exactly
        assert again.get_stats()["recovered"] == 300 + 3 + 1
        assert again.flush(timeout=30)
        stats = again.get_stats()
    assert stored(url_a) == (list(range(1, 301)), 300, [(T0, Decimal(300))])
    assert stats["replayed"] == 304 and stats["trades_written"] == 300 and stats["trades_duplicate"] == 0
    assert not list((tmp_path / "spool").glob("slot-*/*.spool"))


def test_stop_with_the_database_gone_spools_at_once_and_the_next_writer_stores_exactly_that(fresh, tmp_path):
    server, url = fresh
    writer = writer_for(url, tmp_path)  # default timeouts (connect_timeout 5 s)
    writer.start()
    write_some(writer, range(1, 1_001))
    assert writer.flush(timeout=30)
    write_some(writer, range(1_001, 2_001))  # buffered
    stop_embedded(server)
    assert writer.flush(timeout=0.5) is False  # the writer has met the outage: pool dropped, backing off
    write_some(writer, range(2_001, 3_001))
    started = time.monotonic()
    try:
        assert writer.stop() is False
        elapsed = time.monotonic() - started
        stats = writer.get_stats()
    finally:
        start_embedded(server, database="kh_writer")
    assert elapsed < 5.0, f"stop() took {elapsed:.1f}s with the database down"
    assert stats["spool_pending"] == stats["spooled"] == 2_000 + 20 + 2
    assert stored(url) == (list(range(1, 1_001)), 1_000, [(T0, Decimal(900)), (T0 + timedelta(minutes=1), Decimal(1000))])

    with writer_for(url, tmp_path) as again:
        assert again.flush(timeout=30)
        replay = again.get_stats()
    assert stored(url) == (list(range(1, 3_001)), 3_000,
                           [(T0, Decimal(900)), (T0 + timedelta(minutes=1), Decimal(1900)),
                            (T0 + timedelta(minutes=2), Decimal(2900)), (T0 + timedelta(minutes=3), Decimal(3000))])
    assert replay["replayed"] == 2_022 and replay["trades_written"] == 2_000 and replay["trades_duplicate"] == 0


def test_a_spool_found_while_the_database_is_down_waits_for_its_identity(fresh, tmp_path):
    server, url = fresh
    spool_left_by_a_writer_of(tmp_path, url, server, range(1, 301))  # the server stays down
    writer = writer_for(url, tmp_path, connect_timeout=0.5, max_retry_delay=0.3)
    writer.start()  # cannot tell yet whose the spool is: held, numbered before anything new
    try:
        assert writer.get_stats()["spool_held"] == 304
        write_some(writer, range(301, 401))
        assert writer.flush(timeout=0.5) is False
    finally:
        start_embedded(server, database="kh_writer")
    assert writer.flush(timeout=30)
    stats = writer.get_stats()
    assert writer.stop()
    # in order: the held spool's sync status (300) before this writer's (400)
    assert stored(url) == (list(range(1, 401)), 400, [(T0, Decimal(400))])
    assert stats["spool_held"] == 0 and stats["spool_foreign"] == 0 and stats["trades_written"] == 400
    assert not list((tmp_path / "spool").glob("slot-*/*.spool"))


def test_a_held_spool_of_another_database_is_left_alone(fresh, fresh_b, tmp_path, caplog):
    server, url_a = fresh
    spooled = spool_left_by_a_writer_of(tmp_path, url_a, server, range(1, 301))
    writer = writer_for(fresh_b, tmp_path, connect_timeout=0.5, max_retry_delay=0.3)
    writer.start()  # B is down too (same server): A's spool is held
    try:
        write_some(writer, range(1_001, 1_101))
    finally:
        start_embedded(server, database="kh_writer")
    assert writer.flush(timeout=30)  # only its own records: A's spool is not its to wait for
    stats = writer.get_stats()
    assert writer.stop()
    assert stored(fresh_b) == (list(range(1_001, 1_101)), 1_100, [(T0 + timedelta(minutes=1), Decimal(1100))])
    assert stored(url_a) == ([], None, [])
    assert stats["spool_foreign"] == 304 and stats["spool_pending"] == 0
    assert {k: v for k, v in spool_files(tmp_path).items() if k.startswith("spool/slot-0/")} == spooled
    errors = [r.getMessage() for r in caplog.records if getattr(r, "event", None) == "writer_spool_foreign"]
    assert len(errors) == 1 and describe_url(url_a) in errors[0] and describe_url(fresh_b) in errors[0]

    with pytest.raises(SpoolOwnerError):  # and B's next start says so
        writer_for(fresh_b, tmp_path).start()
    with writer_for(url_a, tmp_path) as again:
        assert again.flush(timeout=30)
    assert stored(url_a) == (list(range(1, 301)), 300, [(T0, Decimal(300))])


def put_block(directory: Path, ids: range, label: DatabaseIdentity | None) -> None:
    spool = Spool(directory)
    assert spool._try_lock()
    if label is not None:
        spool.write_label(label)
    lines = "".join(f"BTC/USD\t{i}\t2024-05-01 09:00:{i % 60:02d}.000000+00\t60000\t0.5\ts\tm\tws\n" for i in ids)
    spool.append("T", len(ids), {"BTC/USD": [ids[0], ids[-1], [28575900]]}, lines.encode(), 1)  # T0's minute
    spool.close()


def test_an_unlabelled_or_pending_spool_is_refused_unless_vouched_for(db_url, tmp_path):
    slot = tmp_path / "spool" / "slot-0"
    put_block(slot, range(1, 11), None)  # as the version before labels left it
    with pytest.raises(SpoolOwnerError, match="adopt_unlabelled_spool") as refused:
        writer_for(db_url, tmp_path).start()
    assert str(slot) in str(refused.value) and describe_url(db_url) in str(refused.value)
    with writer_for(db_url, tmp_path, adopt_unlabelled_spool=True) as writer:
        assert writer.flush(timeout=30)
    assert stored(db_url)[0] == list(range(1, 11))

    # written by a writer that never reached its server: only its description tells
    put_block(slot, range(11, 21), DatabaseIdentity("elsewhere:5432/kraken"))
    with pytest.raises(SpoolOwnerError, match="elsewhere:5432/kraken"):
        writer_for(db_url, tmp_path).start()
    put_block(slot, range(21, 31), DatabaseIdentity(describe_url(db_url)))  # pending label, same description
    with writer_for(db_url, tmp_path) as writer:
        assert writer.flush(timeout=30)
    assert stored(db_url)[0] == list(range(1, 31))


def test_slots_of_one_database_are_merged_oldest_first(tmp_path):
    me = DatabaseIdentity("h:5432/d", "42", 7, "d")
    put_block(tmp_path / "slot-3", range(1, 4), me)
    put_block(tmp_path / "slot-1", range(4, 6), me)
    (tmp_path / "slot-1" / LABEL_FILE).write_text(json.dumps({"database": me.to_json(), "created": 2.0}))
    (tmp_path / "slot-3" / LABEL_FILE).write_text(json.dumps({"database": me.to_json(), "created": 1.0}))
    put_block(tmp_path / "slot-0", range(6, 7), DatabaseIdentity("h:5432/d"))  # pending, same description
    found = claim(tmp_path, me)
    try:
        assert found.spool.directory.name == "slot-3" and found.held == [] and found.recovered == 6
        assert [b.first_seq for b in found.spool.blocks()] == [1, 4, 6]
        assert [b.meta["BTC/USD"][0] for b in found.spool.blocks()] == [1, 4, 6]  # oldest label first
        assert not list((tmp_path / "slot-1").glob("*.spool")) and not list((tmp_path / "slot-0").glob("*.spool"))
    finally:
        found.spool.close()
    with pytest.raises(SpoolOwnerError, match="h:5432/d"):  # another server's writer
        claim(tmp_path, DatabaseIdentity("h:5432/d", "43", 7, "d"))
    assert describe_url("postgresql://u:secret@db.example:6543/kraken?sslmode=require") == "db.example:6543/kraken"


# ---------------------------------------------------------------- kraken-hist stream: SIGTERM with the database down

def test_stream_exits_quickly_on_sigterm_with_the_database_down_and_loses_nothing(fresh, tmp_path, exchange):
    server, url = fresh
    market, ws, rest = exchange
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("KRAKEN_HIST_")},
        "KRAKEN_HIST_DATABASE_URL": url,
        "KRAKEN_HIST_WS_URL": ws.url,
        "KRAKEN_HIST_REST_URL": rest.url,
        "KRAKEN_HIST_DATA_DIR": str(tmp_path),
        "KRAKEN_HIST_REST_MIN_INTERVAL": "0",
    }
    process = StreamProcess(env, *SYMBOLS, "--flush-interval", "60", "--status-interval", "0.1")
    try:
        ws.wait_for_subscribers("trade", SYMBOLS, timeout=30)
        for symbol in SYMBOLS:
            ws.publish_new(symbol, 25)
        process.wait_received(2 * (50 + 25))
        time.sleep(0.5)  # let the REST catch-up of the first minute settle
        received = process.received()
        stop_embedded(server)
        for symbol in SYMBOLS:  # accepted while the database is away
            ws.publish_new(symbol, 5)
        process.wait_received(received + 2 * 5)
        started = time.monotonic()
        code = process.terminate(timeout=60)
        elapsed = time.monotonic() - started
    finally:
        if process.proc.poll() is None:
            process.proc.kill()
            process.proc.wait(5)
        start_embedded(server, database="kh_writer")
    assert elapsed < 10.0, f"stream took {elapsed:.1f}s to exit:\n" + "\n".join(process.lines)
    assert code == 1 and "spooled" in process.lines[-1], "\n".join(process.lines)

    with writer_for(url, tmp_path) as writer:  # the next writer of this database stores what it had
        assert writer.get_stats()["recovered"] > 0
        assert writer.flush(timeout=30)
    with psycopg.connect(url) as conn:
        for symbol in SYMBOLS:
            ids = [r[0] for r in conn.execute("SELECT trade_id FROM trades WHERE symbol = %s ORDER BY trade_id",
                                              (symbol,))]
            newest = market.next_trade_id(symbol)
            assert len(ids) == len(set(ids)) and set(range(newest - 80, newest)) <= set(ids)
