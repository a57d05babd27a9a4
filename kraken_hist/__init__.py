"""kraken_hist: Kraken's public market history in PostgreSQL, served to synchronous strategy code.

The names most code needs are importable from here (``from kraken_hist import
HistoricalDataProvider``); each is loaded on first use, so ``import kraken_hist`` stays cheap.
The package layout is explained in the README's Development section.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: Public name → the module that defines it.
_PUBLIC = {
    "Settings": "kraken_hist.core.config",
    "HistoricalTrade": "kraken_hist.core.types",
    "HistoricalCandle": "kraken_hist.core.types",
    "TradeRecord": "kraken_hist.core.types",
    "CandleRecord": "kraken_hist.core.types",
    "HistoricalDataProvider": "kraken_hist.query.provider",
    "DatabaseWriter": "kraken_hist.storage.writer",
    "refresh_aggregates": "kraken_hist.storage.refresh",
    "KrakenTradesBackfill": "kraken_hist.ingest.backfill",
    "WebSocketDBIntegration": "kraken_hist.ingest.live",
    "BulkCSVImporter": "kraken_hist.ingest.archive.importer",
    "GapFiller": "kraken_hist.gaps.filler",
    "KrakenRestClient": "kraken_hist.kraken.rest_client",
    "KrakenWSClient": "kraken_hist.kraken.ws_client",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'kraken_hist' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
