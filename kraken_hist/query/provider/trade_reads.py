"""The trade part of the provider's API: stored trades, their DataFrames and information bars
(the work is ``trades_out``'s and ``bars``'; a trade replay is ``replay``'s)."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal

import pandas as pd

from kraken_hist.core.timeutils import EPOCH
from kraken_hist.core.types import HistoricalTrade
from kraken_hist.query import bars as bars_module
from kraken_hist.query import trades_out
from kraken_hist.query.provider.arguments import TimeArg
from kraken_hist.query.provider.base import ProviderBase
from kraken_hist.storage.db import connect, translate_errors


class TradeReads(ProviderBase):
    """Trade reads and information bars: the part of ``HistoricalDataProvider`` that reads trades."""

    def get_trades(self, symbol: str, start: TimeArg = None, end: TimeArg = None, *,
                   batch_size: int = 10_000) -> Iterator[HistoricalTrade]:
        """Stored trades with ``start <= time < min(now, end)`` in (time, id) order, streamed
        with constant memory on a connection of their own (closed with the iterator)."""
        name, (lo, hi) = self.registry.normalize(symbol), self._trade_window(start, end)
        return trades_out.read_trades(self._database_url(), name, lo, hi, batch_size=batch_size)

    def iter_trades_df(self, symbol: str, start: TimeArg = None, end: TimeArg = None, *,
                       chunk_rows: int = 100_000, exact: bool = False) -> Iterator[pd.DataFrame]:
        """``get_trades`` as DataFrames of at most `chunk_rows` rows (constant memory)."""
        name, (lo, hi) = self.registry.normalize(symbol), self._trade_window(start, end)
        return trades_out.read_trade_frames(self._database_url(), name, lo, hi, chunk_rows=chunk_rows, exact=exact)

    def get_trades_df(self, symbol: str, start: TimeArg = None, end: TimeArg = None, *,
                      exact: bool = False) -> pd.DataFrame:
        """``get_trades`` as one DataFrame: UTC index ``time``, columns trade_id, price, volume,
        side, ord_type; float64 prices and volumes unless ``exact=True`` (Decimals)."""
        return trades_out.concat_frames(self.iter_trades_df(symbol, start, end, exact=exact),
                                        self.registry.normalize(symbol), exact)

    def get_bars(self, symbol: str, kind: bars_module.BarKind | str, size: Decimal | int | str,
                 start: TimeArg = None, end: TimeArg = None, *, include_forming: bool = False,
                 from_trades: bool = False) -> list[bars_module.InformationBar]:
        """Tick, volume or value bars of the trades in ``[start, min(now, end))``, counted from
        `start` (default: the first stored trade); complete bars only unless `include_forming`.
        See ``kraken_hist.query.bars`` for the rule."""
        name, (lo, hi) = self.registry.normalize(symbol), self._trade_window(start, end)
        decimals = self.registry.get(name).price_decimals
        with connect(self._database_url(), autocommit=True, options="-c TimeZone=UTC") as conn, translate_errors():
            if lo == EPOCH:
                first = conn.execute("SELECT min(time) FROM trades WHERE symbol = %s", (name,)).fetchone()
                if first is None or first[0] is None:
                    return []
                lo = first[0]
            return bars_module.read_bars(conn, name, bars_module.BarKind(kind), bars_module.check_size(kind, size),
                                         lo, hi, price_decimals=decimals, from_trades=from_trades,
                                         include_forming=include_forming)

    def get_bars_df(self, symbol: str, kind: bars_module.BarKind | str, size: Decimal | int | str,
                    start: TimeArg = None, end: TimeArg = None, *, include_forming: bool = False,
                    from_trades: bool = False, exact: bool = False) -> pd.DataFrame:
        """``get_bars`` as a DataFrame (see ``bars.bars_to_frame``)."""
        return bars_module.bars_to_frame(self.get_bars(symbol, kind, size, start, end, include_forming=include_forming,
                                                       from_trades=from_trades), exact=exact)
