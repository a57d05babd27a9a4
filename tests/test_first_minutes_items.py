"""The small items of issue 18, each pinned: intervals, candles arguments, digits, refresh and
import summaries, health after an import, a hand-edited candle, DataFrame column names."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import psycopg
import pytest
from click.testing import CliRunner

from kraken_hist.cli.imports import more_bad_lines
from kraken_hist.cli.main import cli
from kraken_hist.core.intervals import Interval
from kraken_hist.query.provider import HistoricalDataProvider
from kraken_hist.testing.fake_rest import FakeKrakenREST, demo_market


@pytest.fixture
def filled(db_url: str) -> Iterator[dict[str, str]]:
    """A database with 12 hours of BTC/USD backfilled from the fake, and its environment."""
    market = demo_market(["BTC/USD"], days=0.6, trades_per_minute=6.0, seed=5, ahead=0)
    with FakeKrakenREST(market) as fake:
        env = {"KRAKEN_HIST_DATABASE_URL": db_url, "KRAKEN_HIST_REST_URL": fake.url,
               "KRAKEN_HIST_REST_MIN_INTERVAL": "0", "KRAKEN_HIST_REST_LIMITER": "process"}
        result = CliRunner().invoke(cli, ["backfill", "BTC/USD", "--no-progress"], env=env)
        assert result.exit_code == 0, result.output
        yield env


def test_1M_is_refused_not_read_as_a_minute() -> None:
    with pytest.raises(ValueError, match="months are not a candle interval"):
        Interval.parse("1M")
    with pytest.raises(ValueError, match="month"):
        Interval.parse("1month")
    assert Interval.parse("1m").minutes == 1 and Interval.parse("1h").minutes == 60


def test_candles_start_after_end_is_an_error(db_url: str) -> None:
    result = CliRunner().invoke(cli, ["candles", "BTC/USD", "--start", "2025-02-02", "--end", "2025-02-01"],
                                env={"KRAKEN_HIST_DATABASE_URL": db_url})
    assert result.exit_code == 2 and "is not after --start" in result.output


def test_vwap_and_prices_have_the_pairs_decimals(filled: dict[str, str]) -> None:
    with HistoricalDataProvider(filled["KRAKEN_HIST_DATABASE_URL"]) as data:
        for interval in ("5m", "1h", "45m"):
            bars = data.get_candles("BTC/USD", interval, "2000-01-01")
            assert bars and all(c.vwap is None or c.vwap.as_tuple().exponent >= -1 for c in bars), interval
    table = CliRunner().invoke(cli, ["candles", "BTC/USD", "-i", "1h", "--last", "8", "--format", "csv"], env=filled)
    rows = [line.split(",") for line in table.output.splitlines()[1:]]
    assert rows and {len(v.split(".")[1]) for row in rows for v in row[1:5] + [row[6]]} == {1}, table.output


def test_dataframe_columns_for_backtesting_libraries(filled: dict[str, str]) -> None:
    # the README's one-liner for backtesting.py / vectorbt
    with HistoricalDataProvider(filled["KRAKEN_HIST_DATABASE_URL"]) as data:
        df = data.get_candles_df("BTC/USD", "15m", "2000-01-01").rename(columns=str.capitalize)
    assert list(df.columns[:5]) == ["Open", "High", "Low", "Close", "Volume"]
    assert df.index.tz is not None and len(df) > 10


def test_refresh_prints_a_short_summary_and_json_on_request(filled: dict[str, str]) -> None:
    text = CliRunner().invoke(cli, ["refresh"], env=filled)
    assert text.exit_code == 0 and len(text.output.strip().splitlines()) == 1, text.output
    assert text.output.startswith(("refreshed", "nothing to refresh"))
    as_json = CliRunner().invoke(cli, ["refresh", "BTC/USD", "--start", "2000-01-01", "--json"], env=filled)
    assert as_json.exit_code == 0 and "changes_consumed" in json.loads(as_json.output)


def test_more_bad_lines_counts_only_what_was_not_shown(db_url: str, tmp_path: Path) -> None:
    assert more_bad_lines(10, {"price": 8, "fields": 1, "volume": 1}, ["price"] * 5) == \
        "5 more bad lines (fields: 1, price: 3, volume: 1)"
    path = tmp_path / "XBTUSD.csv"
    good = [f"{1733300000 + i},100.5,0.1" for i in range(20)]
    bad = [f"{1733300030 + i},abc,0.1" for i in range(7)]
    path.write_text("\n".join(good + bad) + "\n")
    result = CliRunner().invoke(cli, ["import", str(path), "--no-progress"], env={"KRAKEN_HIST_DATABASE_URL": db_url})
    assert "... 2 more bad lines (price: 2)" in result.output, result.output
    # and right after an import whose aggregates are current, nothing is pending
    with HistoricalDataProvider(db_url) as data:
        assert data.health_check()["aggregates"]["pending_changes"] == 0


def test_gaps_verify_candles_finds_an_edited_candle_with_its_trade_count_unchanged(filled: dict[str, str]) -> None:
    url = filled["KRAKEN_HIST_DATABASE_URL"]
    with psycopg.connect(url) as conn:
        minute = conn.execute("UPDATE candles SET high = high + 1 WHERE symbol = 'BTC/USD' AND time = "
                              "(SELECT min(time) + interval '1 hour' FROM candles) RETURNING time").fetchone()[0]
    assert CliRunner().invoke(cli, ["gaps", "BTC/USD"], env=filled).output.strip() == "no gaps"  # counts agree
    deep = CliRunner().invoke(cli, ["gaps", "BTC/USD", "--verify-candles", "--json"], env=filled)
    found = json.loads(deep.output)
    assert [(g["kind"], g["start"]) for g in found] == [("candles", minute.isoformat())]
    fixed = CliRunner().invoke(cli, ["gaps", "BTC/USD", "--verify-candles", "--fill", "--no-progress"], env=filled)
    assert fixed.exit_code == 0, fixed.output
    assert CliRunner().invoke(cli, ["gaps", "--verify-candles"], env=filled).output.strip() == "no gaps"
