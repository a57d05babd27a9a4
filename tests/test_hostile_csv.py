"""Hostile archives (issue 14): a damaged zip member is refused with one line while the others
are imported; weekly OHLCVT files are compared with weeks of the exchange's own alignment."""

from __future__ import annotations

import zipfile
from pathlib import Path

import psycopg

from kraken_hist.csv_import import BulkCSVImporter


def lines(start: int, minutes: int) -> bytes:
    return b"".join(b"%d,%d.5,0.0%d\n" % (start + 20 * i, 30000 + i % 7, 1 + i % 9) for i in range(minutes * 3))


def test_a_damaged_member_is_refused_and_the_others_are_imported(db_url: str, tmp_path: Path) -> None:
    path = tmp_path / "Kraken_Trading_History.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("TimeAndSales_Combined/ETHUSD.csv", lines(1_700_000_000, 400), zipfile.ZIP_DEFLATED)
        archive.writestr("TimeAndSales_Combined/SOLUSD.csv", lines(1_700_000_000, 400), zipfile.ZIP_STORED)
        archive.writestr("TimeAndSales_Combined/XBTUSD.csv", lines(1_700_000_000, 400), zipfile.ZIP_DEFLATED)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        infos = {i.filename.rsplit("/", 1)[-1]: i for i in archive.infolist()}
    for name in ("ETHUSD.csv", "SOLUSD.csv"):  # spoil the middle of two members' data
        info = infos[name]
        body = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
        middle = body + info.compress_size // 2
        data[middle:middle + 8] = bytes(b ^ 0x5A for b in data[middle:middle + 8])
    path.write_bytes(bytes(data))
    results = BulkCSVImporter(db_url, chunk_size=200).import_archive(path)
    by_name = {r.file.rsplit("/", 1)[-1]: r for r in results}
    assert by_name["XBTUSD.csv"].status == "imported" and by_name["XBTUSD.csv"].imported == 1200
    for name in ("ETHUSD.csv", "SOLUSD.csv"):  # (spoilt deflate data fails in zlib or at the CRC check)
        result = by_name[name]
        assert result.status == "refused", result.reason
        assert "zlib error" in (result.reason or "") or "Bad CRC-32" in (result.reason or ""), result.reason
        assert "\n" not in (result.reason or "")
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM trades WHERE symbol = 'BTC/USD'").fetchone() == (1200,)


def test_a_weekly_ohlcvt_file_is_checked_against_thursday_weeks(db_url: str, tmp_path: Path) -> None:
    week = 1_699_488_000  # Thursday 2023-11-09 00:00 UTC: Kraken's weeks start at the epoch's weekday
    trades = tmp_path / "XBTUSD.csv"
    trades.write_text(f"{week + 100},100.0,1\n{week + 200_000},110.0,2\n{week + 604_800 + 50},105.0,1\n")
    weekly = tmp_path / "XBTUSD_10080.csv"
    weekly.write_text(f"{week},100.0,110.0,100.0,110.0,3,2\n{week + 604_800},105.0,105.0,105.0,105.0,1,1\n")
    importer = BulkCSVImporter(db_url)
    assert [r.status for r in importer.import_paths([trades, weekly])] == ["imported", "imported"]
    check = importer.compare_exchange_candles("BTC/USD", 10080)
    assert (check.compared, check.matching, check.mismatched) == (2, 2, 0), check.to_dict()
