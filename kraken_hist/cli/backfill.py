"""``kraken-hist backfill SYMBOL...``: fetch trades through REST, resuming where the last run stopped."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import click
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from kraken_hist.ingest.backfill import BackfillProgress, BackfillResult, KrakenTradesBackfill
from kraken_hist.storage.migrate import prepare_database
from kraken_hist.kraken.ratelimit import limiter_for
from kraken_hist.kraken.rest_client import KrakenRestClient
from kraken_hist.core.timeutils import floor_minute, utcnow
from kraken_hist.cli.common import friendly_errors, parse_time_option, resolve_symbols, settings_from


class _Bars:
    """One tqdm bar per symbol and phase, measured in minutes of market time covered."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: tqdm | None = None
        self.key: tuple[str, str] | None = None
        self.origin: datetime | None = None

    def __call__(self, event: BackfillProgress) -> None:
        if not self.enabled or event.position is None:
            return
        key = (event.symbol, event.phase)
        if key != self.key:
            self.close()
            self.key = key
            self.origin = event.start if event.start is not None and event.start <= event.position else event.position
            total = None
            if event.target is not None and event.target > self.origin:
                total = int((event.target - self.origin).total_seconds() // 60) or 1
            self.bar = tqdm(total=total, unit="min", desc=f"{event.symbol} {event.phase}", dynamic_ncols=True)
        assert self.bar is not None and self.origin is not None
        done = int((event.position - self.origin).total_seconds() // 60)
        if self.bar.total is not None:
            done = min(done, self.bar.total)
        self.bar.update(max(0, done - self.bar.n))
        self.bar.set_postfix(pages=event.pages, trades=event.trades, at=event.position.strftime("%Y-%m-%d %H:%M"))

    def finish(self) -> None:
        """The run got where it was going (caught up, or --until): the bar shows 100 %. (The
        target is the clock at the start, the last trade a little before it: 99.9 % before.)"""
        if self.bar is not None and self.bar.total is not None:
            self.bar.update(self.bar.total - self.bar.n)
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _summary(result: BackfillResult) -> str:
    state = "caught up" if result.caught_up else "reached --until" if result.reached_until else "stopped"
    up_to = result.last_time.isoformat() if result.last_time else "-"
    backward = f", {result.backward_windows} older range(s)" if result.backward_windows else ""
    return (
        f"{result.symbol}: {result.pages} pages, {result.trades_fetched} trades fetched, "
        f"{result.trades_stored} new{backward}; stored up to {up_to} "
        f"(last trade id {result.last_trade_id if result.last_trade_id is not None else '-'}), "
        f"{state}, {result.seconds:.1f} s"
    )


#: how far back a symbol with nothing stored starts without --since: a first run finishes in a
#: minute or two at Kraken's pace (a liquid pair trades some 10^4–10^5 times a day, 1,000 a call)
DEFAULT_RECENT = timedelta(hours=12)


@click.command()
@click.argument("symbols", nargs=-1)
@click.option("--since", callback=parse_time_option, help="Start here when the symbol has no stored data, or extend stored data back to here "
              "(ISO date/time, UTC, or unix seconds). Default for a symbol with nothing stored: the last "
              "12 hours (the long history: kraken-hist import of Kraken's archive, or an early --since).")
@click.option("--until", callback=parse_time_option, help="Stop before this time (exclusive). Default: catch up with the exchange.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary per symbol instead of text.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
@click.pass_context
@friendly_errors
def backfill(ctx: click.Context, symbols: tuple[str, ...], since: datetime | None, until: datetime | None,
             as_json: bool, progress: bool) -> None:
    """Backfill trades (and their 1-minute candles) of SYMBOL... from Kraken's REST API.

    SYMBOL is any of Kraken's names (BTC/USD, XBTUSD, XXBTZUSD), a pattern (\'*/USD\') or
    'all'; without one, KRAKEN_HIST_SYMBOLS (default BTC/USD).

    Resumes by default: a run that was interrupted, or a later run, continues from the
    stored cursor without losing or doubling a trade. Calls are paced by
    KRAKEN_HIST_REST_MIN_INTERVAL (seconds, default 1) and KRAKEN_HIST_REST_URL selects the
    exchange (e.g. the offline fake: python -m kraken_hist.testing.fake_rest).
    """
    settings = settings_from(ctx)
    start, end = since, until
    if start is not None and end is not None and end <= start:
        raise click.BadParameter(f"{end.isoformat()} is not after --since {start.isoformat()}", param_hint="'--until'")
    url = prepare_database(settings=settings)
    canonical = resolve_symbols(settings, url, symbols or settings.symbols)
    client = KrakenRestClient.from_settings(settings, limiter=limiter_for(settings))  # the pace the settings choose
    bars = _Bars(progress)
    # -v log lines are written above the bar (tqdm.write), never into it
    with KrakenTradesBackfill(url, client, settings=settings, progress=bars) as job, logging_redirect_tqdm():
        try:
            for symbol in canonical:
                first = start
                if first is None and job.get_resume_point(symbol) is None:
                    first = floor_minute(utcnow()) - DEFAULT_RECENT
                    click.echo(
                        f"{symbol}: nothing stored yet, fetching the last {DEFAULT_RECENT.total_seconds() / 3600:g} hours "
                        f"(since {first:%Y-%m-%d %H:%M} UTC). For the long history import Kraken's archive "
                        "(kraken-hist import Kraken_Trading_History.zip) or give --since (REST: ~1 day per 10^5 "
                        "trades at Kraken's pace).", err=True)
                result = job.backfill_symbol(symbol, since=first, until=end)
                if result.caught_up or result.reached_until:
                    bars.finish()
                bars.close()
                click.echo(json.dumps(result.to_dict()) if as_json else _summary(result))
        finally:
            bars.close()
            client.close()
