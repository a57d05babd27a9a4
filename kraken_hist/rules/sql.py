"""The market-data rules in SQL, each written once and rendered wherever a query needs it.

Every path that builds candles in the database (the backfill's rebuild, the writer's flush, the
archive import, gap detection, the refresh, the provider's on-the-fly intervals, the migrations'
continuous aggregates) renders these expressions instead of spelling the rule out again. The
Python twins live in :mod:`kraken_hist.rules.candles`; ``tests/test_rules_agree.py`` checks
every rendering against them over the same trades.

Kraken's 1-minute candle (KRAKEN.md): trades bucketed by minute; open/close = first/last trade
by (time, id); high/low; volume = Σv; count; vwap = Σ(p·v)/Σv truncated to the pair's price
decimals (0 for a minute without volume). Wider candles: first open, max high, min low, last
close, Σ volume, Σ count, vwap weighted by the volume of the minutes that have one.
"""

from __future__ import annotations


def kraken_vwap(notional: str, volume: str, decimals: str, *, no_volume: str = "0") -> str:
    """Kraken's 1-minute vwap from the SQL expressions Σp·v (`notional`) and Σv (`volume`).

    Truncated exactly: ``div`` is the whole quotient of ``Σp·v·10^d`` by ``Σv``. A plain
    ``trunc(n / v, d)`` is not: PostgreSQL rounds a numeric quotient at 16 or more significant
    digits before ``trunc`` sees it, so 0.1200001 - 1e-23 would become 0.1200001 instead of
    0.1200000 (tests/test_rules_agree.py, "extreme"). Without volume: `no_volume` (Kraken's
    candles say 0; an information bar says NULL)."""
    return (f"CASE WHEN {volume} > 0 THEN trunc(div({notional} * power(10::numeric, {decimals}), {volume})"
            f" * power(10::numeric, -({decimals})), {decimals}) ELSE {no_volume} END")


def minute_candle_columns(*, decimals: str = "%(decimals)s", time: str = "time", price: str = "price",
                          volume: str = "volume", trade_id: str = "trade_id") -> str:
    """The select list of 1-minute candles over trade rows grouped by their minute: ``minute``,
    open, high, low, close, vwap, volume, trades (names of the trade columns as given)."""
    return f"""
           date_trunc('minute', {time})                                      AS minute,
           (array_agg({price} ORDER BY {time}, {trade_id}))[1]               AS open,
           max({price})                                                      AS high,
           min({price})                                                      AS low,
           (array_agg({price} ORDER BY {time} DESC, {trade_id} DESC))[1]     AS close,
           {kraken_vwap(f"sum({price} * {volume})", f"sum({volume})", decimals)} AS vwap,
           sum({volume})                                                     AS volume,
           count(*)::integer                                                 AS trades"""


#: Kraken's 1-minute candles of one symbol's stored trades in ``[%(start)s, %(end)s)``, vwap at
#: ``%(decimals)s``.
MINUTE_CANDLES_FROM_TRADES = f"""
    SELECT {minute_candle_columns()}
    FROM trades
    WHERE symbol = %(symbol)s AND time >= %(start)s AND time < %(end)s
    GROUP BY 1
"""

#: Upsert tail (table aliased ``c``) for candles built from trades: they replace whatever is
#: stored (trades are authoritative) and leave identical rows untouched (no needless rewrite,
#: no change noise).
UPSERT_TRADES_CANDLE = """
ON CONFLICT (symbol, time) DO UPDATE
SET open = EXCLUDED.open, high = EXCLUDED.high, low = EXCLUDED.low, close = EXCLUDED.close,
    vwap = EXCLUDED.vwap, volume = EXCLUDED.volume, trades = EXCLUDED.trades,
    source = 'trades', updated_at = now()
WHERE (c.open, c.high, c.low, c.close, c.vwap, c.volume, c.trades, c.source)
      IS DISTINCT FROM
      (EXCLUDED.open, EXCLUDED.high, EXCLUDED.low, EXCLUDED.close, EXCLUDED.vwap,
       EXCLUDED.volume, EXCLUDED.trades, 'trades')
"""


def upsert_candle(*, only_where: str = "TRUE") -> str:
    """Upsert tail (table aliased ``c``) for candles whose ``source`` comes with the row: a candle
    built from trades replaces any stored one, an exchange candle never replaces one built from
    trades ("trades are authoritative"); identical rows are left untouched. `only_where` narrows
    further which stored rows may be replaced."""
    return f"""
ON CONFLICT (symbol, time) DO UPDATE
SET open = EXCLUDED.open, high = EXCLUDED.high, low = EXCLUDED.low, close = EXCLUDED.close,
    vwap = EXCLUDED.vwap, volume = EXCLUDED.volume, trades = EXCLUDED.trades,
    source = EXCLUDED.source, updated_at = now()
WHERE (c.source <> 'trades' OR EXCLUDED.source = 'trades') AND ({only_where})
  AND (c.open, c.high, c.low, c.close, c.vwap, c.volume, c.trades, c.source)
      IS DISTINCT FROM
      (EXCLUDED.open, EXCLUDED.high, EXCLUDED.low, EXCLUDED.close, EXCLUDED.vwap,
       EXCLUDED.volume, EXCLUDED.trades, EXCLUDED.source)
"""


#: The bucket rule over candle rows aliased ``p``, column by column: first open, max high, min
#: low, last close, summed volume and trades.
_BUCKET_PRICES = (
    ("open", "(array_agg(p.open ORDER BY p.time))[1]"),
    ("high", "max(p.high)"),
    ("low", "min(p.low)"),
    ("close", "(array_agg(p.close ORDER BY p.time DESC))[1]"),
    ("volume", "sum(p.volume)"),
    ("trades", "sum(p.trades)::bigint"),
)

#: vwap and its exact sums from 1-minute candles (which have no vwap_notional/vwap_volume).
_MINUTE_WEIGHTS = (
    ("vwap", "sum(p.vwap * p.volume) / NULLIF(sum(p.volume) FILTER (WHERE p.vwap IS NOT NULL), 0)"),
    ("vwap_volume", "sum(p.volume) FILTER (WHERE p.vwap IS NOT NULL)"),
    ("vwap_notional", "sum(p.vwap * p.volume)"),
)

#: vwap and its exact sums from buckets that carry them: Σvwap_notional/Σvwap_volume divides
#: the very numbers the direct 1-minute weighting divides (sums of numerics are exact).
_BUCKET_WEIGHTS = (
    ("vwap", "sum(p.vwap_notional) / NULLIF(sum(p.vwap_volume), 0)"),
    ("vwap_volume", "sum(p.vwap_volume)"),
    ("vwap_notional", "sum(p.vwap_notional)"),
)


def bucket_column_pairs(parent_minutes: int) -> list[tuple[str, str]]:
    """The bucket rule over parent rows ``p`` of `parent_minutes` (1: the ``candles`` table;
    more: an interval relation with its exact vwap sums) as ``(name, expression)`` pairs in
    select-list order, for a query builder that picks columns by name (the provider)."""
    return [*_BUCKET_PRICES, *(_MINUTE_WEIGHTS if parent_minutes == 1 else _BUCKET_WEIGHTS)]


def bucket_columns(parent_minutes: int) -> str:
    """:func:`bucket_column_pairs` as a select list."""
    return ",\n".join(f"    {expression} AS {name}" for name, expression in bucket_column_pairs(parent_minutes))


def vwap_at_places(vwap: str, places: str) -> str:
    """`vwap` at `places` price decimals, rounded down (a vwap with no more decimals stays as it
    is, digit for digit; `places` NULL leaves it as it is): the SQL form of
    ``rules.candles.vwap_at_decimals``."""
    return f"trunc({vwap}, least({places}, scale({vwap})))"


def skip_scan_symbols(table: str, cte: str = "s") -> str:
    """A recursive CTE named `cte` (column ``symbol``) walking the distinct symbols of `table`,
    whose key starts with ``symbol``: one index probe per symbol instead of a scan of every row
    (PostgreSQL has no skip scan of its own). It ends with one NULL row; use it as
    ``WITH RECURSIVE {skip_scan_symbols('candles')} SELECT symbol FROM s WHERE symbol IS NOT NULL``."""
    return f"""{cte}(symbol) AS (
    SELECT min(symbol) FROM {table}
    UNION ALL
    SELECT (SELECT min(x.symbol) FROM {table} x WHERE x.symbol > {cte}.symbol)
    FROM {cte} WHERE {cte}.symbol IS NOT NULL
)"""


#: Upsert tail (table aliased ``c``) for the exchange's own candles (``exchange_candles``,
#: kept apart from ours to compare with them): the latest answer replaces what is stored;
#: identical rows are left untouched.
UPSERT_EXCHANGE_CANDLE = """
ON CONFLICT (symbol, interval, time) DO UPDATE
SET open = EXCLUDED.open, high = EXCLUDED.high, low = EXCLUDED.low, close = EXCLUDED.close,
    vwap = EXCLUDED.vwap, volume = EXCLUDED.volume, trades = EXCLUDED.trades, source = EXCLUDED.source
WHERE (c.open, c.high, c.low, c.close, c.vwap, c.volume, c.trades, c.source)
      IS DISTINCT FROM
      (EXCLUDED.open, EXCLUDED.high, EXCLUDED.low, EXCLUDED.close, EXCLUDED.vwap,
       EXCLUDED.volume, EXCLUDED.trades, EXCLUDED.source)
"""
