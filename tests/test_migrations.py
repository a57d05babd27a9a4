"""The schema as the migrations build it, on plain PostgreSQL or TimescaleDB (whichever the
suite runs on; what only TimescaleDB has is in test_timescaledb.py)."""

import psycopg
import pytest
import sqlalchemy as sa

from kraken_hist.storage import migrate

from kraken_hist.storage import schema
from kraken_hist.storage.db import sqlalchemy_url
from kraken_hist.core.errors import ConfigurationError
from kraken_hist.core.intervals import INTERVAL_RELATIONS, Interval

HIGHER = [name for minutes, name in INTERVAL_RELATIONS.items() if minutes != 1]


def primary_key(conn, table):
    rows = conn.execute(
        """
        SELECT a.attname FROM pg_index i
        JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
        WHERE i.indrelid = %s::regclass AND i.indisprimary
        ORDER BY array_position(i.indkey::int2[], a.attnum)
        """,
        (table,),
    ).fetchall()
    return [r[0] for r in rows]


def columns(conn, table):
    rows = conn.execute(
        "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = %s ORDER BY ordinal_position",
        (table,),
    ).fetchall()
    return dict(rows)


def test_upgrade_from_empty_creates_every_relation(empty_db_url, timescaledb):
    migrate.upgrade(empty_db_url)
    status = migrate.read_schema_status(empty_db_url)
    assert status.up_to_date and status.revision == migrate.head_revision()
    assert status.timescaledb is timescaledb
    expected = {"trades", *INTERVAL_RELATIONS.values(), "sync_status", "coverage", "candle_changes", "exchange_candles"}
    assert set(status.row_counts) == expected
    assert all(count == 0 for count in status.row_counts.values())


def test_upgrade_is_idempotent(empty_db_url):
    migrate.upgrade(empty_db_url)
    migrate.upgrade(empty_db_url)
    assert migrate.read_schema_status(empty_db_url).up_to_date


def test_downgrade_then_upgrade(empty_db_url):
    migrate.upgrade(empty_db_url)
    migrate.downgrade(empty_db_url, "base")
    assert migrate.read_schema_status(empty_db_url).row_counts == {}
    migrate.upgrade(empty_db_url)
    assert migrate.read_schema_status(empty_db_url).up_to_date


def test_keys_make_writes_idempotent(conn, timescaledb):
    # A hypertable's unique key must hold its time column: there, (symbol, trade_id) is
    # recognised by the staging merge under the symbol lock (store.merge_staged_trades).
    assert primary_key(conn, "trades") == ["symbol", "trade_id", "time"] if timescaledb else ["symbol", "trade_id"]
    assert primary_key(conn, "candles") == ["symbol", "time"]
    if not timescaledb:  # continuous aggregates have no keys: they are views
        for name in HIGHER:
            assert primary_key(conn, name) == ["symbol", "time"], name
    assert primary_key(conn, "sync_status") == ["symbol", "data_type"]
    assert primary_key(conn, "coverage") == ["symbol", "source"]
    assert primary_key(conn, "exchange_candles") == ["symbol", "interval", "time"]


def test_prices_and_volumes_are_exact_decimals(conn):
    trade_columns = columns(conn, "trades")
    assert trade_columns["price"] == trade_columns["volume"] == "numeric"
    assert trade_columns["time"] == "timestamp with time zone"
    for name in ["candles", *HIGHER]:
        cols = columns(conn, name)
        for field in ("open", "high", "low", "close", "vwap", "volume"):
            assert cols[field] == "numeric", (name, field)


def test_exact_decimals_survive_a_round_trip(conn):
    conn.execute(
        "INSERT INTO trades VALUES ('BTC/USD', 1, '2025-01-01T00:00:00.1234567Z', '105433.60000', '0.00027625', 'b', 'l', 'rest')"
    )
    price, volume, time = conn.execute("SELECT price, volume, time FROM trades").fetchone()
    assert str(price) == "105433.60000" and str(volume) == "0.00027625"
    assert time.microsecond == 123457  # PostgreSQL keeps microseconds (rounded); we truncate before storing


def test_duplicate_trade_is_refused_by_the_key(conn, plain_postgresql):
    row = "('BTC/USD', 7, '2025-01-01T00:00:00Z', '1', '1', NULL, NULL, 'csv')"
    conn.execute(f"INSERT INTO trades VALUES {row}")
    with pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute("INSERT INTO trades VALUES ('BTC/USD', 7, '2025-01-01T00:00:00.000001Z', '1', '1', NULL, NULL, 'ws')")


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO trades VALUES ('BTC/USD', 1, now(), 0, 1, NULL, NULL, 'rest')",
        "INSERT INTO trades VALUES ('BTC/USD', 1, now(), 1, -1, NULL, NULL, 'rest')",
        "INSERT INTO trades VALUES ('BTC/USD', 1, now(), 1, 1, 'x', NULL, 'rest')",
        "INSERT INTO trades VALUES ('BTC/USD', 1, now(), 1, 1, NULL, NULL, 'carrier-pigeon')",
    ],
)
def test_constraints_refuse_impossible_rows(conn, statement):
    with pytest.raises(psycopg.errors.CheckViolation):
        conn.execute(statement)


def test_core_declarations_match_the_migrated_schema(db_url):
    engine = sa.create_engine(sqlalchemy_url(db_url))
    try:
        inspector = sa.inspect(engine)
        for table in schema.metadata.sorted_tables:
            migrated = {c["name"] for c in inspector.get_columns(table.name)}
            assert migrated == set(table.columns.keys()), table.name
    finally:
        engine.dispose()


def test_ensure_schema_tells_what_to_do(empty_db_url):
    with pytest.raises(ConfigurationError, match="kraken-hist db upgrade"):
        migrate.ensure_schema(empty_db_url)
    migrate.ensure_schema(empty_db_url, auto_upgrade=True)
    migrate.ensure_schema(empty_db_url)


def test_timescaledb_branch_is_explicit_sql():
    """Runs only where TimescaleDB is (test_timescaledb.py); the statements a reader relies on are there."""
    source = (migrate.migrations_path() / "versions" / "0001_initial.py").read_text()
    assert "create_hypertable('trades', 'time'" in source
    assert "PRIMARY KEY (symbol, trade_id, time)" in source
    assert "CREATE EXTENSION IF NOT EXISTS timescaledb" in source and "begin_nested" in source
    source = (migrate.migrations_path() / "versions" / "0003_timescaledb.py").read_text()
    assert "timescaledb.continuous" in source and "add_continuous_aggregate_policy" in source
    assert "add_compression_policy" in source and "compress_segmentby = 'symbol'" in source
    for width in ("5 minutes", "15 minutes", "30 minutes", "1 hour", "4 hours", "1 day", "1 week"):
        assert f'"{width}"' in source


def test_trades_time_index_skips_deduplication(db_url):
    """Revision 0002: bulk loads do not pay deduplication passes on the (symbol, time) index."""
    with psycopg.connect(db_url) as conn:
        options = conn.execute(
            "SELECT reloptions FROM pg_class WHERE relname = 'trades_symbol_time_idx'").fetchone()[0]
    assert options == ["deduplicate_items=off"]


class _Server:
    """Answers 0001's questions like a server with timescaledb installed: `preload` is its
    shared_preload_libraries, `create_error` what CREATE EXTENSION raises (None: it succeeds)."""

    def __init__(self, preload: str, create_error: str | None = None) -> None:
        self.preload, self.create_error, self.statements = preload, create_error, []

    def execute(self, statement):
        import sqlalchemy as sa

        text = str(statement)
        self.statements.append(text)
        if "CREATE EXTENSION" in text:
            if self.create_error:
                raise sa.exc.DBAPIError(text, {}, Exception(self.create_error))
            return None
        answer = (self.preload,) if "shared_preload_libraries" in text else \
            None if "pg_extension" in text else (1,)

        class Result:
            def first(self):
                return answer

            def scalar(self):
                return answer[0] if answer else None

        return Result()

    def begin_nested(self):
        import contextlib

        return contextlib.nullcontext()


def _revision_0001():
    import importlib.util

    spec = importlib.util.spec_from_file_location("rev0001", migrate.migrations_path() / "versions" / "0001_initial.py")
    assert spec is not None and spec.loader is not None
    rev = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rev)
    return rev


@pytest.mark.parametrize(("preload", "create_error", "taken"), [
    ("", None, False),  # installed, not preloaded: CREATE EXTENSION would be FATAL, so it is not tried
    ("pg_stat_statements", None, False),
    ("pg_stat_statements, timescaledb", None, True),
    ("'$libdir/timescaledb'", None, True),
    ("timescaledb", "permission denied to create extension", False),  # an ERROR, in a savepoint
])
def test_the_branch_is_taken_only_when_the_extension_can_really_be_created(preload, create_error, taken):
    """0001 asks whether the extension can really be created, not pg_available_extensions
    alone: installed but not preloaded (or not permitted) means plain PostgreSQL, no traceback.
    (Checked for real too, against a server with the extension installed and not preloaded.)"""
    server = _Server(preload.strip("'"), create_error)
    assert _revision_0001()._create_timescaledb(server) is taken
    assert any("CREATE EXTENSION" in s for s in server.statements) is (preload.strip("'").endswith("timescaledb"))


def test_upgrading_a_database_with_data_gives_exact_sums_at_every_level(empty_db_url, timescaledb):
    """Revision 0003 on a database that already holds candles and interval rows: every level
    gets its exact sums and the vwap of dividing them (TimescaleDB: the new aggregates are
    materialized during the upgrade)."""
    from datetime import datetime, timezone

    migrate.upgrade(empty_db_url, "0002")
    start = datetime(2025, 3, 3, tzinfo=timezone.utc)
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        conn.execute("""
            INSERT INTO candles (symbol, time, open, high, low, close, vwap, volume, trades, source)
            SELECT 'BTC/USD', %s + m * interval '1 minute', 100, 101, 99, 100,
                   CASE WHEN m %% 7 = 0 THEN NULL ELSE 100 + (m %% 13) / 3.0 END, 0.1 + (m %% 17) / 7.0, 3, 'trades'
            FROM generate_series(0, 3 * 1440) m""", (start,))
        for minutes, relation in INTERVAL_RELATIONS.items():
            if minutes == 1:
                continue
            if timescaledb:  # revision 0001's aggregates, materialized
                conn.execute(f"CALL refresh_continuous_aggregate('{relation}', NULL, NULL)")
            else:  # what the refresh of that time wrote
                conn.execute(f"""
                    INSERT INTO {relation} (symbol, time, open, high, low, close, vwap, volume, trades, vwap_volume)
                    SELECT symbol, date_bin(%s, time, %s), min(open), max(high), min(low), min(close),
                           sum(vwap * volume) / NULLIF(sum(volume) FILTER (WHERE vwap IS NOT NULL), 0),
                           sum(volume), sum(trades), sum(volume) FILTER (WHERE vwap IS NOT NULL)
                    FROM candles GROUP BY 1, 2""", (Interval(minutes).delta, Interval(minutes).origin))
    migrate.upgrade(empty_db_url)
    with psycopg.connect(empty_db_url) as conn:
        for minutes, relation in INTERVAL_RELATIONS.items():
            if minutes == 1:
                continue
            iv = Interval(minutes)
            direct = conn.execute("""
                SELECT date_bin(%s, time, %s), sum(vwap * volume),
                       sum(vwap * volume) / NULLIF(sum(volume) FILTER (WHERE vwap IS NOT NULL), 0)
                FROM candles GROUP BY 1 ORDER BY 1""", (iv.delta, iv.origin)).fetchall()
            stored = conn.execute(f"SELECT time, vwap_notional, vwap FROM {relation} ORDER BY 1").fetchall()
            assert [(t, str(n), str(v)) for t, n, v in stored] == [(t, str(n), str(v)) for t, n, v in direct], relation
        if timescaledb:  # materialized by the upgrade, not only computed in real time
            for relation in INTERVAL_RELATIONS.values():
                if relation == "candles":
                    continue
                (table,), = conn.execute(
                    "SELECT format('%%I.%%I', materialization_hypertable_schema, materialization_hypertable_name) "
                    "FROM timescaledb_information.continuous_aggregates WHERE view_name = %s", (relation,)).fetchall()
                assert conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] > 0, relation
