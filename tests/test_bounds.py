"""Impossible values are refused at every edge (``kraken_hist.core.bounds``): the pure rules, their
array twin, and each parser (CSV lines, REST pages, WebSocket frames) and record type."""

from __future__ import annotations

import io
import json
import logging
from datetime import datetime, timedelta, timezone
from decimal import Context, Decimal, Inexact, InvalidOperation, Overflow

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from kraken_hist.core import bounds
from kraken_hist.core.bounds import (
    KRAKEN_FIRST_TRADE,
    MAX_CLOCK_SKEW,
    MAX_TRADE_ID,
    number_problem,
    price_problem,
    time_problem,
    trade_id_problem,
    unix_seconds_problem,
    unix_seconds_refused,
    volume_problem,
)
from kraken_hist.ingest.archive.formats import (
    TIME_OUT_OF_RANGE,
    BadRowReport,
    StrictModeError,
    parse_header_trades,
    parse_ohlcvt,
    parse_plain_trades,
    sniff_layout,
    synthetic_trade_id,
)
from kraken_hist.ingest.archive.vectorized import stream_plain_trades
from kraken_hist.kraken.rest_parsing import ParseError, loads, parse_ohlc_result, parse_trades_result
from kraken_hist.core.timeutils import EPOCH, from_unix_decimal
from kraken_hist.core.types import CandleRecord, HistoricalTrade, TradeRecord
from kraken_hist.kraken.ws_parsing import OhlcMessage, TradeMessage, parse_frame

UTC = timezone.utc
NOW = datetime(2026, 12, 4, 12, 0, 0, 250_000, tzinfo=UTC)
FIRST = int((KRAKEN_FIRST_TRADE - EPOCH).total_seconds())  # 1377993600
LAST = int((NOW + MAX_CLOCK_SKEW - EPOCH).total_seconds())  # the last whole second allowed at NOW
Y2100 = 4_102_444_800


def lines(text: str) -> list[bytes]:
    return text.encode().splitlines(keepends=True)


def plain(text: str, *, now: datetime = NOW, strict: bool = False, chunk_size: int = 100):
    report = BadRowReport("XBTUSD.csv", strict=strict)
    chunks = list(parse_plain_trades(lines(text), symbol="BTC/USD", report=report, chunk_size=chunk_size, now=now))
    return chunks, report


def copy_rows(chunks) -> list[list[str]]:
    return [line.decode().rstrip("\n").split("\t") for chunk in chunks for line in chunk.payload]


# --------------------------------------------------------------------------- the rules

def test_the_constants() -> None:
    assert KRAKEN_FIRST_TRADE == datetime(2013, 9, 1, tzinfo=UTC) and FIRST == 1_377_993_600
    assert timedelta(0) < MAX_CLOCK_SKEW <= timedelta(minutes=30)
    assert MAX_TRADE_ID == 2**63 - 1


@pytest.mark.parametrize(
    ("second", "refused"),
    [(0, True), (1_300_000_000, True), (FIRST - 1, True), (FIRST, False), (1_381_095_255, False),
     (1_700_000_000, False), (LAST, False), (LAST + 1, True), (Y2100, True), (10**10 - 1, True)],
)
def test_time_bounds_on_seconds_decimals_and_datetimes(second: int, refused: bool) -> None:
    assert (unix_seconds_problem(second, NOW) is not None) is refused
    assert bool(unix_seconds_refused(second, NOW)) is refused
    assert (unix_seconds_problem(Decimal(second) + Decimal("0.9999999"), NOW) is not None) is refused
    if second < 253_402_300_800:  # datetime's range
        when = EPOCH + timedelta(seconds=second, microseconds=999_999)
        assert (time_problem(when, NOW) is not None) is refused


def test_time_reasons_are_one_line_and_name_the_field() -> None:
    assert unix_seconds_problem(0, NOW) == "time 0 is before Kraken's first trade (2013-09-01T00:00:00Z)"
    late = time_problem(datetime(2100, 1, 1, tzinfo=UTC), NOW, "interval_begin")
    assert late == ("interval_begin 2100-01-01T00:00:00Z is after now (2026-12-04T12:00:00Z) plus the allowed "
                    "clock skew of 10 min")
    assert unix_seconds_problem(Decimal("NaN"), NOW) == "time NaN is not a finite number"
    assert unix_seconds_problem(Decimal("-Infinity"), NOW) == "time -Infinity is not a finite number"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (Decimal("NaN"), "price NaN is not a finite number"),
        (Decimal("sNaN"), "price sNaN is not a finite number"),
        (Decimal("Infinity"), "price Infinity is not a finite number"),
        (Decimal("0"), "price must be positive, got 0"),
        (Decimal("-0.5"), "price must be positive, got -0.5"),
        (Decimal("1e20"), "price 1E+20 is too large (more than 20 digits before the point)"),
        (Decimal("1e99"), "price 1E+99 is too large"),
        (Decimal("1e-21"), "price 1E-21 has more than 20 digits after the point"),
        (1.5, "price must be a Decimal or int, got float"),
    ],
)
def test_number_problems(value, message: str) -> None:
    assert (price_problem(value) or "").startswith(message)


def test_numbers_that_are_possible() -> None:
    for text in ("1", "0.00000001", "99999999999999999999", "0.00000000000000000001", "1E+19", "7.", "105433.60000"):
        assert price_problem(Decimal(text)) is None and volume_problem(Decimal(text)) is None
    assert volume_problem(Decimal(0)) == "volume must be positive, got 0"
    assert volume_problem(Decimal(0), zero_ok=True) is None
    assert volume_problem(Decimal(-1), "vwap", zero_ok=True) == "vwap must not be negative, got -1"
    assert price_problem(5) is None and price_problem(True) is not None


@pytest.mark.parametrize(
    ("value", "problem"),
    [(1, None), (MAX_TRADE_ID, None), (0, "trade_id must be positive, got 0"), (-7, "trade_id must be positive"),
     (2**63, "does not fit a bigint"), ("12", "must be an integer"), (True, "must be an integer")],
)
def test_trade_id_problems(value, problem) -> None:
    found = trade_id_problem(value)
    assert found is None if problem is None else problem in found


nows = st.datetimes(min_value=datetime(2014, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-(2**62), 2**62), min_size=1, max_size=50), nows)
def test_the_array_twin_equals_the_scalar_rule(seconds: list[int], now: datetime) -> None:
    near = [s % 10**10 for s in seconds] + [FIRST - 1, FIRST, int((now + MAX_CLOCK_SKEW - EPOCH).total_seconds())]
    for values in (seconds, near, [n + 1 for n in near]):
        mask = unix_seconds_refused(np.asarray(values, dtype=np.int64), now)
        assert mask.tolist() == [unix_seconds_problem(s, now) is not None for s in values]


@settings(max_examples=200, deadline=None)
@given(st.decimals(min_value=0, max_value=10**10, places=7), nows)
def test_decimal_seconds_and_their_datetime_get_the_same_answer(seconds: Decimal, now: datetime) -> None:
    assert (unix_seconds_problem(seconds, now) is None) == (time_problem(from_unix_decimal(seconds), now) is None)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.decimals(allow_nan=False, allow_infinity=False),
                 st.from_regex(r"\A[0-9]{1,25}(\.[0-9]{0,25})?([eE][-+]?[0-9]{1,3})?\Z").map(Decimal)))
def test_the_cheap_exponent_and_plain_text_shortcut_agree_with_the_rule(value: Decimal) -> None:
    assert bounds.exponent(value) == value.as_tuple().exponent
    text = str(value)
    if bounds.plain_decimal_text(text) and value:
        assert number_problem(value, "x") is None
    for raw in (f"{value:f}", f"{value:f}".rstrip("0")):
        if bounds.plain_decimal_text(raw) and Decimal(raw):
            assert number_problem(Decimal(raw), "x") is None


_EXACT = Context(prec=100, traps=[Inexact, Overflow, InvalidOperation])


@settings(max_examples=300, deadline=None)
@given(st.decimals(allow_nan=True, allow_infinity=True), st.decimals(allow_nan=True, allow_infinity=True))
def test_possible_numbers_keep_a_minute_of_sums_exact(price: Decimal, volume: Decimal) -> None:
    """What the plain CSV parser relies on: a minute's Σp·v and Σv of possible numbers never
    need more than its Decimal precision (a 6-million-trade minute is a product times 6e6)."""
    if price_problem(price) is not None or volume_problem(volume) is not None:
        return
    assert price.is_finite() and price > 0 and volume > 0
    notional = _EXACT.multiply(_EXACT.multiply(price, volume), 6_000_000)
    _EXACT.add(notional, Decimal("1e-40"))  # the smallest place a product of two possible numbers can have
    _EXACT.add(_EXACT.multiply(volume, 6_000_000), Decimal("1e-20"))


# --------------------------------------------------------------------------- CSV

def test_plain_lines_out_of_range_are_bad_lines_that_move_nothing() -> None:
    text = (
        "1700000000,100.5,0.1\n"   # 1 ok
        f"{Y2100},100,1\n"         # 2 year 2100
        "0,100,1\n"                # 3 epoch 0
        "1300000000,100,1\n"       # 4 2011: before Kraken's first trade
        "1700000001,100.6,0.2\n"   # 5 ok (not "backwards": refused lines set no previous time)
        f"{LAST + 1},100,1\n"      # 6 one second past now + skew
        f"{LAST},100,1\n"          # 7 ok: within the skew
    )
    chunks, report = plain(text)
    assert report.counts == {TIME_OUT_OF_RANGE: 4}
    assert [(b.line, b.reason) for b in report.examples] == [(n, TIME_OUT_OF_RANGE) for n in (2, 3, 4, 6)]
    assert "is after now" in report.examples[0].message and "before Kraken's first trade" in report.examples[1].message
    assert [r[0] for r in copy_rows(chunks)] == [
        str(synthetic_trade_id(1700000000, 0)), str(synthetic_trade_id(1700000001, 0)), str(synthetic_trade_id(LAST, 0))]
    assert min(c.first_time for c in chunks if c.first_time) == datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)
    assert max(c.last_time for c in chunks if c.last_time) == EPOCH + timedelta(seconds=LAST)
    assert sum(c.lines for c in chunks) == 7


def test_a_file_of_impossible_times_only_has_no_first_or_last_time() -> None:
    chunks, report = plain(f"{Y2100},100,1\n0,1,1\n")
    assert report.counts == {TIME_OUT_OF_RANGE: 2}
    assert all(c.rows == 0 and c.first_time is None and c.last_time is None for c in chunks)


def test_strict_mode_fails_at_an_impossible_time() -> None:
    with pytest.raises(StrictModeError) as info:
        plain(f"1700000000,1,1\n{Y2100},1,1\n", strict=True)
    assert (info.value.bad.line, info.value.bad.reason) == (2, TIME_OUT_OF_RANGE)
    assert f"XBTUSD.csv:2: time {Y2100} is after now" in str(info.value)


@pytest.mark.parametrize(
    ("line", "reason", "message"),
    [
        ("1700000000,100,1e99", "volume", "volume 1E+99 is too large"),
        ("1700000000,100,1e-99", "volume", "volume 1E-99 has more than 20 digits after the point"),
        ("1700000000,1e99,1", "price", "price 1E+99 is too large"),
        ("1700000000,123456789012345678901,1", "price", "is too large"),
        ("1700000000,100,0", "volume", "volume must be positive, got 0"),
        ("1700000000,100,0.000", "volume", "volume must be positive"),
    ],
)
def test_numbers_that_cannot_be_right_are_bad_lines_naming_the_field(line: str, reason: str, message: str) -> None:
    # after a good line of the same minute: the running candle's exact sums used to raise Inexact
    chunks, report = plain(f"1700000000,100.5,0.1\n{line}\n1700000001,100.7,0.3\n")
    assert report.counts == {reason: 1}
    assert report.examples[0].line == 2 and message in report.examples[0].message
    assert len(copy_rows(chunks)) == 2
    assert chunks[0].candles == [b"2023-11-14 22:13:00+00\t100.5\t100.7\t100.5\t100.7\t40.26\t0.4\t2\n"]


def test_a_wide_but_possible_number_is_kept_exactly() -> None:
    price, volume = "12345678901234567890.12345678901234567890", "0.00000000000000000001"
    chunks, report = plain(f"1700000000,{price},{volume}\n1700000000,1,2e3\n")
    assert report.total == 0
    assert [r[2:4] for r in copy_rows(chunks)] == [[price, volume], ["1", "2e3"]]


def test_the_stream_refers_a_block_with_an_impossible_time_to_the_line_parser() -> None:
    good = "".join(f"{1_700_000_000 + i * 7},{100 + i % 13}.5,0.{i % 97 + 1:03d}\n" for i in range(3000))
    data = lines(good)
    data.insert(1500, f"{Y2100},1,1\n".encode())
    data.insert(2500, b"1700010000,1,0\n")
    text = b"".join(data)
    results = []
    for streaming in (False, True):
        report = BadRowReport("XBTUSD.csv")
        if streaming:
            chunks = list(stream_plain_trades(io.BytesIO(text), symbol="BTC/USD", report=report, chunk_size=200, now=NOW))
            assert sum(c.binary for c in chunks) >= 10  # the clean blocks still took the array path
        else:
            chunks = list(parse_plain_trades(data, symbol="BTC/USD", report=report, chunk_size=200, now=NOW))
        results.append(([(b.line, b.reason) for b in report.examples], sum(c.rows for c in chunks),
                        max(c.last_time for c in chunks if c.last_time)))
    assert results[0] == results[1] == ([(1501, TIME_OUT_OF_RANGE), (2501, "volume")], 3000,
                                        EPOCH + timedelta(seconds=1_700_000_000 + 2999 * 7))


def test_headered_and_ohlcvt_lines_out_of_range_are_bad_lines() -> None:
    data = lines("price,volume,time,buy/sell,market/limit,misc,trade_id\n"
                 "100.5,0.1,1700000000.1234,b,l,,5\n"
                 f"100.6,0.2,{Y2100}.5,s,m,,6\n"
                 "100.6,0.2,1200000000,s,m,,7\n"
                 "100.6,0.2,1700000001,s,m,,0\n"
                 f"100.6,0.2,1700000001,s,m,,{2**63}\n"
                 "100.6,0,1700000001,s,m,,8\n"
                 "100.7,0.2,1700000002,s,m,,9\n")
    report = BadRowReport("XBTUSD.csv")
    chunks = list(parse_header_trades(data[1:], layout=sniff_layout(data[0], "XBTUSD.csv"), symbol="BTC/USD",
                                      report=report, chunk_size=10, now=NOW))
    assert [r[1] for r in copy_rows(chunks)] == ["5", "9"]
    assert [(b.line, b.reason) for b in report.examples] == [
        (3, TIME_OUT_OF_RANGE), (4, TIME_OUT_OF_RANGE), (5, "trade_id"), (6, "trade_id"), (7, "volume")]
    assert chunks[0].last_time == datetime(2023, 11, 14, 22, 13, 22, tzinfo=UTC)

    ohlc = lines(f"1700000040,10,12,9,11,1.5,3\n{Y2100 - Y2100 % 60},10,12,9,11,1.5,3\n0,10,12,9,11,1.5,3\n"
                 "1700000100,10,12,9,11,1e99,3\n1700000160,10,12,9,11,1.5,2\n")
    report = BadRowReport("XBTUSD_1.csv")
    chunks = list(parse_ohlcvt(ohlc, layout=sniff_layout(ohlc[0], "XBTUSD_1.csv"), report=report, chunk_size=10,
                               now=NOW))
    assert [(b.line, b.reason) for b in report.examples] == [(2, TIME_OUT_OF_RANGE), (3, TIME_OUT_OF_RANGE),
                                                             (4, "volume")]
    assert chunks[0].rows == 2 and chunks[0].last_time == datetime(2023, 11, 14, 22, 16, tzinfo=UTC)


# ----- fuzz: whatever the file holds, only documented errors escape and good rows round-trip

_good_number = st.decimals(min_value=Decimal("0.00000001"), max_value=Decimal(10**6), places=8).map(str)
_bad_number = st.one_of(
    st.from_regex(r"\A-?[0-9]{0,22}(\.[0-9]{0,22})?([eE][-+]?[0-9]{1,3})?\Z"),
    st.sampled_from(["0", "0.0", "NaN", "Infinity", "1e99", "1e-99", ".", "", "1.2.3", "１", "-1"]),
)
_bad_second = st.one_of(st.sampled_from([0, FIRST - 1, Y2100, LAST + 1, 10**10 - 1]), st.integers(0, 10**11))


def _spoil(draw, fields: dict, spoilers: dict, good: int) -> dict | None:
    """`fields` as they are (`good` times in ``good + len(spoilers)``), or with one field
    replaced by its spoiler's draw; None for the spoiler named "junk" (the caller's own)."""
    kind = draw(st.sampled_from(["good"] * good + list(spoilers)))
    if kind == "junk":
        return None
    return fields if kind == "good" else {**fields, kind: draw(spoilers[kind])}


@st.composite
def _plain_files(draw) -> bytes:
    """Mostly good lines (times moving forward, bursts sharing a second), mixed with lines
    that have one impossible or malformed field, and plain junk."""
    second, out = 1_700_000_000, []
    for _ in range(draw(st.integers(0, 40))):
        second += draw(st.sampled_from([0, 0, 1, 59, 61]))
        line = _spoil(draw, {"ts": second, "price": draw(_good_number), "volume": draw(_good_number)},
                      {"ts": st.one_of(_bad_second, st.integers(second - 100, second - 1)), "price": _bad_number,
                       "volume": _bad_number, "junk": None}, good=5)
        if line is None:
            out.append(draw(st.one_of(st.binary(max_size=30), st.text("0123456789,.eE-\r\n ", max_size=30).map(str.encode))))
        else:
            end = draw(st.sampled_from(["\n", "\n", "\r\n"]))
            out.append(f"{line['ts']},{line['price']},{line['volume']}{end}".encode())
    return b"".join(out)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_plain_files(), st.booleans())
def test_fuzz_plain_parser_only_reports_and_good_rows_round_trip(data: bytes, strict: bool) -> None:
    file_lines = io.BytesIO(data).readlines()
    report = BadRowReport("XBTUSD.csv", strict=strict)
    try:
        chunks = list(parse_plain_trades(file_lines, symbol="BTC/USD", report=report, chunk_size=7, now=NOW))
    except StrictModeError:
        assert strict
        return
    rows = copy_rows(chunks)
    written = {line.rstrip(b"\r\n") for line in file_lines}
    for trade_id, when, price, volume, symbol, source in rows:
        second = (int(trade_id) - synthetic_trade_id(0, 0)) // 100_000
        assert FIRST <= second <= LAST and (symbol, source) == ("BTC/USD", "csv")
        assert datetime.strptime(when, "%Y-%m-%d %H:%M:%S+00").replace(tzinfo=UTC) == EPOCH + timedelta(seconds=second)
        assert price_problem(Decimal(price)) is None and volume_problem(Decimal(volume)) is None
        assert f"{second},{price},{volume}".encode() in written  # the values as the file wrote them
    assert len(rows) + report.total <= len(file_lines)
    # the array path gives the very same answer
    streamed = BadRowReport("XBTUSD.csv")
    again = list(stream_plain_trades(io.BytesIO(data), symbol="BTC/USD", report=streamed, chunk_size=7, now=NOW))
    assert (streamed.counts, [(b.line, b.reason) for b in streamed.examples]) == (
        report.counts, [(b.line, b.reason) for b in report.examples])
    assert sum(c.rows for c in again) == len(rows)


# --------------------------------------------------------------------------- REST

def _trade_row(price='"100.5"', volume='"0.1"', time="1762795433.9717445", trade_id="7") -> str:
    return f'[{price},{volume},{time},"b","l","",{trade_id}]'


def test_rest_trades_with_impossible_values_are_refused_and_recorded(caplog: pytest.LogCaptureFixture) -> None:
    rows = [
        _trade_row(trade_id="10"),
        _trade_row(price='"Infinity"', trade_id="11"),
        _trade_row(volume="NaN", trade_id="12"),  # the non-standard JSON token
        _trade_row(time=f"{Y2100}.5", trade_id="13"),
        _trade_row(time="0", trade_id="14"),
        _trade_row(price='"0"', trade_id="15"),
        _trade_row(volume='"0.00000000"', trade_id="16"),
        _trade_row(price='"abc"', trade_id="17"),
        _trade_row(trade_id="0"),
        _trade_row(trade_id=str(2**63)),
        _trade_row(time="1e400", trade_id="18"),
        _trade_row(trade_id="19"),
    ]
    text = f'{{"XXBTZUSD":[{",".join(rows)}],"last":"1762795433971744500"}}'
    with caplog.at_level(logging.WARNING, logger="kraken_hist.kraken.rest_parsing"):
        page = parse_trades_result(loads(text), "BTC/USD", now=NOW, since="1762795400000000000")
    assert [t.trade_id for t in page.trades] == [10, 19]
    assert page.last == "1762795433971744500"  # the cursor as Kraken sent it
    assert [r.trade_id for r in page.refused] == [11, 12, 13, 14, 15, 16, 17, 0, 2**63, 18]
    reasons = [r.reason for r in page.refused]
    assert reasons[0] == ("BTC/USD Trades page since=1762795400000000000 last=1762795433971744500 row 1 "
                          "(trade 11): price Infinity is not a finite number")
    for reason, field in zip(reasons, ["price", "volume", "time", "time", "price", "volume", "price", "trade_id",
                                       "trade_id", "time"]):
        assert f"): {field} " in reason and "\n" not in reason
    assert page.seen_ids() == list(range(10, 20))  # refused ids count as seen; 0 and 2**63 are no ids
    assert page.first_seen_id(11) == 11 and page.last_seen_id == 19
    assert len([r for r in caplog.records if "refused" in r.getMessage()]) == 10


def test_rest_ohlc_rows_with_impossible_values_are_refused() -> None:
    rows = [
        [1_699_999_260, "10.0", "10.0", "10.0", "10.0", "10.0", "1.0", 1],
        [Y2100, "10.0", "10.0", "10.0", "10.0", "10.0", "1.0", 1],
        [60, "10.0", "10.0", "10.0", "10.0", "10.0", "1.0", 1],
        [1_699_999_320, "Infinity", "10.0", "10.0", "10.0", "10.0", "1.0", 1],
        [1_699_999_380, "10.0", "10.0", "10.0", "10.0", "10.0", "NaN", 1],
        [1_699_999_440, "10.0", "10.0", "10.0", "10.0", "0", "0", 0],  # a filler row: kept
    ]
    page = parse_ohlc_result({"XXBTZUSD": rows, "last": 1_699_999_380}, "BTC/USD", 1, now=NOW)
    assert [r.time.minute for r in page.rows] == [1, 4]
    assert [r.reason.split(": ", 1)[1].split(" ")[0] for r in page.refused] == ["time", "time", "open", "volume"]
    assert page.refused[0].reason.startswith("BTC/USD OHLC 1m page last=1699999380 row 1: time 4102444800")


_junk_numbers = st.one_of(
    st.decimals(allow_nan=False, allow_infinity=False).map(str),
    st.integers(-(2**70), 2**70).map(str),
    st.from_regex(r"\A-?[0-9]{1,25}(\.[0-9]{1,25})?([eE][-+]?[0-9]{1,4})?\Z").map(json.dumps),
    st.sampled_from(['"Infinity"', '"NaN"', '"-0"', "NaN", "Infinity", "-Infinity", '"abc"', '""', "null", "[]",
                     '"1e99"', '"sNaN"', "true", "1.5e-30", '"0.00000000"']),
)
_good_price = st.decimals(min_value=Decimal("0.00001"), max_value=Decimal(10**6), places=5).map(
    lambda d: json.dumps(f"{d:.5f}"))
_good_volume = st.decimals(min_value=Decimal("0.00000001"), max_value=Decimal(1000), places=8).map(
    lambda d: json.dumps(f"{d:.8f}"))
_good_time = st.decimals(min_value=FIRST, max_value=LAST, places=7).map(str)
_bad_time = st.one_of(st.integers(-10, 2**64).map(str), _junk_numbers,
                      st.decimals(min_value=LAST + 1, max_value=10**12, places=4).map(str))
_bad_id = st.sampled_from([0, -1, 2**63, 2**70, 1.5, '"12"', "null"]).map(str)


@st.composite
def _rest_rows(draw) -> str:
    """A Kraken trade row; usually good, else with one field impossible or malformed."""
    row = _spoil(draw, {"price": draw(_good_price), "volume": draw(_good_volume), "time": draw(_good_time),
                        "id": str(draw(st.integers(1, 2**63 - 1)))},
                 {"price": _junk_numbers, "volume": _junk_numbers, "time": _bad_time, "id": _bad_id, "junk": None},
                 good=8)
    if row is None:
        return draw(st.sampled_from(["[]", "7", '"x"', "[1,2,3]", "null", "{}"]))
    return f'[{row["price"]},{row["volume"]},{row["time"]},"b","l","",{row["id"]}]'


@settings(max_examples=300, deadline=None)
@given(st.lists(_rest_rows(), max_size=12))
def test_fuzz_rest_trades_only_documented_errors_and_exact_round_trip(rows: list[str]) -> None:
    text = f'{{"XXBTZUSD":[{",".join(rows)}],"last":"1762795433971744500"}}'
    try:
        result = loads(text)
        page = parse_trades_result(result, "BTC/USD", now=NOW)
    except ParseError:
        return
    raw = result["XXBTZUSD"]
    assert len(page.trades) + len(page.refused) == len(raw)
    accepted = iter(page.trades)
    trade = next(accepted, None)
    for row in raw:  # the accepted trades are rows of the answer, in order, with their exact values
        if trade is None or row[6] != trade.trade_id:
            continue
        try:
            price, volume, when = (Decimal(row[0]), Decimal(row[1]), from_unix_decimal(Decimal(row[2])))
        except (ArithmeticError, ValueError):
            continue  # a refused row (say, a time past datetime's year 9999) that shares the id
        if (trade.price.as_tuple(), trade.volume.as_tuple(), trade.time) != (price.as_tuple(), volume.as_tuple(), when):
            continue
        assert trade_id_problem(trade.trade_id) is None and time_problem(trade.time, NOW) is None
        assert price_problem(trade.price) is None and volume_problem(trade.volume) is None
        trade = next(accepted, None)
    assert trade is None, "an accepted trade matches no row of the answer"


# --------------------------------------------------------------------------- WebSocket

def _ws_trade(trade_id: int = 1, price: str = "83744.3", qty: str = "0.5", when: str = "2026-09-25T17:48:26.844359Z"):
    return (f'{{"symbol":"BTC/USD","side":"buy","price":{price},"qty":{qty},"ord_type":"limit",'
            f'"trade_id":{trade_id},"timestamp":"{when}"}}')


def test_ws_trade_items_with_impossible_values_are_refused_and_the_others_go_on() -> None:
    items = [_ws_trade(1), _ws_trade(2, price="NaN"), _ws_trade(3, when="2100-01-01T00:00:00Z"),
             _ws_trade(4, qty="0"), _ws_trade(0), _ws_trade(5, price="1e99"), _ws_trade(6, qty="-Infinity"),
             _ws_trade(7, when="2010-01-01T00:00:00.5Z"), _ws_trade(8)]
    message = parse_frame(f'{{"channel":"trade","type":"update","data":[{",".join(items)}]}}', now=NOW)
    assert isinstance(message, TradeMessage)
    assert [t.trade_id for t in message.trades] == [1, 8]
    assert [r.trade_id for r in message.refused] == [2, 3, 4, 0, 5, 6, 7]
    assert message.refused[0].reason == "trade update frame item 1 (BTC/USD trade 2): price nan is not a finite number"
    assert message.refused[1].reason.startswith(
        "trade update frame item 2 (BTC/USD trade 3): timestamp 2100-01-01T00:00:00Z is after now")
    fields = [r.reason.split("): ", 1)[1].split(" ")[0] for r in message.refused]
    assert fields == ["price", "timestamp", "qty", "trade_id", "price", "qty", "timestamp"]


def test_ws_ohlc_items_with_impossible_values_are_refused() -> None:
    def item(begin: str, open_: str = "83729.5", volume: str = "1.5") -> str:
        return (f'{{"symbol":"BTC/USD","open":{open_},"high":83800.0,"low":83700.0,"close":83750.0,"trades":3,'
                f'"volume":{volume},"vwap":83750.1,"interval_begin":"{begin}","interval":1,"timestamp":"{begin}"}}')

    frame = (f'{{"channel":"ohlc","type":"snapshot","data":[{item("2026-09-25T17:48:00.000000000Z")},'
             f'{item("2100-01-01T00:00:00Z")},{item("2026-09-25T17:49:00Z", open_="Infinity")},'
             f'{item("2026-09-25T17:50:00Z", volume="-1")}]}}')
    message = parse_frame(frame, now=NOW)
    assert isinstance(message, OhlcMessage) and len(message.candles) == 1
    assert [r.reason.split("): ", 1)[1].split(" ")[0] for r in message.refused] == ["interval_begin", "open", "volume"]
    assert all(r.trade_id is None and r.reason.startswith("ohlc snapshot frame item") for r in message.refused)


# --------------------------------------------------------------------------- records

def test_records_refuse_impossible_times_and_numbers() -> None:
    good = dict(symbol="BTC/USD", trade_id=1, time=datetime(2025, 1, 1, tzinfo=UTC), price=Decimal(1),
                volume=Decimal(1))
    assert TradeRecord(**good).trade_id == 1 and HistoricalTrade(**good).trade_id == 1
    for overrides, message in [
        ({"time": datetime(2100, 1, 1, tzinfo=UTC)}, "time 2100-01-01T00:00:00Z is after now"),
        ({"time": datetime(2013, 8, 31, tzinfo=UTC)}, "is before Kraken's first trade"),
        ({"price": Decimal("Infinity")}, "price must be finite"),
        ({"trade_id": 2**63}, "trade_id 9223372036854775808 does not fit a bigint"),
    ]:
        with pytest.raises(ValueError, match=message):
            TradeRecord(**{**good, **overrides})
    with pytest.raises(ValueError, match="before Kraken's first trade"):
        HistoricalTrade(**{**good, "time": datetime(2012, 1, 1, tzinfo=UTC)})
    with pytest.raises(ValueError, match="volume must be finite"):
        HistoricalTrade(**{**good, "volume": Decimal("NaN")})
    HistoricalTrade(**{**good, "time": datetime(2100, 1, 1, tzinfo=UTC)})  # the fake exchange's future book
    candle = dict(symbol="BTC/USD", time=datetime(2025, 1, 1, tzinfo=UTC), open=Decimal(1), high=Decimal(1),
                  low=Decimal(1), close=Decimal(1), volume=Decimal(1), vwap=Decimal(1), trades=1)
    for when in (datetime(2100, 1, 1, tzinfo=UTC), datetime(1970, 1, 1, tzinfo=UTC)):
        with pytest.raises(ValueError, match="time "):
            CandleRecord(**{**candle, "time": when})


def test_records_take_the_wall_clock_as_now() -> None:
    soon = datetime.now(UTC).replace(second=0, microsecond=0) + bounds.MAX_CLOCK_SKEW - timedelta(minutes=1)
    CandleRecord(symbol="BTC/USD", time=soon, open=Decimal(1), high=Decimal(1), low=Decimal(1), close=Decimal(1),
                 volume=Decimal(1), vwap=None, trades=1)
    with pytest.raises(ValueError, match="after now"):
        TradeRecord(symbol="BTC/USD", trade_id=1, time=soon + timedelta(minutes=2), price=Decimal(1), volume=Decimal(1))
    assert number_problem(Decimal(1), "x") is None
