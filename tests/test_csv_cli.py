"""``kraken-hist import``: files, archives and directories; summary, JSON and exit codes."""

import json
import zipfile

import psycopg
from click.testing import CliRunner

from kraken_hist.cli import cli


def count(db_url, query):
    with psycopg.connect(db_url) as conn:
        return conn.execute(query).fetchone()[0]


def test_import_files_and_archives_prints_a_summary_per_file_and_symbol(db_url, tmp_path):
    (tmp_path / "XBTUSD.csv").write_text("1700000000,30000.5,0.1\n1700000000,30000.6,0.2\n1700000061,30001,1\n")
    with zipfile.ZipFile(tmp_path / "Kraken_OHLCVT.zip", "w") as archive:
        archive.writestr("ETHUSD_60.csv", "1699999200,2000,2010,1990,2005,3.5,12\n")
    env = {"KRAKEN_HIST_DATABASE_URL": db_url}
    result = CliRunner().invoke(cli, ["import", str(tmp_path), "--no-progress"], env=env)
    assert result.exit_code == 0, result.output
    assert "imported" in result.output and "3 new" in result.output
    assert "BTC/USD: 3 rows imported, 0 skipped (0 bad, 0 covered), 0 duplicates, " \
           "2023-11-14 22:13:20 → 2023-11-14 22:14:21" in result.output
    assert "ETH/USD: 1 rows imported" in result.output
    assert count(db_url, "SELECT count(*) FROM trades") == 3
    assert count(db_url, "SELECT count(*) FROM exchange_candles WHERE symbol = 'ETH/USD'") == 1

    again = CliRunner().invoke(cli, ["import", str(tmp_path / "XBTUSD.csv"), "--json", "--no-progress"], env=env)
    assert again.exit_code == 0, again.output
    [record] = json.loads(again.output)["results"]
    assert (record["imported"], record["duplicates"]) == (0, 3)


def test_strict_failure_and_refused_files_exit_with_one_and_say_why(db_url, tmp_path):
    (tmp_path / "XBTUSD.csv").write_text("1700000000,30000.5,0.1\n1700000001,-1,0.1\n")
    (tmp_path / "UNKNOWN.csv").write_text("1700000000,1,1\n")
    env = {"KRAKEN_HIST_DATABASE_URL": db_url}
    result = CliRunner().invoke(
        cli, ["import", str(tmp_path / "XBTUSD.csv"), str(tmp_path / "UNKNOWN.csv"), "--strict", "--no-progress"],
        env=env)
    assert result.exit_code == 1
    assert "failed" in result.output and "XBTUSD.csv:2: price must be positive" in result.output
    assert "refused" in result.output and "cannot tell the pair" in result.output
    assert count(db_url, "SELECT count(*) FROM trades") == 0

    lenient = CliRunner().invoke(cli, ["import", str(tmp_path / "XBTUSD.csv"), "--symbol", "XBTUSD",
                                       "--no-progress"], env=env)
    assert lenient.exit_code == 0, lenient.output
    assert "1 bad" in lenient.output and "line 2: price must be positive" in lenient.output
