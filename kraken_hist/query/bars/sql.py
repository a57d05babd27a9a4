"""The information-bar query (see ``bars`` for the rule): one SQL statement over the minute index
and the trades of the minutes a threshold falls in, and the parameters that say how a range is read.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

import psycopg

from kraken_hist.core.intervals import Interval
from kraken_hist.core.timeutils import floor_minute
from kraken_hist.rules.sql import kraken_vwap


class BarKind(str, enum.Enum):
    """What a bar's running total counts."""

    TICK = "tick"  # trades
    VOLUME = "volume"  # base units
    VALUE = "value"  # quote units (price × volume)


_MINUTE = Interval(1)

#: Kraken's 1-minute vwap of a minute's trades, truncated to ``%(decimals)s`` (``rules.sql``).
MINUTE_VWAP = kraken_vwap("sum(price * volume)", "sum(volume)", "%(decimals)s")
#: A bar's vwap from its Σp·v (``weight``) and Σv, Kraken's rule; a bar without volume has none.
BAR_VWAP = kraken_vwap("b.weight", "b.volume", "%(decimals)s", no_volume="NULL")

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
_MINUTES_FROM_TRADES = f"""
        SELECT minute, n, v, high, low, vwap, {{x}} AS x FROM (
            SELECT date_trunc('minute', time) AS minute, count(*)::bigint AS n, sum(volume) AS v,
                   sum(price * volume) AS val, max(price) AS high, min(price) AS low,
                   {MINUTE_VWAP} AS vwap
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
           CASE WHEN bool_or(whole) THEN {minute_vwap} * sum(volume) ELSE sum(price * volume) END AS weight,
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
       {bar_vwap},
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
    index only). Parameters: symbol, lo, hi, f_minute, f_hi, l_lo, c_lo, c_hi, size, decimals and
    the offset's."""
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
        bar_vwap=BAR_VWAP,
        tx=tx, ttx=ttx, minutes=minutes, minute_vwap=MINUTE_VWAP,
        offset=_OFFSET.format(tx=tx, cx=_CANDLE_MEASURE.get(kind, "0")) if offset else "0",
        c0="(SELECT o + f FROM cuts) + " if first_cut or offset else "")


def query_ranges(lo: datetime, hi: datetime, *, candles: bool) -> dict[str, Any]:
    """How ``[lo, hi)`` is read (``lo < hi``): whole minutes [c_lo, c_hi) from candles, the
    minute cut by lo ([lo, f_hi)) and the one cut by hi ([l_lo, hi)) from trades; empty ranges
    are ``lo``/``hi`` on both sides. From trades, every minute comes from the trades."""
    out = {"lo": lo, "hi": hi, "f_minute": floor_minute(lo), "f_hi": lo, "l_lo": hi, "c_lo": lo, "c_hi": lo}
    if not candles:
        return out
    lo_min, hi_min = _MINUTE.first_bucket_at_or_after(lo), floor_minute(hi)
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
Row = tuple[Any, ...]


def run_query(conn: psycopg.Connection[Any], query: str, params: dict[str, Any]) -> list[Row]:
    """`query`'s rows, inside a transaction the caller holds open."""
    conn.execute("SET LOCAL jit = off")  # compiling costs more than these scans (planners overestimate them)
    conn.execute("SET LOCAL work_mem = '256MB'")  # the running totals and the piece sums stay in memory
    return conn.execute(query, params).fetchall()
