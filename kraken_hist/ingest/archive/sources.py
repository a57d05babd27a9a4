"""Where the CSV files come from: files on disk and members of zip archives, opened on demand,
and whose they are (the pair from the file name, or from the file's own prices when Kraken
no longer lists it)."""

from __future__ import annotations

import fnmatch
import io
import logging
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from kraken_hist.core.errors import UnknownSymbolError
from kraken_hist.core.pairs import Pair, parse_csv_filename, symbol_from_wsname
from kraken_hist.ingest.archive.results import ImportRefusedError
from kraken_hist.storage.pair_store import PairResolver

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Source:
    """One CSV to read: a file on disk or a member of a zip archive."""

    label: str  # what reports show
    name: str  # the file name the pair and interval are read from
    size: int
    opener: Callable[[], IO[bytes]]


_DECIMALS_SAMPLE = 1 << 16  # bytes read to infer a pair's price decimals from its prices


def price_decimals_of(source: Source) -> int:
    """The most decimal places among the prices of the file's first lines (the price is the
    second field in Time and Sales and the first OHLC field in OHLCVT): what the pair quotes
    prices in, as far as the file shows it, for pairs Kraken no longer lists."""
    with source.opener() as stream:
        sample = stream.read(_DECIMALS_SAMPLE)
    places = 0
    for line in sample.splitlines()[:-1] or sample.splitlines():
        fields = line.split(b",")
        if len(fields) < 3 or not fields[0].strip().isdigit():
            continue
        price = fields[1].strip()
        if b"." in price and b"e" not in price.lower():
            places = max(places, len(price.split(b".", 1)[1]))
    return min(places, 12)


def file_source(path: Path) -> Source:
    return Source(str(path), path.name, path.stat().st_size, lambda: open(path, "rb", buffering=1 << 20))


def zip_sources(archive: zipfile.ZipFile, path: Path, pattern: str) -> list[Source]:
    """CSV members of `archive` whose base name matches `pattern`, streamed on demand."""
    sources = []
    for info in archive.infolist():
        base = info.filename.rsplit("/", 1)[-1]
        if info.is_dir() or info.filename.startswith("__MACOSX/") or base.startswith("._"):
            continue
        if not fnmatch.fnmatch(base.lower(), pattern.lower()):
            continue
        opener = (lambda i=info: io.BufferedReader(archive.open(i), 1 << 20))  # type: ignore[misc]
        sources.append(Source(f"{path}:{info.filename}", base, info.file_size, opener))
    return sources


def resolve_symbol(resolver: PairResolver, source: Source, symbol: str | None) -> str:
    """The pair of a file: `symbol`, else its file name — through the pair table and
    Kraken's AssetPairs; a pair neither knows (delisted) is recorded from the file name,
    its price decimals read off the file's own prices."""
    try:
        stem = symbol or parse_csv_filename(source.name)[0]
    except UnknownSymbolError:
        raise ImportRefusedError(
            f"{source.label}: cannot tell the pair from the file name {source.name!r}; name the file "
            "<ALTNAME>.csv or <ALTNAME>_<minutes>.csv (e.g. XBTUSD.csv) or pass the symbol") from None
    try:
        return resolver.resolve(stem).symbol
    except UnknownSymbolError as exc:
        unknown = exc
    decimals = price_decimals_of(source)
    try:
        if symbol and "/" in symbol:  # --symbol BASE/QUOTE names a pair Kraken no longer lists
            base, quote = symbol.strip().upper().split("/", 1)
            inferred = Pair(symbol=symbol_from_wsname(f"{base}/{quote}"), altname=f"{base}{quote}",
                            rest_key=f"{base}{quote}", price_decimals=decimals, status="inferred",
                            origin="file_name", decimals_inferred=True)
        else:
            inferred = resolver.registry.infer_from_stem(stem, price_decimals=decimals)
    except UnknownSymbolError:
        how = f"symbol {symbol!r} is unknown" if symbol else f"cannot tell the pair from the file name {source.name!r}"
        raise ImportRefusedError(
            f"{source.label}: {how} ({unknown}); name the file <ALTNAME>.csv or <ALTNAME>_<minutes>.csv "
            "(e.g. XBTUSD.csv) or pass --symbol BASE/QUOTE") from None
    pair = resolver.record_inferred(inferred)
    log.warning("csv import %s: %s is not listed by Kraken; recorded from the file name as %s "
                "(price decimals %d read off the file; `kraken-hist pairs --search %s` shows it)",
                source.label, stem, pair.symbol, pair.price_decimals, pair.altname,
                extra={"event": "csv_import_inferred_pair"})
    return pair.symbol
