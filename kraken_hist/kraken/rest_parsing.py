"""Kraken REST answers → our records. Pure: text and decoded JSON in, typed values out.

The wire shape is kept apart from the domain types: rows are decoded as Kraken sends them
and turned into ``HistoricalTrade`` / ``OhlcRow`` by named functions. Numbers are read from
their text (``json.loads(text, parse_float=Decimal)``) because the trade time is a JSON float
with up to 7 decimals (``1762795433.9717445``) that a binary float cannot hold.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, TypeVar

from kraken_hist.core.bounds import count_problem, plain_decimal_text, price_problem, trade_id_problem, unix_seconds_problem, volume_problem
from kraken_hist.core.pairs import PairRegistry
from kraken_hist.core.timeutils import EPOCH, check_aware, from_unix_decimal, parse_rfc3339, utcnow
from kraken_hist.core.types import CandleRecord, CandleSource, HistoricalCandle, HistoricalTrade, Refused

logger = logging.getLogger(__name__)

_SIDES = frozenset(("b", "s"))
_ORD_TYPES = frozenset(("m", "l"))
T = TypeVar("T")


class ParseError(ValueError):
    """An answer that does not have the shape Kraken documents."""


class RefusedRow(ParseError):
    """A row of Kraken's shape holding a value that cannot be right (``bounds``): a page
    parser leaves it out and records it as :class:`~kraken_hist.core.types.Refused`."""

    def __init__(self, problem: str, trade_id: int | None = None, time: datetime | None = None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.trade_id = trade_id
        self.time = time


def loads(text: str | bytes) -> Any:
    """Decode a Kraken JSON answer with every float as an exact Decimal (and the non-standard
    ``NaN``/``Infinity`` tokens as Decimal too, so the rows holding them are refused by value)."""
    try:
        return json.loads(text, parse_float=Decimal, parse_constant=Decimal)
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
    #: Rows left out because a value cannot be right (``bounds``), with the id when readable.
    refused: tuple[Refused, ...] = ()

    @property
    def first_id(self) -> int | None:
        return self.trades[0].trade_id if self.trades else None

    @property
    def last_id(self) -> int | None:
        return self.trades[-1].trade_id if self.trades else None

    def seen_ids(self) -> list[int]:
        """Sorted ids Kraken sent on this page, refused trades included: a refused trade is
        not a hole in the id sequence (fetching it again gives the same refused row)."""
        ids = [t.trade_id for t in self.trades]
        ids += [r.trade_id for r in self.refused if r.trade_id is not None and trade_id_problem(r.trade_id) is None]
        return sorted(ids)

    def first_seen_id(self, at_least: int | None = None) -> int | None:
        """The smallest seen id (at least `at_least`), or None."""
        return next((i for i in self.seen_ids() if at_least is None or i >= at_least), None)

    @property
    def last_seen_id(self) -> int | None:
        ids = self.seen_ids()
        return ids[-1] if ids else None


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
    #: Rows left out because a value cannot be right (``bounds``).
    refused: tuple[Refused, ...] = ()

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


def parse_trade(
    symbol: str, row: Sequence[Any], _times: dict[Any, Any] | None = None, *, now: datetime | None = None
) -> HistoricalTrade:
    """``["105433.60000", "0.00027625", 1762795433.9717445, "b", "l", "", 10218208]`` → trade.

    Time is truncated to the microsecond from the number's text; side/order type are the
    taker's. A row not of this shape raises :class:`ParseError`; one whose values cannot be
    right (``bounds``: time outside Kraken's life given `now`, default the wall clock; a
    price or volume not finite and positive; an id outside ``[1, 2**63 - 1]``) raises its
    subclass :class:`RefusedRow`.
    """
    if not isinstance(row, (list, tuple)) or len(row) < 7:
        raise ParseError(f"trade row must have 7 fields [price, volume, time, side, type, misc, id], got {row!r}")
    price, volume, when, side, ord_type, _misc, trade_id = row[:7]
    if isinstance(trade_id, bool) or not isinstance(trade_id, int):
        raise ParseError(f"trade id must be an integer, got {trade_id!r}")
    problem = trade_id_problem(trade_id)
    if problem is not None:
        raise RefusedRow(problem, trade_id)
    now = utcnow() if now is None else now
    time = _trade_time(when, _times, now, trade_id)
    try:
        price_value = _checked(price, "price", trade_id, price_problem)
        volume_value = _checked(volume, "volume", trade_id, volume_problem)
    except RefusedRow as exc:
        exc.time = time  # possible: a refused trade is placed in time all the same
        raise
    return HistoricalTrade(
        symbol=symbol,
        trade_id=trade_id,
        time=time,
        price=price_value,
        volume=volume_value,
        side=side if side in _SIDES else None,
        ord_type=ord_type if ord_type in _ORD_TYPES else None,
    )


def parse_trades_result(
    result: Mapping[str, Any], symbol: str, *, now: datetime | None = None, since: str | None = None
) -> TradesPage:
    """A Trades ``result`` → :class:`TradesPage` for canonical `symbol`.

    Rows whose values cannot be right are left out of ``trades`` and recorded in
    ``refused`` (each reason names the field, the row and the page: `since` as asked, when
    given, and ``last``), and logged as warnings; ``last`` stays the cursor Kraken sent.
    """
    _key, rows = pair_entry(result)
    if not isinstance(rows, list):
        raise ParseError(f"trades must be a list, got {type(rows).__name__}")
    last = result.get("last")
    if last is None or isinstance(last, bool):
        raise ParseError("Trades result has no 'last' cursor")
    cursor = str(last)
    if not cursor.isdigit():
        raise ParseError(f"'last' must be integer nanoseconds, got {last!r}")
    now = utcnow() if now is None else check_aware(now, "now")
    times: dict[Any, Any] = {}  # trades of one taker order share a time: convert (and check) it once
    trades, refused = _parse_rows(
        rows, lambda row: parse_trade(symbol, row, times, now=now),
        f"{symbol} Trades page{'' if since is None else f' since={since}'} last={cursor}",
    )
    return TradesPage(symbol=symbol, trades=trades, last=cursor, refused=refused)


def _parse_rows(rows: list[Any], parse: Callable[[Any], T], where: str) -> tuple[list[T], tuple[Refused, ...]]:
    """Each row parsed; the refused ones apart, each with a one-line reason naming the row
    and `where` (the page), and logged as a warning."""
    parsed: list[T] = []
    refused: list[Refused] = []
    for number, row in enumerate(rows):
        try:
            parsed.append(parse(row))
        except RefusedRow as exc:
            item = f"{where} row {number}{'' if exc.trade_id is None else f' (trade {exc.trade_id})'}"
            refused.append(Refused(exc.trade_id, f"{item}: {exc.problem}", exc.time))
            logger.warning("refused %s", refused[-1].reason, extra={"event": "refused_row"})
    return parsed, tuple(refused)


def _checked(value: Any, field: str, trade_id: int | None, rule: Any) -> Decimal:
    """`value` read exactly and judged by `rule` (a ``bounds`` check); RefusedRow if it fails."""
    try:
        number = Decimal(value) if type(value) is str else _decimal(value, field)
    except ParseError:
        raise
    except (ValueError, ArithmeticError):
        raise RefusedRow(f"{field} {value!r} is not a number", trade_id) from None
    if number and type(value) is str and plain_decimal_text(value):
        return number  # Kraken's usual "105433.60000": positive and narrow by its text
    problem = rule(number, field)
    if problem is not None:
        raise RefusedRow(problem, trade_id)
    return number


def _trade_time(when: Any, cache: dict[Any, Any] | None, now: datetime, trade_id: int | None = None) -> datetime:
    """The time of a row, truncated to the microsecond; RefusedRow outside ``bounds``."""
    cacheable = cache is not None and (
        type(when) in (int, str) or (type(when) is Decimal and not when.is_nan())  # hashable, and equal to itself
    )
    found = cache.get(when) if cacheable else None  # type: ignore[union-attr]
    if found is None:
        found = _unix_time(when, now)
        if cacheable:
            cache[when] = found  # type: ignore[index]
    if isinstance(found, str):
        raise RefusedRow(found, trade_id)
    return found


def _unix_time(when: Any, now: datetime) -> datetime | str:
    """Unix seconds (a JSON number read exactly) → datetime, or the reason it cannot be right."""
    try:
        seconds = _exact(when, "time")
    except ParseError:
        raise
    except (ValueError, ArithmeticError):
        return f"time {when!r} is not a number"
    problem = unix_seconds_problem(seconds, now)
    return problem if problem is not None else from_unix_decimal(seconds)


def parse_ohlc_row(symbol: str, interval: int, row: Sequence[Any], *, now: datetime | None = None) -> OhlcRow:
    """``[1762777140, "106038.3", ..., "106038.3", "0.00032101", 1]`` → :class:`OhlcRow`.

    A row not of this shape raises :class:`ParseError`; one whose values cannot be right
    (time outside ``bounds`` given `now`, prices not finite and positive, volume or vwap not
    finite and non-negative, a count that is not a whole number >= 0) raises
    :class:`RefusedRow`."""
    if not isinstance(row, (list, tuple)) or len(row) < 8:
        raise ParseError(f"OHLC row must have 8 fields, got {row!r}")
    when, o, h, low, c, vwap, volume, count = row[:8]
    found = _unix_time(when, utcnow() if now is None else now)
    if isinstance(found, str):
        raise RefusedRow(found)
    if isinstance(count, bool) or not isinstance(count, (int, str)) or not str(count).isdigit():
        raise RefusedRow(f"count {count!r} is not a whole number")
    problem = count_problem(int(count), "count")
    if problem is not None:
        raise RefusedRow(problem)
    return OhlcRow(
        symbol=symbol,
        interval=interval,
        time=found,
        open=_checked(o, "open", None, price_problem),
        high=_checked(h, "high", None, price_problem),
        low=_checked(low, "low", None, price_problem),
        close=_checked(c, "close", None, price_problem),
        vwap=_checked(vwap, "vwap", None, _zero_ok),
        volume=_checked(volume, "volume", None, _zero_ok),
        count=int(count),
    )


def _zero_ok(value: Decimal, field: str) -> str | None:
    """A candle's volume or vwap: a filler candle has 0 of both."""
    return volume_problem(value, field, zero_ok=True)


def parse_ohlc_result(
    result: Mapping[str, Any], symbol: str, interval: int, *, now: datetime | None = None
) -> OhlcPage:
    """An OHLC ``result`` → :class:`OhlcPage`; ``last`` may come as an int or a string. Rows
    whose values cannot be right are left out and recorded in ``refused`` (and logged)."""
    _key, rows = pair_entry(result)
    if not isinstance(rows, list):
        raise ParseError(f"OHLC rows must be a list, got {type(rows).__name__}")
    last = result.get("last")
    try:
        last_seconds = int(str(last))
    except ValueError:
        raise ParseError(f"OHLC 'last' must be unix seconds, got {last!r}") from None
    now = utcnow() if now is None else check_aware(now, "now")
    parsed, refused = _parse_rows(rows, lambda row: parse_ohlc_row(symbol, interval, row, now=now),
                                  f"{symbol} OHLC {interval}m page last={last_seconds}")
    return OhlcPage(symbol=symbol, interval=interval, rows=parsed, last=last_seconds, refused=refused)


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

