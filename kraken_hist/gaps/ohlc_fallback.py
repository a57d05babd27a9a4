"""The last resort for a fresh gap whose trades cannot be had: its minutes' candles from OHLC.

Kraken's OHLC endpoint serves the 720 newest 1-minute candles. Its finished, trading rows are
stored with source ``rest_ohlc`` where no candle built from trades exists ("trades are
authoritative"), and kept in ``exchange_candles``; filler rows (no trade) are not stored. The
fetched minutes are recorded as ``ohlc`` coverage, which vouches for candles, not trades: the
trades stay missing, so the gap is found again next time.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from kraken_hist.core.errors import PermanentError
from kraken_hist.core.pairs import Pair
from kraken_hist.core.timeutils import ONE_MINUTE, floor_minute, to_unix_seconds
from kraken_hist.core.types import CandleRecord, CandleSource, DataGap
from kraken_hist.gaps import plan
from kraken_hist.gaps.plan import FillMethod
from kraken_hist.gaps.report import GapFill
from kraken_hist.rules import sql as sql_rules
from kraken_hist.storage import ownership, store
from kraken_hist.storage.db import connect, translate_errors

if TYPE_CHECKING:
    from kraken_hist.kraken.rest_client import KrakenRestClient

MICROSECOND = timedelta(microseconds=1)

_UPSERT_EXCHANGE = f"""
INSERT INTO exchange_candles AS c (symbol, interval, time, open, high, low, close, vwap, volume, trades, source)
VALUES (%s, 1, %s, %s, %s, %s, %s, %s, %s, %s, 'rest_ohlc')
{sql_rules.UPSERT_EXCHANGE_CANDLE}"""

_UPSERT_CANDLE = f"""
INSERT INTO candles AS c (symbol, time, open, high, low, close, vwap, volume, trades, source, updated_at)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, now())
{sql_rules.upsert_candle()}"""


def fill_from_ohlc(gap: DataGap, *, db_url: str, client: "KrakenRestClient", pair: Pair, now: datetime) -> GapFill:
    """Fill `gap`'s minutes from the OHLC endpoint (1m) as the module says. Raises
    PermanentError when the gap is older than the endpoint's reach, and the exchange's errors."""
    first_minute = floor_minute(gap.start)
    if first_minute < plan.ohlc_reach_start(now):
        raise PermanentError(
            f"{gap.symbol}: {first_minute.isoformat()} is older than the OHLC endpoint's 720 newest candles"
        )
    last_minute = floor_minute(gap.end - MICROSECOND) if gap.end > gap.start else first_minute
    page = client.get_ohlc(pair, 1, since=to_unix_seconds(first_minute) - 60)
    rows = [r for r in page.finished_rows() if first_minute <= r.time <= last_minute]
    trading = [r.to_candle_record(CandleSource.REST_OHLC) for r in rows if not r.is_filler]
    written = write_ohlc_candles(db_url, gap.symbol, trading)
    if rows:
        with connect(db_url) as conn, translate_errors(), conn.transaction():
            store.add_coverage(conn, gap.symbol, "ohlc", rows[0].time, rows[-1].time + ONE_MINUTE)
    covered_to = rows[-1].time + ONE_MINUTE if rows else first_minute
    status = "filled" if covered_to > last_minute else "partial"
    return GapFill(gap=gap, status=status, method=FillMethod.OHLC, candles_written=written,
                   reason=None if status == "filled" else "OHLC has no finished candles up to the gap's end")


def write_ohlc_candles(db_url: str, symbol: str, candles: list[CandleRecord]) -> int:
    """Store `candles` (time-ordered) in ``exchange_candles`` and, where no candle built from
    trades is stored, in ``candles``; note the change for the refresh. Returns the candles
    rows written."""
    if not candles:
        return 0
    with connect(db_url) as conn, translate_errors(), conn.transaction():
        ownership.lock_symbol(conn, symbol)
        with conn.cursor() as cur:
            cur.executemany(
                _UPSERT_EXCHANGE,
                [(c.symbol, c.time, c.open, c.high, c.low, c.close, c.vwap, c.volume, c.trades) for c in candles],
            )
            written = 0
            for c in candles:
                cur.execute(_UPSERT_CANDLE, (c.symbol, c.time, c.open, c.high, c.low, c.close, c.vwap, c.volume,
                                             c.trades, c.source.value))
                written += cur.rowcount
        store.record_candle_change(conn, symbol, candles[0].time, candles[-1].time + ONE_MINUTE)
    return written
