"""The fake exchange's own list of pairs: hundreds of them, named the way Kraken names them.

Kraken's ``AssetPairs`` mixes two naming generations (KRAKEN.md): legacy assets carry X/Z
prefixes in their codes (``XXBT``, ``ZUSD``) and legacy-with-legacy pairs are keyed by both
codes (``XXBTZUSD``, ``XXRPZEUR``) while newer pairs are keyed by their altname (``ADAUSD``,
``XBTUSDT``); two assets are named differently on WebSocket v2 (``XBT`` → ``BTC``, ``XDG`` →
``DOGE``). This module builds such a listing deterministically, on its own — it does not ask
the library's pair registry — so tests that compare the library's view with the fake's check
two independent sources. Some pairs are *delisted*: they have history (and archive files) but
are missing from AssetPairs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from decimal import Decimal

#: Legacy assets: v2 name → (AssetPairs code, wsname/altname part).
LEGACY = {
    "BTC": ("XXBT", "XBT"), "ETH": ("XETH", "ETH"), "XRP": ("XXRP", "XRP"), "LTC": ("XLTC", "LTC"),
    "XLM": ("XXLM", "XLM"), "XMR": ("XXMR", "XMR"), "ZEC": ("XZEC", "ZEC"), "ETC": ("XETC", "ETC"),
    "DOGE": ("XXDG", "XDG"), "REP": ("XREP", "REP"), "MLN": ("XMLN", "MLN"),
    "USD": ("ZUSD", "USD"), "EUR": ("ZEUR", "EUR"), "GBP": ("ZGBP", "GBP"), "CAD": ("ZCAD", "CAD"),
    "JPY": ("ZJPY", "JPY"), "AUD": ("ZAUD", "AUD"), "CHF": ("ZCHF", "CHF"),
}
QUOTES = ("USD", "EUR", "GBP", "BTC", "ETH", "USDT", "USDC", "CAD", "JPY", "AUD", "CHF", "DAI")
NEW_ASSETS = (
    "ADA", "DOT", "SOL", "LINK", "ATOM", "AAVE", "ALGO", "AVAX", "BAL", "BAT", "BCH", "COMP", "CRV", "DASH",
    "EOS", "FIL", "FLOW", "GRT", "ICX", "KAVA", "KNC", "KSM", "LSK", "MANA", "MATIC", "MINA", "NANO", "OMG",
    "OXT", "PAXG", "QTUM", "SC", "SNX", "STORJ", "SUSHI", "TRX", "UNI", "WAVES", "XTZ", "YFI", "ZRX", "ANKR",
    "AXS", "BNT", "CHZ", "ENJ", "GNO", "LPT", "MKR", "OCEAN", "REN", "SAND", "SRM", "USDT", "USDC", "DAI",
)
#: Rough price level per asset in USD, so decimals and prices look like the pair they name.
USD_PRICE = {"BTC": 100000, "ETH": 3000, "SOL": 150, "DOGE": 0.15, "XRP": 0.6, "LTC": 80, "XMR": 150,
             "ZEC": 40, "ETC": 25, "BCH": 400, "MKR": 2000, "YFI": 8000, "PAXG": 2300, "USDT": 1, "USDC": 1,
             "DAI": 1, "EUR": 1.1, "GBP": 1.3, "CAD": 0.75, "JPY": 0.0067, "AUD": 0.66, "CHF": 1.1}
#: The eight pairs of KRAKEN.md's table, exactly as Kraken lists them.
KNOWN = {"BTC/USD": 1, "ETH/USD": 2, "SOL/USD": 2, "ETH/BTC": 5, "BTC/USDT": 1, "ETH/USDT": 2, "BTC/EUR": 1,
         "DOGE/USD": 7}
#: Always there, for tests that name them: legacy keys (XXRPZEUR) and plain ones (ADAUSD).
ALWAYS_LISTED = ("XRP/USD", "XRP/EUR", "LTC/USD", "LTC/EUR", "XMR/USD", "ADA/USD", "ADA/EUR", "DOT/USD",
                 "LINK/USD", "XLM/EUR")
#: Delisted since: archives still hold them, AssetPairs does not.
ALWAYS_DELISTED = ("REP/EUR", "MLN/BTC", "REP/USD")
#: Where Kraken's key breaks its own rule (a legacy pair keyed by its altname).
KEY_EXCEPTIONS = {"DOGE/USD": "XDGUSD"}


@dataclass(frozen=True, slots=True)
class Listing:
    """One pair as the fake exchange lists it (an ``AssetPairs`` entry, and its v2 name)."""

    symbol: str  # WebSocket v2 name: BTC/USD
    altname: str  # XBTUSD (also the archive's file stem)
    rest_key: str  # XXBTZUSD
    wsname: str  # XBT/USD
    base: str  # XXBT
    quote: str  # ZUSD
    price_decimals: int
    lot_decimals: int = 8
    listed: bool = True  # False: delisted (history and archives only)

    @property
    def start_price(self) -> Decimal:
        base, quote = self.symbol.split("/")
        price = USD_PRICE.get(base, 5.0) / USD_PRICE.get(quote, 1.0)
        return Decimal(str(round(price, self.price_decimals))) or Decimal(1).scaleb(-self.price_decimals)

    def names(self) -> tuple[str, ...]:
        return (self.symbol, self.altname, self.rest_key)

    def asset_pairs_entry(self) -> dict:
        return {
            "altname": self.altname, "wsname": self.wsname, "aclass_base": "currency", "base": self.base,
            "aclass_quote": "currency", "quote": self.quote, "lot": "unit", "cost_decimals": 5,
            "pair_decimals": self.price_decimals, "lot_decimals": self.lot_decimals, "lot_multiplier": 1,
            "leverage_buy": [], "leverage_sell": [], "fees": [[0, 0.26]], "fees_maker": [[0, 0.16]],
            "fee_volume_currency": "ZUSD", "margin_call": 80, "margin_stop": 40, "ordermin": "0.0001",
            "costmin": "0.5", "tick_size": str(Decimal(1).scaleb(-self.price_decimals)), "status": "online",
        }


def _part(asset: str) -> tuple[str, str]:
    """(AssetPairs code, wsname part) of an asset by its v2 name."""
    return LEGACY.get(asset, (asset, asset))


def listing(base: str, quote: str, *, decimals: int | None = None, listed: bool = True) -> Listing:
    """The listing of ``base/quote`` (v2 asset names) with Kraken's naming rules."""
    base_code, base_part = _part(base)
    quote_code, quote_part = _part(quote)
    altname = base_part + quote_part
    legacy_pair = base in LEGACY and quote in LEGACY and base_code != base_part and quote_code != quote_part
    rest_key = KEY_EXCEPTIONS.get(f"{base}/{quote}", base_code + quote_code if legacy_pair else altname)
    if decimals is None:
        price = USD_PRICE.get(base, 5.0) / USD_PRICE.get(quote, 1.0)
        decimals = max(1, min(8, 5 - len(str(int(price))) + (2 if price < 1 else 0)))
    return Listing(symbol=f"{base}/{quote}", altname=altname, rest_key=rest_key, wsname=f"{base_part}/{quote_part}",
                   base=base_code, quote=quote_code, price_decimals=decimals, listed=listed)


class Universe:
    """The fake's pairs, found by any of their names (exact, upper case) — Kraken's REST
    accepts the altname, the REST key and the v2 name; WebSocket v2 only the v2 name."""

    def __init__(self, listings: list[Listing]) -> None:
        self.listings = {item.symbol: item for item in listings}
        self._by_name = {name.upper(): item for item in listings for name in item.names()}

    def find(self, name: str) -> Listing | None:
        return self._by_name.get(name.strip().upper())

    def get(self, symbol: str) -> Listing:
        return self.listings[symbol]

    def symbols(self, *, listed_only: bool = False) -> list[str]:
        return sorted(s for s, item in self.listings.items() if item.listed or not listed_only)

    def asset_pairs(self, names: list[str] | None = None) -> dict[str, dict]:
        """The ``AssetPairs`` result (listed pairs; delisted ones are gone from it)."""
        chosen = [self.find(n) for n in names] if names else [i for i in self.listings.values() if i.listed]
        return {item.rest_key: item.asset_pairs_entry() for item in chosen if item is not None and item.listed}


def generate_universe(pairs: int = 400, *, delisted: int = 20, seed: int = 1) -> Universe:
    """At least `pairs` listed pairs (KRAKEN.md's eight among them, with their real names and
    decimals) plus `delisted` pairs that only archives still hold."""
    rng = random.Random(seed)
    out = {s: listing(*s.split("/"), decimals=d) for s, d in KNOWN.items()}
    for symbol in ALWAYS_LISTED:
        out[symbol] = listing(*symbol.split("/"))
    for symbol in ALWAYS_DELISTED[:delisted]:
        out[symbol] = listing(*symbol.split("/"), listed=False)
    bases = list(dict.fromkeys([*LEGACY, *NEW_ASSETS]))
    bases = [b for b in bases if b not in ("USD", "EUR", "GBP", "CAD", "JPY", "AUD", "CHF")]
    candidates = [(b, q) for b in bases for q in QUOTES if b != q]
    rng.shuffle(candidates)
    for base, quote in candidates:
        if len(out) >= pairs + delisted:
            break
        symbol = f"{base}/{quote}"
        if symbol not in out:
            out[symbol] = listing(base, quote, listed=sum(i.listed for i in out.values()) < pairs)
    synthetic = 0
    while len(out) < pairs + delisted:  # more than the named assets give: coined ones
        synthetic += 1
        base = "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWYZ") for _ in range(rng.choice((3, 4, 5)))) + "X"
        out.setdefault(f"{base}/USD", listing(base, "USD", listed=sum(i.listed for i in out.values()) < pairs))
    return Universe(list(out.values()))


_DEFAULT: Universe | None = None


def default_universe() -> Universe:
    """The universe the fakes use unless given one (built once; deterministic)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = generate_universe()
    return _DEFAULT
