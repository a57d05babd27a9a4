"""What only the TimescaleDB schema has: hypertables, hierarchical continuous aggregates with
real-time aggregation, their policies, compression, chunk-pruned duplicate probes.

Every test here needs a TimescaleDB server (KRAKEN_HIST_TEST_ADMIN_URL) and skips on plain
PostgreSQL. The test template has the policies unscheduled (conftest): a test runs a policy
when it wants it, with ``CALL run_job``.
"""

from __future__ import annotations

import random
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import psycopg
import pytest

from kraken_hist.storage import migrate

from kraken_hist.storage import store

from kraken_hist.storage import timescale
from kraken_hist.rules.candles import candles_from_trades, resample
from kraken_hist.ingest.archive.importer import BulkCSVImporter
from kraken_hist.core.intervals import INTERVAL_RELATIONS, REFRESH_PARENT, Interval
from kraken_hist.query.provider import HistoricalDataProvider
from kraken_hist.storage.refresh import refresh_aggregates, refresh_order
from kraken_hist.core.types import CandleRecord, HistoricalTrade, TradeRecord, TradeSource
from kraken_hist.storage.writer import DatabaseWriter

pytestmark = pytest.mark.usefixtures("needs_timescaledb")

UTC = timezone.utc
T0 = datetime(2024, 3, 4, tzinfo=UTC)  # a Monday, long past: every chunk is old enough to compress
HIGHER = [m for m in INTERVAL_RELATIONS if m != 1]


def rows(conn: psycopg.Connection, query: str, params: object = ()) -> list[tuple]:
    return conn.execute(query, params).fetchall()  # type: ignore[arg-type]


def materialized(conn: psycopg.Connection, minutes: int) -> list[tuple]:
    """The rows a continuous aggregate has materialized (not what real-time aggregation adds)."""
    (table,), = rows(conn, "SELECT format('%%I.%%I', materialization_hypertable_schema, materialization_hypertable_name) "
                           "FROM timescaledb_information.continuous_aggregates WHERE view_name = %s",
                     (INTERVAL_RELATIONS[minutes],))
    return rows(conn, f"SELECT symbol, time, trades FROM {table} ORDER BY symbol, time")


def minute_candles(symbol: str, start: datetime, minutes: int, seed: int) -> list[CandleRecord]:
    rng = random.Random(seed)
    out, price = [], Decimal(1000)
    for m in range(minutes):
        if rng.random() < 0.3:
            continue
        close = price + Decimal(rng.randrange(-30, 31)) / 10
        vwap = None if rng.random() < 0.1 else (price + close) / 2
        out.append(CandleRecord(symbol=symbol, time=start + timedelta(minutes=m), open=price, high=max(price, close) + 1,
                                low=min(price, close) - 1, close=close, volume=Decimal(rng.randrange(1, 10**6)) / 10**4,
                                vwap=vwap, trades=rng.randrange(1, 30)))
        price = close
    return out


def insert_candles(conn: psycopg.Connection, records: list[CandleRecord]) -> None:
    with conn.cursor().copy("COPY candles (symbol, time, open, high, low, close, vwap, volume, trades, source) "
                            "FROM STDIN") as copy:
        for c in records:
            copy.write_row((c.symbol, c.time, c.open, c.high, c.low, c.close, c.vwap, c.volume, c.trades, "trades"))
    for symbol in {c.symbol for c in records}:
        times = [c.time for c in records if c.symbol == symbol]
        store.record_candle_change(conn, symbol, min(times), max(times) + timedelta(minutes=1))
    conn.commit()


def trade(trade_id: int, when: datetime, *, symbol: str = "BTC/USD", price: str = "60000.5") -> TradeRecord:
    return TradeRecord(symbol=symbol, trade_id=trade_id, time=when, price=Decimal(price), volume=Decimal("0.01"),
                       side="b", ord_type="l", source=TradeSource.WEBSOCKET)


def write_trades(settings, trades: list[TradeRecord]) -> dict:
    with DatabaseWriter(settings.database_url, trade_buffer_size=10_000, settings=settings) as writer:
        for t in trades:
            writer.write_trade(t)
        assert writer.flush(timeout=30)
        return writer.get_stats()


# ----- the schema

def test_hypertables_and_only_the_indexes_that_are_read(conn):
    dims = dict(rows(conn, "SELECT hypertable_name, time_interval FROM timescaledb_information.dimensions "
                           "WHERE hypertable_name IN ('trades', 'candles')"))
    assert dims == {"trades": timedelta(days=7), "candles": timedelta(days=30)}
    indexes = {r[0] for r in rows(conn, "SELECT indexname FROM pg_indexes WHERE tablename IN ('trades', 'candles')")}
    assert indexes == {"trades_pkey", "trades_symbol_time_idx", "candles_pkey"}  # no trades_time_idx, candles_time_idx


def test_aggregates_are_hierarchical_with_real_time_aggregation(conn):
    for minutes in HIGHER:
        relation, parent = INTERVAL_RELATIONS[minutes], INTERVAL_RELATIONS[REFRESH_PARENT[minutes]]
        (materialized_only, definition), = rows(
            conn, "SELECT materialized_only, view_definition FROM timescaledb_information.continuous_aggregates "
                  "WHERE view_name = %s", (relation,))
        assert not materialized_only, relation
        assert f"FROM {parent}" in definition.replace("\n", " ").replace("  ", " "), (relation, definition)


def test_compression_is_set_up_by_symbol_and_time(conn):
    settings = rows(conn, "SELECT hypertable_name, attname, segmentby_column_index, orderby_column_index "
                          "FROM timescaledb_information.compression_settings "
                          "WHERE hypertable_name IN ('trades', 'candles') ORDER BY 1, 2")
    assert ("trades", "symbol", 1, None) in settings and ("trades", "time", None, 1) in settings
    assert ("candles", "symbol", 1, None) in settings and ("candles", "time", None, 1) in settings
    policies = dict(rows(conn, "SELECT hypertable_name, config->>'compress_after' FROM timescaledb_information.jobs "
                               "WHERE proc_name = 'policy_compression'"))
    assert policies == {"trades": "7 days", "candles": "7 days"}


def test_refresh_policies_never_reach_the_bucket_in_progress_and_span_two_buckets(conn):
    jobs = rows(conn, "SELECT c.view_name, (j.config->>'start_offset')::interval, (j.config->>'end_offset')::interval, "
                      "(j.config->>'buckets_per_batch')::int "
                      "FROM timescaledb_information.jobs j JOIN timescaledb_information.continuous_aggregates c "
                      "ON c.view_name = j.hypertable_name "
                      "WHERE j.proc_name = 'policy_refresh_continuous_aggregate'")
    widths = {name: Interval(m).delta for m, name in INTERVAL_RELATIONS.items()}
    assert {view for view, *_ in jobs} == {INTERVAL_RELATIONS[m] for m in HIGHER}
    for view, start, end, batch in jobs:
        assert end is not None and end > timedelta(0), view  # never up to now: no bucket in progress
        assert start >= end + 2 * widths[view], view  # at least two whole buckets (a week was never refreshed)
        assert batch == 0, view  # one pass, not a statement per 10 buckets


# ----- refresh, real-time aggregation, policies

def test_the_bucket_in_progress_is_never_materialized_and_real_time_keeps_it_current(db_url, conn):
    now = rows(conn, "SELECT date_trunc('minute', now())")[0][0]
    week = Interval(10080).bucket_start(now)
    records = [c for c in minute_candles("BTC/USD", week - timedelta(days=7), 7 * 1440 + 60, seed=1)
               if c.time < now - timedelta(minutes=2)]
    insert_candles(conn, records)
    refresh_aggregates(db_url)
    for minutes in HIGHER:
        in_progress = Interval(minutes).bucket_start(now)
        assert all(t < in_progress for _s, t, _n in materialized(conn, minutes)), minutes
    # the minute in progress (in every level's bucket in progress): each level shows it without a refresh
    late = CandleRecord(symbol="BTC/USD", time=now, open=Decimal(1), high=Decimal(1),
                        low=Decimal(1), close=Decimal(1), volume=Decimal(1), vwap=Decimal(1), trades=1000)
    insert_candles(conn, [late])
    everything = [*records, late]
    for minutes in HIGHER:
        start = Interval(minutes).bucket_start(now)
        (trades,), = rows(conn, f"SELECT trades FROM {INTERVAL_RELATIONS[minutes]} WHERE symbol = 'BTC/USD' AND time = %s",
                          (start,))
        assert trades == sum(c.trades for c in everything if Interval(minutes).bucket_start(c.time) == start), minutes


def test_a_refresh_materializes_every_complete_bucket_and_later_changes_below_the_watermark(db_url, conn):
    records = minute_candles("ETH/USD", T0, 3 * 1440, seed=2)
    insert_candles(conn, records)
    assert refresh_aggregates(db_url).changes_consumed == 1
    for minutes in HIGHER:
        assert [(t, n) for _s, t, n in materialized(conn, minutes)] == \
            [(c.time, c.trades) for c in resample(records, minutes)], minutes
    # change an old minute: TimescaleDB logged it, the next refresh puts it right at every level
    target = records[len(records) // 2]
    conn.execute("UPDATE candles SET trades = trades + 500 WHERE symbol = 'ETH/USD' AND time = %s", (target.time,))
    store.record_candle_change(conn, "ETH/USD", target.time, target.time + timedelta(minutes=1))
    conn.commit()
    refresh_aggregates(db_url)
    changed = [c if c.time != target.time else CandleRecord(**{**{f: getattr(c, f) for f in
               ("symbol", "time", "open", "high", "low", "close", "volume", "vwap")}, "trades": c.trades + 500})
               for c in records]
    for minutes in HIGHER:
        assert [(t, n) for _s, t, n in materialized(conn, minutes)] == \
            [(c.time, c.trades) for c in resample(changed, minutes)], minutes
    assert rows(conn, "SELECT count(*) FROM candle_changes") == [(0,)]


def test_policies_run_and_leave_the_bucket_in_progress_alone(db_url, conn):
    now = rows(conn, "SELECT date_trunc('minute', now())")[0][0]
    records = [c for c in minute_candles("SOL/USD", now - timedelta(days=2), 2 * 1440, seed=3)
               if c.time < now - timedelta(minutes=1)]
    insert_candles(conn, records)
    jobs = dict(rows(conn, "SELECT c.view_name, j.job_id FROM timescaledb_information.jobs j "
                           "JOIN timescaledb_information.continuous_aggregates c "
                           "ON c.view_name = j.hypertable_name "
                           "WHERE j.proc_name = 'policy_refresh_continuous_aggregate'"))
    conn.commit()
    conn.autocommit = True
    for minutes in refresh_order():  # parents first, as the hierarchy needs
        conn.execute("CALL run_job(%s)", (jobs[INTERVAL_RELATIONS[minutes]],))
    for minutes in (5, 60, 240):  # inside the policies' windows (3 days)
        in_progress = Interval(minutes).bucket_start(now)
        got = [(t, n) for _s, t, n in materialized(conn, minutes)]
        expected = [(c.time, c.trades) for c in resample(records, minutes)
                    if now - timedelta(days=3) <= c.time and c.time + c.interval * timedelta(minutes=1) <= now
                    - timedelta(minutes=1)]
        assert got and all(t < in_progress for t, _n in got), minutes
        assert set(expected) <= set(got), minutes


def test_provider_reads_of_the_views_and_minutes_equal_the_pure_twin_in_windows(db_url, conn):
    records = minute_candles("BTC/USD", T0, 20 * 1440, seed=5)
    holes = [c for c in records if not (T0 + timedelta(days=5) <= c.time < T0 + timedelta(days=12))]  # a quiet week
    insert_candles(conn, holes)
    refresh_aggregates(db_url)
    with HistoricalDataProvider(db_url) as provider:
        for minutes in (1, 5, 15, 60, 240):
            expected = resample(holes, minutes)
            got = provider.get_candles("BTC/USD", minutes, start=T0, end=T0 + timedelta(days=40), limit=300)
            assert [(c.time, c.trades) for c in got] == [(c.time, c.trades) for c in expected[:300]], minutes
            periods = min(300, len(expected))
            latest = provider.get_warmup_data("BTC/USD", minutes, periods, end=T0 + timedelta(days=40))
            assert [(c.time, c.trades) for c in latest] == [(c.time, c.trades) for c in expected[-periods:]], minutes


# ----- duplicates: the key holds time, the probes are bounded in time

def test_one_trade_a_microsecond_apart_is_stored_once_by_the_writer(settings, conn):
    first = [trade(i, T0 + timedelta(seconds=i)) for i in range(1, 201)]
    write_trades(settings, first)
    again = [trade(i, T0 + timedelta(seconds=i, microseconds=1)) for i in range(150, 251)]  # REST vs WebSocket times
    stats = write_trades(settings, again)
    assert rows(conn, "SELECT count(*), count(DISTINCT trade_id) FROM trades") == [(250, 250)]
    assert stats["trades_duplicate"] == 51


def _chunks_scanned(plan: dict) -> int:
    node_chunks = 1 if plan.get("Relation Name", "").startswith("_hyper_") else 0
    return node_chunks + sum(_chunks_scanned(p) for p in plan.get("Plans", []))


def test_duplicate_probes_read_one_or_two_chunks_of_many(settings, conn):
    """Weekly chunks over a year: the writer's probe and the staging merge prune by time."""
    conn.execute("""
        INSERT INTO trades (symbol, trade_id, time, price, volume, source)
        SELECT 'BTC/USD', i, %s + i * interval '1 hour', 100, 1, 'rest' FROM generate_series(1, 24 * 365) i""", (T0,))
    conn.commit()
    assert rows(conn, "SELECT count(*) FROM show_chunks('trades')")[0][0] >= 52
    from kraken_hist.storage.writer.statements import PROBE_TRADES as _PROBE_TRADES, probe_params as _probe_params
    window = store.identity_window(T0 + timedelta(hours=4000), T0 + timedelta(hours=4010))
    minutes = [int((T0 + timedelta(hours=h)).timestamp()) // 60 for h in (4000, 4010)]
    (plan,), = rows(conn, "EXPLAIN (ANALYZE, FORMAT JSON) " + _PROBE_TRADES,
                    _probe_params({"BTC/USD": [4000, 4010, minutes]}))[0]
    assert 1 <= _chunks_scanned(plan["Plan"]) <= 2
    conn.execute("CREATE TEMP TABLE stage (LIKE trades)")
    conn.execute("INSERT INTO stage SELECT * FROM trades WHERE trade_id BETWEEN 4000 AND 4010")
    (plan,), = rows(conn, "EXPLAIN (ANALYZE, FORMAT JSON) " + store.merge_staged_trades("stage"), window)[0]
    assert 1 <= _chunks_scanned(plan["Plan"]) <= 2
    conn.rollback()


# ----- compression

def test_the_periodic_refresh_compresses_old_chunks_and_late_data_still_goes_in(settings, db_url, conn, tmp_path):
    early = [trade(i, T0 + timedelta(minutes=i)) for i in range(1, 3001)]  # ~2 days, one chunk
    write_trades(settings, early)
    before = timescale.read_trade_storage(conn)
    assert before.chunks_compressed == 0 and before.bytes_uncompressed == before.bytes_stored
    conn.rollback()
    # the periodic job (no window, every symbol); chunks whose minutes changed since the last
    # refresh are being written: they wait for the next run
    assert refresh_aggregates(db_url).chunks_compressed == 0
    assert refresh_aggregates(db_url).chunks_compressed >= 2  # the trades chunk and the candles chunk
    after = timescale.read_trade_storage(conn)
    assert after.chunks_compressed == after.chunks >= 1
    assert after.per_trade_stored < after.per_trade_uncompressed  # type: ignore[operator]
    conn.rollback()
    # late trades, duplicates among them, into the compressed chunk
    late = [trade(i, T0 + timedelta(minutes=i, microseconds=1)) for i in range(2990, 3101)]
    stats = write_trades(settings, late)
    assert stats["trades_duplicate"] == 11
    assert rows(conn, "SELECT count(*), count(DISTINCT trade_id) FROM trades") == [(3100, 3100)]
    stored = rows(conn, "SELECT trade_id, time, price, volume FROM trades ORDER BY trade_id")
    expected = [HistoricalTrade(symbol="BTC/USD", trade_id=t.trade_id, time=t.time, price=t.price, volume=t.volume)
                for t in [*early, *late[11:]]]
    assert stored == [(t.trade_id, t.time, t.price, t.volume) for t in expected]
    built = rows(conn, "SELECT time, open, close, vwap, volume, trades FROM candles ORDER BY time")
    assert built == [(c.time, c.open, c.close, c.vwap, c.volume, c.trades) for c in candles_from_trades(expected)]


def test_a_reimport_into_compressed_chunks_stores_nothing_twice(db_url, conn, tmp_path):
    start = int(T0.timestamp())
    lines = "".join(f"{start + 7 * i},{100 + i % 50}.5,0.{i % 9 + 1}\n" for i in range(5000))
    path = tmp_path / "XBTUSD.csv"
    path.write_text(lines)
    BulkCSVImporter(db_url, chunk_size=700).import_csv_file(path)
    before = rows(conn, "SELECT trade_id, time, price, volume FROM trades ORDER BY trade_id")
    candles_before = rows(conn, "SELECT * FROM candles ORDER BY time")
    conn.rollback()
    refresh_aggregates(db_url)
    assert refresh_aggregates(db_url).chunks_compressed >= 1
    again = BulkCSVImporter(db_url, chunk_size=700).import_csv_file(path)
    assert (again.imported, again.duplicates) == (0, 5000)
    assert rows(conn, "SELECT trade_id, time, price, volume FROM trades ORDER BY trade_id") == before
    assert rows(conn, "SELECT * FROM candles ORDER BY time") == candles_before


def test_the_compression_age_is_a_setting(db_url, conn):
    assert timescale.read_compress_after(conn) == timedelta(days=7)
    conn.rollback()
    assert migrate.apply_compress_after(db_url, 30) == timedelta(days=30)
    assert timescale.read_compress_after(conn) == timedelta(days=30)
    conn.rollback()
    assert migrate.apply_compress_after(db_url, 0) is None  # switched off
    assert timescale.read_compress_after(conn) is None
    assert timescale.read_compress_after(conn, "candles") is None
    conn.rollback()
    insert_candles(conn, minute_candles("BTC/USD", T0, 100, seed=6))
    assert refresh_aggregates(db_url).chunks_compressed == 0  # no policy: nothing is compressed


def test_db_status_shows_bytes_per_trade_before_and_after_compression(settings, db_url):
    from click.testing import CliRunner

    from kraken_hist.cli import cli

    write_trades(settings, [trade(i, T0 + timedelta(minutes=i)) for i in range(1, 1001)])
    refresh_aggregates(db_url)
    refresh_aggregates(db_url)  # the second one finds the chunks settled and compresses them
    result = CliRunner().invoke(cli, ["db", "status"], env={"KRAKEN_HIST_DATABASE_URL": db_url})
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if line.startswith("trades:"))
    assert "bytes each uncompressed" in line and "stored" in line and "1 of 1 chunks compressed" in line
    before, after = (float(part.split()[0]) for part in line.split(":", 1)[1].split(",")[:2])
    assert after < before


# ----- migrations beside TimescaleDB's scheduler

HOLD_CANDLES_1W = """
    CREATE PROCEDURE hold_candles_1w(job_id int, config jsonb) LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM count(*) FROM candles_1w;  -- the lock a DROP of candles_1w waits for
        PERFORM pg_sleep(120);
    END $$"""


def _job_running(conn: psycopg.Connection, job: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        if rows(conn, "SELECT 1 FROM pg_stat_activity WHERE datname = current_database() AND backend_type = %s "
                      "AND wait_event = 'PgSleep'", (f"User-Defined Action [{job}]",)):
            return True
        time.sleep(0.1)
    return False


def _scheduled(conn: psycopg.Connection) -> dict[int, bool]:
    return dict(rows(conn, "SELECT job_id, scheduled FROM timescaledb_information.jobs"))


def test_a_migration_ends_a_job_in_its_way_and_schedules_the_jobs_again(empty_db_url):
    """Revision 0004 drops and creates the aggregates while a job holds one of them: the
    database's jobs are unscheduled and the running one ended, so the migration does not wait
    for it (nor deadlock with a policy); every job scheduled before is scheduled after."""
    migrate.upgrade(empty_db_url, "0003")
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        conn.execute(HOLD_CANDLES_1W)
        (job,), = rows(conn, "SELECT add_job('hold_candles_1w', INTERVAL '1 hour')")
        before = _scheduled(conn)
        assert _job_running(conn, job), "the scheduler did not start the job"
        began = time.monotonic()
        migrate.upgrade(empty_db_url)
        assert time.monotonic() - began < 60  # the job alone sleeps 120 s holding candles_1w
        after = _scheduled(conn)
    assert after[job] and all(after[j] for j, on in before.items() if on and j in after)
    assert {j for j in after if j not in before} and all(after.values())  # the new policies, scheduled


def test_a_failed_migration_schedules_the_jobs_it_paused_again(empty_db_url):
    """Downgrading revision 0004 recreates the aggregates counting in integer; with a bucket
    whose count overflows that, materializing fails: the jobs paused for it are scheduled again."""
    migrate.upgrade(empty_db_url)
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        conn.execute("INSERT INTO candles (symbol, time, open, high, low, close, volume, trades, source) "
                     "SELECT 'BTC/USD', %s + m * INTERVAL '1 minute', 1, 1, 1, 1, 1, 2147483647, 'trades' "
                     "FROM generate_series(0, 1) m", (T0,))
        before = _scheduled(conn)
        with pytest.raises(Exception, match="integer out of range"):
            migrate.downgrade(empty_db_url, "0003")
        after = _scheduled(conn)
    assert before and all(before.values())
    assert all(after[j] for j in before if j in after)
    assert {1, 3} <= set(after)  # the extension's own jobs (telemetry, job-history retention) among them
