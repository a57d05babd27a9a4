"""What a gap fill did: one gap's outcome, and the totals per symbol and per run that the CLI,
the task and the logs report."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kraken_hist.core.types import DataGap
from kraken_hist.gaps.plan import FillMethod


@dataclass(frozen=True, slots=True, kw_only=True)
class GapFill:
    """The outcome of filling one gap."""

    gap: DataGap
    status: str  # "filled" | "empty" (verified, now covered) | "partial" | "failed"
    method: FillMethod | None
    trades_stored: int = 0
    candles_written: int = 0
    attempts: int = 1
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "symbol": self.gap.symbol,
            "kind": self.gap.kind.value,
            "start": self.gap.start.isoformat(),
            "end": self.gap.end.isoformat(),
            "first_missing_id": self.gap.first_missing_id,
            "last_missing_id": self.gap.last_missing_id,
            "status": self.status,
            "method": self.method.value if self.method else None,
            "trades_stored": self.trades_stored,
            "candles_written": self.candles_written,
            "attempts": self.attempts,
            "reason": self.reason,
        }


@dataclass(slots=True, kw_only=True)
class SymbolFillReport:
    """One symbol's gaps: found, and how each fill ended."""

    symbol: str
    found: int = 0
    filled: int = 0
    verified_empty: int = 0
    partial: int = 0
    failed: list[tuple[DataGap, str]] = field(default_factory=list)
    trades_stored: int = 0
    candles_written: int = 0
    methods: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "found": self.found,
            "filled": self.filled,
            "verified_empty": self.verified_empty,
            "partial": self.partial,
            "failed": [
                {"kind": g.kind.value, "start": g.start.isoformat(), "end": g.end.isoformat(), "reason": reason}
                for g, reason in self.failed
            ],
            "trades_stored": self.trades_stored,
            "candles_written": self.candles_written,
            "methods": dict(self.methods),
        }


@dataclass(slots=True, kw_only=True)
class GapFillReport:
    """Gaps found, filled, verified empty and failed (with the reason), per symbol."""

    symbols: dict[str, SymbolFillReport] = field(default_factory=dict)
    fills: list[GapFill] = field(default_factory=list)
    seconds: float = 0.0
    refreshed: bool = False

    def add(self, fill: GapFill) -> None:
        report = self.symbol(fill.gap.symbol)
        self.fills.append(fill)
        if fill.status == "filled":
            report.filled += 1
        elif fill.status == "empty":
            report.verified_empty += 1
        elif fill.status == "partial":
            report.partial += 1
        if fill.status in ("failed", "partial"):
            report.failed.append((fill.gap, fill.reason or "unknown"))
        if fill.method is not None:
            report.methods[fill.method.value] = report.methods.get(fill.method.value, 0) + 1
        report.trades_stored += fill.trades_stored
        report.candles_written += fill.candles_written

    def symbol(self, name: str) -> SymbolFillReport:
        return self.symbols.setdefault(name, SymbolFillReport(symbol=name))

    @property
    def found(self) -> int:
        return sum(r.found for r in self.symbols.values())

    @property
    def filled(self) -> int:
        return sum(r.filled for r in self.symbols.values())

    @property
    def verified_empty(self) -> int:
        return sum(r.verified_empty for r in self.symbols.values())

    @property
    def failed(self) -> int:
        return sum(len(r.failed) for r in self.symbols.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "found": self.found,
            "filled": self.filled,
            "verified_empty": self.verified_empty,
            "failed": self.failed,
            "seconds": round(self.seconds, 3),
            "refreshed": self.refreshed,
            "symbols": {name: r.to_dict() for name, r in sorted(self.symbols.items())},
        }
