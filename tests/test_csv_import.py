"""BulkCSVImporter against the real PostgreSQL: files generated in tmp_path, plain and zipped."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
import zipfile
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest

from kraken_hist.rules import sql as sql_rules
from kraken_hist.storage import store
from kraken_hist.rules.candles import candles_from_trades, resample
from kraken_hist.ingest.archive.formats import StrictModeError, synthetic_trade_id
from kraken_hist.ingest.archive.importer import BulkCSVImporter, ImportRefusedError, compare_exchange_candles
from kraken_hist.core.pairs import PAIR_MAP
from kraken_hist.core.timeutils import EPOCH, floor_minute, since_cursor, to_unix_ns
from kraken_hist.core.types import HistoricalTrade

from .helpers import read, snapshot

UTC = timezone.utc
SYMBOL = "BTC/USD"
START = 1_700_000_000 - 1_700_000_000 % 43_200  # on a 12-hour boundary, so 60m and 720m buckets are whole


def at(second: int) -> datetime:
    return EPOCH + timedelta(seconds=second)


def generate(minutes: int = 150, *, seed: int = 3, start: int = START) -> list[tuple[int, str, str]]:
    """(second, price, volume) like Kraken's Time and Sales: bursts sharing a second, quiet minutes."""
    rng = random.Random(seed)
    price = 300_000  # in ticks of 0.1
    rows = []
    for minute in range(minutes):
        if rng.random() < 0.3:
            continue
        for second in sorted(rng.sample(range(60), rng.randint(1, 6))):
            for _ in range(rng.choice((1, 1, 1, 2, 5))):
                price += rng.randint(-20, 20)
                rows.append((start + minute * 60 + second, f"{price / 10:.1f}", f"{rng.randrange(1, 10**8) / 10**8:.8f}"))
    return rows


def as_trades(rows) -> list[HistoricalTrade]:
    """What the database must hold for `rows`: synthetic ids by ordinal within each second."""
    out, previous, ordinal = [], None, 0
    for second, price, volume in rows:
        ordinal = ordinal + 1 if second == previous else 0
        previous = second
        out.append(HistoricalTrade(symbol=SYMBOL, trade_id=synthetic_trade_id(second, ordinal), time=at(second),
                                   price=Decimal(price), volume=Decimal(volume)))
    return out


def time_and_sales_text(rows) -> str:
    return "".join(f"{s},{p},{v}\n" for s, p, v in rows)


def ohlcvt_text(candles) -> str:
    return "".join(
        f"{int((c.time - EPOCH).total_seconds())},{c.open},{c.high},{c.low},{c.close},{c.volume},{c.trades}\n"
        for c in candles
    )


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def stored_trades(db_url: str) -> list[tuple]:
    return read(db_url, "SELECT trade_id, time, price, volume, side, ord_type, source FROM trades ORDER BY time, trade_id")


def expected_trade_rows(trades) -> list[tuple]:
    return [(t.trade_id, t.time, t.price, t.volume, None, None, "csv") for t in trades]


def candle_rows(db_url: str) -> list[tuple]:
    return read(db_url, "SELECT time, open, high, low, close, vwap, volume, trades, source FROM candles ORDER BY time")


def expected_candle_rows(trades) -> list[tuple]:
    return [(c.time, c.open, c.high, c.low, c.close, c.vwap, c.volume, c.trades, "trades")
            for c in candles_from_trades(trades)]


@pytest.fixture
def rows():
    return generate()


@pytest.fixture
def ts_file(tmp_path: Path, rows) -> Path:
    return write(tmp_path / "XBTUSD.csv", time_and_sales_text(rows))


# ----- Time and Sales: the database equals the file

@pytest.mark.parametrize("writers", [1, 2])
def test_time_and_sales_file_is_stored_as_it_is_with_candles_coverage_and_resume_point(db_url, ts_file, rows,
                                                                                       writers):
    result = BulkCSVImporter(db_url, chunk_size=97, writers=writers).import_csv_file(ts_file)
    trades = as_trades(rows)
    assert stored_trades(db_url) == expected_trade_rows(trades)
    assert candle_rows(db_url) == expected_candle_rows(trades)
    first, end = at(rows[0][0]), at(rows[-1][0] + 1)
    assert read(db_url, "SELECT source, lower(ranges), upper(ranges) FROM coverage") == [("csv", first, end)]
    assert read(db_url, "SELECT last_time, cursor, last_trade_id FROM sync_status "
                        "WHERE symbol = %s AND data_type = 'trades'", (SYMBOL,)) == [(end, since_cursor(end), None)]
    assert (result.status, result.symbol, result.kind, result.imported, result.duplicates, result.bad) == (
        "imported", SYMBOL, "trades", len(rows), 0, 0)
    assert (result.first_time, result.last_time, result.lines) == (first, at(rows[-1][0]), len(rows))
    assert result.bytes == ts_file.stat().st_size
    assert result.refreshed  # kraken_hist.storage.refresh is there: the hourly relation follows
    hourly = read(db_url, "SELECT time, open, high, low, close, volume, trades FROM candles_1h ORDER BY time")
    assert hourly == [(c.time, c.open, c.high, c.low, c.close, c.volume, c.trades)
                      for c in resample(candles_from_trades(trades), 60)]


@pytest.mark.parametrize("line_end", ["\n", "\r\n"], ids=["array-twin", "line-twin"])
def test_candles_equal_sql_over_the_stored_trades_to_the_last_digit(db_url, tmp_path, line_end):
    """Prices and volumes written with different numbers of decimals: every candle column,
    vwap included, reads exactly as SQL computes it from the stored trades (scale and all;
    PostgreSQL's division, hence the vwap, depends on the operands' scales). Both twins of
    the rule that build the candles as they parse: the numpy one (``vectorized``) for clean
    blocks, the line parser's running candle (``trade_lines``) for lines the array path
    refuses (a ``\\r\\n`` line end, here every line)."""
    rng = random.Random(8)
    second, lines = START, []
    for _ in range(4000):
        second += rng.choice((0, 0, 1, 7, 61))
        price = rng.choice((f"{rng.randint(1000, 9999)}.{rng.randint(0, 9)}",  # disjoint ranges: no
                            f"{rng.randint(10000, 99999)}.{rng.randint(0, 99):02d}",  # equal prices
                            f"{rng.randint(1, 999)}"))  # written two ways
        volume = rng.choice((f"0.{rng.randrange(10**8):08d}", f"{rng.randint(1, 50)}", f"{rng.randint(1, 9)}.5",
                             f"0.{rng.randrange(1, 10**12):012d}"))
        lines.append(f"{second},{price},{volume}{line_end}")
    path = tmp_path / "XBTUSD.csv"
    path.write_bytes("".join(lines).encode())  # (as written: no newline translation)
    BulkCSVImporter(db_url, chunk_size=500).import_csv_file(path)
    columns = "open::text, high::text, low::text, close::text, vwap::text, volume::text, trades"
    with psycopg.connect(db_url) as conn:
        stored = conn.execute(f"SELECT time, {columns} FROM candles ORDER BY time").fetchall()
        lo, hi = conn.execute("SELECT min(time), max(time) + interval '1 minute' FROM trades").fetchone()
        from_trades = conn.execute(
            f"SELECT minute, {columns} FROM ({sql_rules.MINUTE_CANDLES_FROM_TRADES}) b ORDER BY minute",
            {"symbol": SYMBOL, "start": lo, "end": hi, "decimals": PAIR_MAP[SYMBOL].price_decimals},
        ).fetchall()
    assert len(stored) > 500
    assert stored == from_trades


def test_imported_minutes_replace_exchange_candles_and_drop_stale_trade_candles(db_url, ts_file, rows):
    """The fast path (candles from the parser) keeps rebuild_candles' rules."""
    trades = as_trades(rows)
    minutes = candles_from_trades(trades)
    active = minutes[3].time
    quiet = next(m for m in (minutes[0].time + timedelta(minutes=i) for i in range(60))
                 if m not in {c.time for c in minutes})
    with psycopg.connect(db_url) as conn:
        conn.execute(
            "INSERT INTO candles (symbol, time, open, high, low, close, vwap, volume, trades, source) VALUES "
            "(%s, %s, 1, 1, 1, 1, 1, 1, 1, 'rest_ohlc'), (%s, %s, 2, 2, 2, 2, 2, 2, 2, 'trades')",
            (SYMBOL, active, SYMBOL, quiet),
        )
    BulkCSVImporter(db_url).import_csv_file(ts_file)
    assert candle_rows(db_url) == expected_candle_rows(trades)


def test_reimport_changes_nothing(db_url, ts_file, rows):
    importer = BulkCSVImporter(db_url, chunk_size=200)
    importer.import_csv_file(ts_file)
    before = snapshot(db_url)
    again = importer.import_csv_file(ts_file)
    assert snapshot(db_url) == before
    assert (again.imported, again.duplicates, again.candles) == (0, len(rows), 0)


def test_the_rest_of_a_file_cut_mid_second_is_added_by_the_full_file(db_url, tmp_path, rows):
    """A first import of a file that ends part-way through a second, then the longer file:
    the ordinals of that second continue, nothing doubles (quarterly archives overlap)."""
    burst = [(rows[-1][0] + 5, "30000.0", "0.1")] * 4
    full = rows + burst
    BulkCSVImporter(db_url).import_csv_file(write(tmp_path / "XBTUSD.csv", time_and_sales_text(rows + burst[:2])))
    (tmp_path / "later").mkdir()
    result = BulkCSVImporter(db_url).import_csv_file(write(tmp_path / "later" / "XBTUSD.csv", time_and_sales_text(full)))
    assert (result.imported, result.duplicates) == (2, len(rows) + 2)
    assert stored_trades(db_url) == expected_trade_rows(as_trades(full))


def test_a_crash_mid_file_leaves_whole_chunks_and_a_rerun_completes_it(db_url, ts_file, rows):
    clean_url = db_url

    class Crash(Exception):
        pass

    calls = []

    def crash_after_two_chunks(nbytes, nlines):
        calls.append(nlines)
        if len(calls) == 2:
            raise Crash

    with pytest.raises(Crash):
        BulkCSVImporter(db_url, chunk_size=100, progress=crash_after_two_chunks).import_csv_file(ts_file)
    partial = stored_trades(db_url)
    # Chunks in flight on the other writer finish too: whole chunks, a prefix of the file.
    assert len(partial) >= sum(calls) > 0
    assert partial == expected_trade_rows(as_trades(rows))[:len(partial)]
    stored_minutes = {floor_minute(t.time) for t in as_trades(rows)[:len(partial)]}
    assert candle_rows(db_url) == [c for c in expected_candle_rows(as_trades(rows)) if c[0] in stored_minutes]
    assert read(db_url, "SELECT count(*) FROM sync_status WHERE data_type = 'trades'") == [(0,)]  # no resume point yet
    BulkCSVImporter(db_url, chunk_size=100).import_csv_file(ts_file)
    assert stored_trades(clean_url) == expected_trade_rows(as_trades(rows))
    assert candle_rows(db_url) == expected_candle_rows(as_trades(rows))


def test_an_import_killed_at_any_moment_is_completed_by_running_it_again(db_url, other_db_url, tmp_path):
    """SIGKILL while both writers are storing chunks: whatever committed is whole chunks with
    their candles and coverage; the re-run stores the rest and equals one clean import."""
    rows = generate(minutes=6000, seed=11)
    path = write(tmp_path / "XBTUSD.csv", time_and_sales_text(rows))
    BulkCSVImporter(other_db_url, chunk_size=500).import_csv_file(path)
    code = ("import sys; from kraken_hist.ingest.archive.importer import BulkCSVImporter; "
            "BulkCSVImporter(sys.argv[1], chunk_size=500).import_csv_file(sys.argv[2])")
    rng = random.Random(5)
    partial = []
    for _ in range(3):
        process = subprocess.Popen([sys.executable, "-c", code, db_url, str(path)])
        deadline = time.monotonic() + 60
        while not read(db_url, "SELECT EXISTS (SELECT 1 FROM trades)")[0][0] and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.2))  # anywhere: parsing, COPY, candles, coverage or commit
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        stored = stored_trades(db_url)
        partial.append(len(stored))
        assert set(stored) <= set(expected_trade_rows(as_trades(rows)))
    assert 0 < partial[0] < len(rows)
    result = BulkCSVImporter(db_url, chunk_size=500).import_csv_file(path)
    assert result.imported + result.duplicates == len(rows)
    clean = snapshot(other_db_url)
    assert snapshot(db_url) == clean
    assert clean["trades"] == [(SYMBOL,) + row[:4] + (None, None, "csv") for row in
                               [(t.trade_id, t.time, t.price, t.volume) for t in as_trades(rows)]]


# ----- zip archives

def test_members_are_streamed_from_zip_archives(db_url, tmp_path, rows):
    trades = as_trades(rows)
    hourly = resample(candles_from_trades(trades), 60)
    history = tmp_path / "Kraken_Trading_History.zip"
    with zipfile.ZipFile(history, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("TimeAndSales_Combined/XBTUSD.csv", time_and_sales_text(rows))
    ohlcvt = tmp_path / "Kraken_OHLCVT.zip"
    with zipfile.ZipFile(ohlcvt, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("XBTUSD_60.csv", ohlcvt_text(hourly))
        archive.writestr("FOOBAR_60.csv", "1700000000,1,1,1,1,1,1\n")
        archive.writestr("readme.txt", "not a csv")
    single = BulkCSVImporter(db_url).import_csv_file(history)
    assert (single.file, single.imported) == (f"{history}:TimeAndSales_Combined/XBTUSD.csv", len(rows))
    assert stored_trades(db_url) == expected_trade_rows(trades)
    results = BulkCSVImporter(db_url).import_archive(ohlcvt)
    assert [(r.file.rsplit(":", 1)[1], r.status) for r in results] == [("XBTUSD_60.csv", "imported"),
                                                                        ("FOOBAR_60.csv", "refused")]
    assert "cannot tell the pair" in results[1].reason
    assert read(db_url, "SELECT time, open, high, low, close, vwap, volume, trades FROM exchange_candles "
                        "WHERE interval = 60 ORDER BY time") == [
        (c.time, c.open, c.high, c.low, c.close, None, c.volume, c.trades) for c in hourly]
    with pytest.raises(ImportRefusedError, match="holds 2 CSV files"):
        BulkCSVImporter(db_url).import_csv_file(ohlcvt)


# ----- coverage: no overlap with id-bearing data

def test_seconds_covered_by_rest_are_left_to_rest_and_coverage_stays_without_holes(db_url, ts_file, rows):
    lo = at(rows[0][0] + 1800) + timedelta(milliseconds=400)  # REST coverage starts mid-second
    hi = at(rows[0][0] + 3600)
    rest_trades = [
        HistoricalTrade(symbol=SYMBOL, trade_id=1000 + i, time=lo + timedelta(seconds=7 * i), price=Decimal("31000.5"),
                        volume=Decimal("0.5"), side="b", ord_type="l")
        for i in range(int((hi - lo).total_seconds() // 7))
    ]
    with psycopg.connect(db_url) as conn:
        with conn.cursor().copy("COPY trades (symbol, trade_id, time, price, volume, side, ord_type, source) "
                                "FROM STDIN") as copy:
            for t in rest_trades:
                copy.write_row((SYMBOL, t.trade_id, t.time, t.price, t.volume, t.side, t.ord_type, "rest"))
        store.rebuild_candles(conn, SYMBOL, lo, hi, decimals=PAIR_MAP[SYMBOL].price_decimals)  # as the backfill that stored them did
        store.add_coverage(conn, SYMBOL, "rest", lo, hi)
        store.write_sync_status(conn, SYMBOL, "trades", last_time=hi, cursor=str(to_unix_ns(hi)), last_trade_id=1999)

    result = BulkCSVImporter(db_url, chunk_size=150).import_csv_file(ts_file)

    blocked_from = lo.replace(microsecond=0)
    kept = [t for t in as_trades(rows) if not (blocked_from <= t.time < hi)]
    assert result.covered == len(rows) - len(kept) > 0
    assert result.imported == len(kept)
    csv_rows = read(db_url, "SELECT trade_id, time FROM trades WHERE source = 'csv' ORDER BY trade_id")
    assert csv_rows == [(t.trade_id, t.time) for t in kept]
    assert read(db_url, "SELECT count(*) FROM trades WHERE source = 'rest'") == [(len(rest_trades),)]
    end = at(rows[-1][0] + 1)
    # The archive claims whole seconds only: the second REST starts in is REST's (one owner per
    # second), and its part before REST's coverage is known to nobody.
    assert read(db_url, "SELECT lower(r), upper(r) FROM coverage, unnest(ranges) r WHERE source = 'csv' ORDER BY 1") == [
        (at(rows[0][0]), blocked_from), (hi, end)]
    assert read(db_url, "SELECT lower(r), upper(r) FROM (SELECT unnest(range_agg(ranges)) r FROM coverage) m") == [
        (at(rows[0][0]), blocked_from), (lo, end)]
    # Minutes holding both REST and CSV trades are built from all of them.
    assert candle_rows(db_url) == expected_candle_rows(kept + rest_trades)
    # The file ends after the REST resume point: a backfill continues from the file's end.
    assert read(db_url, "SELECT last_time, cursor, last_trade_id FROM sync_status WHERE data_type = 'trades'") == [
        (end, since_cursor(end), None)]


def test_an_older_file_does_not_move_the_resume_point_back(db_url, ts_file, rows):
    later = at(rows[-1][0] + 86_400)
    with psycopg.connect(db_url) as conn:
        store.write_sync_status(conn, SYMBOL, "trades", last_time=later, cursor=str(to_unix_ns(later)), last_trade_id=7)
    BulkCSVImporter(db_url).import_csv_file(ts_file)
    assert read(db_url, "SELECT last_time, last_trade_id FROM sync_status WHERE data_type = 'trades'") == [(later, 7)]


def test_rest_backfill_continues_at_the_end_of_the_file_without_overlap(db_url, tmp_path, settings):
    from kraken_hist.ingest.backfill import KrakenTradesBackfill
    from kraken_hist.kraken.rest_client import KrakenRestClient
    from kraken_hist.testing.fake_rest import FakeKrakenREST
    from kraken_hist.testing.history import generate_trades
    from kraken_hist.testing.market import FakeMarket

    start = datetime(2025, 3, 3, tzinfo=UTC)
    history = generate_trades(SYMBOL, start, start + timedelta(hours=2), seed=5, trades_per_minute=15)
    cut = start + timedelta(minutes=80, seconds=17)  # the file holds every trade before this second ends
    in_file = [t for t in history if t.time < cut + timedelta(seconds=1)]
    file_rows = [(int((t.time - EPOCH).total_seconds()), str(t.price), str(t.volume)) for t in in_file]
    csv_path = write(tmp_path / "XBTUSD.csv", time_and_sales_text(file_rows))
    BulkCSVImporter(db_url).import_csv_file(csv_path)

    with FakeKrakenREST(FakeMarket({SYMBOL: history})) as fake, \
            KrakenRestClient(fake.url, min_interval=0) as client:
        backfill = KrakenTradesBackfill(db_url, client, settings=settings)
        try:
            backfill.backfill_symbol(SYMBOL, until=start + timedelta(hours=2))
        finally:
            backfill.close()

    rest = read(db_url, "SELECT trade_id FROM trades WHERE source = 'rest' ORDER BY trade_id")
    assert [r[0] for r in rest] == [t.trade_id for t in history if t not in in_file]  # exactly the rest, no overlap
    assert read(db_url, "SELECT count(*) FROM trades WHERE source = 'csv'") == [(len(in_file),)]
    first_rest_time = read(db_url, "SELECT min(time) FROM trades WHERE source = 'rest'")[0][0]
    assert first_rest_time >= cut + timedelta(seconds=1)


# ----- bad input

BAD_FILE = (
    "1700000000,30000.5,0.1\n"     # 1
    "1700000001,abc,0.1\n"         # 2 not a number
    "1700000002,-3.0,0.1\n"        # 3 negative price
    "1700000003,0,0.1\n"           # 4 zero price
    "1700000004,30001.0,0.2\n"     # 5
    "1700000001,30001.5,0.3\n"     # 6 backwards
    "1700000065,30002.0,0.4\n"     # 7
    "1700000070,30"                # 8 truncated last line
)


def test_bad_rows_are_skipped_and_reported_with_line_numbers(db_url, tmp_path):
    path = write(tmp_path / "XBTUSD.csv", BAD_FILE)
    result = BulkCSVImporter(db_url, chunk_size=2).import_csv_file(path)
    assert result.imported == 3 and result.bad == 5
    assert result.bad_by_reason == {"price": 3, "backwards": 1, "truncated": 1}
    assert [(b.file, b.line, b.reason) for b in result.bad_examples] == [
        (str(path), 2, "price"), (str(path), 3, "price"), (str(path), 4, "price"),
        (str(path), 6, "backwards"), (str(path), 8, "truncated")]
    assert [r[0] for r in stored_trades(db_url)] == [
        synthetic_trade_id(1700000000, 0), synthetic_trade_id(1700000004, 0), synthetic_trade_id(1700000065, 0)]


def test_strict_mode_fails_before_anything_is_committed(db_url, tmp_path, rows):
    empty = snapshot(db_url)
    # Many good chunks first, the bad line last: the chunks before it must go too.
    path = write(tmp_path / "XBTUSD.csv", time_and_sales_text(rows) + f"{rows[-1][0] + 9},0.0,1\n")
    with pytest.raises(StrictModeError) as info:
        BulkCSVImporter(db_url, chunk_size=50, strict=True).import_csv_file(path)
    assert (info.value.bad.line, info.value.bad.reason) == (len(rows) + 1, "price")
    assert snapshot(db_url) == empty
    results = BulkCSVImporter(db_url, strict=True).import_paths([path])
    assert results[0].status == "failed" and f":{len(rows) + 1}:" in results[0].reason
    assert snapshot(db_url) == empty
    ok = BulkCSVImporter(db_url, strict=True).import_csv_file(write(tmp_path / "b.csv", time_and_sales_text(rows)),
                                                              symbol="XBTUSD")
    assert ok.imported == len(rows) and stored_trades(db_url) == expected_trade_rows(as_trades(rows))


def test_files_whose_symbol_or_layout_is_unknown_are_refused(db_url, tmp_path):
    importer = BulkCSVImporter(db_url)
    with pytest.raises(ImportRefusedError, match="cannot tell the pair from the file name 'FOOBAR.csv'"):
        importer.import_csv_file(write(tmp_path / "FOOBAR.csv", "1700000000,1,1\n"))
    with pytest.raises(ImportRefusedError, match="symbol 'NOPE' is unknown"):
        importer.import_csv_file(write(tmp_path / "XBTUSD.csv", "1700000000,1,1\n"), symbol="NOPE")
    with pytest.raises(ImportRefusedError, match="unknown column name"):
        importer.import_csv_file(write(tmp_path / "ETHUSD.csv", "when,price,volume\n1700000000,1,1\n"))
    results = importer.import_paths([write(tmp_path / "SOLUSD.csv", "1,2,3,4,5\n"), tmp_path / "missing.csv"])
    assert [r.status for r in results] == ["refused", "refused"]
    assert "5 columns without a header" in results[0].reason
    assert read(db_url, "SELECT count(*) FROM trades") == [(0,)]


# ----- the 7-column variant with trade ids

def test_header_file_with_trade_ids_deduplicates_against_rest_by_identity(db_url, tmp_path):
    t = at(1_700_000_000)
    with psycopg.connect(db_url) as conn:
        conn.execute("INSERT INTO trades VALUES (%s, 41, %s, 30000.1, 0.5, 'b', 'l', 'rest')",
                     (SYMBOL, t + timedelta(microseconds=123_400)))
    text = ("price,volume,time,buy/sell,market/limit,misc,trade_id\n"
            "30000.1,0.5,1700000000.1234,b,l,,41\n"
            "30000.2,0.25,1700000000.5,s,m,,42\n"
            "30000.3,0.125,1700000002.25,buy,limit,,43\n")
    result = BulkCSVImporter(db_url).import_csv_file(write(tmp_path / "XBTUSD.csv", text))
    assert (result.imported, result.duplicates, result.covered) == (2, 1, 0)
    assert read(db_url, "SELECT trade_id, time, price, side, ord_type, source FROM trades ORDER BY trade_id") == [
        (41, t + timedelta(microseconds=123_400), Decimal("30000.1"), "b", "l", "rest"),
        (42, t + timedelta(microseconds=500_000), Decimal("30000.2"), "s", "m", "csv"),
        (43, t + timedelta(seconds=2, microseconds=250_000), Decimal("30000.3"), "b", "l", "csv"),
    ]
    end = t + timedelta(seconds=2, microseconds=250_001)
    assert read(db_url, "SELECT last_time, cursor, last_trade_id FROM sync_status WHERE data_type = 'trades'") == [
        (end, since_cursor(end), 43)]


# ----- OHLCVT

def test_candles_built_from_time_and_sales_equal_the_ohlcvt_rows(db_url, tmp_path, ts_file, rows):
    trades = as_trades(rows)
    minutes = candles_from_trades(trades)
    ohlc_1m = write(tmp_path / "XBTUSD_1.csv", ohlcvt_text(minutes))
    BulkCSVImporter(db_url).import_csv_file(ts_file)
    assert read(db_url, "SELECT time, open, high, low, close, volume, trades FROM candles ORDER BY time") == [
        (c.time, c.open, c.high, c.low, c.close, c.volume, c.trades) for c in minutes]
    before = snapshot(db_url)["candles"]
    # The same minutes from the OHLCVT file are all covered by trades: nothing replaces them.
    result = BulkCSVImporter(db_url).import_csv_file(ohlc_1m)
    assert (result.imported, result.covered) == (0, len(minutes))
    assert snapshot(db_url)["candles"] == before


def test_ohlcvt_one_minute_rows_fill_only_minutes_no_trades_cover(db_url, tmp_path, rows):
    minutes = candles_from_trades(as_trades(rows))
    covered_from, covered_to = minutes[10].time, minutes[20].time  # REST trades cover minutes 10..19
    with psycopg.connect(db_url) as conn:
        store.add_coverage(conn, SYMBOL, "rest", covered_from, covered_to)
    result = BulkCSVImporter(db_url, chunk_size=16).import_csv_file(write(tmp_path / "XBTUSD_1.csv", ohlcvt_text(minutes)))
    kept = [c for c in minutes if not covered_from <= c.time < covered_to]
    assert (result.imported, result.covered, result.candles) == (len(kept), 10, len(kept))
    assert candle_rows(db_url) == [
        (c.time, c.open, c.high, c.low, c.close, None, c.volume, c.trades, "csv_ohlc") for c in kept]
    assert read(db_url, "SELECT lower(ranges), upper(ranges) FROM coverage WHERE source = 'ohlc'") == [
        (minutes[0].time, minutes[-1].time + timedelta(minutes=1))]
    again = BulkCSVImporter(db_url).import_csv_file(tmp_path / "XBTUSD_1.csv")
    assert (again.imported, again.duplicates) == (0, len(kept))


def test_exchange_candles_are_checked_against_our_aggregates(db_url, tmp_path, ts_file, rows):
    trades = as_trades(rows)
    hourly, half_days = resample(candles_from_trades(trades), 60), resample(candles_from_trades(trades), 720)
    importer = BulkCSVImporter(db_url)
    importer.import_csv_file(ts_file)
    tampered = list(hourly)
    wrong = tampered[1]
    tampered[1] = type(wrong)(**{**{f: getattr(wrong, f) for f in wrong.__dataclass_fields__}, "close": wrong.low,
                                "trades": wrong.trades + 1})
    importer.import_csv_file(write(tmp_path / "XBTUSD_60.csv", ohlcvt_text(tampered)))
    importer.import_csv_file(write(tmp_path / "XBTUSD_720.csv", ohlcvt_text(half_days)))

    check = compare_exchange_candles(db_url, SYMBOL, 60)
    assert (check.compared, check.matching, check.mismatched, check.missing_ours) == (len(hourly), len(hourly) - 1, 1, 0)
    assert check.examples[0].time == wrong.time and check.examples[0].fields == ("close", "trades")
    assert compare_exchange_candles(db_url, SYMBOL, 60, use_relation=False).mismatched == 1
    assert importer.compare_exchange_candles("XBTUSD", 720).ok  # not stored: computed from 1m candles
    # A bucket the exchange has and we do not.
    with psycopg.connect(db_url) as conn:
        conn.execute("DELETE FROM candles WHERE time >= %s AND time < %s", (hourly[0].time, hourly[0].end))
    assert compare_exchange_candles(db_url, SYMBOL, 60, use_relation=False).missing_ours == 1


def test_exchange_days_and_fortnights_are_compared_in_the_exchanges_buckets(db_url, tmp_path):
    """Our side of the comparison: the stored daily relation, or buckets computed from
    1-minute candles by the bucket rule from the exchange's origin (the epoch): 15-day
    buckets are never stored. Exchange candles built from the same trades match either way."""
    rng, price, rows = random.Random(4), 300_000, []
    first_day = START - START % 86_400
    for i in range(40 * 8):  # a trade about every three hours for 40 days
        price += rng.randint(-50, 50)
        rows.append((first_day + i * 10_800 + rng.randrange(60), f"{price / 10:.1f}",
                     f"{rng.randrange(1, 10**6) / 10**6:.6f}"))
    minutes = candles_from_trades(as_trades(rows))
    days, fortnights = resample(minutes, 1440), resample(minutes, 21600)
    assert len(fortnights) >= 3
    importer = BulkCSVImporter(db_url)
    results = importer.import_paths([write(tmp_path / "XBTUSD.csv", time_and_sales_text(rows)),
                                     write(tmp_path / "XBTUSD_1440.csv", ohlcvt_text(days)),
                                     write(tmp_path / "XBTUSD_21600.csv", ohlcvt_text(fortnights))])
    assert [r.status for r in results] == ["imported"] * 3 and results[0].refreshed
    for interval, expected in ((1440, days), (21600, fortnights)):
        for use_relation in (True, False):
            check = compare_exchange_candles(db_url, SYMBOL, interval, use_relation=use_relation)
            assert (check.compared, check.matching) == (len(expected), len(expected)), check.to_dict()




def test_a_chunk_rolled_back_as_a_deadlock_victim_is_stored_again(db_url, tmp_path, monkeypatch):
    """TimescaleDB's compression job may deadlock with an import writing into the chunk it
    converts; the server then rolls the import's chunk back. The chunk is stored again: the
    import completes with every row once."""
    import psycopg.errors

    from kraken_hist.ingest.archive import chunk_store

    rows = generate(300, seed=11)
    trades = as_trades(rows)
    path = write(tmp_path / "XBTUSD.csv", time_and_sales_text(rows))
    real = chunk_store.store_trade_chunk
    victims = []

    def once_a_victim(conn, *args, **kwargs):
        counts = real(conn, *args, **kwargs)  # the work is done, then the server ends it
        if len(victims) < 2:
            victims.append(1)
            raise psycopg.errors.DeadlockDetected("deadlock detected")
        return counts

    monkeypatch.setattr(chunk_store, "store_trade_chunk", once_a_victim)
    result = BulkCSVImporter(db_url, chunk_size=1000).import_csv_file(path)
    assert len(victims) == 2 and result.ok and result.imported == len(trades)
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*), count(DISTINCT trade_id) FROM trades").fetchone() == (len(trades), len(trades))
