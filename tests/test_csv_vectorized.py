"""The numpy fast path for plain Time and Sales files against the line-by-line parser.

``stream_plain_trades`` must give exactly what ``parse_plain_trades`` gives (rows, synthetic
ids, candles, bad-line reports, covered counts) whatever the file holds, with each minute in
exactly one chunk; and its binary COPY rows must be stored by PostgreSQL as the very values
the text rows store.
"""

from __future__ import annotations

import io
import random
import struct
from datetime import datetime, timedelta, timezone
from decimal import Decimal, localcontext

import numpy as np
import psycopg
import pytest

from kraken_hist.ingest.archive import vectorized as csv_vectorized
from kraken_hist.ingest.archive.formats import (
    MAX_TRADES_PER_SECOND,
    PLAIN_COLUMNS,
    BadRowReport,
    SecondBlocker,
    StrictModeError,
    parse_plain_trades,
    synthetic_trade_id,
)
from kraken_hist.ingest.archive.vectorized import BINARY_HEADER, BINARY_TRAILER, stream_plain_trades

UTC = timezone.utc
PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


# ----- decoding what the parsers produce

def _numeric(data: bytes) -> str:
    ndigits, weight, sign, dscale = struct.unpack_from(">hhHh", data)
    digits = struct.unpack_from(f">{ndigits}h", data, 8)
    assert sign == 0
    with localcontext() as exact:
        exact.prec = 100
        value = sum(Decimal(d) * Decimal(10000) ** (weight - i) for i, d in enumerate(digits))
        return str(value.quantize(Decimal(1).scaleb(-dscale)))


def _binary_tuples(data: bytes) -> list[list[bytes]]:
    rows, pos = [], 0
    while pos < len(data):
        (count,) = struct.unpack_from(">h", data, pos)
        pos += 2
        fields = []
        for _ in range(count):
            (length,) = struct.unpack_from(">i", data, pos)
            fields.append(data[pos + 4:pos + 4 + length])
            pos += 4 + length
        rows.append(fields)
    return rows


def _when(field: bytes) -> datetime:
    return PG_EPOCH + timedelta(microseconds=struct.unpack(">q", field)[0])


def decode_rows(chunk) -> list[tuple]:
    """(trade_id, time, price text, volume text, symbol, source) of every row of a chunk."""
    assert chunk.columns == PLAIN_COLUMNS
    data = b"".join(chunk.payload)
    if not chunk.binary:
        rows = []
        for line in data.splitlines():
            trade_id, when, price, volume, symbol, source = (f.strip().decode() for f in line.split(b"\t"))
            rows.append((int(trade_id), datetime.fromisoformat(when), str(Decimal(price)), str(Decimal(volume)),
                         symbol, source))
        return rows
    return [(struct.unpack(">q", f[0])[0], _when(f[1]), _numeric(f[2]), _numeric(f[3]), f[4].decode(), f[5].decode())
            for f in _binary_tuples(data)]


def decode_candles(chunk) -> list[tuple]:
    """(minute, open, high, low, close, Σp·v, Σv, count) as text, scale included."""
    data = b"".join(chunk.candles or [])
    if not chunk.binary:
        return [(datetime.fromisoformat(f[0]),) + tuple(str(Decimal(x)) for x in f[1:7]) + (int(f[7]),)
                for f in ([x.strip().decode() for x in line.split(b"\t")] for line in data.splitlines())]
    return [(_when(f[0]),) + tuple(_numeric(x) for x in f[1:7]) + (struct.unpack(">i", f[7])[0],)
            for f in _binary_tuples(data)]


def parse_both(data: bytes, chunk_size: int, blocker_ranges=()):
    """(line-by-line, stream) results: rows, candles, report counts, example lines, covered, chunks."""
    results = []
    for streaming in (False, True):
        report = BadRowReport("XBTUSD.csv")
        blocker = SecondBlocker(blocker_ranges)
        if streaming:
            chunks = list(stream_plain_trades(io.BytesIO(data), symbol="BTC/USD", report=report,
                                              chunk_size=chunk_size, blocker=blocker))
        else:
            chunks = list(parse_plain_trades(io.BytesIO(data).readlines(), symbol="BTC/USD", report=report,
                                             chunk_size=chunk_size, blocker=blocker))
        results.append({
            "rows": [r for c in chunks for r in decode_rows(c)],
            "candles": [k for c in chunks for k in decode_candles(c)],
            "bad": (report.counts, [(b.line, b.reason) for b in report.examples]),
            "covered": sum(c.covered for c in chunks),
            "lines": sum(c.lines for c in chunks),
            "bytes": sum(c.bytes for c in chunks),
            "chunks": chunks,
        })
    return results


# ----- generated files

PRICES = ("{a}.{b}", "{a}", "0.000{c}", ".5", "7.", "{a}.{b}0")
VOLUMES = ("0.{v:08d}", "{a}", "12.5", "0.5")
# Values too wide for the array path's integers: a block holding one goes line by line.
WIDE_PRICE, WIDE_VOLUME = "123456789012.12345678", "99999999.9999999999"
BAD_LINES = ("{s},0,1\n", "{s},1,1\r{s},1,1\n", "\x0c\n", "{back},1.0,1\n", "garbage\n", "\n", "{s},1e-3,1\n", "{s},1.0,1\r\n", "{s},1..0,1\n",
             "{s},-1,1\n", "{s},1,-1\n", "{s},1\n", "{s},1,1,1\n", "{s}.5,1,1\n", "{s},,1\n", "{s},1,.\n",
             # impossible values (bounds): zero volume, out-of-range times, numbers too wide
             "{s},1,0\n", "{s},1,0.0\n", "0,1,1\n", "4102444800,1,1\n", "1300000000,1,1\n", "{s},1,1e99\n",
             "{s},1e-99,1\n", "{s},100000000000000000000,1\n", "{s},1,0.000000000000000000001\n")


START = 1_500_000_000


def generate(rng: random.Random, lines: int, bad: float, wide: float = 0.0) -> bytes:
    second = START + rng.randrange(10**6)
    out = []
    for _ in range(lines):
        second += rng.choice((0, 0, 0, 1, 2, 59, 61, 7, 3600))
        values = {"a": rng.randint(1, 99999), "b": rng.randint(0, 99), "c": rng.randint(1, 99), "v": rng.randrange(1, 10**8),
                  "s": second, "back": second - rng.randint(1, 5000)}
        if rng.random() < bad:
            out.append(rng.choice(BAD_LINES).format(**values))
        else:
            price = WIDE_PRICE if rng.random() < wide else rng.choice(PRICES).format(**values)
            volume = WIDE_VOLUME if rng.random() < wide else rng.choice(VOLUMES).format(**values)
            out.append(f"{second},{price},{volume}\n")
    return "".join(out).encode()


@pytest.mark.parametrize("seed", range(6))
def test_the_stream_gives_exactly_what_the_line_parser_gives(seed):
    rng = random.Random(seed)
    for _ in range(40):
        data = generate(rng, rng.randint(1, 600), bad=rng.choice((0, 0, 0.002, 0.02, 0.2)),
                        wide=rng.choice((0, 0, 0.001)))
        if rng.random() < 0.2:
            data = data.rstrip(b"\n")  # no newline at the end (or a cut-short last line)
        ranges = []
        if rng.random() < 0.5:
            lo = datetime.fromtimestamp(START + rng.uniform(0, 10**6 + 5000), UTC)
            ranges = [(lo, lo + timedelta(seconds=rng.uniform(0.1, 20000)))]
        by_line, streamed = parse_both(data, rng.choice((1, 2, 7, 50, 1000)), ranges)
        for key in ("rows", "bad", "covered", "lines", "bytes"):
            assert streamed[key] == by_line[key], key
        assert sorted(streamed["candles"]) == sorted(by_line["candles"])


def test_clean_blocks_take_the_array_path_and_every_minute_is_in_one_chunk(monkeypatch):
    built = []
    original = csv_vectorized.build_chunk

    def counting(*args, **kwargs):
        built.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(csv_vectorized, "build_chunk", counting)
    data = generate(random.Random(7), 5000, bad=0)
    by_line, streamed = parse_both(data, 100)
    assert streamed["rows"] == by_line["rows"]
    chunks = streamed["chunks"]
    assert len(built) == len(chunks) >= 40  # every block took the array path
    assert all(c.binary for c in chunks)
    assert all(c.lines <= 100 for c in chunks[:-1])
    minutes = [{r[1].replace(second=0) for r in decode_rows(c)} for c in chunks]
    assert all(not (a & b) for i, a in enumerate(minutes) for b in minutes[i + 1:])


def test_a_minute_longer_than_a_chunk_stays_whole():
    data = b"".join(b"1700000040,%d,1\n" % (i + 1) for i in range(250)) + b"1700000100,5,1\n"
    by_line, streamed = parse_both(data, 30)
    assert streamed["rows"] == by_line["rows"]
    assert streamed["chunks"][0].rows >= 250  # the minute is not split, though the chunk size is 30
    assert [r[0] for r in streamed["rows"][:3]] == [synthetic_trade_id(1700000040, i) for i in range(3)]


def test_a_second_with_too_many_trades_is_reported_like_the_line_parser_does():
    data = b"1700000000,1,1\n" * (MAX_TRADES_PER_SECOND + 2) + b"1700000060,2,1\n"
    by_line, streamed = parse_both(data, 50_000)
    assert streamed["bad"] == by_line["bad"]
    assert streamed["bad"][0] == {"second_overflow": 2}
    assert len(streamed["rows"]) == MAX_TRADES_PER_SECOND + 1


def test_strict_mode_raises_at_the_first_bad_line_with_its_number():
    data = b"1700000000,1,1\n" * 10 + b"1700000001,x,1\n"
    with pytest.raises(StrictModeError, match=r"XBTUSD.csv:11: price"):
        list(stream_plain_trades(io.BytesIO(data), symbol="BTC/USD", report=BadRowReport("XBTUSD.csv", strict=True),
                                 chunk_size=4))


def test_covered_mask_follows_the_second_blocker():
    rng = random.Random(3)
    base = 1_700_000_000
    for _ in range(50):
        ranges, t = [], base - 100
        for _ in range(rng.randint(1, 6)):
            lo = t + rng.uniform(0, 50)
            t = lo + rng.uniform(0.01, 30)
            ranges.append((datetime.fromtimestamp(lo, UTC), datetime.fromtimestamp(t, UTC)))
        seconds = np.arange(base - 120, base + 200, dtype=np.int64)
        blocker = SecondBlocker(ranges)
        mask = blocker.blocked_seconds(seconds)
        assert mask.tolist() == [SecondBlocker(ranges).blocked(int(s)) for s in seconds]


def test_candle_sums_stay_exact_at_the_largest_values_the_fast_path_takes():
    price = "9999999999.99999999"  # 18 digits at scale 8 (a multiple of 4)
    volume = "999999.999999999999"  # 18 digits at scale 12
    data = b"".join(f"1700000000,{price},{volume}\n".encode() for _ in range(2000))
    by_line, streamed = parse_both(data, 10_000)
    assert streamed["chunks"][0].binary
    assert streamed["candles"] == by_line["candles"]
    (candle,) = streamed["candles"]
    with localcontext() as exact:
        exact.prec = 100
        assert Decimal(candle[5]) == Decimal(price) * Decimal(volume) * 2000  # Σ p·v
        assert Decimal(candle[6]) == Decimal(volume) * 2000


# ----- PostgreSQL stores the binary rows as it stores the text rows

def test_binary_rows_are_stored_exactly_as_the_text_rows(conn: psycopg.Connection):
    rng = random.Random(11)
    data = generate(rng, 3000, bad=0)
    by_line, streamed = parse_both(data, 1000)
    assert all(c.binary for c in streamed["chunks"])
    conn.execute("CREATE TEMP TABLE t_text (LIKE trades INCLUDING DEFAULTS)")
    conn.execute("CREATE TEMP TABLE t_binary (LIKE trades INCLUDING DEFAULTS)")
    columns = ", ".join(PLAIN_COLUMNS)
    with conn.cursor().copy(f"COPY t_text ({columns}) FROM STDIN") as copy:
        for chunk in by_line["chunks"]:
            copy.write(b"".join(chunk.payload))
    with conn.cursor().copy(f"COPY t_binary ({columns}) FROM STDIN (FORMAT binary)") as copy:
        copy.write(BINARY_HEADER + b"".join(p for c in streamed["chunks"] for p in c.payload) + BINARY_TRAILER)
    query = ("SELECT symbol, trade_id, time, price::text, volume::text, side, ord_type, source FROM {} "
             "ORDER BY trade_id")
    text_rows = conn.execute(query.format("t_text")).fetchall()
    assert len(text_rows) == 3000
    assert conn.execute(query.format("t_binary")).fetchall() == text_rows
