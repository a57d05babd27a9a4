"""Information bars from stored trades, in SQL: tick bars (every N trades), volume bars (every V
base units), value bars (every Q quote units).

The rule (one place; ``tests/test_bars.py`` holds a plain-Python twin):

* Trades are taken in Kraken's order (time, then id) from `start`, and a running total is
  kept of the bar's measure — 1 per trade, the volume, or price × volume. A trade belongs to
  bar ``k = floor(total before it / size)``: bar k closes with the trade that makes the total
  reach ``(k + 1) · size``, and the next trade opens the next bar. A trade is never split; a
  trade that carries the total past several thresholds closes one bar (bar numbers then skip).
  Tick bars hold exactly N trades. Bars are fixed to the thresholds of the running total (not
  restarted at each bar), which is what lets SQL compute them without visiting trades one by one.
* A bar is complete when the total over ``[start, end)`` reached its threshold; only complete
  bars are returned unless asked (the last one is usually still forming — no look-ahead).
* Columns: those of a candle (open/close = first/last trade, high, low, volume, trades, vwap)
  plus the first and last trade's id and time. vwap is volume-weighted like every candle
  interval: a minute during which the running total crosses no threshold lies wholly inside
  one bar and counts with its 1-minute vwap (Kraken's rule: Σp·v/Σv rounded down to the pair's
  price decimals); the trades of a minute in which a threshold falls count with their own
  price. The bar's vwap is handed out like every interval's: at the pair's price decimals,
  rounded down (``aggregates.vwap_at_decimals``) — within one price tick of Σp·v/Σv of its trades.

How it is fast: the minutes of ``[start, end)`` come from the stored 1-minute candles built
from trades (the "minute index"), so a year is ~525k minute rows, not millions of trades: one
ordered pass keeps the running total and sums the minutes in which no threshold falls per bar.
Only the minutes in which a threshold falls — and the minutes cut by `start` and `end` — are
read trade by trade. Value bars need Σp·v per minute, which candles do not keep, so they (and
``from_trades=True``) build the minute index from the trades themselves — exact whatever the
candles say, and slower. The candle index is as good as the candles: a minute whose candle
disagrees with its trades is a ``candles`` gap (``kraken-hist gaps`` finds it, ``--fill``
repairs it). A long range from the candle index is cut into as many pieces as the server gives
one parallel query processes, computed at once on the caller's connection and others opened like
it, in one snapshot; a later piece's running total starts from the sum of the range before it
(from the same candles), and a bar two pieces share is joined.
"""

from __future__ import annotations

import enum
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from contextlib import ExitStack
from itertools import repeat
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import ROUND_DOWN, Decimal, localcontext
from typing import Any

import pandas as pd
import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from kraken_hist.core.timeutils import UTC, floor_minute


class BarKind(str, enum.Enum):
    """What a bar's running total counts."""

    TICK = "tick"  # trades
    VOLUME = "volume"  # base units
    VALUE = "value"  # quote units (price × volume)


@dataclass(frozen=True, slots=True, kw_only=True)
class InformationBar:
    """One bar: candle columns plus its first/last trade. ``time`` is its first trade's time,
    ``end_time`` its last trade's; ``number`` is k (the threshold it closes at is (k+1)·size)."""

    symbol: str
    kind: BarKind
    size: Decimal
    number: int
    time: datetime
    end_time: datetime
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    volume: Decimal
    vwap: Decimal | None
    trades: int
    first_trade_id: int
    last_trade_id: int
    complete: bool


#: Columns of a bar DataFrame, in order (index: UTC ``DatetimeIndex`` named ``time``).
BAR_FRAME_COLUMNS = ("end_time", "open", "high", "low", "close", "volume", "vwap", "trades",
                     "first_trade_id", "last_trade_id", "complete")

#: A range at least this long (from the candle index) is computed in pieces at once.
PARALLEL_SPAN = timedelta(days=14)

# The measure of a trade row, of a minute summed from trades, of a candle (SQL, never user input).
_TRADE_MEASURE = {BarKind.TICK: "1", BarKind.VOLUME: "volume", BarKind.VALUE: "price * volume"}
_MINUTE_MEASURE = {BarKind.TICK: "n", BarKind.VOLUME: "v", BarKind.VALUE: "val"}
_CANDLE_MEASURE = {BarKind.TICK: "trades::bigint", BarKind.VOLUME: "volume"}

#: The minute index from candles built from trades: whole minutes ``[c_lo, c_hi)``, in key order.
_MINUTES_FROM_CANDLES = """
        SELECT time AS minute, trades::bigint AS n, volume AS v, high, low, vwap, {x} AS x
        FROM candles
        WHERE symbol = %(symbol)s AND source = 'trades' AND time >= %(c_lo)s AND time < %(c_hi)s
        ORDER BY time"""

#: ... or summed from the trades of ``[lo, hi)``: the 1-minute candle rule of
#: ``rules.sql.MINUTE_CANDLES_FROM_TRADES`` (vwap truncated to the pair's decimals) plus Σp·v.
_MINUTES_FROM_TRADES = """
        SELECT minute, n, v, high, low, vwap, {x} AS x FROM (
            SELECT date_trunc('minute', time) AS minute, count(*)::bigint AS n, sum(volume) AS v,
                   sum(price * volume) AS val, max(price) AS high, min(price) AS low,
                   CASE WHEN sum(volume) > 0 THEN trunc(sum(price * volume) / sum(volume), %(decimals)s) ELSE 0 END
                   AS vwap
            FROM trades
            WHERE symbol = %(symbol)s AND time >= %(lo)s AND time < %(hi)s
            GROUP BY 1) per_minute
        ORDER BY minute"""

#: The running total before ``lo`` when the query is the second half of a range: the first
#: half's cut minute [ot_lo, ot_hi) and whole minutes [oc_lo, oc_hi).
_OFFSET = """(SELECT coalesce(sum({tx}), 0) FROM trades
            WHERE symbol = %(symbol)s AND time >= %(ot_lo)s AND time < %(ot_hi)s)
           + (SELECT coalesce(sum({cx}), 0) FROM candles
              WHERE symbol = %(symbol)s AND source = 'trades' AND time >= %(oc_lo)s AND time < %(oc_hi)s)"""

# How the query goes:
# * cuts: the measures of the minute cut by `start` ([lo, f_hi)) and by `end` ([l_lo, hi)),
#   read from trades, and the running total before lo (o: 0 unless second half).
# * groups: one ordered pass over the minute index keeps the running total (`after` a minute;
#   `before` = after - its measure) and groups the minutes by the bar the total is in after
#   them. A minute in which a threshold falls ("split": after mod size < its measure) is the
#   first of its group; the others lie wholly in that bar and are summed as they are.
# * splits: the minutes read trade by trade — the split ones, and the cut minutes — with
#   hb, the bar of their first trade; r, what is left to hb's threshold; multi, whether more
#   than one threshold falls in them (the bar after them is past hb + 1); whole, a cut minute
#   in which none falls (its trades then weigh with the minute's truncated vwap, like any
#   minute wholly inside a bar).
# * pieces: each such minute's trades in (time, id) order with the running total c before each
#   (from 0 at the minute's start): a trade's bar is hb + k, k = the thresholds at or below c.
#   Pieces are grouped by bar and by whether they are the bar's head — the part at the start
#   of a minute that continues a bar begun earlier (is_head), which comes after that bar's
#   whole minutes — or not (the bar begins inside the minute). A piece's first and last trade
#   are found from the trade before and after it (lag, lead).
# * bars: a bar is [its piece that begins it] [its whole minutes] [its head piece]; a bar that
#   begins (ends) with a whole minute takes that minute's first (last) trade in [lo, hi).
_BARS = """
WITH cuts AS MATERIALIZED (
    SELECT (SELECT coalesce(sum({tx}), 0) FROM trades
            WHERE symbol = %(symbol)s AND time >= %(lo)s AND time < %(f_hi)s) AS f,
           (SELECT coalesce(sum({tx}), 0) FROM trades
            WHERE symbol = %(symbol)s AND time >= %(l_lo)s AND time < %(hi)s) AS l,
           {offset} AS o
), groups AS MATERIALIZED (
    SELECT bar_after AS bar,
           min(minute) FILTER (WHERE NOT split) AS first_minute, max(minute) FILTER (WHERE NOT split) AS last_minute,
           max(high) FILTER (WHERE NOT split) AS high, min(low) FILTER (WHERE NOT split) AS low,
           sum(v) FILTER (WHERE NOT split) AS volume, sum(vwap * v) FILTER (WHERE NOT split) AS weight,
           sum(n) FILTER (WHERE NOT split) AS trades,
           max(minute) FILTER (WHERE split) AS split_minute, max(after - x) FILTER (WHERE split) AS split_before,
           max(after) AS after
    FROM (SELECT minute, n, v, high, low, vwap, x, {c0}sum(x) OVER w AS after,
                 div({c0}sum(x) OVER w, %(size)s)::bigint AS bar_after,
                 mod({c0}sum(x) OVER w, %(size)s) < x AS split
          FROM ({minutes}) m
          WINDOW w AS (ORDER BY minute ROWS UNBOUNDED PRECEDING)) per_minute
    GROUP BY bar_after
), splits AS MATERIALIZED (
    SELECT minute, hb, (hb + 1) * %(size)s - before AS r, head_ok, ba > hb + 1 AS multi, cut AND ba = hb AS whole
    FROM (SELECT minute, before, div(before, %(size)s)::bigint AS hb, ba, head_ok, cut
          FROM (SELECT split_minute AS minute, split_before AS before, bar AS ba, true AS head_ok, false AS cut
                FROM groups WHERE split_minute IS NOT NULL
                UNION ALL
                SELECT %(f_minute)s::timestamptz, o, div(o + f, %(size)s)::bigint, false, true FROM cuts
                WHERE %(f_hi)s::timestamptz > %(lo)s
                UNION ALL
                SELECT %(l_lo)s::timestamptz, before, div(before + l, %(size)s)::bigint, true, true
                FROM (SELECT coalesce((SELECT max(after) FROM groups), o + f) AS before, l FROM cuts) last_cut
                WHERE %(l_lo)s::timestamptz < %(hi)s) listed) numbered
    ORDER BY minute
), pieces AS (
    SELECT bar, is_head,
           max(time) FILTER (WHERE opens) AS first_time, max(trade_id) FILTER (WHERE opens) AS first_id,
           max(price) FILTER (WHERE opens) AS first_price,
           max(time) FILTER (WHERE closes) AS last_time, max(trade_id) FILTER (WHERE closes) AS last_id,
           max(price) FILTER (WHERE closes) AS last_price,
           max(price) AS high, min(price) AS low, sum(volume) AS volume,
           CASE WHEN bool_or(whole) THEN trunc(sum(price * volume) / nullif(sum(volume), 0), %(decimals)s) * sum(volume)
                ELSE sum(price * volume) END AS weight,
           count(*) AS trades
    FROM (SELECT time, trade_id, price, volume, whole,
                 hb + CASE WHEN c < r THEN 0 WHEN NOT multi THEN 1 ELSE 1 + div(c - r, %(size)s)::bigint END AS bar,
                 head_ok AND c < r AS is_head,
                 prev IS NULL OR (c >= r AND (c - prev < r OR multi
                                              AND div(c - prev - r, %(size)s) < div(c - r, %(size)s))) AS opens,
                 following IS NULL OR (c < r AND c + x >= r)
                                   OR multi AND c >= r AND div(c + x - r, %(size)s) > div(c - r, %(size)s) AS closes
          FROM (SELECT t.time, t.trade_id, t.price, t.volume, {ttx} AS x, s.hb, s.r, s.head_ok, s.multi, s.whole,
                       sum({ttx}) OVER w - {ttx} AS c, lag({ttx}) OVER w AS prev, lead({ttx}) OVER w AS following
                FROM (SELECT * FROM splits ORDER BY minute) s
                CROSS JOIN LATERAL (
                    SELECT time, trade_id, price, volume FROM trades
                    WHERE symbol = %(symbol)s AND time >= s.minute AND time < s.minute + interval '1 minute'
                      AND time >= %(lo)s AND time < %(hi)s
                    OFFSET 0) t
                WINDOW w AS (PARTITION BY s.minute ORDER BY t.time, t.trade_id ROWS UNBOUNDED PRECEDING)) per_trade
          OFFSET 0) classified
    GROUP BY bar, is_head
), bars AS (
    SELECT bar, w.first_minute, w.last_minute,
           coalesce(o.first_time, h.first_time) AS first_time, coalesce(o.first_id, h.first_id) AS first_id,
           coalesce(o.first_price, h.first_price) AS first_price,
           coalesce(h.last_time, o.last_time) AS last_time, coalesce(h.last_id, o.last_id) AS last_id,
           coalesce(h.last_price, o.last_price) AS last_price,
           greatest(w.high, o.high, h.high) AS high, least(w.low, o.low, h.low) AS low,
           coalesce(w.volume, 0) + coalesce(o.volume, 0) + coalesce(h.volume, 0) AS volume,
           coalesce(w.weight, 0) + coalesce(o.weight, 0) + coalesce(h.weight, 0) AS weight,
           coalesce(w.trades, 0) + coalesce(o.trades, 0) + coalesce(h.trades, 0) AS trades
    FROM (SELECT * FROM groups WHERE trades IS NOT NULL) w
    FULL JOIN (SELECT * FROM pieces WHERE NOT is_head) o USING (bar)
    FULL JOIN (SELECT * FROM pieces WHERE is_head) h USING (bar)
)
SELECT b.bar, coalesce(f.time, b.first_time), coalesce(l.time, b.last_time),
       coalesce(f.price, b.first_price), b.high, b.low, coalesce(l.price, b.last_price), b.volume,
       CASE WHEN lag(b.bar) OVER o IS NULL OR lead(b.bar) OVER o IS NULL THEN b.weight END,  -- to join pieces
       CASE WHEN b.volume > 0 THEN trunc(div(b.weight * %(unit)s, b.volume) / %(unit)s, %(decimals)s) END,
       b.trades::bigint, coalesce(f.trade_id, b.first_id), coalesce(l.trade_id, b.last_id),
       b.bar < div(coalesce((SELECT max(after) FROM groups), (SELECT o + f FROM cuts)) + (SELECT l FROM cuts), %(size)s)
FROM bars b
LEFT JOIN LATERAL (
    SELECT time, trade_id, price FROM trades
    WHERE b.first_minute < coalesce(b.first_time, 'infinity') AND symbol = %(symbol)s
      AND time >= greatest(b.first_minute, %(lo)s) AND time < least(b.first_minute + interval '1 minute', %(hi)s)
    ORDER BY time, trade_id LIMIT 1) f ON true
LEFT JOIN LATERAL (
    SELECT time, trade_id, price FROM trades
    WHERE b.last_minute > coalesce(b.last_time, '-infinity') AND symbol = %(symbol)s
      AND time >= greatest(b.last_minute, %(lo)s) AND time < least(b.last_minute + interval '1 minute', %(hi)s)
    ORDER BY time DESC, trade_id DESC LIMIT 1) l ON true
WINDOW o AS (ORDER BY b.bar)
ORDER BY b.bar
"""


def bars_sql(kind: BarKind, *, from_trades: bool, first_cut: bool = True, offset: bool = False) -> str:
    """The bar query for `kind`, its minute index from candles or (`from_trades`, value bars)
    from trades. `first_cut`: the range starts inside a minute; `offset`: the running total
    starts from the sums named by ot_lo/ot_hi/oc_lo/oc_hi (the second half of a range, candle
    index only). Parameters: symbol, lo, hi, f_minute, f_hi, l_lo, c_lo, c_hi, size, decimals,
    unit (10 ** decimals) and the offset's."""
    kind = BarKind(kind)
    tx = _TRADE_MEASURE[kind]
    ttx = tx.replace("price", "t.price").replace("volume", "t.volume")
    if from_trades or kind is BarKind.VALUE:
        if offset:
            raise ValueError("an offset needs the candle index")
        minutes = _MINUTES_FROM_TRADES.format(x=_MINUTE_MEASURE[kind])
        first_cut = False  # the trades' own minutes include the cut ones
    else:
        minutes = _MINUTES_FROM_CANDLES.format(x=_CANDLE_MEASURE[kind])
    return _BARS.format(
        tx=tx, ttx=ttx, minutes=minutes,
        offset=_OFFSET.format(tx=tx, cx=_CANDLE_MEASURE.get(kind, "0")) if offset else "0",
        c0="(SELECT o + f FROM cuts) + " if first_cut or offset else "")


def check_size(kind: BarKind, size: Decimal | int | str) -> Decimal:
    """The bar size as an exact Decimal: positive and finite; a whole number of trades for tick bars."""
    if isinstance(size, (float, bool)):
        raise ValueError(f"bar size must be a Decimal, int or str (never float), got {size!r}")
    try:
        value = Decimal(size)
    except ArithmeticError:
        raise ValueError(f"bar size is not a number: {size!r}") from None
    if not value.is_finite() or value <= 0:
        raise ValueError(f"bar size must be positive, got {size!r}")
    if BarKind(kind) is BarKind.TICK and value != value.to_integral_value():
        raise ValueError(f"tick bars need a whole number of trades, got {size!r}")
    return value


def _ceil_minute(when: datetime) -> datetime:
    start = floor_minute(when)
    return start if start == when else start + timedelta(minutes=1)


def _ranges(lo: datetime, hi: datetime, *, candles: bool) -> dict[str, Any]:
    """How ``[lo, hi)`` is read (``lo < hi``): whole minutes [c_lo, c_hi) from candles, the
    minute cut by lo ([lo, f_hi)) and the one cut by hi ([l_lo, hi)) from trades; empty ranges
    are ``lo``/``hi`` on both sides. From trades, every minute comes from the trades."""
    out = {"lo": lo, "hi": hi, "f_minute": floor_minute(lo), "f_hi": lo, "l_lo": hi, "c_lo": lo, "c_hi": lo}
    if not candles:
        return out
    lo_min, hi_min = _ceil_minute(lo), floor_minute(hi)
    if lo_min >= hi_min:  # no whole minute: one minute cut (or two, when lo and hi are in neighbours)
        if floor_minute(lo) == floor_minute(hi) or hi <= lo_min:
            out["f_hi"] = hi
        else:
            out["f_hi"] = out["l_lo"] = lo_min
        return out
    out.update(c_lo=lo_min, c_hi=hi_min, f_hi=lo_min)
    if hi > hi_min:
        out["l_lo"] = hi_min
    return out


#: A row of the query: bar, first time, last time, open, high, low, close, volume, weight (of the
#: first and the last bar only: what joining pieces needs), vwap, trades, first id, last id, complete.
_Row = tuple[Any, ...]


def _run(conn: psycopg.Connection[Any], query: str, params: dict[str, Any]) -> list[_Row]:
    """`query`'s rows, inside a transaction the caller holds open."""
    conn.execute("SET LOCAL jit = off")  # compiling costs more than these scans (planners overestimate them)
    conn.execute("SET LOCAL work_mem = '256MB'")  # the running totals and the piece sums stay in memory
    return conn.execute(query, params).fetchall()


def _vwap(weight: Decimal, volume: Decimal, decimals: int) -> Decimal | None:
    """weight / volume rounded down to `decimals`, digit for digit the query's rule."""
    if volume <= 0:
        return None
    with localcontext() as ctx:
        ctx.prec, ctx.rounding = 80, ROUND_DOWN
        unit = Decimal(10) ** decimals
        return ((weight * unit) // volume / unit).quantize(Decimal(1).scaleb(-decimals))


def _join(pieces: list[list[_Row]], decimals: int) -> list[_Row]:
    """The rows of consecutive pieces of a range. A bar two neighbours both hold (the earlier
    one's last, still forming at the cut) becomes one: its first trade from the earlier piece,
    its last from the later."""
    out: list[_Row] = []
    for rows in pieces:
        if out and rows and out[-1][0] == rows[0][0]:
            a, b = out.pop(), rows[0]
            volume, weight = a[7] + b[7], a[8] + b[8]
            out.append((a[0], a[1], b[2], a[3], max(a[4], b[4]), min(a[5], b[5]), b[6], volume, weight,
                        _vwap(weight, volume, decimals), a[10] + b[10], a[11], b[12], b[13]))
            rows = rows[1:]
        out.extend(rows)
    return out


def _sibling(conn: psycopg.Connection[Any]) -> psycopg.Connection[Any] | None:
    """A connection opened with `conn`'s own parameters (password included), or None."""
    options = {o.keyword.decode(): o.val.decode() for o in conn.pgconn.info if o.val is not None}
    try:
        return psycopg.connect(make_conninfo(**options), autocommit=True)
    except psycopg.Error:
        return None


#: What summing a minute's candle for a later piece's running total costs, against computing
#: bars over that minute (measured: ~1/12).
_OFFSET_COST = 0.08


def _cuts(conn: psycopg.Connection[Any], lo: datetime, hi: datetime) -> list[datetime]:
    """Where a long range is cut: into as many pieces as the server gives one parallel query
    processes (max_parallel_workers_per_gather + 1), at whole minutes, each later piece a little
    shorter so that summing the range before it evens out: piece i starts at the fraction
    (1 - (1 - c)^i) / (1 - (1 - c)^n) of the range, c = _OFFSET_COST."""
    with conn.transaction():
        row = conn.execute("SELECT current_setting('max_parallel_workers_per_gather')::int").fetchone()
    count = 1 + max(0, row[0] if row else 0)
    keep = 1 - _OFFSET_COST
    inner = {floor_minute(lo + (hi - lo) * ((1 - keep ** i) / (1 - keep ** count))) for i in range(1, count)}
    return [lo, *sorted(c for c in inner if lo < c < hi), hi]


def _read_pieces(conn: psycopg.Connection[Any], kind: BarKind, fixed: dict[str, Any], cuts: list[datetime]
                 ) -> list[_Row] | None:
    """Rows of ``[cuts[0], cuts[1])`` on `conn` and of each later piece on a connection of its
    own, all at once and in one snapshot (exported by `conn`'s transaction), joined. A later
    piece's running total starts from the sum of the range before it (the first piece's cut
    minute and whole minutes up to the piece). None when the others cannot be opened or the
    server cannot export a snapshot."""
    others = [_sibling(conn) for _ in cuts[2:]]
    if None in others:
        for other in others:
            if other is not None:
                other.close()
        return None
    first = fixed | _ranges(cuts[0], cuts[1], candles=True)
    later = [fixed | _ranges(a, b, candles=True) | {"ot_lo": cuts[0], "ot_hi": first["f_hi"], "oc_lo": first["c_lo"],
                                                     "oc_hi": a}
             for a, b in zip(cuts[1:], cuts[2:])]
    results: list[dict[str, Any]] = [{} for _ in later]
    imported = [threading.Event() for _ in later]

    def run(other: psycopg.Connection[Any], params: dict[str, Any], result: dict[str, Any],
            done: threading.Event, snapshot: str) -> None:
        try:
            with other.transaction():
                other.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                other.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
                done.set()
                result["rows"] = _run(other, bars_sql(kind, from_trades=False, offset=True), params)
        except BaseException as exc:  # raised again in the caller's thread
            result["error"] = exc
        finally:
            done.set()

    exported = False
    try:
        with ExitStack() as stack:
            for other in others:
                stack.enter_context(other)  # type: ignore[arg-type]
            stack.enter_context(conn.transaction())
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            snapshot = conn.execute("SELECT pg_export_snapshot()").fetchone()[0]  # type: ignore[index]
            exported = True
            workers = [threading.Thread(target=run, args=(other, params, result, done, snapshot), daemon=True,
                                        name=f"bars-piece-{i + 2}")
                       for i, (other, params, result, done) in enumerate(zip(others, later, results, imported))]
            for worker in workers:
                worker.start()
            for done in imported:
                done.wait()
            try:
                rows = _run(conn, bars_sql(kind, from_trades=False, first_cut=first["f_hi"] > cuts[0]), first)
            except BaseException:
                for other in others:
                    other.cancel_safe()  # type: ignore[union-attr]
                raise
            finally:
                for worker in workers:
                    worker.join()
    except psycopg.Error:
        if exported:
            raise
        return None  # a server that cannot export a snapshot: the range as one query
    for result in results:
        if "error" in result:
            raise result["error"]
    return _join([rows, *(result["rows"] for result in results)], fixed["decimals"])


def read_bars(
    conn: psycopg.Connection[Any],
    symbol: str,
    kind: BarKind,
    size: Decimal,
    lo: datetime,
    hi: datetime,
    *,
    price_decimals: int,
    from_trades: bool = False,
    include_forming: bool = False,
    parallel_span: timedelta | None = PARALLEL_SPAN,
) -> list[InformationBar]:
    """Bars of `symbol`'s trades in ``[lo, hi)`` counted from `lo` (see the module's rule), vwap
    at `price_decimals`. A range of at least `parallel_span` (None: never) from the candle index
    is cut into as many pieces as the server gives one parallel query, computed at once on
    connections opened like `conn`."""
    kind = BarKind(kind)
    size = check_size(kind, size)
    if hi <= lo:
        return []
    candles = not (from_trades or kind is BarKind.VALUE)
    fixed = {"symbol": symbol, "size": size, "decimals": price_decimals, "unit": Decimal(10) ** price_decimals}
    rows: list[_Row] | None = None
    # not inside a transaction of the caller's: other connections would not see its writes
    if candles and parallel_span is not None and hi - lo >= parallel_span \
            and conn.info.transaction_status is psycopg.pq.TransactionStatus.IDLE:
        cuts = _cuts(conn, lo, hi)
        if len(cuts) > 2:
            rows = _read_pieces(conn, kind, fixed, cuts)
    if rows is None:
        params = fixed | _ranges(lo, hi, candles=candles)
        with conn.transaction():
            rows = _run(conn, bars_sql(kind, from_trades=from_trades, first_cut=params["f_hi"] > lo), params)
    return _bars(symbol, kind, size, rows if include_forming else [r for r in rows if r[13]])


#: InformationBar's slots in the order of a row (weight, the row's 9th column, has none).
_ROW_FIELDS = ("number", "time", "end_time", "open", "high", "low", "close", "volume", None, "vwap", "trades",
               "first_trade_id", "last_trade_id", "complete")


def _bars(symbol: str, kind: BarKind, size: Decimal, rows: list[_Row]) -> list[InformationBar]:
    """InformationBars from rows, column by column: each slot's setter mapped over its column
    (the provider's way with candles; the keyword call of a frozen dataclass costs twice as much)."""
    out = list(map(object.__new__, repeat(InformationBar, len(rows))))
    columns: list[Iterable[Any]] = [repeat(symbol), repeat(kind), repeat(size), *zip(*rows)] if rows else []
    consume = deque(maxlen=0).extend
    for name, values in zip(("symbol", "kind", "size", *_ROW_FIELDS), columns):
        if name is not None:
            consume(map(getattr(InformationBar, name).__set__, out, values))
    return out


def bars_to_frame(bars: Sequence[InformationBar], *, exact: bool = False) -> pd.DataFrame:
    """Bars → a DataFrame indexed by the first trade's time (UTC, named ``time``): float64
    prices and volumes unless `exact` (Decimals); ``attrs`` carries symbol, kind and size."""
    index = pd.DatetimeIndex([b.time for b in bars], name="time").tz_convert(UTC) if bars else \
        pd.DatetimeIndex([], tz=UTC, name="time")

    def numbers(name: str) -> pd.Series:
        values = [getattr(b, name) for b in bars]
        if exact:
            return pd.Series(values, index=index, dtype=object)
        return pd.Series([float(v) if v is not None else float("nan") for v in values], index=index, dtype="float64")

    data: dict[str, Any] = {name: numbers(name) for name in ("open", "high", "low", "close", "volume", "vwap")}
    data["end_time"] = pd.Series(pd.to_datetime([b.end_time for b in bars], utc=True), index=index)
    for name in ("trades", "first_trade_id", "last_trade_id"):
        data[name] = pd.Series([getattr(b, name) for b in bars], index=index, dtype="int64")
    data["complete"] = pd.Series([b.complete for b in bars], index=index, dtype=bool)
    frame = pd.DataFrame(data, index=index, columns=list(BAR_FRAME_COLUMNS))
    if bars:
        frame.attrs.update(symbol=bars[0].symbol, kind=bars[0].kind.value, size=str(bars[0].size))
    return frame


__all__ = ["BAR_FRAME_COLUMNS", "BarKind", "InformationBar", "bars_sql", "bars_to_frame", "check_size", "read_bars"]
