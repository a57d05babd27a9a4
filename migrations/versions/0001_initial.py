"""Initial schema: trades, 1-minute candles, the seven interval relations, bookkeeping.

Two explicit branches, chosen by whether the ``timescaledb`` extension can really be created
(installed is not enough: it must be preloaded too, and permitted):

* TimescaleDB: ``trades`` and ``candles`` become hypertables and the seven intervals are
  continuous aggregates over ``candles`` (real-time, so the newest bucket is always there).
  A unique index on a hypertable must contain its time column, so the trade key is
  (symbol, trade_id, time); writers recognise duplicates by (symbol, trade_id) in staging.
* Plain PostgreSQL: the same names hold ordinary tables; the refresh job recomputes only
  the buckets listed in ``candle_changes``.

The interval relations also keep ``vwap_volume``, the volume of the 1-minute candles that
have a vwap (OHLCVT imports have none): the weight that lets each level be computed from
the one below with exactly the vwap of direct 1-minute weighting.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Iterator

from alembic import op
import sqlalchemy as sa

log = logging.getLogger("alembic.runtime.migration")

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# (relation, bucket width) for every interval above one minute.
INTERVALS = (
    ("candles_5m", "5 minutes"),
    ("candles_15m", "15 minutes"),
    ("candles_30m", "30 minutes"),
    ("candles_1h", "1 hour"),
    ("candles_4h", "4 hours"),
    ("candles_1d", "1 day"),
    ("candles_1w", "1 week"),  # time_bucket's default origin, 2000-01-03, is a Monday
)

TRADE_COLUMNS = """
    symbol     text        NOT NULL,
    trade_id   bigint      NOT NULL,
    time       timestamptz NOT NULL,
    price      numeric     NOT NULL CHECK (price > 0),
    volume     numeric     NOT NULL CHECK (volume >= 0),
    side       text        CHECK (side IN ('b', 's')),
    ord_type   text        CHECK (ord_type IN ('m', 'l')),
    source     text        NOT NULL CHECK (source IN ('rest', 'ws', 'csv'))
"""

CANDLE_COLUMNS = """
    symbol     text        NOT NULL,
    time       timestamptz NOT NULL,
    open       numeric     NOT NULL,
    high       numeric     NOT NULL,
    low        numeric     NOT NULL,
    close      numeric     NOT NULL,
    vwap       numeric,
    volume     numeric     NOT NULL,
    trades     integer     NOT NULL
"""

BOOKKEEPING = [
    # How far each kind of ingestion has come, per symbol: resume points.
    """
    CREATE TABLE sync_status (
        symbol        text        NOT NULL,
        data_type     text        NOT NULL,
        last_time     timestamptz,
        cursor        text,
        last_trade_id bigint,
        details       jsonb       NOT NULL DEFAULT '{}'::jsonb,
        updated_at    timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (symbol, data_type)
    )
    """,
    # Time ranges known complete, per symbol and source (rest, ws, csv, ...).
    """
    CREATE TABLE coverage (
        symbol     text           NOT NULL,
        source     text           NOT NULL,
        ranges     tstzmultirange NOT NULL DEFAULT '{}',
        updated_at timestamptz    NOT NULL DEFAULT now(),
        PRIMARY KEY (symbol, source)
    )
    """,
    # Windows of 1-minute candles changed since the last aggregate refresh.
    """
    CREATE TABLE candle_changes (
        id         bigserial   PRIMARY KEY,
        symbol     text        NOT NULL,
        start_time timestamptz NOT NULL,
        end_time   timestamptz NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now(),
        CHECK (end_time > start_time)
    )
    """,
    "CREATE INDEX candle_changes_symbol_idx ON candle_changes (symbol, start_time)",
    # Candles as the exchange published them at any interval (OHLCVT files, REST OHLC),
    # kept for reference and cross-checks; queries read our own relations.
    f"""
    CREATE TABLE exchange_candles (
        {CANDLE_COLUMNS},
        interval   integer     NOT NULL CHECK (interval > 0),
        source     text        NOT NULL,
        PRIMARY KEY (symbol, interval, time)
    )
    """,
]


def _preloaded(bind: sa.Connection) -> bool:
    """Whether ``shared_preload_libraries`` names timescaledb (as a name or a path)."""
    setting = bind.execute(sa.text("SELECT current_setting('shared_preload_libraries')")).scalar() or ""
    names = (entry.strip().strip('"').rsplit("/", 1)[-1] for entry in str(setting).split(","))
    return "timescaledb" in names


def _create_timescaledb(bind: sa.Connection) -> bool:
    """Create the extension if it really can be: installed *and* preloaded (and permitted).

    ``pg_available_extensions`` only says the files are installed. Without
    ``shared_preload_libraries = 'timescaledb'`` CREATE EXTENSION is FATAL (it ends the session,
    no savepoint survives it), so the setting is asked first; any other refusal (a missing
    privilege) is an ERROR, tried in a savepoint. Either way the plain branch is taken."""
    if bind.execute(sa.text("SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'")).first() is None:
        return False
    if bind.execute(sa.text("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'")).first() is not None:
        return True
    if not _preloaded(bind):
        log.warning("timescaledb is installed but not in shared_preload_libraries: plain PostgreSQL schema "
                    "(preload it and start from an empty database to get the TimescaleDB one)")
        return False
    try:
        with bind.begin_nested():
            bind.execute(sa.text("CREATE EXTENSION IF NOT EXISTS timescaledb"))
    except sa.exc.DBAPIError as exc:
        reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
        log.warning("timescaledb cannot be created here (%s): plain PostgreSQL schema", reason)
        return False
    return True


def upgrade() -> None:
    bind = op.get_bind()
    timescale = _create_timescaledb(bind)
    if timescale:
        _upgrade_timescaledb()
    else:
        _upgrade_plain()
    for statement in BOOKKEEPING:
        op.execute(statement)


def _upgrade_plain() -> None:
    op.execute(f"CREATE TABLE trades ({TRADE_COLUMNS}, PRIMARY KEY (symbol, trade_id))")
    op.execute("CREATE INDEX trades_symbol_time_idx ON trades (symbol, time)")
    op.execute(
        f"""CREATE TABLE candles ({CANDLE_COLUMNS},
            source     text        NOT NULL,
            updated_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (symbol, time))"""
    )
    for relation, _width in INTERVALS:
        op.execute(
            f"CREATE TABLE {relation} ({CANDLE_COLUMNS}, vwap_volume numeric, PRIMARY KEY (symbol, time))"
        )


def _upgrade_timescaledb() -> None:
    op.execute(f"CREATE TABLE trades ({TRADE_COLUMNS}, PRIMARY KEY (symbol, trade_id, time))")
    op.execute("SELECT create_hypertable('trades', 'time', chunk_time_interval => INTERVAL '7 days')")
    op.execute("CREATE INDEX trades_symbol_time_idx ON trades (symbol, time)")
    op.execute(
        f"""CREATE TABLE candles ({CANDLE_COLUMNS},
            source     text        NOT NULL,
            updated_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (symbol, time))"""
    )
    op.execute("SELECT create_hypertable('candles', 'time', chunk_time_interval => INTERVAL '30 days')")
    create_aggregates()


def create_aggregates(with_policies: bool = True) -> None:
    """This revision's continuous aggregates, each over ``candles``, with their policies
    (revision 0003 replaces them, and puts them back when downgraded: without the policies
    first, which come after it has materialized the aggregates)."""
    for relation, width in INTERVALS:
        # WITH NO DATA: creating a continuous aggregate with data cannot run in a transaction.
        op.execute(
            f"""
            CREATE MATERIALIZED VIEW {relation}
            WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
            SELECT symbol,
                   time_bucket(INTERVAL '{width}', time) AS time,
                   first(open, time)                    AS open,
                   max(high)                            AS high,
                   min(low)                             AS low,
                   last(close, time)                    AS close,
                   sum(vwap * volume) / NULLIF(sum(volume) FILTER (WHERE vwap IS NOT NULL), 0) AS vwap,
                   sum(volume)                          AS volume,
                   sum(trades)::integer                 AS trades,
                   sum(volume) FILTER (WHERE vwap IS NOT NULL) AS vwap_volume
            FROM candles
            GROUP BY symbol, time_bucket(INTERVAL '{width}', time)
            WITH NO DATA
            """
        )
    if with_policies:
        add_policies()


def add_policies() -> None:
    """This revision's refresh policy of every aggregate."""
    for relation, _width in INTERVALS:
        op.execute(
            f"""SELECT add_continuous_aggregate_policy('{relation}',
                    start_offset => INTERVAL '3 days', end_offset => NULL,
                    schedule_interval => INTERVAL '5 minutes')"""
        )


#: TimescaleDB's job workers in this database. A job's worker is named "<job name> [<job id>]"
#: from the moment it starts (its application_name only once it has read its job); the
#: scheduler's name has no job id. Each is waited for up to 5 s to exit, locks released.
_JOB_WORKERS = ("SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                "AND backend_type ~ ' \\[[0-9]+\\]$'")


def end_job_workers(bind: sa.Connection) -> None:
    """End every TimescaleDB job running in this database. ``pg_stat_activity`` is a snapshot
    taken once per transaction: it is cleared first, or a worker started since this
    transaction first looked would never be seen."""
    bind.execute(sa.text("SELECT pg_stat_clear_snapshot()"))
    bind.execute(sa.text(_JOB_WORKERS))


@contextlib.contextmanager
def policies_paused() -> Iterator[None]:
    """Keep TimescaleDB's jobs away while continuous aggregates are dropped or made.

    The scheduler starts a policy as soon as it is committed, and a job running beside a
    migration waits for the migration's locks while the migration waits for the job's: a
    deadlock (the job holds its aggregate's invalidation threshold and waits for ``candles``,
    which the migration's earlier drops hold). So the database's jobs are unscheduled
    (committed at once, outside the migration's transaction) and whatever job still runs is
    ended; ``drop_aggregate`` ends any the scheduler started from its list before it saw the
    change. The jobs scheduled before are scheduled again afterwards, in the migration's
    transaction; if the migration fails, from a connection of their own. Policies created
    meanwhile are created scheduled."""
    bind = op.get_bind()
    with op.get_context().autocommit_block():
        # (all of the database's jobs: the job-history retention job touches every job's rows too)
        paused = [row[0] for row in bind.execute(sa.text(
            "SELECT job_id FROM timescaledb_information.jobs WHERE scheduled"))]
        for job in paused:
            bind.execute(sa.text("SELECT alter_job(:job, scheduled => false)"), {"job": job})
        end_job_workers(bind)
    try:
        yield
    except BaseException:
        _schedule_after_failure(bind, paused)
        raise
    for job in paused:
        bind.execute(sa.text(_SCHEDULE), {"job": job})


#: Schedule a job again if it still exists (an aggregate's policy goes with the aggregate).
_SCHEDULE = "SELECT alter_job(job_id, scheduled => true) FROM timescaledb_information.jobs WHERE job_id = :job"


def _schedule_after_failure(bind: sa.Connection, jobs: list[int]) -> None:
    """Schedule `jobs` again from a connection of their own: the migration's transaction is
    aborted and rolls back. A job it deleted or locked (a dropped aggregate's policy) is
    waited for a second at most, then named in a warning with the statement that schedules it."""
    left = list(jobs)
    try:
        with bind.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as other:
            other.execute(sa.text("SET lock_timeout = '1s'"))
            for job in jobs:
                try:
                    other.execute(sa.text(_SCHEDULE), {"job": job})
                    left.remove(job)
                except sa.exc.DBAPIError:
                    pass
    except sa.exc.DBAPIError:
        pass
    if left:
        log.warning("TimescaleDB jobs %s were unscheduled for this migration and still are; schedule them "
                    "with SELECT alter_job(<id>, scheduled => true)", ", ".join(map(str, left)))


def drop_aggregate(relation: str, attempts: int = 20) -> None:
    """DROP MATERIALIZED VIEW `relation` (its policy goes with it), under ``policies_paused``:
    a job the scheduler started from its stale list is ended first, and if one still got in
    the way ("tuple concurrently deleted", a deadlock), it is ended and the drop tried again
    in a savepoint."""
    bind = op.get_bind()
    for attempt in range(attempts):
        end_job_workers(bind)
        try:
            with bind.begin_nested():
                bind.execute(sa.text(f"DROP MATERIALIZED VIEW IF EXISTS {relation} CASCADE"))
            return
        except sa.exc.DBAPIError as exc:
            busy = "concurrently" in str(exc.orig) or getattr(exc.orig, "sqlstate", None) in ("40P01", "55P03")
            if not busy or attempt == attempts - 1:
                raise
            time.sleep(0.25)


def downgrade() -> None:
    bind = op.get_bind()
    timescale = bind.execute(
        sa.text("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'")
    ).first() is not None
    with policies_paused() if timescale else contextlib.nullcontext():
        for relation, _width in reversed(INTERVALS):
            if timescale:
                drop_aggregate(relation)
            else:
                op.execute(f"DROP TABLE IF EXISTS {relation}")
    for table in ("exchange_candles", "candle_changes", "coverage", "sync_status", "candles", "trades"):
        op.execute(f"DROP TABLE IF EXISTS {table}")
