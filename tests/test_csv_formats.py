"""Layout sniffing and chunk parsing of Kraken's CSV files (pure, no database)."""

import random
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from kraken_hist.rules.candles import candles_from_trades, vwap_at_decimals

from kraken_hist.ingest.archive.formats import (
    MAX_TRADES_PER_SECOND,
    OHLCVT,
    SYNTHETIC_ID_BASE,
    TRADES,
    BadRowReport,
    LayoutError,
    SecondBlocker,
    StrictModeError,
    interval_from_filename,
    parse_header_trades,
    parse_ohlcvt,
    PLAIN_COLUMNS,
    parse_plain_trades,
    sniff_layout,
    synthetic_trade_id,
)
from kraken_hist.core.types import HistoricalTrade

UTC = timezone.utc


def lines(text: str) -> list[bytes]:
    return text.encode().splitlines(keepends=True)


def rows(chunks):
    return [line.decode().rstrip("\n").split("\t") for chunk in chunks for line in chunk.payload]


def ids(chunks):
    """The trade_id column of trade chunks, whatever their column order."""
    return [line.decode().split("\t")[chunk.columns.index("trade_id")]
            for chunk in chunks for line in chunk.payload]


# ----- sniffing

@pytest.mark.parametrize(
    ("first", "name", "kind", "header", "columns", "interval"),
    [
        ("1381095255,122.0,0.1\n", "XBTUSD.csv", TRADES, False, ("time", "price", "volume"), None),
        ("1381017600,122.0,122.0,122.0,122.0,0.1,1\n", "XBTUSD_1440.csv", OHLCVT, False,
         ("time", "open", "high", "low", "close", "volume", "trades"), 1440),
        ("timestamp,price,volume\r\n", "XBTUSD.csv", TRADES, True, ("time", "price", "volume"), None),
        ("price,volume,time,buy/sell,market/limit,misc,trade_id\n", "TimeAndSales/XBTUSD.csv", TRADES, True,
         ("price", "volume", "time", "side", "ord_type", "misc", "trade_id"), None),
        ("Price, Volume, Time, Buy/Sell, Market/Limit, Misc, Trade ID\n", "XBTUSD.csv", TRADES, True,
         ("price", "volume", "time", "side", "ord_type", "misc", "trade_id"), None),
        ("timestamp,open,high,low,close,volume,trades\n", "ETHUSD_60.csv", OHLCVT, True,
         ("time", "open", "high", "low", "close", "volume", "trades"), 60),
    ],
)
def test_layouts_are_sniffed_from_the_first_line_and_the_name(first, name, kind, header, columns, interval):
    layout = sniff_layout(first.encode(), name)
    assert (layout.kind, layout.header, layout.columns, layout.interval) == (kind, header, columns, interval)


@pytest.mark.parametrize(
    ("first", "name", "message"),
    [
        ("1381095255,122.0,0.1,7,8\n", "XBTUSD.csv", "5 columns without a header"),
        ("1381017600,122.0,122.0,122.0,122.0,0.1,1\n", "XBTUSD.csv", "7 columns without a header"),
        ("1381095255,122.0,0.1\n", "XBTUSD_60.csv", "carries an interval"),
        ("price,volume,when,side\n", "XBTUSD.csv", "unknown column name(s) 'when'"),
        ("price,volume,misc\n", "XBTUSD.csv", "missing time"),
        ("price,price,time,volume\n", "XBTUSD.csv", "repeated price"),
        ("timestamp,open,high,low,close,volume,trades\n", "XBTUSD.csv", "no interval in the file name"),
        ("1381017600,1,1,1,1,1,1\n", "XBTUSD_7.csv", "not one Kraken publishes"),
        ("\n", "XBTUSD.csv", "empty"),
    ],
)
def test_unknown_layouts_are_refused_with_the_reason(first, name, message):
    with pytest.raises(LayoutError) as info:
        sniff_layout(first.encode(), name)
    assert message in str(info.value)


def test_interval_comes_from_the_file_name():
    assert interval_from_filename("Kraken_OHLCVT/XBTUSD_60.csv") == 60
    assert interval_from_filename("XBTUSD.csv") is None


# ----- synthetic ids

def test_synthetic_ids_grow_with_time_and_keep_file_order_within_a_second():
    ids = [synthetic_trade_id(1381095255, 0), synthetic_trade_id(1381095255, 1), synthetic_trade_id(1381095256, 0)]
    assert ids == sorted(ids) and all(i < 0 for i in ids)
    assert ids[0] == SYNTHETIC_ID_BASE + 1381095255 * MAX_TRADES_PER_SECOND
    assert synthetic_trade_id(10**10 - 1, MAX_TRADES_PER_SECOND - 1) < 0
    with pytest.raises(ValueError):
        synthetic_trade_id(1, MAX_TRADES_PER_SECOND)


# ----- plain Time and Sales

def test_plain_lines_become_copy_rows_and_chunks_end_on_minute_boundaries():
    text = "1700000000,100.5,0.1\n1700000000,100.6,0.2\n1700000000,100.7,1e-05\n1700000061,99,3\n"
    report = BadRowReport("XBTUSD.csv")
    chunks = list(parse_plain_trades(lines(text), symbol="BTC/USD", report=report, chunk_size=2))
    assert [c.rows for c in chunks] == [3, 1]  # the minute 22:13 is not split
    assert [c.candles for c in chunks] == [
        [b"2023-11-14 22:13:00+00\t100.5\t100.7\t100.5\t100.7\t30.171007\t0.30001\t3\n"],
        [b"2023-11-14 22:14:00+00\t99\t99\t99\t99\t297\t3\t1\n"],
    ]
    base = SYNTHETIC_ID_BASE + 1700000000 * MAX_TRADES_PER_SECOND
    assert all(c.columns == PLAIN_COLUMNS == ("trade_id", "time", "price", "volume", "symbol", "source")
               for c in chunks)
    assert rows(chunks) == [
        [str(base), "2023-11-14 22:13:20+00", "100.5", "0.1", "BTC/USD", "csv"],
        [str(base + 1), "2023-11-14 22:13:20+00", "100.6", "0.2", "BTC/USD", "csv"],
        [str(base + 2), "2023-11-14 22:13:20+00", "100.7", "1e-05", "BTC/USD", "csv"],
        [str(synthetic_trade_id(1700000061, 0)), "2023-11-14 22:14:21+00", "99", "3", "BTC/USD", "csv"],
    ]
    assert chunks[0].first_time == datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)
    assert chunks[1].last_time == datetime(2023, 11, 14, 22, 14, 21, tzinfo=UTC)
    assert (chunks[0].min_id, chunks[0].max_id) == (base, base + 2)
    assert [(c.lines, c.bytes, c.last_line) for c in chunks] == [(3, len(text) - 16, 3), (1, 16, 4)]
    assert report.total == 0


def test_bad_plain_lines_are_reported_with_line_numbers_and_take_no_ordinal():
    text = (
        "1700000000,100.5,0.1\n"      # 1 ok
        "1700000000,abc,0.1\n"        # 2 price not a number
        "1700000000,-5,0.1\n"         # 3 negative price
        "1700000000,0.0,0.1\n"        # 4 zero price
        "1700000000,100,-1\n"         # 5 negative volume
        "1700000000,100\n"            # 6 two fields
        "17000000x0,100,1\n"          # 7 time
        "1700000001,101,1\r\n"        # 8 ok (CRLF)
        "\n"                          # 9 blank: ignored
        "1699999999,101,1\n"          # 10 backwards
        "1700000001,102,2\n"          # 11 ok, ordinal 1
        "1700000002,10"               # 12 truncated last line
    )
    report = BadRowReport("XBTUSD.csv", max_examples=3)
    chunks = list(parse_plain_trades(lines(text), symbol="BTC/USD", report=report, chunk_size=100))
    assert ids(chunks) == [
        str(synthetic_trade_id(1700000000, 0)), str(synthetic_trade_id(1700000001, 0)),
        str(synthetic_trade_id(1700000001, 1)),
    ]
    assert report.counts == {"price": 3, "volume": 1, "fields": 1, "time": 1, "backwards": 1, "truncated": 1}
    assert [(b.line, b.reason) for b in report.examples] == [(2, "price"), (3, "price"), (4, "price")]
    assert "must be positive" in report.examples[1].message


def test_a_last_line_without_line_end_that_parses_is_kept():
    report = BadRowReport("XBTUSD.csv")
    chunks = list(parse_plain_trades(lines("1700000000,1,1\n1700000001,2,2"), symbol="BTC/USD", report=report,
                                     chunk_size=10))
    assert len(rows(chunks)) == 2 and report.total == 0


def test_strict_mode_raises_at_the_first_bad_line():
    report = BadRowReport("XBTUSD.csv", strict=True)
    with pytest.raises(StrictModeError) as info:
        list(parse_plain_trades(lines("1700000000,1,1\n1700000000,0,1\n"), symbol="BTC/USD", report=report,
                                chunk_size=10))
    assert info.value.bad.line == 2 and info.value.bad.reason == "price"


def test_more_trades_in_one_second_than_ids_can_hold_are_refused():
    text = "1700000000,1,1\n" * (MAX_TRADES_PER_SECOND + 2)
    report = BadRowReport("XBTUSD.csv")
    chunks = list(parse_plain_trades(lines(text), symbol="BTC/USD", report=report, chunk_size=10**6))
    assert sum(c.rows for c in chunks) == MAX_TRADES_PER_SECOND
    assert report.counts == {"second_overflow": 2}
    assert report.examples[0].line == MAX_TRADES_PER_SECOND + 1


def test_seconds_touched_by_id_bearing_coverage_are_left_out_but_keep_their_ordinals():
    t0 = datetime.fromtimestamp(1700000000, UTC)
    # REST coverage starts half-way through second 1700000001 and ends at 1700000003 exactly.
    blocker = SecondBlocker([(t0 + timedelta(seconds=1.5), t0 + timedelta(seconds=3))])
    text = "".join(f"{1700000000 + s},1,1\n" for s in (0, 1, 1, 2, 3, 3))
    report = BadRowReport("XBTUSD.csv")
    chunks = list(parse_plain_trades(lines(text), symbol="BTC/USD", report=report, chunk_size=10, blocker=blocker))
    assert ids(chunks) == [
        str(synthetic_trade_id(1700000000, 0)), str(synthetic_trade_id(1700000003, 0)),
        str(synthetic_trade_id(1700000003, 1)),
    ]
    assert chunks[0].covered == 3
    assert (chunks[0].first_time, chunks[0].last_time) == (t0, t0 + timedelta(seconds=3))


# ----- headered Time and Sales

def test_seven_column_header_layout_keeps_kraken_ids_side_and_order_type():
    text = (
        "price,volume,time,buy/sell,market/limit,misc,trade_id\n"
        "100.5,0.1,1700000000.1234,b,l,,5\n"
        "100.6,0.2,1700000000.5,sell,market,,6\n"
        "100.7,0.2,1700000001,x,m,,7\n"
        "100.8,0.3,1700000002,s,m,,-1\n"
    )
    data = lines(text)
    layout = sniff_layout(data[0], "XBTUSD.csv")
    report = BadRowReport("XBTUSD.csv")
    chunks = list(parse_header_trades(data[1:], layout=layout, symbol="BTC/USD", report=report, chunk_size=10))
    assert rows(chunks) == [
        ["BTC/USD", "5", "2023-11-14 22:13:20.123400+00", "100.5", "0.1", "b", "l", "csv"],
        ["BTC/USD", "6", "2023-11-14 22:13:20.500000+00", "100.6", "0.2", "s", "m", "csv"],
    ]
    assert [(b.line, b.reason) for b in report.examples] == [(4, "side"), (5, "trade_id")]


def test_header_layout_without_ids_gets_synthetic_ids():
    data = lines("timestamp,price,volume\n1700000000,1,1\n1700000000,2,1\n")
    layout = sniff_layout(data[0], "XBTUSD.csv")
    chunks = list(parse_header_trades(data[1:], layout=layout, symbol="BTC/USD", report=BadRowReport("f"),
                                      chunk_size=10))
    assert ids(chunks) == [str(synthetic_trade_id(1700000000, 0)), str(synthetic_trade_id(1700000000, 1))]


# ----- OHLCVT

def test_ohlcvt_rows_are_validated_as_candles():
    text = (
        "1700000040,10,12,9,11,1.5,3\n"     # 1 ok
        "1700000100,10,12,9,13,1.5,3\n"     # 2 close above high
        "1700000130,10,12,9,11,1.5,3\n"     # 3 not on the minute grid
        "1700000160,10,12,9,11,1.5,0\n"     # 4 zero trades
        "1700000040,10,12,9,11,1.5,3\n"     # 5 not after the previous line
        "1700000160,10,12,0,11,1.5,3\n"     # 6 low zero
        "1700000220,10,12,9,11,1.5,2\n"     # 7 ok
        "1700000280,10,12"                  # 8 truncated
    )
    layout = sniff_layout(lines(text)[0], "XBTUSD_1.csv")
    report = BadRowReport("XBTUSD_1.csv")
    chunks = list(parse_ohlcvt(lines(text), layout=layout, report=report, chunk_size=10))
    assert rows(chunks) == [
        ["2023-11-14 22:14:00+00", "10", "12", "9", "11", r"\N", "1.5", "3", "1"],
        ["2023-11-14 22:17:00+00", "10", "12", "9", "11", r"\N", "1.5", "2", "7"],
    ]
    assert [(b.line, b.reason) for b in report.examples] == [
        (2, "ohlc"), (3, "time"), (4, "trades"), (5, "backwards"), (6, "price"), (8, "truncated"),
    ]


def test_chunk_candles_equal_the_pure_twin():
    rng = random.Random(11)
    second, price, text = 1_700_000_000, 300_000, []
    for _ in range(5000):
        second += rng.choice((0, 0, 1, 13, 70))
        price += rng.randint(-30, 30)
        text.append(f"{second},{price / 10:.1f},{rng.randrange(0, 10**9) / 10**8:.8f}\n")
    trades, prev, ordinal = [], None, 0
    for line in text:
        ts, p, v = line.strip().split(",")
        ordinal = ordinal + 1 if ts == prev else 0
        prev = ts
        trades.append(HistoricalTrade(symbol="BTC/USD", trade_id=synthetic_trade_id(int(ts), ordinal),
                                      time=datetime.fromtimestamp(int(ts), UTC), price=Decimal(p), volume=Decimal(v)))
    chunks = list(parse_plain_trades(lines("".join(text)), symbol="BTC/USD", report=BadRowReport("f"), chunk_size=333))
    got = []
    for chunk in chunks:
        for row in chunk.candles:
            when, o, h, low, c, notional, volume, n = row.decode().rstrip("\n").split("\t")
            vwap = vwap_at_decimals(Decimal(notional) / Decimal(volume), 1) if Decimal(volume) else 0
            got.append((when, Decimal(o), Decimal(h), Decimal(low), Decimal(c), vwap, Decimal(volume), int(n)))
    assert got == [
        (c.time.strftime("%Y-%m-%d %H:%M:%S+00"), c.open, c.high, c.low, c.close, c.vwap, c.volume, c.trades)
        for c in candles_from_trades(trades)
    ]
