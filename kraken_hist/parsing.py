"""Kraken REST answers → our records. Pure: text and decoded JSON in, typed values out.

The wire shape is kept apart from the domain types: rows are decoded as Kraken sends them
and turned into ``HistoricalTrade`` / ``OhlcRow`` by named functions. Numbers are read from
their text (``json.loads(text, parse_float=Decimal)``) because the trade time is a JSON float
with up to 7 decimals (``1762795433.9717445``) that a binary float cannot hold.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from .pairs import PairRegistry
from .timeutils import EPOCH, from_unix_decimal, parse_rfc3339
from .types import CandleRecord, CandleSource, HistoricalCandle, HistoricalTrade

_SIDES = frozenset(("b", "s"))
_ORD_TYPES = frozenset(("m", "l"))


class ParseError(ValueError):
    """An answer that does not have the shape Kraken documents."""


def loads(text: str | bytes) -> Any:
    """Decode a Kraken JSON answer with every float as an exact Decimal."""
    try:
        return json.loads(text, parse_float=Decimal)
    except ValueError as exc:  # JSONDecodeError and bad UTF-8 alike
        raise ParseError(f"answer is not valid JSON: {exc}") from exc


# --- pages ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class TradesPage:
    """One ``/0/public/Trades`` answer: trades oldest first, and ``last`` (ns, a string) to
    page on with exactly as received."""

    symbol: str
    trades: list[HistoricalTrade]
    last: str

    @property
    def first_id(self) -> int | None:
        return self.trades[0].trade_id if self.trades else None

    @property
    def last_id(self) -> int | None:
        return self.trades[-1].trade_id if self.trades else None


@dataclass(frozen=True, slots=True, kw_only=True)
class OhlcRow:
    """One OHLC row as Kraken sent it; ``time`` is the candle's open. Filler rows (no trades)
    are kept so callers can see them, and flagged by :attr:`is_filler`."""

    symbol: str
    interval: int
    time: datetime
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    vwap: Decimal
    volume: Decimal
    count: int

    @property
    def is_filler(self) -> bool:
        """A quiet bucket: count 0, O=H=L=C = previous close, vwap 0, volume 0. Not trading."""
        return self.count == 0

    def to_candle(self) -> HistoricalCandle:
        return HistoricalCandle(
            symbol=self.symbol,
            interval=self.interval,
            time=self.time,
            open=self.open,
            high=self.high,
            low=self.low,
            close=self.close,
            volume=self.volume,
            vwap=None if self.is_filler else self.vwap,
            trades=self.count,
        )

    def to_candle_record(self, source: CandleSource = CandleSource.REST_OHLC) -> CandleRecord:
        """A 1-minute candle for storage; refuses filler rows, which are not trading."""
        if self.interval != 1:
            raise ValueError(f"only 1-minute rows become stored candles, this one is {self.interval}m")
        if self.is_filler:
            raise ValueError(f"{self.symbol} {self.time.isoformat()} is a filler row (no trades)")
        return CandleRecord(
            symbol=self.symbol,
            time=self.time,
            open=self.open,
            high=self.high,
            low=self.low,
            close=self.close,
            volume=self.volume,
            vwap=self.vwap,
            trades=self.count,
            source=source,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class OhlcPage:
    """One ``/0/public/OHLC`` answer. The last row is the unfinished candle; ``last`` is the
    open time (unix seconds) of the last finished one."""

    symbol: str
    interval: int
    rows: list[OhlcRow]
    last: int

    def finished_rows(self) -> list[OhlcRow]:
        """Rows whose candle is closed (open time <= ``last``), filler rows included."""
        return [row for row in self.rows if _seconds(row.time) <= self.last]

    def trading_rows(self) -> list[OhlcRow]:
        """Finished rows that hold trades (no fillers): what may be stored as candles."""
        return [row for row in self.finished_rows() if not row.is_filler]


def _seconds(when: datetime) -> int:
    delta = when - EPOCH
    return delta.days * 86_400 + delta.seconds


# --- result bodies ----------------------------------------------------------------------


def pair_entry(result: Mapping[str, Any]) -> tuple[str, Any]:
    """The single non-``last`` entry of a Trades/OHLC result.

    Kraken files the data under a key that may differ from the name asked for
    (``XXBTZUSD`` for ``XBTUSD``, ``XBTUSDT``, or ``BTC/USD``), so it is found, not guessed.
    """
    if not isinstance(result, Mapping):
        raise ParseError(f"result must be an object, got {type(result).__name__}")
    keys = [key for key in result if key != "last"]
    if len(keys) != 1:
        raise ParseError(f"expected exactly one pair key in the result, got {keys}")
    return keys[0], result[keys[0]]


def parse_trade(symbol: str, row: Sequence[Any], _times: dict[Any, datetime] | None = None) -> HistoricalTrade:
    """``["105433.60000", "0.00027625", 1762795433.9717445, "b", "l", "", 10218208]`` → trade.

    Time is truncated to the microsecond from the number's text; side/order type are the
    taker's.
    """
    if not isinstance(row, (list, tuple)) or len(row) < 7:
        raise ParseError(f"trade row must have 7 fields [price, volume, time, side, type, misc, id], got {row!r}")
    price, volume, when, side, ord_type, _misc, trade_id = row[:7]
    if isinstance(trade_id, bool) or not isinstance(trade_id, int):
        raise ParseError(f"trade id must be an integer, got {trade_id!r}")
    try:
        price_value = _decimal(price, "price")
        volume_value = _decimal(volume, "volume")
        if not price_value > 0 or not volume_value >= 0:
            raise ValueError("price must be positive and volume not negative")
        return HistoricalTrade(
            symbol=symbol,
            trade_id=trade_id,
            time=_trade_time(when, _times),
            price=price_value,
            volume=volume_value,
            side=side if side in _SIDES else None,
            ord_type=ord_type if ord_type in _ORD_TYPES else None,
        )
    except (ValueError, ArithmeticError) as exc:
        raise ParseError(f"bad trade row {row!r}: {exc}") from exc


def parse_trades_result(result: Mapping[str, Any], symbol: str) -> TradesPage:
    """A Trades ``result`` → :class:`TradesPage` for canonical `symbol`."""
    _key, rows = pair_entry(result)
    if not isinstance(rows, list):
        raise ParseError(f"trades must be a list, got {type(rows).__name__}")
    last = result.get("last")
    if last is None or isinstance(last, bool):
        raise ParseError("Trades result has no 'last' cursor")
    cursor = str(last)
    if not cursor.isdigit():
        raise ParseError(f"'last' must be integer nanoseconds, got {last!r}")
    times: dict[Any, datetime] = {}  # trades of one taker order share a time: convert it once
    return TradesPage(symbol=symbol, trades=[parse_trade(symbol, row, times) for row in rows], last=cursor)


def _trade_time(when: Any, cache: dict[Any, datetime] | None) -> datetime:
    if cache is None:
        return from_unix_decimal(_exact(when, "time"))
    found = cache.get(when)
    if found is None or type(when) is float:
        found = cache[when] = from_unix_decimal(_exact(when, "time"))
    return found


def parse_ohlc_row(symbol: str, interval: int, row: Sequence[Any]) -> OhlcRow:
    """``[1762777140, "106038.3", ..., "106038.3", "0.00032101", 1]`` → :class:`OhlcRow`."""
    if not isinstance(row, (list, tuple)) or len(row) < 8:
        raise ParseError(f"OHLC row must have 8 fields, got {row!r}")
    when, o, h, low, c, vwap, volume, count = row[:8]
    try:
        return OhlcRow(
            symbol=symbol,
            interval=interval,
            time=from_unix_decimal(_exact(when, "time")),
            open=_decimal(o, "open"),
            high=_decimal(h, "high"),
            low=_decimal(low, "low"),
            close=_decimal(c, "close"),
            vwap=_decimal(vwap, "vwap"),
            volume=_decimal(volume, "volume"),
            count=int(count),
        )
    except (ValueError, ArithmeticError, TypeError) as exc:
        raise ParseError(f"bad OHLC row {row!r}: {exc}") from exc


def parse_ohlc_result(result: Mapping[str, Any], symbol: str, interval: int) -> OhlcPage:
    """An OHLC ``result`` → :class:`OhlcPage`; ``last`` may come as an int or a string."""
    _key, rows = pair_entry(result)
    if not isinstance(rows, list):
        raise ParseError(f"OHLC rows must be a list, got {type(rows).__name__}")
    last = result.get("last")
    try:
        last_seconds = int(str(last))
    except ValueError:
        raise ParseError(f"OHLC 'last' must be unix seconds, got {last!r}") from None
    return OhlcPage(
        symbol=symbol,
        interval=interval,
        rows=[parse_ohlc_row(symbol, interval, row) for row in rows],
        last=last_seconds,
    )


def parse_server_time(result: Mapping[str, Any]) -> datetime:
    """``{"unixtime": 1762820224, "rfc1123": ...}`` → aware datetime."""
    try:
        return from_unix_decimal(_exact(result["unixtime"], "unixtime"))
    except (KeyError, TypeError, ValueError, ArithmeticError) as exc:
        raise ParseError(f"bad Time result {result!r}") from exc


@dataclass(frozen=True, slots=True, kw_only=True)
class SystemStatus:
    """``/0/public/SystemStatus``: online, maintenance, cancel_only or post_only."""

    status: str
    timestamp: datetime | None

    @property
    def online(self) -> bool:
        return self.status == "online"


def parse_system_status(result: Mapping[str, Any]) -> SystemStatus:
    try:
        status = str(result["status"])
    except (KeyError, TypeError) as exc:
        raise ParseError(f"bad SystemStatus result {result!r}") from exc
    stamp = result.get("timestamp")
    return SystemStatus(status=status, timestamp=parse_rfc3339(stamp) if isinstance(stamp, str) else None)


def parse_asset_pairs(result: Mapping[str, Any], registry: PairRegistry | None = None) -> dict[str, dict[str, Any]]:
    """AssetPairs ``result`` as given (keyed by REST pair key); with `registry`, the pairs are
    also added to it so their names resolve."""
    if not isinstance(result, Mapping):
        raise ParseError(f"AssetPairs result must be an object, got {type(result).__name__}")
    if registry is not None:
        registry.update_from_asset_pairs(result)
    return {str(k): dict(v) for k, v in result.items()}


def _exact(value: Any, field: str) -> Decimal:
    """A JSON number read exactly. A binary float here means the text was decoded without
    ``parse_float=Decimal`` and has already lost digits: refuse rather than guess."""
    if isinstance(value, Decimal):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return Decimal(value)
    if isinstance(value, str):
        return Decimal(value)
    if isinstance(value, float):
        raise ParseError(f"{field} was decoded as a binary float; decode with parse_float=Decimal")
    raise ParseError(f"{field} must be a number, got {value!r}")


def _decimal(value: Any, field: str) -> Decimal:
    if isinstance(value, str):
        return Decimal(value)
    return _exact(value, field)

