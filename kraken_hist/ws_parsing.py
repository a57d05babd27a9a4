"""Kraken WebSocket v2 frames → typed messages, pure (no sockets, no clocks).

Numbers on the v2 wire are JSON numbers (``"price":83744.3``), so frames are read with
``json.loads(text, parse_float=Decimal)`` and never pass through a binary float. A frame we
cannot read raises :class:`FrameError` carrying its text; the client logs and skips it.

Trimmed real frames (``kraken-samples/ws_v2_recorded.jsonl``)::

    {"channel":"status","type":"update","data":[{"system":"online","connection_id":16174536464690282295,...}]}
    {"method":"subscribe","result":{"channel":"trade","snapshot":false,"symbol":"BTC/USD"},"success":true,...}
    {"error":"Currency pair not supported XBT/USD","method":"subscribe","success":false,"symbol":"XBT/USD",...}
    {"channel":"trade","type":"update","data":[{"symbol":"BTC/USD","side":"buy","price":83744.3,
      "qty":0.00044780,"ord_type":"limit","trade_id":109116693,"timestamp":"2026-09-25T17:48:26.844359Z"}]}
    {"channel":"ohlc","type":"update","data":[{"symbol":"BTC/USD","open":83729.5,...,"trades":33,
      "interval_begin":"2026-09-25T17:48:00.000000000Z","interval":1,"timestamp":"..."}]}
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from functools import lru_cache
from typing import Any, Mapping, NamedTuple, Union

from .timeutils import UTC, parse_rfc3339
from .types import HistoricalCandle, HistoricalTrade

_SIDES = {"buy": "b", "sell": "s"}
_ORD_TYPES = {"limit": "l", "market": "m"}


class FrameError(ValueError):
    """A frame that is not valid JSON, not a v2 message we know, or missing a field."""

    def __init__(self, reason: str, text: str) -> None:
        self.reason = reason
        self.text = text
        shown = text if len(text) <= 500 else text[:500] + "..."
        super().__init__(f"{reason}: {shown!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class StatusMessage:
    """Sent on connect (and on exchange state changes); ``connection_id`` exceeds 2^63."""

    system: str
    version: str | None = None
    api_version: str | None = None
    connection_id: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class HeartbeatMessage:
    """Liveness only: says nothing about whether any subscription works."""


@dataclass(frozen=True, slots=True, kw_only=True)
class MethodResponse:
    """An answer to a request: subscribe/unsubscribe acks (one per symbol), pong, errors.

    A refused subscribe carries ``symbol`` and ``error`` but no ``channel``; ``req_id`` is
    echoed when the request carried one.
    """

    method: str
    success: bool
    req_id: int | None = None
    channel: str | None = None
    symbol: str | None = None
    interval: int | None = None
    error: str | None = None
    time_in: datetime | None = None
    time_out: datetime | None = None
    warnings: tuple[str, ...] = ()


class WsTrade(NamedTuple):
    """One trade as the v2 ``trade`` channel sent it, already in our units (Decimal, aware UTC,
    side/ord_type as the REST letters). Same field names as HistoricalTrade, so
    ``TradeRecord.from_trade`` takes either; a light tuple because a busy pair sends tens of
    thousands a second and validation happens once, when the record is built."""

    symbol: str
    trade_id: int
    time: datetime
    price: Decimal
    volume: Decimal
    side: str | None
    ord_type: str | None

    def to_historical(self) -> HistoricalTrade:
        return HistoricalTrade(**self._asdict())


@dataclass(frozen=True, slots=True, kw_only=True)
class TradeMessage:
    """One ``trade`` frame: several trades, possibly of several symbols, oldest first."""

    snapshot: bool
    trades: tuple[WsTrade | HistoricalTrade, ...] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True, kw_only=True)
class OhlcMessage:
    """One ``ohlc`` frame; each candle's ``time`` is its ``interval_begin``, and the running
    candle is re-sent on every update (no "closed" flag)."""

    snapshot: bool
    candles: tuple[HistoricalCandle, ...] = field(default_factory=tuple)


Message = Union[StatusMessage, HeartbeatMessage, MethodResponse, TradeMessage, OhlcMessage]


def loads(text: str | bytes) -> Any:
    """JSON with every non-integer number as Decimal."""
    return json.loads(text, parse_float=Decimal)


def parse_frame(text: str | bytes) -> Message:
    """Parse one text frame; raises FrameError for anything unreadable or unknown."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise FrameError("frame is not UTF-8", repr(text)) from None
    try:
        obj = loads(text)
    except ValueError as exc:
        raise FrameError(f"invalid JSON ({exc})", text) from None
    if not isinstance(obj, dict):
        raise FrameError("frame is not a JSON object", text)
    try:
        if "method" in obj:
            return _method_response(obj)
        channel = obj.get("channel")
        if channel == "heartbeat":
            return HeartbeatMessage()
        if channel == "trade":
            return TradeMessage(
                snapshot=_message_type(obj) == "snapshot",
                trades=tuple(parse_trade(item) for item in _data(obj)),
            )
        if channel == "ohlc":
            return OhlcMessage(
                snapshot=_message_type(obj) == "snapshot",
                candles=tuple(parse_candle(item) for item in _data(obj)),
            )
        if channel == "status":
            return _status(_data(obj))
        if "error" in obj:  # an error answer with no method (e.g. a request we could not send right)
            return MethodResponse(method="", success=False, error=str(obj["error"]), req_id=_opt_int(obj, "req_id"))
    except FrameError:
        raise
    except (KeyError, TypeError, ValueError, ArithmeticError) as exc:
        raise FrameError(f"bad {obj.get('channel') or obj.get('method')} frame ({exc!r})", text) from None
    raise FrameError(f"unknown channel {channel!r}", text)


def parse_trade(item: Mapping[str, Any]) -> WsTrade:
    """One v2 trade item → WsTrade (side/ord_type as the REST letters b/s, l/m)."""
    side = item.get("side")
    ord_type = item.get("ord_type")
    if side is not None and side not in _SIDES:
        raise ValueError(f"unknown side {side!r}")
    if ord_type is not None and ord_type not in _ORD_TYPES:
        raise ValueError(f"unknown ord_type {ord_type!r}")
    return WsTrade(
        _str(item, "symbol"),
        _int(item, "trade_id"),
        parse_timestamp(_str(item, "timestamp")),
        _number(item, "price"),
        _number(item, "qty"),
        _SIDES[side] if side else None,
        _ORD_TYPES[ord_type] if ord_type else None,
    )


@lru_cache(maxsize=4096)
def parse_timestamp(text: str) -> datetime:
    """RFC 3339 → aware UTC datetime truncated to the microsecond; cached, because a burst of
    trades shares one timestamp. The C ``fromisoformat`` (3.11+) reads ``Z`` and nanoseconds;
    anything it refuses goes through the general parser."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        return parse_rfc3339(text)
    if value.tzinfo is None:
        raise ValueError(f"timestamp without a zone: {text!r}")
    return value if value.tzinfo is UTC else value.astimezone(UTC)


def parse_candle(item: Mapping[str, Any]) -> HistoricalCandle:
    """One v2 ohlc item → HistoricalCandle at ``interval_begin`` (the row ``timestamp`` is the
    interval END and deprecated, so it is ignored)."""
    return HistoricalCandle(
        symbol=_str(item, "symbol"),
        interval=_int(item, "interval"),
        time=parse_timestamp(_str(item, "interval_begin")),
        open=_number(item, "open"),
        high=_number(item, "high"),
        low=_number(item, "low"),
        close=_number(item, "close"),
        volume=_number(item, "volume"),
        vwap=_number(item, "vwap") if item.get("vwap") is not None else None,
        trades=_int(item, "trades"),
    )


def _method_response(obj: Mapping[str, Any]) -> MethodResponse:
    result = obj.get("result")
    result = result if isinstance(result, dict) else {}
    warnings = result.get("warnings") or obj.get("warnings") or ()
    interval = result.get("interval")
    return MethodResponse(
        method=_str(obj, "method"),
        success=bool(obj.get("success", obj.get("method") == "pong")),
        req_id=_opt_int(obj, "req_id"),
        channel=result.get("channel"),
        symbol=result.get("symbol") or obj.get("symbol"),
        interval=int(interval) if isinstance(interval, int) and not isinstance(interval, bool) else None,
        error=str(obj["error"]) if obj.get("error") is not None else None,
        time_in=parse_rfc3339(obj["time_in"]) if isinstance(obj.get("time_in"), str) else None,
        time_out=parse_rfc3339(obj["time_out"]) if isinstance(obj.get("time_out"), str) else None,
        warnings=tuple(str(w) for w in warnings),
    )


def _status(data: list[Any]) -> StatusMessage:
    if not data or not isinstance(data[0], dict):
        raise ValueError("status without data")
    info = data[0]
    connection_id = info.get("connection_id")
    return StatusMessage(
        system=_str(info, "system"),
        version=info.get("version"),
        api_version=info.get("api_version"),
        connection_id=connection_id if isinstance(connection_id, int) else None,
    )


def _message_type(obj: Mapping[str, Any]) -> str:
    kind = obj.get("type")
    if kind not in ("snapshot", "update"):
        raise ValueError(f"type must be 'snapshot' or 'update', got {kind!r}")
    return kind


def _data(obj: Mapping[str, Any]) -> list[Any]:
    data = obj.get("data")
    if not isinstance(data, list):
        raise ValueError("data must be a list")
    for item in data:
        if not isinstance(item, dict):
            raise ValueError("data items must be objects")
    return data


def _str(item: Mapping[str, Any], key: str) -> str:
    value = item[key]
    if not isinstance(value, str) or not value:
        raise ValueError(f"{key} must be a non-empty string, got {value!r}")
    return value


def _int(item: Mapping[str, Any], key: str) -> int:
    value = item[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{key} must be an integer, got {value!r}")
    return value


def _opt_int(item: Mapping[str, Any], key: str) -> int | None:
    value = item.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _number(item: Mapping[str, Any], key: str) -> Decimal:
    """A JSON number as Decimal (integers too: ``"price":84000`` has no decimal point)."""
    value = item[key]
    if type(value) is Decimal:  # from parse_float: always finite (NaN/Infinity come as floats)
        return value
    if isinstance(value, bool) or not isinstance(value, (int, Decimal)):
        raise ValueError(f"{key} must be a JSON number, got {value!r}")
    result = Decimal(value)
    if not result.is_finite():
        raise ValueError(f"{key} must be finite, got {value!r}")
    return result
