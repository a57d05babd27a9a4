"""``kraken-hist import``: load Kraken's downloadable CSV history (files, zip archives, directories)."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import click
from tqdm import tqdm

from kraken_hist.ingest.archive.importer import BulkCSVImporter, ImportResult
from kraken_hist.storage.migrate import prepare_database
from kraken_hist.storage.pair_store import resolver_for
from kraken_hist.cli.common import friendly_errors, settings_from

SHOWN_BAD_LINES = 5


def planned_bytes(paths: Sequence[Path]) -> int:
    """Bytes the import will read (uncompressed sizes for zip members), for the progress bar."""
    total = 0
    for path in paths:
        if path.is_dir():
            total += planned_bytes([p for p in sorted(path.iterdir()) if p.suffix.lower() in (".csv", ".zip")])
        elif path.is_file() and zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                total += sum(i.file_size for i in archive.infolist() if i.filename.lower().endswith(".csv"))
        elif path.is_file():
            total += path.stat().st_size
    return total


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def summarize(results: Sequence[ImportResult]) -> list[str]:
    """Human summary: one line per file, its first bad lines, then totals per symbol."""
    out = []
    for r in results:
        if not r.ok:
            out.append(f"{r.status:8} {r.file}: {r.reason}")
            continue
        what = "trades" if r.kind == "trades" else f"{r.interval}m candles"
        out.append(
            f"imported {r.file} ({r.symbol}, {what}): {r.imported:,} new, {r.duplicates:,} already stored, "
            f"{r.covered:,} covered by other sources, {r.bad:,} bad; {_when(r.first_time)} → {_when(r.last_time)}"
        )
        shown = r.bad_examples[:SHOWN_BAD_LINES]
        for bad in shown:
            out.append(f"    line {bad.line}: {bad.message}: {bad.text!r}")
        if r.bad > len(shown):
            out.append(f"    ... {more_bad_lines(r.bad, r.bad_by_reason, [b.reason for b in shown])}")
    by_symbol: dict[str, list[ImportResult]] = {}
    for r in results:
        if r.ok and r.symbol:
            by_symbol.setdefault(r.symbol, []).append(r)
    if by_symbol:
        out.append("per symbol:")
    for symbol, items in sorted(by_symbol.items()):
        firsts = [r.first_time for r in items if r.first_time]
        lasts = [r.last_time for r in items if r.last_time]
        out.append(
            f"  {symbol}: {sum(r.imported for r in items):,} rows imported, "
            f"{sum(r.bad + r.covered for r in items):,} skipped ({sum(r.bad for r in items):,} bad, "
            f"{sum(r.covered for r in items):,} covered), {sum(r.duplicates for r in items):,} duplicates, "
            f"{_when(min(firsts) if firsts else None)} → {_when(max(lasts) if lasts else None)}"
        )
    return out


def more_bad_lines(bad: int, by_reason: dict[str, int], shown_reasons: Sequence[str]) -> str:
    """``5 more bad lines (price: 3, volume: 2)``: the lines not shown above, and their reasons
    counted without the shown ones (the breakdown used to count every bad line, shown or not)."""
    left = dict(by_reason)
    for reason in shown_reasons:
        left[reason] = left.get(reason, 0) - 1
    reasons = ", ".join(f"{k}: {v:,}" for k, v in sorted(left.items()) if v > 0)
    more = bad - len(shown_reasons)
    return f"{more:,} more bad line{'s' if more != 1 else ''}" + (f" ({reasons})" if reasons else "")


@click.command("import")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--symbol", help="Pair of every file (default: from each file name, e.g. XBTUSD.csv → BTC/USD).")
@click.option("--strict", is_flag=True, help="Refuse a file at its first bad line; nothing of it is stored.")
@click.option("--chunk-size", default=100_000, show_default=True, type=click.IntRange(min=1),
              help="Rows parsed, stored and committed at a time.")
@click.option("--check", is_flag=True, help="Compare imported OHLCVT candles (other than 1m) with our aggregates.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.pass_context
@friendly_errors
def import_command(ctx: click.Context, paths: tuple[Path, ...], symbol: str | None, strict: bool,
                   chunk_size: int, check: bool, no_progress: bool, as_json: bool) -> None:
    """Import Kraken's downloadable history: Time and Sales (XBTUSD.csv) and OHLCVT
    (XBTUSD_60.csv) files, zip archives of them, or directories holding them.

    Re-importing is safe (nothing is stored twice). Seconds already covered by REST or
    WebSocket trades are left to them, and a later backfill continues at the file's end.
    Exits with 1 when a file was refused or failed.
    """
    settings = settings_from(ctx)
    bar = tqdm(total=planned_bytes(paths), unit="B", unit_scale=True, unit_divisor=1024, desc="import",
               disable=True if no_progress else None)
    rows = 0

    def progress(nbytes: int, nlines: int) -> None:
        nonlocal rows
        rows += nlines
        bar.update(nbytes)
        bar.set_postfix(rows=f"{rows:,}", refresh=False)

    try:
        url = prepare_database(settings=settings)
        # file names of pairs not in the table are looked up in Kraken's AssetPairs once;
        # pairs Kraken no longer lists are recorded from their file names
        importer = BulkCSVImporter(url, chunk_size, settings=settings, strict=strict, progress=progress,
                                   resolver=resolver_for(settings, url))
        results = importer.import_paths(paths, symbol)
    finally:
        bar.close()
    checks = []
    if check:
        for r in results:
            if r.ok and r.kind == "ohlcvt" and r.interval != 1 and r.symbol and r.interval:
                checks.append(importer.compare_exchange_candles(r.symbol, r.interval))
    if as_json:
        click.echo(json.dumps({"results": [r.to_dict() for r in results], "checks": [c.to_dict() for c in checks]},
                              indent=2))
    else:
        for line in summarize(results):
            click.echo(line)
        for c in checks:
            state = "all match" if c.ok else (f"{c.mismatched} differ, {c.missing_ours} missing here, "
                                              f"{c.missing_exchange} missing in the file")
            click.echo(f"check {c.symbol} {c.interval}m: {c.compared:,} buckets, {state}")
            for m in c.examples[:SHOWN_BAD_LINES]:
                click.echo(f"    {m.time.isoformat()}: {', '.join(m.fields)}")
    if any(not r.ok for r in results):
        ctx.exit(1)
