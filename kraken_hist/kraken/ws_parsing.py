"""Kraken WebSocket v2 frames → typed messages, pure (no sockets, no clocks).

Numbers on the v2 wire are JSON numbers (``"price":83744.3``), so frames are read with
``json.loads(text, parse_float=Decimal)`` and never pass through a binary float. A frame we
cannot read raises :class:`FrameError` carrying its text; the client logs and skips it. A
trade or ohlc item of the right shape whose values cannot be right (``bounds``: a time
outside Kraken's life, a price or volume not finite and positive, an id <= 0) is left out of
its message and recorded in the message's ``refused`` (the other items go on); the client
logs and counts those too.

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

from kraken_hist.core.bounds import count_problem, price_problem, time_problem, time_window, trade_id_problem, volume_problem
from kraken_hist.core.timeutils import UTC, check_aware, parse_rfc3339, utcnow
from kraken_hist.core.types import HistoricalCandle, HistoricalTrade, Refused

_SIDES = {"buy": "b", "sell": "s"}
_ORD_TYPES = {"limit": "l", "market": "m"}


class FrameError(ValueError):
    """A frame that is not valid JSON, not a v2 message we know, or missing a field."""

    def __init__(self, reason: str, text: str) -> None:
        self.reason = reason
        self.text = text
        shown = text if len(text) <= 500 else text[:500] + "..."
        super().__init__(f"{reason}: {shown!r}")


class RefusedItem(ValueError):
    """An item of the right shape with a value that cannot be right (``bounds``); the frame
    parser leaves it out of its message and records it in the message's ``refused``."""

    def __init__(self, problem: str, trade_id: int | None = None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.trade_id = trade_id


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
    refused: tuple[Refused, ...] = ()  # items left out: impossible values, with the id when readable


@dataclass(frozen=True, slots=True, kw_only=True)
class OhlcMessage:
    """One ``ohlc`` frame; each candle's ``time`` is its ``interval_begin``, and the running
    candle is re-sent on every update (no "closed" flag)."""

    snapshot: bool
    candles: tuple[HistoricalCandle, ...] = field(default_factory=tuple)
    refused: tuple[Refused, ...] = ()  # items left out: impossible values


Message = Union[StatusMessage, HeartbeatMessage, MethodResponse, TradeMessage, OhlcMessage]


def loads(text: str | bytes) -> Any:
    """JSON with every non-integer number as Decimal."""
    return json.loads(text, parse_float=Decimal)


def parse_frame(text: str | bytes, now: datetime | None = None) -> Message:
    """Parse one text frame; raises FrameError for anything unreadable or unknown. Trade and
    ohlc items with impossible values (times judged against `now`, default the wall clock)
    are left out and listed in the message's ``refused``."""
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
            kind = _message_type(obj)
            trades, refused = _items(parse_trade, obj, f"trade {kind}", now)
            return TradeMessage(snapshot=kind == "snapshot", trades=trades, refused=refused)
        if channel == "ohlc":
            kind = _message_type(obj)
            candles, refused = _items(parse_candle, obj, f"ohlc {kind}", now)
            return OhlcMessage(snapshot=kind == "snapshot", candles=candles, refused=refused)
        if channel == "status":
            return _status(_data(obj))
        if "error" in obj:  # an error answer with no method (e.g. a request we could not send right)
            return MethodResponse(method="", success=False, error=str(obj["error"]), req_id=_opt_int(obj, "req_id"))
    except FrameError:
        raise
    except (KeyError, TypeError, ValueError, ArithmeticError) as exc:
        raise FrameError(f"bad {obj.get('channel') or obj.get('method')} frame ({exc!r})", text) from None
    raise FrameError(f"unknown channel {channel!r}", text)


def _items(parse: Any, obj: Mapping[str, Any], what: str, now: datetime | None) -> tuple[tuple[Any, ...], tuple[Refused, ...]]:
    """Each data item parsed with `parse`; refused items apart, each with a one-line reason."""
    now = utcnow() if now is None else check_aware(now, "now")
    window = time_window(now)
    parsed: list[Any] = []
    refused: list[Refused] = []
    for number, item in enumerate(_data(obj)):
        try:
            parsed.append(parse(item, now, window=window))
        except RefusedItem as exc:
            name = item.get("symbol")
            ident = "" if exc.trade_id is None else f" trade {exc.trade_id}"
            refused.append(Refused(exc.trade_id, f"{what} frame item {number} ({name}{ident}): {exc.problem}",
                                   _possible_time(item, now), name if isinstance(name, str) else None))
    return tuple(parsed), tuple(refused)


def _possible_time(item: Mapping[str, Any], now: datetime) -> datetime | None:
    """A refused trade item's ``timestamp`` when it is readable and possible, else None."""
    stamp = item.get("timestamp")
    try:
        when = parse_timestamp(stamp) if isinstance(stamp, str) else None
    except ValueError:
        return None
    return when if when is not None and time_problem(when, now) is None else None


def parse_trade(item: Mapping[str, Any], now: datetime | None = None, *,
                window: tuple[datetime, datetime] | None = None) -> WsTrade:
    """One v2 trade item → WsTrade (side/ord_type as the REST letters b/s, l/m). ValueError
    for an item not of the v2 shape; its subclass RefusedItem for impossible values (time
    outside ``bounds`` given `now` (default the wall clock), price or qty not finite and
    positive, trade_id <= 0). `window` is ``bounds.time_window(now)``, computed once a frame."""
    side = item.get("side")
    ord_type = item.get("ord_type")
    if side is not None and side not in _SIDES:
        raise ValueError(f"unknown side {side!r}")
    if ord_type is not None and ord_type not in _ORD_TYPES:
        raise ValueError(f"unknown ord_type {ord_type!r}")
    symbol = _str(item, "symbol")
    trade_id = _int(item, "trade_id")
    when = parse_timestamp(_str(item, "timestamp"))
    price, qty = _wire_number(item, "price"), _wire_number(item, "qty")
    problem = trade_id_problem(trade_id)
    if problem is not None:
        raise RefusedItem(problem, trade_id)
    _check_time(when, "timestamp", window, now, trade_id)
    return WsTrade(
        symbol,
        trade_id,
        when,
        _checked(price, "price", trade_id),
        _checked(qty, "qty", trade_id),
        _SIDES[side] if side else None,
        _ORD_TYPES[ord_type] if ord_type else None,
    )


def _check_time(when: datetime, key: str, window: tuple[datetime, datetime] | None, now: datetime | None,
                trade_id: int | None = None) -> None:
    """RefusedItem unless `when` is within ``bounds`` (`window`: ``time_window(now)``, given
    when many items are checked against one `now`)."""
    if now is None:
        now = utcnow()
    start, end = window if window is not None else time_window(now)
    if not start <= when < end:
        raise RefusedItem(time_problem(when, now, key) or f"{key} is out of range", trade_id)


def _wire_number(item: Mapping[str, Any], key: str) -> Decimal | float:
    """A JSON number as Decimal, or the float of a ``NaN``/``Infinity`` token (parse_float
    turned every finite number into a Decimal): a value for :func:`_checked` to refuse."""
    value = item[key]
    return value if type(value) is float else _number(item, key)


def _checked(value: Decimal | float, key: str, trade_id: int | None = None, *, zero_ok: bool = False) -> Decimal:
    """A price (positive), a qty (positive) or a candle's volume/vwap (`zero_ok`), checked by ``bounds``."""
    if isinstance(value, float):
        raise RefusedItem(f"{key} {value} is not a finite number", trade_id)
    problem = volume_problem(value, key, zero_ok=True) if zero_ok else price_problem(value, key)
    if problem is not None:
        raise RefusedItem(problem, trade_id)
    return value


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


def parse_candle(item: Mapping[str, Any], now: datetime | None = None, *,
                 window: tuple[datetime, datetime] | None = None) -> HistoricalCandle:
    """One v2 ohlc item → HistoricalCandle at ``interval_begin`` (the row ``timestamp`` is the
    interval END and deprecated, so it is ignored). ValueError for an item not of the v2
    shape; RefusedItem for impossible values (``interval_begin`` outside ``bounds``, prices
    not finite and positive, volume or vwap not finite and non-negative, trades < 0)."""
    symbol = _str(item, "symbol")
    interval = _int(item, "interval")
    when = parse_timestamp(_str(item, "interval_begin"))
    trades = _int(item, "trades")
    prices = [_wire_number(item, key) for key in ("open", "high", "low", "close")]
    volume = _wire_number(item, "volume")
    vwap = _wire_number(item, "vwap") if item.get("vwap") is not None else None
    _check_time(when, "interval_begin", window, now)
    problem = count_problem(trades)
    if problem is not None:
        raise RefusedItem(problem)
    o, h, low, c = (_checked(value, key) for value, key in zip(prices, ("open", "high", "low", "close")))
    return HistoricalCandle(
        symbol=symbol,
        interval=interval,
        time=when,
        open=o,
        high=h,
        low=low,
        close=c,
        volume=_checked(volume, "volume", zero_ok=True),
        vwap=_checked(vwap, "vwap", zero_ok=True) if vwap is not None else None,
        trades=trades,
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
