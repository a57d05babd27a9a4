"""One place for pair naming: canonical WebSocket v2 symbols, REST altnames and pair keys, CSV names.

Kraken names one market several ways (``BTC/USD`` on WebSocket v2, ``XBTUSD`` as the REST
altname and CSV file name, ``XXBTZUSD`` as the REST pair key, ``XBT/USD`` as the AssetPairs
``wsname`` that WebSocket v2 refuses). Names are never derived from one another by string
rules; everything goes through the table below, extensible from a real AssetPairs answer.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from .errors import UnknownSymbolError


@dataclass(frozen=True, slots=True, kw_only=True)
class Pair:
    """One market under all its names, with the decimals Kraken quotes it in."""

    symbol: str  # canonical, as WebSocket v2 wants it and as stored: "BTC/USD"
    altname: str  # REST altname and CSV file stem: "XBTUSD"
    rest_key: str  # REST pair key in answers: "XXBTZUSD"
    price_decimals: int
    lot_decimals: int = 8

    @property
    def csv_name(self) -> str:
        """Stem of the pair's files in Kraken's downloadable archives (``XBTUSD.csv``)."""
        return self.altname


# Assets whose WebSocket v2 name differs from the legacy name used in REST wsname/altname.
ASSET_ALIASES: Mapping[str, str] = {"XBT": "BTC", "XDG": "DOGE"}

_DEFAULT_PAIRS = (
    Pair(symbol="BTC/USD", altname="XBTUSD", rest_key="XXBTZUSD", price_decimals=1),
    Pair(symbol="ETH/USD", altname="ETHUSD", rest_key="XETHZUSD", price_decimals=2),
    Pair(symbol="SOL/USD", altname="SOLUSD", rest_key="SOLUSD", price_decimals=2),
    Pair(symbol="ETH/BTC", altname="ETHXBT", rest_key="XETHXXBT", price_decimals=5),
    Pair(symbol="BTC/USDT", altname="XBTUSDT", rest_key="XBTUSDT", price_decimals=1),
    Pair(symbol="ETH/USDT", altname="ETHUSDT", rest_key="ETHUSDT", price_decimals=2),
    Pair(symbol="BTC/EUR", altname="XBTEUR", rest_key="XXBTZEUR", price_decimals=1),
    Pair(symbol="DOGE/USD", altname="XDGUSD", rest_key="XDGUSD", price_decimals=7),
)

#: The built-in pairs, keyed by canonical symbol.
PAIR_MAP: Mapping[str, Pair] = {p.symbol: p for p in _DEFAULT_PAIRS}

_CSV_NAME = re.compile(r"^(?P<stem>[A-Za-z0-9.]+?)(?:_(?P<minutes>\d+))?\.csv$")


class PairRegistry:
    """Look up a pair by any of its names; thread-safe, extensible at run time."""

    def __init__(self, pairs: Iterable[Pair] = _DEFAULT_PAIRS) -> None:
        self._lock = threading.Lock()
        self._by_symbol: dict[str, Pair] = {}
        self._by_name: dict[str, Pair] = {}
        for pair in pairs:
            self.add(pair)

    def add(self, pair: Pair) -> None:
        """Register `pair` under all its names (a later entry replaces an earlier one)."""
        with self._lock:
            self._by_symbol[pair.symbol] = pair
            for name in (pair.symbol, pair.altname, pair.rest_key):
                self._by_name[name.upper()] = pair

    def get(self, name: str) -> Pair:
        """The pair known by `name` (canonical, altname or REST key; any case)."""
        pair = self._by_name.get(str(name).strip().upper())
        if pair is None:
            raise UnknownSymbolError(str(name), self.symbols())
        return pair

    def normalize(self, name: str) -> str:
        """Canonical symbol for any known name: ``xbtusd`` → ``BTC/USD``."""
        return self.get(name).symbol

    def is_known(self, name: str) -> bool:
        return str(name).strip().upper() in self._by_name

    def symbols(self) -> list[str]:
        return sorted(self._by_symbol)

    def from_csv_filename(self, filename: str) -> tuple[Pair, int | None]:
        """Pair and interval (minutes, or None for Time and Sales) from a Kraken CSV file name.

        ``XBTUSD.csv`` → (BTC/USD, None); ``XBTUSD_60.csv`` → (BTC/USD, 60).
        """
        base = filename.replace("\\", "/").rsplit("/", 1)[-1]
        match = _CSV_NAME.match(base)
        if match is None:
            raise UnknownSymbolError(base, self.symbols())
        minutes = match.group("minutes")
        return self.get(match.group("stem")), int(minutes) if minutes else None

    def update_from_asset_pairs(self, result: Mapping[str, Mapping[str, Any]]) -> list[Pair]:
        """Add every pair of an ``/0/public/AssetPairs`` ``result``; returns the pairs added.

        The canonical symbol comes from ``wsname`` with legacy asset names mapped through
        ASSET_ALIASES (``XBT/USD`` → ``BTC/USD``), since WebSocket v2 refuses the wsname.
        Dark-pool entries (``.d`` keys) and entries without a wsname are skipped.
        """
        added = []
        for rest_key, info in result.items():
            wsname = info.get("wsname")
            if not wsname or rest_key.endswith(".d") or "/" not in wsname:
                continue
            base, quote = wsname.split("/", 1)
            symbol = f"{ASSET_ALIASES.get(base, base)}/{ASSET_ALIASES.get(quote, quote)}"
            pair = Pair(
                symbol=symbol,
                altname=str(info.get("altname", rest_key)),
                rest_key=rest_key,
                price_decimals=int(info.get("pair_decimals", 8)),
                lot_decimals=int(info.get("lot_decimals", 8)),
            )
            self.add(pair)
            added.append(pair)
        return added


#: The registry used when none is passed explicitly.
DEFAULT_REGISTRY = PairRegistry()


def get_pair(name: str) -> Pair:
    """Pair for any known name, from the default registry."""
    return DEFAULT_REGISTRY.get(name)


def normalize_symbol(name: str) -> str:
    """Canonical symbol for any known name, from the default registry."""
    return DEFAULT_REGISTRY.normalize(name)
