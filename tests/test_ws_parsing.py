"""WebSocket v2 frame parsing: every recorded real frame, and the frames that must be refused."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

import pytest

from kraken_hist.kraken.ws_parsing import (
    FrameError,
    HeartbeatMessage,
    MethodResponse,
    OhlcMessage,
    StatusMessage,
    TradeMessage,
    parse_frame,
)

UTC = timezone.utc


def _recorded(samples_dir: Path) -> list[dict]:
    with open(samples_dir / "ws_v2_recorded.jsonl", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def test_every_recorded_frame_parses(samples_dir: Path) -> None:
    records = _recorded(samples_dir)
    assert len(records) >= 10
    kinds = {}
    for record in records:
        message = parse_frame(record["frame"])
        kinds.setdefault(type(message).__name__, []).append(message)
    assert set(kinds) == {"StatusMessage", "HeartbeatMessage", "MethodResponse", "TradeMessage", "OhlcMessage"}
    for status in kinds["StatusMessage"]:
        assert status.system == "online"
        assert status.connection_id is not None and status.connection_id > 2**63
    acks = [m for m in kinds["MethodResponse"] if m.success]
    refused = [m for m in kinds["MethodResponse"] if not m.success]
    assert {a.channel for a in acks} == {"trade", "ohlc"}
    assert all(a.symbol and "/" in a.symbol and a.time_in and a.time_out for a in acks)
    assert [r.symbol for r in refused] == ["XBT/USDT", "XBT/USD"]
    assert all(r.error == f"Currency pair not supported {r.symbol}" and r.channel is None for r in refused)


def test_recorded_trade_values_are_exact_decimals(samples_dir: Path) -> None:
    frame = next(r["frame"] for r in _recorded(samples_dir) if r["what"] == "trade update")
    message = parse_frame(frame)
    assert isinstance(message, TradeMessage) and not message.snapshot
    (trade,) = message.trades
    raw = json.loads(frame, parse_float=str)["data"][0]
    assert trade.price == Decimal(raw["price"]) and str(trade.price) == raw["price"]
    assert str(trade.volume) == raw["qty"]  # trailing zeros kept: 0.00044780
    assert trade.trade_id == raw["trade_id"]
    assert trade.side == "b" and trade.ord_type == "l"
    assert trade.time.tzinfo is not None and trade.time.isoformat().startswith(raw["timestamp"][:26])


def test_recorded_ohlc_snapshot_uses_interval_begin_and_skips_quiet_minutes(samples_dir: Path) -> None:
    frame = next(r["frame"] for r in _recorded(samples_dir) if r["what"].startswith("ohlc snapshot"))
    message = parse_frame(frame)
    assert isinstance(message, OhlcMessage) and message.snapshot
    minutes = [c.time.minute for c in message.candles]
    assert minutes == sorted(minutes)
    assert 36 not in minutes and 37 not in minutes and 42 not in minutes
    for candle in message.candles:
        assert candle.time.second == 0 and candle.interval == 1
        assert candle.low <= candle.open <= candle.high and isinstance(candle.vwap, Decimal)


def test_trade_snapshot_with_integer_numbers() -> None:
    text = (
        '{"channel":"trade","type":"snapshot","data":['
        '{"symbol":"ETH/USD","side":"sell","price":3000,"qty":2,"ord_type":"market",'
        '"trade_id":7,"timestamp":"2025-01-02T03:04:05.123456789Z"}]}'
    )
    message = parse_frame(text)
    assert isinstance(message, TradeMessage) and message.snapshot
    (trade,) = message.trades
    assert trade.price == Decimal(3000) and isinstance(trade.price, Decimal)
    assert trade.side == "s" and trade.ord_type == "m"
    assert trade.time == datetime(2025, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)  # truncated, not rounded


def test_pong_and_heartbeat() -> None:
    pong = parse_frame('{"method":"pong","req_id":42,"time_in":"2025-01-01T00:00:00.1Z","time_out":"2025-01-01T00:00:00.2Z"}')
    assert isinstance(pong, MethodResponse) and pong.method == "pong" and pong.req_id == 42 and pong.success
    assert isinstance(parse_frame(b'{"channel":"heartbeat"}'), HeartbeatMessage)
    status = parse_frame('{"channel":"status","type":"update","data":[{"system":"maintenance"}]}')
    assert isinstance(status, StatusMessage) and status.system == "maintenance" and status.connection_id is None


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not json",
        '{"channel":"trade","type":"update","data":[{"symbol":"BTC/USD"',  # truncated
        "[1, 2, 3]",
        '{"channel":"mystery","data":[]}',
        '{"channel":"trade","type":"update","data":[{"symbol":"BTC/USD","side":"buy","price":"1.5",'
        '"qty":1.0,"ord_type":"limit","trade_id":1,"timestamp":"2025-01-01T00:00:00Z"}]}',  # price as string
        '{"channel":"trade","type":"update","data":[{"symbol":"BTC/USD","side":"buy","price":1.5,'
        '"qty":1.0,"ord_type":"limit","timestamp":"2025-01-01T00:00:00Z"}]}',  # no trade_id
        '{"channel":"trade","type":"update","data":[{"symbol":"BTC/USD","side":"up","price":1.5,'
        '"qty":1.0,"ord_type":"limit","trade_id":1,"timestamp":"2025-01-01T00:00:00Z"}]}',  # bad side
        '{"channel":"trade","type":"delta","data":[]}',  # unknown type
        '{"channel":"ohlc","type":"update","data":[{"symbol":"BTC/USD","open":1.0,"high":1.0,"low":1.0,'
        '"close":1.0,"trades":1,"volume":1.0,"vwap":1.0,"interval":1}]}',  # no interval_begin
        '{"channel":"trade","type":"update","data":[{"symbol":"BTC/USD","side":"buy","price":1.5,'
        '"qty":1.0,"ord_type":"limit","trade_id":1,"timestamp":"yesterday"}]}',
        '{"channel":"status","type":"update","data":[]}',
        b"\xff\xfe",
    ],
)
def test_malformed_frames_raise_frame_error_with_text(text: str | bytes) -> None:
    with pytest.raises(FrameError) as info:
        parse_frame(text)
    assert info.value.text is not None
    assert isinstance(info.value, ValueError)
