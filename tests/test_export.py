"""Export of trades and candles to Parquet and CSV: exact values, partitions, the command line."""

import csv
import json
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from kraken_hist.rules.candles import vwap_at_decimals
from kraken_hist.cli.main import cli
from kraken_hist.query.export import Partition, Piece, export, plan_pieces
from kraken_hist.core.intervals import Interval
from kraken_hist.query.provider import HistoricalDataProvider
from kraken_hist.storage.refresh import refresh_aggregates
from kraken_hist.testing.history import generate_trades

from .trade_data import by_time_and_id, store_trades

UTC = timezone.utc
T0 = datetime(2025, 1, 30, 22, tzinfo=UTC)


def d(*args):
    return datetime(*args, tzinfo=UTC)


@pytest.mark.parametrize("lo,hi,partition,expected", [
    (d(2025, 1, 30, 22), d(2025, 2, 1, 3), "day",
     [("2025-01-30", d(2025, 1, 30, 22), d(2025, 1, 31)), ("2025-01-31", d(2025, 1, 31), d(2025, 2, 1)),
      ("2025-02-01", d(2025, 2, 1), d(2025, 2, 1, 3))]),
    (d(2024, 12, 15), d(2025, 2, 1), "month",
     [("2024-12", d(2024, 12, 15), d(2025, 1, 1)), ("2025-01", d(2025, 1, 1), d(2025, 2, 1))]),
    (d(2025, 1, 1), d(2025, 1, 20), "auto", [(None, d(2025, 1, 1), d(2025, 1, 20))]),
    (d(2025, 1, 1), d(2025, 3, 2), "auto",
     [("2025-01", d(2025, 1, 1), d(2025, 2, 1)), ("2025-02", d(2025, 2, 1), d(2025, 3, 1)),
      ("2025-03", d(2025, 3, 1), d(2025, 3, 2))]),
    (d(2025, 1, 1), d(2025, 3, 2), "none", [(None, d(2025, 1, 1), d(2025, 3, 2))]),
])
def test_pieces_are_whole_days_or_months_cut_at_the_ends(lo, hi, partition, expected):
    assert plan_pieces(lo, hi, Partition(partition)) == [Piece(*e) for e in expected]


@pytest.fixture
def history(db_url, conn):
    trades = generate_trades("ETH/USD", T0, T0 + timedelta(hours=30), seed=9, trades_per_minute=2)
    store_trades(conn, trades)
    refresh_aggregates(db_url)
    return by_time_and_id(trades)


def test_trades_to_parquet_by_day_are_exact(db_url, history, tmp_path):
    lo, hi = T0 + timedelta(minutes=30), T0 + timedelta(hours=29)
    result = export(db_url, "ETH/USD", "trades", lo, hi, tmp_path / "out", fmt="parquet", partition="day")
    expected = [t for t in history if lo <= t.time < hi]
    assert [p.name for p in result.files] == ["2025-01-30.parquet", "2025-01-31.parquet", "2025-02-01.parquet"]
    assert result.rows == len(expected) and result.bytes == sum(p.stat().st_size for p in result.files)
    rows = []
    for path, day in zip(result.files, ("2025-01-30", "2025-01-31", "2025-02-01")):
        table = pq.read_table(path)
        assert str(table.schema.field("price").type) == "decimal128(38, 18)"
        part = table.to_pylist()
        assert {r["time"].strftime("%Y-%m-%d") for r in part} == {day}
        rows.extend(part)
    assert [(r["time"], r["trade_id"], r["price"], r["volume"], r["side"], r["ord_type"], r["source"]) for r in rows] == [
        (t.time, t.trade_id, t.price, t.volume, t.side, t.ord_type, "rest") for t in expected]


def test_candles_to_csv_are_the_stored_ones(db_url, conn, history, tmp_path):
    lo, hi = T0 + timedelta(hours=1), T0 + timedelta(hours=20)
    result = export(db_url, "ETH/USD", "candles", lo, hi, tmp_path / "c.csv", fmt="csv", interval=Interval(60))
    with open(result.files[0], newline="") as f:
        got = list(csv.reader(f))
    stored = conn.execute(
        "SELECT time, open, high, low, close, volume, vwap, trades FROM candles_1h "
        "WHERE symbol = 'ETH/USD' AND time >= %s AND time < %s ORDER BY time", (lo, hi)).fetchall()
    assert got[0] == ["time", "open", "high", "low", "close", "volume", "vwap", "trades"]
    assert len(got) - 1 == len(stored) == 19 == result.rows
    for row, s in zip(got[1:], stored):
        assert datetime.fromisoformat(row[0]) == s[0]
        assert [Decimal(v) for v in row[1:6]] == list(s[1:6])
        # vwap as every read hands it out: at ETH/USD's 2 price decimals, rounded down
        assert row[6] == str(vwap_at_decimals(s[6], 2)) and int(row[7]) == s[7]
    assert any(s[6] != vwap_at_decimals(s[6], 2) for s in stored)  # the stored quotients have more digits


def test_an_empty_single_file_still_has_its_columns(db_url, tmp_path):
    result = export(db_url, "BTC/USD", "trades", T0, T0 + timedelta(hours=1), tmp_path / "none.parquet")
    table = pq.read_table(result.files[0])
    assert table.num_rows == 0 and table.column_names[:3] == ["time", "trade_id", "price"]


def test_export_command(db_url, history, tmp_path):
    env = {"KRAKEN_HIST_DATABASE_URL": db_url, "KRAKEN_HIST_DATA_DIR": str(tmp_path)}
    out = tmp_path / "months"
    run = CliRunner().invoke(cli, ["export", "ETHUSD", "--kind", "candles", "-i", "45m", "--format", "parquet",
                                   "--partition", "month", "-o", str(out), "--no-progress"], env=env)
    assert run.exit_code == 0, run.output
    summary = json.loads(run.output)
    assert [p.split("/")[-1] for p in summary["files"]] == ["2025-01.parquet", "2025-02.parquet"]
    times = [r["time"] for f in summary["files"] for r in pq.read_table(f).to_pylist()]
    # every 45-minute bucket (epoch-aligned) holding trades, all closed long ago
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    buckets = sorted({epoch + timedelta(seconds=(t.time - epoch).total_seconds() // 2700 * 2700) for t in history})
    assert times == buckets and len(times) == summary["rows"]
    # an interval computed on the fly: vwap at the pair's decimals, the provider's digits
    vwaps = [r["vwap"] for f in summary["files"] for r in pq.read_table(f).to_pylist()]
    with HistoricalDataProvider(db_url) as provider:
        candles = provider.get_candles("ETH/USD", "45m", buckets[0], buckets[-1] + timedelta(minutes=45))
    assert vwaps == [c.vwap for c in candles] and all(v == v.quantize(Decimal("0.01")) for v in vwaps)
    # a file name with the format's suffix means one file; without --end the export stops at the
    # newest stored trade, and --start is the first bucket starting at or after it
    one = CliRunner().invoke(cli, ["export", "ETH/USD", "--kind", "candles", "-i", "45m", "--start",
                                   (buckets[3] + timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
                                   "-o", str(tmp_path / "one.parquet"), "--no-progress"], env=env)
    assert one.exit_code == 0, one.output
    assert [r["time"] for r in pq.read_table(tmp_path / "one.parquet").to_pylist()] == buckets[4:]
    bad = CliRunner().invoke(cli, ["export", "ETHUSD", "--start", "2030-01-01"], env=env)
    assert bad.exit_code == 1 and "nothing stored" in bad.output
