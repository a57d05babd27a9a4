"""Accepting records: each trade, candle and sync status is checked once, at ``write_*``, and
kept in the form it has until it is committed.

A trade becomes its PostgreSQL COPY text line in the same pass that checks it: that one bytes
form is what the flush thread COPYs, what the spool stores and what a replay COPYs again, so
nothing is done per row after acceptance. The cheap checks run inline (a trade is checked a
few hundred thousand times a second); anything unusual goes through the field checkers, whose
message names the field.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, Callable

from kraken_hist.core.errors import PermanentError
from kraken_hist.core.pairs import PairRegistry
from kraken_hist.core.types import CandleRecord, CandleSource, TradeRecord, TradeSource

UTC = timezone.utc

BIGINT = 2**63
NULL = "\\N"  # COPY text NULL
TRADE_COLUMNS = ("symbol", "trade_id", "time", "price", "volume", "side", "ord_type", "source")

_TRADE_SOURCES = {s: s.value for s in TradeSource} | {s.value: s.value for s in TradeSource}
_CANDLE_SOURCES = {s: s.value for s in CandleSource} | {s.value: s.value for s in CandleSource}
_ZERO = Decimal(0)


class InvalidRecordError(PermanentError, ValueError):
    """A record that cannot be right, refused at ``write_*``; the message names the field."""


def _bad(field: str, message: str) -> InvalidRecordError:
    return InvalidRecordError(f"{field} {message}")


def as_utc(value: object, field: str) -> datetime:
    """`value` as an aware UTC datetime (a naive one is refused: its zone is a guess)."""
    if not isinstance(value, datetime):
        raise _bad(field, f"must be a datetime, got {type(value).__name__}")
    tz = value.tzinfo
    if tz is UTC:
        return value
    if tz is None or tz.utcoffset(value) is None:
        raise _bad(field, f"must be timezone-aware (UTC), got naive {value.isoformat()}")
    return value.astimezone(UTC)


def _number(value: object, field: str, *, positive: bool) -> Decimal:
    if value.__class__ is not Decimal and not isinstance(value, Decimal):
        raise _bad(field, f"must be a Decimal, got {type(value).__name__}")
    if not value.is_finite():  # type: ignore[attr-defined]
        raise _bad(field, f"must be finite, got {value}")
    if positive and value <= _ZERO:  # type: ignore[operator]
        raise _bad(field, f"must be positive, got {value}")
    if value < _ZERO:  # type: ignore[operator]
        raise _bad(field, f"must not be negative, got {value}")
    return value  # type: ignore[return-value]


class SymbolCheck:
    """Canonical symbols already checked (the registry can grow at run time)."""

    def __init__(self, registry: Callable[[], PairRegistry]) -> None:
        self._registry = registry
        self._known: set[str] = set()

    def __call__(self, value: object) -> str:
        if value.__class__ is str and value in self._known:
            return value  # type: ignore[return-value]
        if not isinstance(value, str):
            raise _bad("symbol", f"must be a str, got {type(value).__name__}")
        try:
            canonical = self._registry().normalize(value)
        except ValueError as exc:
            raise InvalidRecordError(f"symbol: {exc}") from None
        if canonical != value:
            raise _bad("symbol", f"must be canonical ({canonical!r}), got {value!r}")
        if any(ch in value for ch in "\t\n\r\\"):
            raise _bad("symbol", f"must not contain tabs, newlines or backslashes: {value!r}")
        self._known.add(value)
        return value


_SIDES = {None: NULL, "b": "b", "s": "s"}
_SECONDS = [f"{second:02d}." for second in range(61)]
_ORD_TYPES = {None: NULL, "m": "m", "l": "l"}


class TradeEncoder:
    """Validate a TradeRecord and encode it as its COPY text line, in one pass.

    The text of a minute (``YYYY-MM-DD HH:MM:``) and its number are cached, so a time costs
    one dict lookup and a short format."""

    _CACHE_LIMIT = 100_000

    def __init__(self, symbol_check: SymbolCheck) -> None:
        self._symbol = symbol_check
        self._minutes: dict[tuple[int, int, int, int, int], tuple[str, int]] = {}

    def __call__(self, record: object) -> tuple[str, int, int, str]:
        """record → (symbol, trade_id, minute number, COPY line)."""
        if record.__class__ is not TradeRecord and not isinstance(record, TradeRecord):
            raise InvalidRecordError(f"record must be a TradeRecord, got {type(record).__name__}")
        trade_id = record.trade_id
        if trade_id.__class__ is not int or not -BIGINT <= trade_id < BIGINT:
            raise _bad("trade_id", f"must be an int within bigint range, got {trade_id!r}")
        side = _SIDES.get(record.side)  # type: ignore[call-overload]
        if side is None:
            raise _bad("side", f"must be 'b', 's' or None, got {record.side!r}")
        ord_type = _ORD_TYPES.get(record.ord_type)  # type: ignore[call-overload]
        if ord_type is None:
            raise _bad("ord_type", f"must be 'm', 'l' or None, got {record.ord_type!r}")
        source = record.source
        source = source._value_ if source.__class__ is TradeSource else _TRADE_SOURCES.get(source)  # type: ignore[call-overload]
        if source is None:
            raise _bad("source", f"must be one of {sorted(_TRADE_SOURCES)}, got {record.source!r}")
        symbol = self._symbol(record.symbol)
        when = record.time
        if when.__class__ is not datetime or when.tzinfo is not UTC:
            when = as_utc(when, "time")
        price = record.price
        if price.__class__ is not Decimal or not price.is_finite() or price <= _ZERO:
            price = _number(price, "price", positive=True)
        volume = record.volume
        if volume.__class__ is not Decimal or not volume.is_finite() or volume < _ZERO:
            volume = _number(volume, "volume", positive=False)
        key = (when.year, when.month, when.day, when.hour, when.minute)
        cached = self._minutes.get(key)
        if cached is None:
            cached = self._minute(when, key)
        # (format specs and Decimal.__format__ are slow: a seconds table, str() and !s instead)
        return symbol, trade_id, cached[1], (
            f"{symbol}\t{trade_id}\t{cached[0]}{_SECONDS[when.second]}{str(1_000_000 + when.microsecond)[1:]}+00"
            f"\t{price!s}\t{volume!s}\t{side}\t{ord_type}\t{source}\n"
        )

    def _minute(self, when: datetime, key: tuple[int, int, int, int, int]) -> tuple[str, int]:
        if len(self._minutes) >= self._CACHE_LIMIT:
            self._minutes.clear()
        start = when.replace(second=0, microsecond=0)
        entry = (f"{when.year:04d}-{when.month:02d}-{when.day:02d} {when.hour:02d}:{when.minute:02d}:",
                 minute_number(start))
        self._minutes[key] = entry
        return entry


def minute_start(minute: int) -> datetime:
    """The start of minute number `minute`: the writer names a minute by its number (minutes
    since the epoch), which is what its SQL takes (``to_timestamp(m * 60)``)."""
    return datetime.fromtimestamp(minute * 60, UTC)


def minute_number(when: datetime) -> int:
    """The number of the minute `when` falls in."""
    return int(when.timestamp()) // 60


def decode_trade_line(line: bytes) -> tuple:
    """A COPY line back to a row (for rejection reports)."""
    f = line.decode().rstrip("\n").split("\t")
    return (f[0], int(f[1]), datetime.fromisoformat(f[2]), Decimal(f[3]), Decimal(f[4]),
            None if f[5] == NULL else f[5], None if f[6] == NULL else f[6], f[7])


def candle_row(record: object, symbol_check: SymbolCheck) -> tuple:
    """A CandleRecord, checked, as the row the candle upsert takes: (symbol, time, open, high,
    low, close, vwap, volume, trades, source)."""
    if not isinstance(record, CandleRecord):
        raise InvalidRecordError(f"record must be a CandleRecord, got {type(record).__name__}")
    when = as_utc(record.time, "time")
    if when.second or when.microsecond:
        raise _bad("time", f"must be the start of a minute, got {when.isoformat()}")
    open_ = _number(record.open, "open", positive=True)
    high = _number(record.high, "high", positive=True)
    low = _number(record.low, "low", positive=True)
    close = _number(record.close, "close", positive=True)
    if low > high:
        raise _bad("low", f"({low}) must not exceed high ({high})")
    if not low <= open_ <= high:
        raise _bad("open", f"({open_}) must lie between low ({low}) and high ({high})")
    if not low <= close <= high:
        raise _bad("close", f"({close}) must lie between low ({low}) and high ({high})")
    vwap = record.vwap
    if vwap is not None:
        vwap = _number(vwap, "vwap", positive=False)
    trades = record.trades
    if type(trades) is not int or not 0 <= trades < 2**31:
        raise _bad("trades", f"must be a non-negative int, got {trades!r}")
    source = _CANDLE_SOURCES.get(record.source)  # type: ignore[call-overload]
    if source is None:
        raise _bad("source", f"must be one of {sorted(_CANDLE_SOURCES)}, got {record.source!r}")
    return (
        symbol_check(record.symbol), when, open_, high, low, close, vwap,
        _number(record.volume, "volume", positive=False), trades, source,
    )


def sync_row(symbol: str, data_type: object, timestamp: object, details: dict[str, Any]) -> tuple:
    """A sync status update, checked, as the row its upsert takes: (symbol, data_type,
    last_time, cursor, last_trade_id, details as JSON). ``cursor`` and ``last_trade_id`` are
    taken out of `details` (they have their own columns)."""
    if not isinstance(data_type, str) or not data_type or any(c in data_type for c in "\t\n"):
        raise InvalidRecordError(f"data_type must be a non-empty name, got {data_type!r}")
    when = None if timestamp is None else as_utc(timestamp, "timestamp")
    cursor = details.pop("cursor", None)
    last_trade_id = details.pop("last_trade_id", None)
    if last_trade_id is not None and (type(last_trade_id) is not int or not -BIGINT <= last_trade_id < BIGINT):
        raise InvalidRecordError(f"last_trade_id must be an int, got {last_trade_id!r}")
    try:
        details_json = json.dumps(details, default=str, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise InvalidRecordError(f"details must be JSON-serialisable: {exc}") from None
    return (symbol, data_type, when, None if cursor is None else str(cursor), last_trade_id, details_json)
