"""`kraken-hist candles` and `kraken-hist refresh` against a real database."""

import csv
import io
import json
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from click.testing import CliRunner

from kraken_hist.cli.main import cli
from kraken_hist.core.types import CandleRecord

from .trade_data import insert_candles

UTC = timezone.utc
T0 = datetime(2025, 3, 5, tzinfo=UTC)


@pytest.fixture
def run(db_url):
    def invoke(*args):
        result = CliRunner().invoke(cli, list(args), env={"KRAKEN_HIST_DATABASE_URL": db_url})
        return result
    return invoke


@pytest.fixture
def minutes(conn):
    records = []
    for m in range(0, 180, 7):
        p = Decimal(100 + m)
        records.append(CandleRecord(symbol="BTC/USD", time=T0 + timedelta(minutes=m), open=p, high=p + 1, low=p - 1,
                                    close=p, volume=Decimal("0.5"), vwap=None if m == 7 else p, trades=2))
    insert_candles(conn, records)
    return records


def test_refresh_then_candles_in_three_formats(run, minutes):
    refreshed = run("refresh", "XBTUSD", "--json")  # (text: a one-line summary)
    assert refreshed.exit_code == 0, refreshed.output
    assert json.loads(refreshed.output)["changes_consumed"] == 1

    table = run("candles", "XBTUSD", "--interval", "1h", "--start", "2025-03-05", "--end", "2025-03-05T03:00:00Z")
    assert table.exit_code == 0, table.output
    lines = table.output.strip().splitlines()
    assert lines[0].split() == ["time", "open", "high", "low", "close", "volume", "vwap", "trades"]
    assert [line.split()[0] for line in lines[1:4]] == [
        "2025-03-05T00:00:00+00:00", "2025-03-05T01:00:00+00:00", "2025-03-05T02:00:00+00:00"]

    as_csv = run("candles", "BTC/USD", "-i", "45m", "--start", "2025-03-05", "--end", "2025-03-05T03:00:00Z",
                 "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(as_csv.output)))
    assert [r["time"] for r in rows] == [(T0 + timedelta(minutes=45 * i)).isoformat() for i in range(4)]
    assert rows[0]["open"] == "100.0" and rows[0]["trades"] == "14"  # minutes 0, 7, ..., 42; prices at the pair decimals

    as_json = run("candles", "BTC/USD", "-i", "1m", "--last", "2", "--end", "2025-03-05T00:10:00Z", "--format", "json")
    objects = json.loads(as_json.output)
    assert objects == [
        {"time": "2025-03-05T00:00:00+00:00", "open": "100.0", "high": "101.0", "low": "99.0", "close": "100.0",
         "volume": "0.5", "vwap": "100.0", "trades": 2},
        {"time": "2025-03-05T00:07:00+00:00", "open": "107.0", "high": "108.0", "low": "106.0", "close": "107.0",
         "volume": "0.5", "vwap": None, "trades": 2},
    ]


def test_candles_forming_and_fill_flags(run, minutes):
    assert run("refresh").exit_code == 0
    end = "2025-03-05T00:22:30Z"
    plain = json.loads(run("candles", "BTC/USD", "-i", "15m", "--start", "2025-03-05", "--end", end,
                           "--format", "json").output)
    assert [o["time"][11:16] for o in plain] == ["00:00"]
    forming = json.loads(run("candles", "BTC/USD", "-i", "15m", "--start", "2025-03-05", "--end", end,
                             "--include-forming", "--format", "json").output)
    # 00:15 is forming: only minute 21 (closed 00:22) is known at 00:22:30; minute 28 is not
    assert [(o["time"][11:16], o["trades"]) for o in forming] == [("00:00", 6), ("00:15", 2)]
    filled = json.loads(run("candles", "BTC/USD", "-i", "1m", "--start", "2025-03-05T00:06:00Z", "--end",
                            "2025-03-05T00:09:00Z", "--fill-quiet", "--format", "json").output)
    assert [(o["time"][14:16], o["volume"], o["close"]) for o in filled] == [("06", "0", "100.0"), ("07", "0.5", "107.0"),
                                                                              ("08", "0", "107.0")]


def test_candles_usage_errors(run, minutes):
    both = run("candles", "BTC/USD", "--start", "2025-03-05", "--last", "3")
    assert both.exit_code == 2 and "either" in both.output
    bad_symbol = run("candles", "NOPE/USD")
    assert bad_symbol.exit_code == 1 and "unknown symbol" in bad_symbol.output
    bad_interval = run("candles", "BTC/USD", "-i", "1y")
    assert bad_interval.exit_code == 2 and "interval" in bad_interval.output
    bad_time = run("candles", "BTC/USD", "--start", "yesterday")
    assert bad_time.exit_code == 2 and "cannot read time" in bad_time.output


def test_prices_and_vwap_are_shown_at_the_pair_decimals():
    # issue 18: vwap at the pair's decimals everywhere (rounded down, Kraken's rule), and one
    # length per column (REST pads prices with zeros, the archive does not)
    from decimal import Decimal

    from kraken_hist.rules.candles import vwap_at_decimals
    from kraken_hist.cli.candles import _price_text

    assert vwap_at_decimals(Decimal("99134.260673677459610267414490605879449980"), 1) == Decimal("99134.2")
    assert vwap_at_decimals(Decimal("99134.2"), 1) == Decimal("99134.2")  # a 1-minute vwap stays as it is
    assert _price_text(Decimal("98380.00000"), 1) == "98380.0" == _price_text(Decimal("98380.0"), 1)
    assert _price_text(Decimal("98380"), 1) == "98380.0"
    assert _price_text(Decimal("0.123456789"), 1) == "0.123456789"  # never rounds a price away
    assert _price_text(None, 1) == ""
