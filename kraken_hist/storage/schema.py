"""SQLAlchemy Core declarations of the schema, for queries (the migrations create it).

The interval relations share one shape whether they are tables (plain PostgreSQL) or
continuous aggregates (TimescaleDB), so queries do not care which.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB, TSTZMULTIRANGE

from kraken_hist.core.intervals import INTERVAL_RELATIONS

metadata = sa.MetaData()

trades = sa.Table(
    "trades",
    metadata,
    sa.Column("symbol", sa.Text, primary_key=True),
    sa.Column("trade_id", sa.BigInteger, primary_key=True),
    sa.Column("time", sa.DateTime(timezone=True), nullable=False),
    sa.Column("price", sa.Numeric, nullable=False),
    sa.Column("volume", sa.Numeric, nullable=False),
    sa.Column("side", sa.Text),
    sa.Column("ord_type", sa.Text),
    sa.Column("source", sa.Text, nullable=False),
)


def _candle_columns(count: type[sa.types.TypeEngine] = sa.Integer) -> list[sa.Column]:
    return [
        sa.Column("symbol", sa.Text, primary_key=True),
        sa.Column("time", sa.DateTime(timezone=True), primary_key=True),
        sa.Column("open", sa.Numeric, nullable=False),
        sa.Column("high", sa.Numeric, nullable=False),
        sa.Column("low", sa.Numeric, nullable=False),
        sa.Column("close", sa.Numeric, nullable=False),
        sa.Column("vwap", sa.Numeric),
        sa.Column("volume", sa.Numeric, nullable=False),
        sa.Column("trades", count, nullable=False),
    ]


candles = sa.Table(
    "candles",
    metadata,
    *_candle_columns(),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

#: Relation for each stored interval, in minutes (1 → ``candles``).
#: The higher ones also hold ``vwap_volume`` and ``vwap_notional``: the volume of their 1-minute
#: candles that have a vwap and Σ(vwap·volume) over them — exact sums, so a level aggregated
#: from the one below divides exactly what the direct 1-minute weighting divides.
interval_tables: dict[int, sa.Table] = {1: candles}
for _minutes, _name in INTERVAL_RELATIONS.items():
    if _minutes != 1:
        interval_tables[_minutes] = sa.Table(
            _name, metadata, *_candle_columns(sa.BigInteger), sa.Column("vwap_volume", sa.Numeric),
            sa.Column("vwap_notional", sa.Numeric),
        )

sync_status = sa.Table(
    "sync_status",
    metadata,
    sa.Column("symbol", sa.Text, primary_key=True),
    sa.Column("data_type", sa.Text, primary_key=True),
    sa.Column("last_time", sa.DateTime(timezone=True)),
    sa.Column("cursor", sa.Text),
    sa.Column("last_trade_id", sa.BigInteger),
    sa.Column("details", JSONB, nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

coverage = sa.Table(
    "coverage",
    metadata,
    sa.Column("symbol", sa.Text, primary_key=True),
    sa.Column("source", sa.Text, primary_key=True),
    sa.Column("ranges", TSTZMULTIRANGE, nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

candle_changes = sa.Table(
    "candle_changes",
    metadata,
    sa.Column("id", sa.BigInteger, primary_key=True),
    sa.Column("symbol", sa.Text, nullable=False),
    sa.Column("start_time", sa.DateTime(timezone=True), nullable=False),
    sa.Column("end_time", sa.DateTime(timezone=True), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)

exchange_candles = sa.Table(
    "exchange_candles",
    metadata,
    *_candle_columns(),
    sa.Column("interval", sa.Integer, primary_key=True),
    sa.Column("source", sa.Text, nullable=False),
)

#: Trades the exchange sent with an impossible value (``bounds``): their ids are accounted for
#: (refused, not missing), so gap detection and the live stream never fetch them again.
refused_trades = sa.Table(
    "refused_trades",
    metadata,
    sa.Column("symbol", sa.Text, primary_key=True),
    sa.Column("trade_id", sa.BigInteger, primary_key=True),
    sa.Column("time", sa.DateTime(timezone=True)),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
)
