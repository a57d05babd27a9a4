"""Immutable domain records. Decimal prices and volumes, timezone-aware UTC times, nothing else.

``HistoricalTrade``/``HistoricalCandle`` are what the exchange reported or the database holds;
``TradeRecord``/``CandleRecord`` are rows on their way into storage, tagged with their source
and validated on construction so a bad record never reaches a batch.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from kraken_hist.core.bounds import KRAKEN_FIRST_TRADE, MAX_CLOCK_SKEW, MAX_TRADE_ID, count_problem, time_problem
from kraken_hist.core.pairs import symbol_from_wsname
from kraken_hist.core.timeutils import UTC, check_aware, utcnow


class TradeSource(str, enum.Enum):
    """Where a stored trade came from."""

    REST = "rest"
    WEBSOCKET = "ws"
    CSV = "csv"


class CandleSource(str, enum.Enum):
    """Where a stored 1-minute candle came from; TRADES (built from stored trades) is authoritative."""

    TRADES = "trades"
    REST_OHLC = "rest_ohlc"
    WS_OHLC = "ws_ohlc"
    CSV_OHLC = "csv_ohlc"


class GapKind(str, enum.Enum):
    TRADE_IDS = "trade_ids"  # a jump in the contiguous trade-id sequence
    REFUSED = "refused"  # ids the exchange sent with impossible values: accounted for, never fetched
    UNCOVERED = "uncovered"  # a time range no source has covered
    CANDLES = "candles"  # trades stored but their minute's candle missing or stale


def _decimal(value: object, field: str) -> Decimal:
    if isinstance(value, Decimal):
        result = value
    elif isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            result = Decimal(value)
        except ArithmeticError:
            raise ValueError(f"{field} is not a number: {value!r}") from None
    else:
        raise ValueError(f"{field} must be a Decimal, int or str (never float), got {type(value).__name__}")
    if not result.is_finite():
        raise ValueError(f"{field} must be finite, got {value!r}")
    return result


def _positive(value: object, field: str) -> Decimal:
    result = _decimal(value, field)
    if result <= 0:
        raise ValueError(f"{field} must be positive, got {result}")
    return result


def _non_negative(value: object, field: str) -> Decimal:
    result = _decimal(value, field)
    if result < 0:
        raise ValueError(f"{field} must not be negative, got {result}")
    return result


_SYMBOL_SHAPE = re.compile(r"^[A-Z0-9.]{1,16}/[A-Z0-9.]{1,16}$")


def _symbol(value: str) -> str:
    """A canonical ``BASE/QUOTE`` name (legacy asset names mapped: ``XBT/USD`` → ``BTC/USD``).
    Other names (``XBTUSD``) need a pair registry, which a record does not have: the services
    that take names resolve them through theirs; whether the pair is one we store is for the
    writer to say, with the registry it was given."""
    if isinstance(value, str) and "/" in value:
        upper = value.strip().upper()
        if _SYMBOL_SHAPE.match(upper):
            return symbol_from_wsname(upper)
    raise ValueError(f"symbol must be a BASE/QUOTE name such as 'BTC/USD', got {value!r} "
                     "(a PairRegistry resolves Kraken's other names)")


#: A time known to be possible: an earlier wall-clock now plus the skew. Anything between
#: Kraken's first trade and it is possible now too (the clock only moves on), so most records
#: are judged without reading the clock.
_known_possible = [KRAKEN_FIRST_TRADE]


def _possible_time(value: object, field: str = "time") -> datetime:
    """An aware time within ``bounds`` (Kraken's life, up to now plus the clock skew)."""
    when = value if type(value) is datetime and value.tzinfo is UTC else check_aware(value, field)  # type: ignore[arg-type]
    if KRAKEN_FIRST_TRADE <= when <= _known_possible[0]:
        return when
    now = utcnow()
    problem = time_problem(when, now, field)
    if problem is not None:
        raise ValueError(problem)
    _known_possible[0] = now + MAX_CLOCK_SKEW
    return when


def _bigint(value: object, field: str = "trade_id") -> int:
    if type(value) is int and -MAX_TRADE_ID - 1 <= value <= MAX_TRADE_ID:
        return value
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{field} must be an int, got {value!r}")
    raise ValueError(f"{field} {value} does not fit a bigint")


@dataclass(frozen=True, slots=True)
class Refused:
    """Something an exchange answer held that cannot be right (``bounds``): left out of what
    the parser returns, and recorded with it. ``trade_id`` is the item's id when it could be
    read (a refused trade's id is still "seen": the id sequence has no hole there);
    ``reason`` is one line naming the field and where the item was; ``time`` is the item's time
    when that is possible (its price or volume was the problem), ``symbol`` its pair when the
    item named one (a WebSocket frame may mix pairs)."""

    trade_id: int | None
    reason: str
    time: datetime | None = None
    symbol: str | None = None

    def __str__(self) -> str:
        return self.reason


@dataclass(frozen=True, slots=True, kw_only=True)
class HistoricalTrade:
    """One trade as Kraken reported it. ``trade_id`` is Kraken's per-pair running number;
    trades from id-less sources (Time and Sales CSV) carry a negative synthetic id."""

    symbol: str
    trade_id: int
    time: datetime
    price: Decimal
    volume: Decimal
    side: str | None = None  # "b" | "s" (taker side), None when the source does not say
    ord_type: str | None = None  # "m" | "l", None when unknown

    def __post_init__(self) -> None:
        # Not bounded by the wall clock: the fake exchange schedules future trades as these.
        when = self.time
        if type(when) is not datetime or when.tzinfo is not UTC:
            when = check_aware(when, "time")
            object.__setattr__(self, "time", when)
        if when < KRAKEN_FIRST_TRADE:
            raise ValueError(f"time {when.isoformat()} is before Kraken's first trade ({KRAKEN_FIRST_TRADE.date()})")
        _bigint(self.trade_id)
        for name in ("price", "volume"):
            value = getattr(self, name)
            if type(value) is not Decimal or not value.is_finite():  # the parsers hand in finite Decimals
                object.__setattr__(self, name, _decimal(value, name))


@dataclass(frozen=True, slots=True, kw_only=True)
class TradeRecord:
    """A trade on its way into ``trades``; refused at construction if it cannot be right."""

    symbol: str
    trade_id: int
    time: datetime
    price: Decimal
    volume: Decimal
    side: str | None = None
    ord_type: str | None = None
    source: TradeSource = TradeSource.REST

    def __post_init__(self) -> None:
        object.__setattr__(self, "symbol", _symbol(self.symbol))
        _bigint(self.trade_id)
        object.__setattr__(self, "time", _possible_time(self.time))
        object.__setattr__(self, "price", _positive(self.price, "price"))
        object.__setattr__(self, "volume", _non_negative(self.volume, "volume"))
        if self.side not in (None, "b", "s"):
            raise ValueError(f"side must be 'b', 's' or None, got {self.side!r}")
        if self.ord_type not in (None, "m", "l"):
            raise ValueError(f"ord_type must be 'm', 'l' or None, got {self.ord_type!r}")
        object.__setattr__(self, "source", TradeSource(self.source))

    @classmethod
    def from_trade(cls, trade: HistoricalTrade, source: TradeSource) -> "TradeRecord":
        return cls(
            symbol=trade.symbol,
            trade_id=trade.trade_id,
            time=trade.time,
            price=trade.price,
            volume=trade.volume,
            side=trade.side,
            ord_type=trade.ord_type,
            source=source,
        )


def _check_ohlc(open_: Decimal, high: Decimal, low: Decimal, close: Decimal) -> None:
    if low > high:
        raise ValueError(f"low ({low}) must not exceed high ({high})")
    for name, value in (("open", open_), ("close", close)):
        if not low <= value <= high:
            raise ValueError(f"{name} ({value}) must lie between low ({low}) and high ({high})")


@dataclass(frozen=True, slots=True, kw_only=True)
class HistoricalCandle:
    """One candle of any interval; ``time`` is the bucket's start (UTC)."""

    symbol: str
    interval: int  # minutes
    time: datetime
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    volume: Decimal
    vwap: Decimal | None
    trades: int

    @property
    def end(self) -> datetime:
        return self.time + timedelta(minutes=self.interval)


@dataclass(frozen=True, slots=True, kw_only=True)
class CandleRecord:
    """A 1-minute candle on its way into ``candles``; ``time`` must be a whole minute."""

    symbol: str
    time: datetime
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    volume: Decimal
    vwap: Decimal | None
    trades: int
    source: CandleSource = CandleSource.TRADES

    def __post_init__(self) -> None:
        object.__setattr__(self, "symbol", _symbol(self.symbol))
        when = _possible_time(self.time)
        if when.second or when.microsecond:
            raise ValueError(f"time must be the start of a minute, got {when.isoformat()}")
        object.__setattr__(self, "time", when)
        for name in ("open", "high", "low", "close"):
            object.__setattr__(self, name, _positive(getattr(self, name), name))
        object.__setattr__(self, "volume", _non_negative(self.volume, "volume"))
        if self.vwap is not None:
            object.__setattr__(self, "vwap", _non_negative(self.vwap, "vwap"))
        problem = count_problem(self.trades)
        if problem is not None:
            raise ValueError(problem)
        _check_ohlc(self.open, self.high, self.low, self.close)
        object.__setattr__(self, "source", CandleSource(self.source))


@dataclass(frozen=True, slots=True, kw_only=True)
class DataGap:
    """A hole in stored data: ``[start, end)`` in time, and the missing trade ids when known."""

    symbol: str
    kind: GapKind
    start: datetime
    end: datetime
    first_missing_id: int | None = None
    last_missing_id: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "start", check_aware(self.start, "start"))
        object.__setattr__(self, "end", check_aware(self.end, "end"))
        if self.end < self.start:
            raise ValueError(f"gap end {self.end.isoformat()} is before its start {self.start.isoformat()}")
        object.__setattr__(self, "kind", GapKind(self.kind))

    @property
    def minutes(self) -> float:
        return (self.end - self.start).total_seconds() / 60

    @property
    def missing_ids(self) -> int | None:
        if self.first_missing_id is None or self.last_missing_id is None:
            return None
        return self.last_missing_id - self.first_missing_id + 1
