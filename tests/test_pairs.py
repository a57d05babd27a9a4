import json

import pytest

from kraken_hist.core.errors import UnknownSymbolError
from kraken_hist.core.pairs import PAIR_MAP, Pair, PairRegistry

BUILTIN = PairRegistry()
normalize_symbol, get_pair = BUILTIN.normalize, BUILTIN.get

# canonical, REST altname (= CSV name), REST pair key, price decimals (KRAKEN.md's table)
KRAKEN_TABLE = [
    ("BTC/USD", "XBTUSD", "XXBTZUSD", 1),
    ("ETH/USD", "ETHUSD", "XETHZUSD", 2),
    ("SOL/USD", "SOLUSD", "SOLUSD", 2),
    ("ETH/BTC", "ETHXBT", "XETHXXBT", 5),
    ("BTC/USDT", "XBTUSDT", "XBTUSDT", 1),
    ("ETH/USDT", "ETHUSDT", "ETHUSDT", 2),
    ("BTC/EUR", "XBTEUR", "XXBTZEUR", 1),
    ("DOGE/USD", "XDGUSD", "XDGUSD", 7),
]


@pytest.mark.parametrize(("symbol", "altname", "rest_key", "decimals"), KRAKEN_TABLE)
def test_every_name_maps_to_the_canonical_symbol(symbol, altname, rest_key, decimals):
    for name in (symbol, altname, rest_key, altname.lower(), symbol.lower()):
        assert normalize_symbol(name) == symbol
    pair = get_pair(rest_key)
    assert (pair.altname, pair.rest_key, pair.csv_name, pair.price_decimals) == (altname, rest_key, altname, decimals)
    assert PAIR_MAP[symbol] is not None


def test_the_legacy_wsname_is_one_of_the_names_and_an_unknown_name_gets_the_closest_known():
    assert normalize_symbol("XBT/USD") == "BTC/USD"  # AssetPairs' wsname: ours to map, never sent to v2
    assert normalize_symbol("xdg/usd") == "DOGE/USD" and normalize_symbol("BTCUSD") == "BTC/USD"
    with pytest.raises(UnknownSymbolError) as info:
        normalize_symbol("XBTUSX")
    message = str(info.value)
    assert "'XBTUSX'" in message and "BTC/USD" in message
    assert info.value.known[0] in ("BTC/USD", "BTC/USDT")
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("filename", "symbol", "minutes"),
    [("XBTUSD.csv", "BTC/USD", None), ("XBTUSD_60.csv", "BTC/USD", 60), ("TimeAndSales_Combined/XDGUSD.csv", "DOGE/USD", None), ("ETHXBT_1440.csv", "ETH/BTC", 1440)],
)
def test_csv_file_names(filename, symbol, minutes):
    pair, interval = PairRegistry().from_csv_filename(filename)
    assert (pair.symbol, interval) == (symbol, minutes)


def test_csv_file_of_an_unknown_pair_is_refused():
    with pytest.raises(UnknownSymbolError, match="unknown symbol .FOOBAR."):
        PairRegistry().from_csv_filename("FOOBAR_5.csv")


def test_registry_extends_from_a_real_asset_pairs_answer(samples_dir):
    result = json.loads((samples_dir / "http_asset_pairs_2021_full.json").read_text())["result"]
    registry = PairRegistry(pairs=())
    added = registry.update_from_asset_pairs(result)
    assert len(added) > 250
    assert registry.normalize("XXBTZUSD") == "BTC/USD"
    assert registry.normalize("XDGUSD") == "DOGE/USD"
    assert registry.normalize("XETHXXBT") == "ETH/BTC"
    assert registry.get("ETH/BTC").price_decimals == 5
    assert registry.normalize("XBT/USD") == "BTC/USD"  # the wsname, mapped through the asset aliases
    assert registry.normalize("XXRPZEUR") == "XRP/EUR" and registry.get("XRP/EUR").status == "online"


def test_registry_extends_from_a_synthetic_entry():
    registry = PairRegistry(pairs=())
    registry.update_from_asset_pairs(
        {"ADAUSD": {"altname": "ADAUSD", "wsname": "ADA/USD", "pair_decimals": 6, "lot_decimals": 8},
         "XXBTZUSD.d": {"altname": "XBTUSD.d", "wsname": "XBT/USD"}}
    )
    assert registry.get("ada/usd") == Pair(symbol="ADA/USD", altname="ADAUSD", rest_key="ADAUSD", price_decimals=6,
                                           wsname="ADA/USD", origin="asset_pairs")
    assert registry.symbols() == ["ADA/USD"]


def test_pairs_kraken_no_longer_lists_are_inferred_from_archive_file_stems():
    registry = PairRegistry()
    assert registry.infer_from_stem("XRPUSD", price_decimals=5).symbol == "XRP/USD"
    legacy = registry.infer_from_stem("XXRPZEUR", price_decimals=5)  # X/Z-prefixed legacy codes
    assert (legacy.symbol, legacy.status, legacy.origin, legacy.decimals_inferred) == ("XRP/EUR", "inferred", "file_name", True)
    assert registry.infer_from_stem("ADAXBT", price_decimals=8).symbol == "ADA/BTC"
    with pytest.raises(UnknownSymbolError):
        registry.infer_from_stem("FOOBAR", price_decimals=2)


def test_patterns_select_pairs_by_any_name():
    registry = PairRegistry()
    assert registry.match("*/USD") == ["BTC/USD", "DOGE/USD", "ETH/USD", "SOL/USD"]
    assert registry.match("XBT*") == ["BTC/EUR", "BTC/USD", "BTC/USDT"]
    assert registry.match("all") == registry.symbols()
