"""Celery tasks: parse JSON arguments, build the service from settings, call one function.

Every task is safe to run twice (the services are idempotent and resumable), retried with
back-off on transient errors only, and guarded by a Redis lock per (task, symbol): a second
run of the same job, from another worker or an overlapping beat tick, returns at once with
``{"status": "already running", ...}`` instead of doing the work twice. Arguments and
results are small JSON values (symbols, ISO-8601 times, counts, durations).
"""

from __future__ import annotations

import contextlib
import enum
import logging
import time
import zipfile
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import redis
from celery import Task, shared_task
from celery.exceptions import SoftTimeLimitExceeded

from kraken_hist.core.config import Settings, settings_or_env
from kraken_hist.core.errors import TransientError
from kraken_hist.ops.locks import DEFAULT_TTL, hold, lock_name
from kraken_hist.core.timeutils import parse_time

logger = logging.getLogger(__name__)

# Shared by every task: late acknowledgement so a killed worker's message is delivered
# again; bounded, jittered exponential retries for transient errors only.
_TASK_OPTIONS: dict[str, Any] = {
    "bind": True,
    "acks_late": True,
    "reject_on_worker_lost": True,
    "autoretry_for": (TransientError,),
    "retry_backoff": 10,
    "retry_backoff_max": 600,
    "retry_jitter": True,
    "max_retries": 5,
}

STATUS_OK = "ok"
STATUS_ALREADY_RUNNING = "already running"
STATUS_TIME_LIMIT = "stopped at time limit"


def to_json(value: Any) -> Any:
    """Service results → plain JSON values (datetimes as ISO-8601, Decimals as strings)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, enum.Enum):
        return to_json(value.value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(to_json(k)): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_json(v) for v in value]
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict):
        return to_json(to_dict())
    raise TypeError(f"cannot turn {type(value).__name__} into JSON")


def _time_arg(name: str, value: str | int | float | None) -> datetime | None:
    """An ISO-8601 (or unix seconds) task argument → aware UTC datetime; naive means UTC."""
    if value is None:
        return None
    try:
        return parse_time(value)
    except (ValueError, OverflowError, OSError) as exc:
        raise ValueError(f"{name}: {exc}") from None


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _lock_ttl(task: Task) -> float:
    return float(task.app.conf.get("kraken_hist_lock_ttl") or DEFAULT_TTL)


@contextlib.contextmanager
def _redis(settings: Settings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=5, socket_timeout=10)
    try:
        yield client
    finally:
        client.close()


def _run_locked(
    task: Task,
    settings: Settings,
    subjects: Sequence[str | None],
    work: Callable[[list[str | None]], Any],
    report: dict[str, Any],
) -> dict[str, Any]:
    """Run `work` on the subjects whose locks this run could take; report the others.

    `work` gets the subjects it may touch. The result says what ran, what was already
    running elsewhere (with the holder), and how long it took.
    """
    began = time.monotonic()
    by_name = {lock_name(task.name, s): s for s in subjects}
    with _redis(settings) as client, hold(client, list(by_name), ttl=_lock_ttl(task), label=task.request.id) as held:
        busy = {str(by_name[name] or "*"): holder for name, holder in held.busy.items()}
        if not held.acquired:
            logger.info("%s %s already running: %s", task.name, report, busy, extra={"event": "task.already_running"})
            return to_json({"status": STATUS_ALREADY_RUNNING, "task": task.name, **report, "held_by": busy})
        mine = [by_name[name] for name in held.acquired]
        logger.info("%s %s started", task.name, report, extra={"event": "task.started"})
        try:
            outcome = {"status": STATUS_OK, "result": work(mine)}
        except SoftTimeLimitExceeded:
            # Whatever was committed stays; the next run resumes from the stored cursor.
            logger.warning("%s %s stopped at its soft time limit", task.name, report, extra={"event": "task.time_limit"})
            outcome = {"status": STATUS_TIME_LIMIT, "result": None}
        lost = [str(by_name[name] or "*") for name in held.lost]
    result: dict[str, Any] = {"task": task.name, **report, **outcome, "duration": round(time.monotonic() - began, 3)}
    if busy:
        result["already_running"] = busy
    if lost:
        result["lock_lost"] = lost
    logger.info("%s %s finished: %s", task.name, report, outcome["status"], extra={"event": "task.finished"})
    return to_json(result)


def _resolve(settings: Settings, names: list[str] | tuple[str, ...]) -> list[str]:
    """Task arguments in any Kraken spelling, patterns or ``all`` → canonical symbols (the
    database's pair table, Kraken's AssetPairs for names it does not know yet)."""
    from kraken_hist.storage.migrate import prepare_database
    from kraken_hist.storage.pair_store import resolver_for

    return resolver_for(settings, prepare_database(settings=settings)).expand(names)


@shared_task(name="kraken_hist.tasks.backfill_symbol", soft_time_limit=3300, time_limit=3600, **_TASK_OPTIONS)
def backfill_symbol(self: Task, symbol: str, since: str | None = None, until: str | None = None) -> dict[str, Any]:
    """Fetch one symbol's trades from Kraken REST and store them (resumes from the stored cursor).

    A run cut off by its time limit keeps what it stored; the next run (the beat catch-up
    backfill, or the same call again) continues from there.
    """
    settings = settings_or_env()
    wanted = _resolve(settings, [symbol])  # a name, or a pattern / 'all' (KRAKEN_HIST_SYMBOLS=all on beat)
    start, end = _time_arg("since", since), _time_arg("until", until)
    report = {"symbol": wanted[0] if len(wanted) == 1 else symbol, "since": _iso(start), "until": _iso(end)}

    def work(mine: list[str | None]) -> Any:
        from kraken_hist.ingest.backfill import KrakenTradesBackfill

        service = KrakenTradesBackfill(settings=settings)
        try:
            results = [service.backfill_symbol(name, since=start, until=end) for name in mine if name]
            return results[0] if len(wanted) == 1 and results else {"symbols": results}
        finally:
            _close(service)

    return _run_locked(self, settings, wanted, work, report)


@shared_task(name="kraken_hist.tasks.fill_gaps", soft_time_limit=1500, time_limit=1800, **_TASK_OPTIONS)
def fill_gaps(self: Task, symbols: list[str] | None = None) -> dict[str, Any]:
    """Find and repair holes in the stored trades and candles of `symbols` (default: configured).

    Symbols whose gap fill is already running elsewhere are skipped and listed.
    """
    settings = settings_or_env()
    wanted = _resolve(settings, symbols or settings.symbols)
    report: dict[str, Any] = {"symbols": wanted}

    def work(mine: list[str | None]) -> Any:
        from kraken_hist.gaps.filler import GapFiller

        service = GapFiller(symbols=[s for s in mine if s], settings=settings)
        try:
            return {"filled_symbols": mine, **to_json(service.fill_all_gaps())}
        finally:
            _close(service)

    return _run_locked(self, settings, wanted, work, report)


@shared_task(name="kraken_hist.tasks.refresh_aggregates", soft_time_limit=240, time_limit=300, **_TASK_OPTIONS)
def refresh_aggregates(
    self: Task, symbol: str | None = None, start: str | None = None, end: str | None = None
) -> dict[str, Any]:
    """Bring the 5m…1w candle relations up to date with the changed 1-minute candles."""
    settings = settings_or_env()
    canonical = _resolve(settings, [symbol])[0] if symbol else None
    lo, hi = _time_arg("start", start), _time_arg("end", end)
    report = {"symbol": canonical, "start": _iso(lo), "end": _iso(hi)}

    def work(_: list[str | None]) -> Any:
        from kraken_hist.storage.migrate import prepare_database
        from kraken_hist.storage.refresh import refresh_aggregates as refresh

        return refresh(prepare_database(settings=settings), canonical, lo, hi)

    return _run_locked(self, settings, [canonical], work, report)


@shared_task(name="kraken_hist.tasks.import_csv", soft_time_limit=3 * 3600 - 300, time_limit=3 * 3600, **_TASK_OPTIONS)
def import_csv(self: Task, path: str, symbol: str | None = None) -> dict[str, Any]:
    """Import Kraken's downloadable CSV history: a file, a zip archive, or a directory of
    them (``*.csv``), at a path on the worker's file system.

    Locked per symbol when one is given, else per path (the importer reads the symbol from
    each file name).
    """
    target = Path(path).expanduser().resolve()
    if not target.exists():
        raise FileNotFoundError(f"import_csv: no file or directory {str(target)!r} on this worker")
    settings = settings_or_env()
    canonical = _resolve(settings, [symbol])[0] if symbol else None
    report = {"path": str(target), "symbol": canonical}

    def work(_: list[str | None]) -> Any:
        from kraken_hist.ingest.archive.importer import BulkCSVImporter

        from kraken_hist.storage.migrate import prepare_database
        from kraken_hist.storage.pair_store import resolver_for

        url = prepare_database(settings=settings)
        importer = BulkCSVImporter(url, settings=settings, resolver=resolver_for(settings, url))
        try:
            if target.is_dir():
                return {"files": importer.import_directory(target)}
            if zipfile.is_zipfile(target):  # a whole archive: every member, every pair
                return {"files": importer.import_archive(target, symbol=canonical)}
            return importer.import_csv_file(target, symbol=canonical)
        finally:
            _close(importer)

    return _run_locked(self, settings, [canonical or f"path:{target}"], work, report)


def _close(service: object) -> None:
    """Close a service that owns connections or sessions (not every service does)."""
    close = getattr(service, "close", None)
    if callable(close):
        close()
