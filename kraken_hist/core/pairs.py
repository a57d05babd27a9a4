"""One place for pair naming: canonical WebSocket v2 symbols, REST altnames and pair keys, CSV names.

Kraken names one market several ways (``BTC/USD`` on WebSocket v2, ``XBTUSD`` as the REST
altname and CSV file name, ``XXBTZUSD`` as the REST pair key, ``XBT/USD`` as the AssetPairs
``wsname`` that WebSocket v2 refuses). Names are never derived from one another by string
rules; everything goes through the table below, extensible from a real AssetPairs answer.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
import threading
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from kraken_hist.core.errors import UnknownSymbolError


@dataclass(frozen=True, slots=True, kw_only=True)
class Pair:
    """One market under all its names, with the decimals Kraken quotes it in."""

    symbol: str  # canonical, as WebSocket v2 wants it and as stored: "BTC/USD"
    altname: str  # REST altname and CSV file stem: "XBTUSD"
    rest_key: str  # REST pair key in answers: "XXBTZUSD"
    price_decimals: int
    lot_decimals: int = 8
    wsname: str | None = None  # AssetPairs' legacy wsname ("XBT/USD"), which WebSocket v2 refuses
    base: str | None = None  # AssetPairs asset codes ("XXBT", "ZUSD")
    quote: str | None = None
    status: str = "online"  # AssetPairs status; "delisted" when gone from it; "inferred" from a file name
    origin: str = "builtin"  # "builtin", "asset_pairs" or "file_name"
    decimals_inferred: bool = False  # price_decimals read off a file's prices, not from Kraken

    @property
    def csv_name(self) -> str:
        """Stem of the pair's files in Kraken's downloadable archives (``XBTUSD.csv``)."""
        return self.altname

    def names(self) -> tuple[str, ...]:
        """Every name the pair answers to (upper case): canonical, altname, REST key, wsname,
        and the canonical name without its slash (``BTCUSD``)."""
        names = [self.symbol, self.altname, self.rest_key, self.symbol.replace("/", "")]
        if self.wsname:
            names.append(self.wsname)
        return tuple(dict.fromkeys(n.upper() for n in names))


# Assets whose WebSocket v2 name differs from the legacy name used in AssetPairs' wsname and
# altname: a fact about two assets (Kraken renamed them in v2), not a list of pairs.
ASSET_ALIASES: Mapping[str, str] = {"XBT": "BTC", "XDG": "DOGE"}

_DEFAULT_PAIRS = (
    Pair(symbol="BTC/USD", altname="XBTUSD", rest_key="XXBTZUSD", price_decimals=1,
         wsname="XBT/USD", base="XXBT", quote="ZUSD"),
    Pair(symbol="ETH/USD", altname="ETHUSD", rest_key="XETHZUSD", price_decimals=2,
         wsname="ETH/USD", base="XETH", quote="ZUSD"),
    Pair(symbol="SOL/USD", altname="SOLUSD", rest_key="SOLUSD", price_decimals=2,
         wsname="SOL/USD", base="SOL", quote="ZUSD"),
    Pair(symbol="ETH/BTC", altname="ETHXBT", rest_key="XETHXXBT", price_decimals=5,
         wsname="ETH/XBT", base="XETH", quote="XXBT"),
    Pair(symbol="BTC/USDT", altname="XBTUSDT", rest_key="XBTUSDT", price_decimals=1,
         wsname="XBT/USDT", base="XXBT", quote="USDT"),
    Pair(symbol="ETH/USDT", altname="ETHUSDT", rest_key="ETHUSDT", price_decimals=2,
         wsname="ETH/USDT", base="XETH", quote="USDT"),
    Pair(symbol="BTC/EUR", altname="XBTEUR", rest_key="XXBTZEUR", price_decimals=1,
         wsname="XBT/EUR", base="XXBT", quote="ZEUR"),
    Pair(symbol="DOGE/USD", altname="XDGUSD", rest_key="XDGUSD", price_decimals=7,
         wsname="XDG/USD", base="XXDG", quote="ZUSD"),
)

#: The built-in pairs (the offline seed), keyed by canonical symbol.
PAIR_MAP: Mapping[str, Pair] = {p.symbol: p for p in _DEFAULT_PAIRS}
BUILTIN_PAIRS: tuple[Pair, ...] = _DEFAULT_PAIRS

_CSV_NAME = re.compile(r"^(?P<stem>[A-Za-z0-9.]+?)(?:_(?P<minutes>\d+))?\.csv$")
_ASSET = re.compile(r"^[A-Z0-9.]{1,16}$")


def canonical_asset(name: str) -> str:
    """An asset's WebSocket v2 name from its legacy wsname/altname part (``XBT`` → ``BTC``)."""
    upper = name.strip().upper()
    return ASSET_ALIASES.get(upper, upper)


def symbol_from_wsname(wsname: str) -> str:
    """Canonical symbol from an AssetPairs wsname: ``XBT/USD`` → ``BTC/USD``."""
    base, quote = wsname.split("/", 1)
    return f"{canonical_asset(base)}/{canonical_asset(quote)}"


def parse_csv_filename(filename: str) -> tuple[str, int | None]:
    """(stem, interval minutes or None) of a Kraken CSV file name: ``XBTUSD_60.csv`` → (XBTUSD, 60)."""
    base = filename.replace("\\", "/").rsplit("/", 1)[-1]
    match = _CSV_NAME.match(base)
    if match is None:
        raise UnknownSymbolError(base, [])
    minutes = match.group("minutes")
    return match.group("stem"), int(minutes) if minutes else None


class PairRegistry:
    """Look up a pair by any of its names; thread-safe, extensible at run time.

    Built from the built-in seed and whatever the caller adds (the database's pair table,
    Kraken's AssetPairs, pairs inferred from archive file names); never from string rules on
    one name to get another, except :meth:`infer_from_stem` for pairs Kraken no longer lists.
    """

    def __init__(self, pairs: Iterable[Pair] = _DEFAULT_PAIRS) -> None:
        self._lock = threading.Lock()
        self._by_symbol: dict[str, Pair] = {}
        self._by_name: dict[str, Pair] = {}
        for pair in pairs:
            self.add(pair)

    def add(self, pair: Pair) -> None:
        """Register `pair` under all its names (a later entry replaces an earlier one; a name
        another listed pair already answers to is kept by that pair unless this one owns it)."""
        with self._lock:
            old = self._by_symbol.get(pair.symbol)
            if old is not None:
                for name in old.names():
                    if self._by_name.get(name) is old:
                        del self._by_name[name]
            self._by_symbol[pair.symbol] = pair
            own = {pair.symbol.upper(), pair.altname.upper(), pair.rest_key.upper()}
            for name in pair.names():
                holder = self._by_name.get(name)
                if holder is None or holder.symbol == pair.symbol or name in own:
                    self._by_name[name] = pair

    def get(self, name: str) -> Pair:
        """The pair known by `name` (canonical, altname, REST key, wsname; any case)."""
        raw = str(name).strip().upper()
        pair = self._by_name.get(raw)
        if pair is None and "/" in raw:
            pair = self._by_name.get(symbol_from_wsname(raw))
        if pair is None:
            raise UnknownSymbolError(str(name), self.close_matches(str(name)))
        return pair

    def normalize(self, name: str) -> str:
        """Canonical symbol for any known name: ``xbtusd`` → ``BTC/USD``."""
        return self.get(name).symbol

    def is_known(self, name: str) -> bool:
        try:
            self.get(name)
        except UnknownSymbolError:
            return False
        return True

    def symbols(self) -> list[str]:
        return sorted(self._by_symbol)

    def pairs(self) -> list[Pair]:
        with self._lock:
            return sorted(self._by_symbol.values(), key=lambda p: p.symbol)

    def close_matches(self, name: str, n: int = 5) -> list[str]:
        """Canonical symbols whose names look like `name` (for "did you mean")."""
        raw = str(name).strip().upper()
        with self._lock:
            names = dict(self._by_name)
        hits = difflib.get_close_matches(raw, list(names), n=n * 3, cutoff=0.6)
        if "/" not in raw:
            hits += difflib.get_close_matches(raw, [k for k in names if "/" not in k], n=n, cutoff=0.6)
        return list(dict.fromkeys(names[h].symbol for h in hits))[:n]

    def match(self, pattern: str) -> list[str]:
        """Symbols matching a shell pattern on any name (``*/USD``, ``XBT*``); ``all`` is every
        listed pair still trading (status online)."""
        if pattern.strip().lower() == "all":
            return [p.symbol for p in self.pairs() if p.status == "online"]
        wanted = pattern.strip().upper()
        return [p.symbol for p in self.pairs() if any(fnmatch.fnmatchcase(n, wanted) for n in p.names())]

    def assets(self) -> dict[str, str]:
        """Every asset code the known pairs use → its canonical name, learnt from the data:
        AssetPairs' base/quote codes (``XXBT``, ``ZUSD``), their wsname parts (``XBT``) and
        the canonical parts (``BTC``)."""
        out: dict[str, str] = {}
        for pair in self.pairs():
            base, quote = pair.symbol.split("/", 1)
            out.setdefault(base, base)
            out.setdefault(quote, quote)
            if pair.wsname and "/" in pair.wsname:
                ws_base, ws_quote = pair.wsname.upper().split("/", 1)
                out.setdefault(ws_base, base)
                out.setdefault(ws_quote, quote)
                if pair.base:
                    out.setdefault(pair.base.upper(), base)
                if pair.quote:
                    out.setdefault(pair.quote.upper(), quote)
        return out

    def infer_from_stem(self, stem: str, *, price_decimals: int) -> Pair:
        """A pair Kraken no longer lists, from an archive file stem (``XRPUSD``, ``XXRPZEUR``):
        split into base and quote at a known quote asset (the longest that leaves a base),
        the base mapped through known asset codes where it is one. Marked ``inferred``."""
        upper = stem.strip().upper()
        assets = self.assets()
        quotes = {code: name for code, name in assets.items()
                  if any(p.symbol.endswith("/" + name) for p in self.pairs())}
        for code in sorted(quotes, key=len, reverse=True):
            if upper.endswith(code) and len(upper) > len(code):
                base_code = upper[: -len(code)]
                if not _ASSET.match(base_code):
                    continue
                if base_code not in assets and len(code) == 4 and code[0] in "XZ" and len(base_code) == 4 \
                        and base_code[0] in "XZ":
                    base_code = base_code[1:]  # legacy key: X-prefixed base + X/Z-prefixed quote (XXRPZEUR)
                base = assets.get(base_code, canonical_asset(base_code))
                return Pair(symbol=f"{base}/{quotes[code]}", altname=upper, rest_key=upper,
                            price_decimals=price_decimals, status="inferred", origin="file_name",
                            decimals_inferred=True)
        raise UnknownSymbolError(stem, self.close_matches(stem))

    def from_csv_filename(self, filename: str) -> tuple[Pair, int | None]:
        """Pair and interval (minutes, or None for Time and Sales) from a Kraken CSV file name.

        ``XBTUSD.csv`` → (BTC/USD, None); ``XBTUSD_60.csv`` → (BTC/USD, 60).
        """
        stem, minutes = parse_csv_filename(filename)
        return self.get(stem), minutes

    def update_from_asset_pairs(self, result: Mapping[str, Mapping[str, Any]]) -> list[Pair]:
        """Add every pair of an ``/0/public/AssetPairs`` ``result``; returns the pairs added."""
        added = pairs_from_asset_pairs(result)
        for pair in added:
            self.add(pair)
        return added


def pairs_from_asset_pairs(result: Mapping[str, Mapping[str, Any]]) -> list[Pair]:
    """The pairs of an ``/0/public/AssetPairs`` ``result`` (the whole answer).

    The canonical symbol comes from ``wsname`` with legacy asset names mapped through
    ASSET_ALIASES (``XBT/USD`` → ``BTC/USD``), since WebSocket v2 refuses the wsname.
    Dark-pool entries (``.d`` keys) and entries without a wsname are skipped.
    """
    out = []
    for rest_key, info in result.items():
        wsname = info.get("wsname")
        if not wsname or rest_key.endswith(".d") or "/" not in str(wsname):
            continue
        out.append(Pair(
            symbol=symbol_from_wsname(str(wsname)),
            altname=str(info.get("altname", rest_key)),
            rest_key=str(rest_key),
            price_decimals=int(info.get("pair_decimals", 8)),
            lot_decimals=int(info.get("lot_decimals", 8)),
            wsname=str(wsname),
            base=str(info["base"]) if info.get("base") else None,
            quote=str(info["quote"]) if info.get("quote") else None,
            status=str(info.get("status", "online")),
            origin="asset_pairs",
        ))
    return out
