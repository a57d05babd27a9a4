"""TimescaleDB for real: hierarchical aggregates, exact vwap sums, compression, no unused indexes.

Both branches:

* Every interval relation keeps ``vwap_notional`` = Σ(vwap·volume) of its 1-minute candles
  that have a vwap, beside ``vwap_volume`` (their volume). Sums of numerics are exact, so each
  level is aggregated from the one below and its vwap, ``vwap_notional / vwap_volume``, is one
  division of the very operands the direct 1-minute weighting divides: the same digits at
  every level and on both backends (before, 15m and up differed by ~1e-12 between them).

TimescaleDB (the extension is in this database: revision 0001 created it):

* ``create_hypertable`` made ``trades_time_idx`` and ``candles_time_idx``; nothing reads them
  (every query names the symbol) and every insert maintained them: dropped.
* The seven continuous aggregates are rebuilt hierarchically (5m from ``candles``, 15m from
  5m, 30m from 15m, 1h from 30m, 4h from 1h, 1d from 4h, 1w from 1d), with real-time
  aggregation. Their policies end one minute before now, so the bucket in progress is never
  materialized (real-time aggregation keeps it current) and each window spans at least two
  buckets (the weekly one looks five weeks back; three days never held a whole week).
* ``trades`` and ``candles`` chunks are compressed (segment by symbol, ordered by time) once
  they are older than seven days (``kraken-hist db upgrade`` applies
  ``KRAKEN_HIST_COMPRESS_AFTER_DAYS``). Late rows and re-imports go into compressed chunks.
* Existing 1-minute candles are materialized into the new aggregates right away (outside a
  transaction: ``refresh_continuous_aggregate`` refuses to run inside one).

Plain PostgreSQL: the new column is added and every level recomputed from the one below.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from types import ModuleType
from typing import Sequence

from alembic import op
import sqlalchemy as sa

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# (relation, bucket width, the relation it is aggregated from), parents first
LEVELS = (
    ("candles_5m", "5 minutes", "candles"),
    ("candles_15m", "15 minutes", "candles_5m"),
    ("candles_30m", "30 minutes", "candles_15m"),
    ("candles_1h", "1 hour", "candles_30m"),
    ("candles_4h", "4 hours", "candles_1h"),
    ("candles_1d", "1 day", "candles_4h"),
    ("candles_1w", "1 week", "candles_1d"),
)
#: Monday 1970-01-05: weeks start on Mondays (time_bucket's default origin, 2000-01-03, is one too).
WEEK_ORIGIN = "1970-01-05T00:00:00Z"

#: Refresh policy per aggregate: (start_offset, schedule_interval). Every window ends one minute
#: before now (end_offset), so no bucket still in progress is ever materialized; each refresh is
#: one pass (buckets_per_batch 0: batches of 10 buckets cost a statement each).
POLICIES = {
    "candles_5m": ("3 days", "5 minutes"),
    "candles_15m": ("3 days", "15 minutes"),
    "candles_30m": ("3 days", "30 minutes"),
    "candles_1h": ("3 days", "1 hour"),
    "candles_4h": ("3 days", "1 hour"),
    "candles_1d": ("7 days", "1 hour"),
    "candles_1w": ("5 weeks", "1 hour"),
}
END_OFFSET = "1 minute"
COMPRESS_AFTER = "7 days"


def _weights(parent: str) -> tuple[str, str]:
    """(vwap_notional, vwap_volume) aggregated over `parent`'s rows."""
    if parent == "candles":
        return "sum(vwap * volume)", "sum(volume) FILTER (WHERE vwap IS NOT NULL)"
    return "sum(vwap_notional)", "sum(vwap_volume)"


def _timescaledb(bind: sa.Connection) -> bool:
    return bind.execute(sa.text("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'")).first() is not None


def upgrade() -> None:
    if _timescaledb(op.get_bind()):
        _upgrade_timescaledb()
    else:
        _upgrade_plain()


# --- plain PostgreSQL ---------------------------------------------------------------------


def _upgrade_plain() -> None:
    for relation, width, parent in LEVELS:
        op.execute(f"ALTER TABLE {relation} ADD COLUMN IF NOT EXISTS vwap_notional numeric")
        notional, weight = _weights(parent)
        origin = WEEK_ORIGIN if width == "1 week" else "1970-01-01T00:00:00Z"
        op.execute(
            f"""
            UPDATE {relation} t
            SET vwap_notional = b.notional, vwap = b.notional / NULLIF(b.weight, 0)
            FROM (SELECT symbol, date_bin(INTERVAL '{width}', time, TIMESTAMPTZ '{origin}') AS bucket,
                         {notional} AS notional, {weight} AS weight
                  FROM {parent} GROUP BY 1, 2) b
            WHERE t.symbol = b.symbol AND t.time = b.bucket
            """
        )


def _downgrade_plain() -> None:
    for relation, _width, _parent in LEVELS:
        op.execute(f"ALTER TABLE {relation} DROP COLUMN IF EXISTS vwap_notional")


# --- TimescaleDB ----------------------------------------------------------------------------


def aggregate_sql(relation: str, width: str, parent: str, count_type: str = "integer") -> str:
    """CREATE one level of the hierarchy (WITH NO DATA: materializing cannot run in a
    transaction), its trade count summed as `count_type`."""
    notional, weight = _weights(parent)
    return f"""
        CREATE MATERIALIZED VIEW {relation}
        WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
        SELECT symbol,
               time_bucket(INTERVAL '{width}', time) AS time,
               first(open, time)                     AS open,
               max(high)                             AS high,
               min(low)                              AS low,
               last(close, time)                     AS close,
               {notional} / NULLIF({weight}, 0)      AS vwap,
               sum(volume)                           AS volume,
               sum(trades)::{count_type}             AS trades,
               {weight}                              AS vwap_volume,
               {notional}                            AS vwap_notional
        FROM {parent}
        GROUP BY symbol, time_bucket(INTERVAL '{width}', time)
        WITH NO DATA
        """


def materialize(relations: Sequence[tuple[str, str]]) -> None:
    """Refresh each (relation, width), in order, up to its bucket in progress, in one pass
    each (a manual refresh otherwise goes 10 buckets a statement), outside a transaction;
    a policy job refreshing the same aggregate meanwhile is waited out (TimescaleDB refuses
    overlapping refreshes rather than queueing them)."""
    with op.get_context().autocommit_block():
        for relation, width in relations:
            statement = (f"CALL refresh_continuous_aggregate('{relation}', NULL, time_bucket(INTERVAL '{width}', "
                         f"now()), options => '{{\"buckets_per_batch\": 0}}')")
            deadline = time.monotonic() + 120
            while True:
                try:
                    op.execute(statement)
                    break
                except sa.exc.OperationalError as exc:
                    if getattr(exc.orig, "sqlstate", None) != "55P03" or time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)


def create_aggregates(count_type: str = "integer") -> None:
    """(Re)create the whole hierarchy, materialize what ``candles`` holds, then the policies,
    with TimescaleDB's scheduler kept off our aggregates meanwhile (0001's ``policies_paused``).

    The policies come last: a healthy scheduler starts them at once, and a policy refreshing
    beside the materialization would make it fail ("due to a concurrent refresh")."""
    rev = _revision_0001()
    with rev.policies_paused():
        for relation, _width, _parent in reversed(LEVELS):
            rev.drop_aggregate(relation)
        for relation, width, parent in LEVELS:
            op.execute(aggregate_sql(relation, width, parent, count_type))
        materialize([(relation, width) for relation, width, _parent in LEVELS])
    for relation, _width, _parent in LEVELS:
        start_offset, every = POLICIES[relation]
        op.execute(
            f"""SELECT add_continuous_aggregate_policy('{relation}',
                    start_offset => INTERVAL '{start_offset}', end_offset => INTERVAL '{END_OFFSET}',
                    schedule_interval => INTERVAL '{every}', buckets_per_batch => 0, if_not_exists => true)"""
        )


def _upgrade_timescaledb() -> None:
    create_aggregates()  # first: it pauses the policies before taking any lock they wait for
    op.execute("DROP INDEX IF EXISTS trades_time_idx")
    op.execute("DROP INDEX IF EXISTS candles_time_idx")
    op.execute(
        "ALTER TABLE trades SET (timescaledb.compress, timescaledb.compress_segmentby = 'symbol', "
        "timescaledb.compress_orderby = 'time, trade_id')"
    )
    op.execute(
        "ALTER TABLE candles SET (timescaledb.compress, timescaledb.compress_segmentby = 'symbol', "
        "timescaledb.compress_orderby = 'time')"
    )
    for table in ("trades", "candles"):
        op.execute(f"SELECT add_compression_policy('{table}', INTERVAL '{COMPRESS_AFTER}', if_not_exists => true)")


def _revision_0001() -> ModuleType:
    """Revision 0001, read from beside this file: its aggregates are what a downgrade restores."""
    path = Path(__file__).with_name("0001_initial.py")
    spec = importlib.util.spec_from_file_location("kraken_hist_revision_0001", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _downgrade_timescaledb() -> None:
    rev = _revision_0001()
    with rev.policies_paused():
        for table in ("trades", "candles"):
            op.execute(f"SELECT remove_compression_policy('{table}', if_exists => true)")
            op.execute(f"SELECT decompress_chunk(c, true) FROM show_chunks('{table}') c")
            op.execute(f"ALTER TABLE {table} SET (timescaledb.compress = false)")
        for relation, _width, _parent in reversed(LEVELS):
            rev.drop_aggregate(relation)
        op.execute("CREATE INDEX IF NOT EXISTS trades_time_idx ON trades (time DESC)")
        op.execute("CREATE INDEX IF NOT EXISTS candles_time_idx ON candles (time DESC)")
        rev.create_aggregates(with_policies=False)
        materialize([(relation, width) for relation, width, _parent in LEVELS])
    rev.add_policies()  # last, as in create_aggregates


def downgrade() -> None:
    if _timescaledb(op.get_bind()):
        _downgrade_timescaledb()
    else:
        _downgrade_plain()
