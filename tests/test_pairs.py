import json

import pytest

from kraken_hist.errors import UnknownSymbolError
from kraken_hist.pairs import PAIR_MAP, Pair, PairRegistry, get_pair, normalize_symbol

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


def test_unknown_symbol_names_it_and_the_known_ones():
    with pytest.raises(UnknownSymbolError) as info:
        normalize_symbol("XBT/USD")  # the AssetPairs wsname, refused by WebSocket v2
    message = str(info.value)
    assert "'XBT/USD'" in message and "BTC/USD" in message and "DOGE/USD" in message
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
    assert not registry.is_known("XBT/USD")


def test_registry_extends_from_a_synthetic_entry():
    registry = PairRegistry(pairs=())
    registry.update_from_asset_pairs(
        {"ADAUSD": {"altname": "ADAUSD", "wsname": "ADA/USD", "pair_decimals": 6, "lot_decimals": 8},
         "XXBTZUSD.d": {"altname": "XBTUSD.d", "wsname": "XBT/USD"}}
    )
    assert registry.get("ada/usd") == Pair(symbol="ADA/USD", altname="ADAUSD", rest_key="ADAUSD", price_decimals=6)
    assert registry.symbols() == ["ADA/USD"]
