"""Hostile input: trade counts that cannot overflow a refresh, and refused trades on record.

* The interval relations (``candles_5m`` … ``candles_1w``) hold their trade count as
  ``bigint``: a 1-minute count may be anything up to 2**31 - 1 (``bounds.MAX_TRADE_COUNT``,
  the ``integer`` of ``candles``), and a sum of a few of those no longer fails every
  refresh with "integer out of range". Plain PostgreSQL: the columns change type.
  TimescaleDB: a continuous aggregate's column cannot change type, so the seven aggregates
  of revision 0003 are dropped and created again with ``sum(trades)::bigint`` (same
  hierarchy, weights, policies), then materialized outside a transaction.
* ``refused_trades``: a trade the exchange sent with an impossible value (``bounds``), its
  id, time when possible, source and the one-line reason. Written in the transaction of the
  page or progress step around it, so gap detection, gap fill and the live stream treat its
  id as accounted for (refused, not missing) and never fetch it again.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from alembic import op
import sqlalchemy as sa

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

REFUSED_TRADES = """
CREATE TABLE IF NOT EXISTS refused_trades (
    symbol    text        NOT NULL,
    trade_id  bigint      NOT NULL CHECK (trade_id > 0),
    time      timestamptz,
    source    text        NOT NULL CHECK (source IN ('rest', 'ws')),
    reason    text        NOT NULL,
    seen_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (symbol, trade_id)
)
"""


def _revision_0003() -> ModuleType:
    """Revision 0003 (the aggregate hierarchy, its weights and policies), read from beside
    this file so both revisions describe the aggregates from one place."""
    path = Path(__file__).with_name("0003_timescaledb.py")
    spec = importlib.util.spec_from_file_location("kraken_hist_revision_0003", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _timescaledb(bind: sa.Connection) -> bool:
    return bind.execute(sa.text("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'")).first() is not None


def upgrade() -> None:
    op.execute(REFUSED_TRADES)
    if _timescaledb(op.get_bind()):
        _recreate_aggregates("bigint")
    else:
        _retype_plain("bigint")


def downgrade() -> None:
    if _timescaledb(op.get_bind()):
        _recreate_aggregates("integer")
    else:
        _retype_plain("integer")
    op.execute("DROP TABLE IF EXISTS refused_trades")


def _retype_plain(count_type: str) -> None:
    for relation, _width, _parent in _revision_0003().LEVELS:
        op.execute(f"ALTER TABLE {relation} ALTER COLUMN trades TYPE {count_type}")


def _recreate_aggregates(count_type: str) -> None:
    """Drop revision 0003's continuous aggregates and create them again, counting in
    `count_type`; materialize them and put their refresh policies back."""
    _revision_0003().create_aggregates(count_type)
