"""Kraken's downloadable CSV files: sniff the layout, parse lines in chunks into COPY text.

The names the rest of the library (and its tests and benchmarks) import, gathered from the
modules that define them:

* :mod:`.layout`: which layout a file holds (``sniff_layout``);
* :mod:`.rows`: what parsing yields (chunks, synthetic ids, the bad-line report, the seconds
  left to the id-bearing sources);
* :mod:`.fields`: the fields of one line, judged by ``core.bounds``;
* :mod:`.trade_lines` and :mod:`.ohlcvt_lines`: the line parsers.
"""

from __future__ import annotations

from kraken_hist.ingest.archive.fields import plain_line_second
from kraken_hist.ingest.archive.layout import (
    OHLCVT,
    OHLCVT_INTERVALS,
    TRADES,
    Layout,
    LayoutError,
    interval_from_filename,
    sniff_layout,
)
from kraken_hist.ingest.archive.ohlcvt_lines import parse_ohlcvt
from kraken_hist.ingest.archive.rows import (
    FULL_COLUMNS,
    MAX_SECOND,
    MAX_TRADES_PER_SECOND,
    PLAIN_COLUMNS,
    SYNTHETIC_ID_BASE,
    TIME_OUT_OF_RANGE,
    BadRow,
    BadRowReport,
    OhlcChunk,
    SecondBlocker,
    StrictModeError,
    TradeChunk,
    synthetic_trade_id,
)
from kraken_hist.ingest.archive.trade_lines import parse_header_trades, parse_plain_trades

__all__ = [
    "FULL_COLUMNS", "MAX_SECOND", "MAX_TRADES_PER_SECOND", "OHLCVT", "OHLCVT_INTERVALS", "PLAIN_COLUMNS",
    "SYNTHETIC_ID_BASE", "TIME_OUT_OF_RANGE", "TRADES", "BadRow", "BadRowReport", "Layout", "LayoutError",
    "OhlcChunk", "SecondBlocker", "StrictModeError", "TradeChunk", "interval_from_filename", "parse_header_trades",
    "parse_ohlcvt", "parse_plain_trades", "plain_line_second", "sniff_layout", "synthetic_trade_id",
]
