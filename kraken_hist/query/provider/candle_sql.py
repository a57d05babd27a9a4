"""The candle selects of the query layer, built with SQLAlchemy Core and compiled once per shape.

Stored intervals are read from their relation; any other whole-minute interval is aggregated
from the largest stored interval dividing it with the bucket rule of ``rules.sql`` (rendered
here as columns over the parent aliased ``p``, never spelt again). Every interval's vwap can be
handed out at the pair's price decimals on the server (``rules.sql.vwap_at_places``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from kraken_hist.core.intervals import Interval
from kraken_hist.rules.sql import bucket_column_pairs, skip_scan_symbols, vwap_at_places
from kraken_hist.storage.schema import candles, interval_tables

TIMESTAMPTZ = sa.DateTime(timezone=True)

#: The candle columns after symbol and time, in the order of every candle select.
CANDLE_COLUMNS = ("open", "high", "low", "close", "volume", "vwap", "trades")


def _vwap_at_places(vwap: str) -> sa.ColumnElement[Any]:
    """`vwap` (SQL text) at the price decimals of the named parameter ``places``, rounded down
    (``places`` NULL: as it is). PostgreSQL sends a few digits instead of an exact quotient's
    20-40, and Python need not round each candle (~3 µs a candle)."""
    text = sa.text(vwap_at_places(vwap, ":places")).bindparams(sa.bindparam("places", None, type_=sa.Integer))
    return sa.type_coerce(text, sa.types.NullType()).label("vwap")


def bucket_select_columns(parent_minutes: int, *, vwap_places: bool = False) -> list[sa.ColumnElement[Any]]:
    """The aggregate columns (``CANDLE_COLUMNS``) of wider candles over parent rows aliased ``p``
    of `parent_minutes`: the rule of ``rules.sql.bucket_columns``, twin of ``rules.candles.resample``."""
    expressions = dict(bucket_column_pairs(parent_minutes))
    return [
        _vwap_at_places(expressions[name]) if name == "vwap" and vwap_places
        else sa.literal_column(expressions[name]).label(name)
        for name in CANDLE_COLUMNS
    ]


def _symbol_filter(column: sa.ColumnElement[Any], symbols: Sequence[str]) -> sa.ColumnElement[bool]:
    if len(symbols) == 1:
        return column == sa.bindparam("symbol", symbols[0], type_=sa.Text)
    return column.in_(list(symbols))


def select_candles(
    interval: Interval, symbols: Sequence[str], lo: datetime | None, hi: datetime | None, *,
    vwap_places: bool = False,
) -> sa.Select[Any]:
    """Buckets of `interval` starting in ``[lo, hi)`` (bounds aligned by the caller), unordered.

    Columns: symbol, time, open, high, low, close, volume, vwap, trades. The single symbol and
    the bounds are the named parameters ``symbol``, ``lo`` and ``hi``, so the compiled text
    depends only on the shape of the request (see ``CompiledQuery``). With `vwap_places`, the
    vwap comes at the price decimals of the parameter ``places``.
    """
    if interval.is_stored:
        t = interval_tables[interval.minutes]
        vwap: sa.ColumnElement[Any] = _vwap_at_places(f"{t.name}.vwap") if vwap_places else t.c.vwap
        stmt = sa.select(t.c.symbol, t.c.time, t.c.open, t.c.high, t.c.low, t.c.close, t.c.volume, vwap,
                         t.c.trades).where(_symbol_filter(t.c.symbol, symbols))
        time_col = t.c.time
    else:
        parent = interval.source_interval().minutes
        p = interval_tables[parent].alias("p")
        bucket = sa.func.date_bin(
            sa.literal(interval.delta, sa.Interval), p.c.time, sa.literal(interval.origin, TIMESTAMPTZ)
        ).label("time")
        stmt = (
            sa.select(p.c.symbol, bucket, *bucket_select_columns(parent, vwap_places=vwap_places))
            .where(_symbol_filter(p.c.symbol, symbols))
            .group_by(p.c.symbol, bucket)
        )
        time_col = p.c.time
    if lo is not None:
        stmt = stmt.where(time_col >= sa.bindparam("lo", lo, type_=TIMESTAMPTZ))
    if hi is not None:
        stmt = stmt.where(time_col < sa.bindparam("hi", hi, type_=TIMESTAMPTZ))
    return stmt


def ordered(stmt: sa.Select[Any], *, desc: bool = False, limit: int | None = None) -> sa.Select[Any]:
    """`stmt` ordered by bucket time, the row limit as the named parameter ``limit``."""
    stmt = stmt.order_by(sa.column("time").desc() if desc else sa.column("time"))
    if limit is not None:
        stmt = stmt.limit(sa.bindparam("limit", limit, type_=sa.Integer))
    return stmt


def select_forming(name: str, start: datetime, known: datetime, *, historical: bool) -> sa.Select[Any]:
    """The bucket beginning at `start` from `name`'s 1-minute candles known at `known`: at a past
    point in time only minutes that had closed (``time < known``, `known` a minute start);
    live, every stored minute up to `known` (the current one included)."""
    p = candles.alias("p")
    known_rows = p.c.time < known if historical else p.c.time <= known
    return (
        sa.select(p.c.symbol, sa.literal(start, TIMESTAMPTZ), *bucket_select_columns(1))
        .where(p.c.symbol == name, p.c.time >= start, known_rows)
        .group_by(p.c.symbol)
    )


def select_first_minute(name: str) -> sa.Select[Any]:
    """`name`'s first stored 1-minute candle time (one probe of the primary key)."""
    return sa.select(sa.func.min(candles.c.time)).where(candles.c.symbol == name)


def select_data_range(name: str) -> sa.Select[Any]:
    """`name`'s first and last stored 1-minute candle times."""
    return sa.select(sa.func.min(candles.c.time), sa.func.max(candles.c.time)).where(candles.c.symbol == name)


def select_previous_close(name: str, before: datetime) -> sa.Select[Any]:
    """The close of `name`'s last 1-minute candle before `before`."""
    return (
        sa.select(candles.c.close).where(candles.c.symbol == name, candles.c.time < before)
        .order_by(candles.c.time.desc()).limit(1)
    )


@dataclass(frozen=True, slots=True)
class CompiledQuery:
    """A Core statement compiled once for the driver: SQL text with ``%(name)s`` placeholders
    and every parameter's value as compiled. Per call only the named ones change."""

    sql: str
    defaults: dict[str, Any]

    @classmethod
    def compile(cls, stmt: sa.Select[Any], dialect: sa.Dialect) -> "CompiledQuery":
        compiled = stmt.compile(dialect=dialect)
        if compiled.positiontup is not None:
            raise RuntimeError(f"expected a named paramstyle, not {dialect.paramstyle!r}")
        return cls(sql=compiled.string, defaults=dict(compiled.params))

    def params(self, **values: Any) -> dict[str, Any]:
        out = dict(self.defaults)
        for name, value in values.items():
            if name in out:
                out[name] = value
        return out


#: Symbols that have stored 1-minute candles, in order (a skip scan of the primary key).
SYMBOLS_SQL = f"""
WITH RECURSIVE {skip_scan_symbols("candles")}
SELECT symbol FROM s WHERE symbol IS NOT NULL ORDER BY symbol
"""

#: Each symbol's newest 1-minute candle time.
NEWEST_SQL = f"""
WITH RECURSIVE {skip_scan_symbols("candles")}
SELECT s.symbol, (SELECT max(c.time) FROM candles c WHERE c.symbol = s.symbol)
FROM s WHERE s.symbol IS NOT NULL ORDER BY s.symbol
"""
