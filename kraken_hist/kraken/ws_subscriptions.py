"""WebSocket v2 subscriptions as data: what to ask for, the requests that ask, which ack answers
which subscription. Pure (no socket, thread or clock): the client (``ws_client``) sends the
requests, reads the acks and keeps the books these functions decide on.

Kraken refuses a bad symbol once and then stays silent for it while heartbeats keep flowing, so
every subscription is matched to its ack; a legacy name (``XBT/USD``) is refused by v2, so names
are mapped to the canonical v2 ones first (:func:`to_ws_symbol`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from kraken_hist.core.errors import ExchangePermanentError, ExchangeTransientError
from kraken_hist.core.pairs import ASSET_ALIASES, PairRegistry
from kraken_hist.kraken.ws_parsing import MethodResponse

SYMBOLS_PER_REQUEST = 50


class SubscriptionRefusedError(ExchangePermanentError):
    """Kraken answered a subscribe with ``success: false`` (unknown or legacy pair name)."""

    def __init__(self, channel: str | None, symbol: str | None, reason: str) -> None:
        self.channel, self.symbol, self.reason = channel, symbol, reason
        super().__init__(f"subscribe {channel or '?'} {symbol or '?'} refused: {reason}")


class SubscriptionTimeoutError(ExchangeTransientError):
    """No ack arrived in time for a subscribe request; the connection is renewed."""


@dataclass(frozen=True, slots=True)
class Subscription:
    """One channel for one symbol; ``interval`` is 0 for ``trade``."""

    channel: str
    symbol: str
    interval: int = 0

    def describe(self) -> str:
        return f"{self.channel}{'/' + str(self.interval) if self.interval else ''} {self.symbol}"


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientState:
    """A consistent copy of the client's counters and subscriptions."""

    running: bool
    connected: bool
    connection_id: int | None
    connections: int
    reconnects: int
    messages: int
    trades: int
    candles: int
    malformed: int
    errors: int
    last_message_age: float | None  # seconds since the last frame of any kind
    last_trade_age: float | None  # seconds since the last trade frame
    subscribed: tuple[Subscription, ...]
    pending: tuple[Subscription, ...]
    refused: dict[Subscription, str] = field(default_factory=dict)
    refused_items: int = 0  # trade/ohlc items left out for impossible values (logged one by one)


def to_ws_symbol(name: str, registry: PairRegistry | None = None) -> str:
    """Any Kraken name → the canonical v2 name: ``XBTUSD``, ``XXBTZUSD``, ``xbt/usd`` → ``BTC/USD``.

    The AssetPairs wsname (``XBT/USD``) is refused by v2, so legacy asset names are mapped
    through ASSET_ALIASES. Names the registry does not know are sent as given (stripped) so
    Kraken's refusal reaches the caller instead of a silent drop. Default registry: the
    built-in pairs (a service passes its own).
    """
    registry = registry if registry is not None else PairRegistry()
    raw = str(name).strip()
    if registry.is_known(raw):
        return registry.normalize(raw)
    if "/" in raw:
        base, quote = (part.upper() for part in raw.split("/", 1))
        aliased = f"{ASSET_ALIASES.get(base, base)}/{ASSET_ALIASES.get(quote, quote)}"
        if registry.is_known(aliased):
            return registry.normalize(aliased)
    return raw


def wanted_subscriptions(symbols: Iterable[str], registry: PairRegistry, *, trades: bool,
                         ohlc_intervals: Sequence[int]) -> list[Subscription]:
    """The subscriptions for `symbols` (any Kraken name): ``trade`` and one ``ohlc`` per interval."""
    wanted = []
    for raw in symbols:
        symbol = to_ws_symbol(raw, registry)
        if trades:
            wanted.append(Subscription("trade", symbol))
        wanted.extend(Subscription("ohlc", symbol, int(i)) for i in ohlc_intervals)
    return wanted


def subscribe_requests(subs: Sequence[Subscription], req_ids: Iterator[int], *, trade_snapshot: bool,
                       ohlc_snapshot: bool) -> list[tuple[int, list[Subscription], dict[str, object]]]:
    """The subscribe requests asking for `subs`: one per channel and interval, at most
    SYMBOLS_PER_REQUEST symbols each, as (req_id, what it asks for, the message)."""
    groups: dict[tuple[str, int], list[Subscription]] = {}
    for sub in subs:
        groups.setdefault((sub.channel, sub.interval), []).append(sub)
    requests = []
    for (channel, interval), members in groups.items():
        for lo in range(0, len(members), SYMBOLS_PER_REQUEST):
            chunk = members[lo:lo + SYMBOLS_PER_REQUEST]
            req_id = next(req_ids)
            params: dict[str, object] = {"channel": channel, "symbol": [s.symbol for s in chunk]}
            if channel == "ohlc":
                params["interval"] = interval
                params["snapshot"] = ohlc_snapshot
            else:
                params["snapshot"] = trade_snapshot
            requests.append((req_id, chunk, {"method": "subscribe", "params": params, "req_id": req_id}))
    return requests


def acked_subscription(message: MethodResponse, asked: Sequence[Subscription],
                       pending: Iterable[Subscription]) -> Subscription | None:
    """The subscription an ack answers: among those its request asked for (else among all
    pending ones), the one of its symbol, channel and interval; None when nothing matches."""
    candidates = asked or list(pending)
    return next((
        s for s in candidates
        if s.symbol == message.symbol
        and (message.channel is None or s.channel == message.channel)
        and (message.interval is None or s.interval == message.interval)
    ), None)


def late_subscriptions(pending: dict[Subscription, float], now: float) -> list[Subscription]:
    """Pending subscriptions whose ack deadline has passed, in name order."""
    return sorted((s for s, deadline in pending.items() if deadline < now), key=by_name)


def by_name(sub: Subscription) -> tuple[str, str, int]:
    return (sub.symbol, sub.channel, sub.interval)
