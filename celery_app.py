"""The Celery application: Redis broker and result backend, the task modules, the beat schedule.

All configuration comes from ``KRAKEN_HIST_*`` settings, read once here (an entry point):

    celery -A celery_app worker -B          # one worker with the beat scheduler inside it
    celery -A celery_app call kraken_hist.tasks.backfill_symbol --args='["BTC/USD"]'

What a worker does besides running tasks, wired through Celery's signals below: it logs
task activity at INFO even when started without ``--loglevel``; it says at start, in one
line, when the database is unreachable or not migrated; with ``KRAKEN_HIST_METRICS_PORT``
it serves Prometheus metrics of all its pool processes. Beat keeps its schedule file in
``KRAKEN_HIST_DATA_DIR``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from celery import Celery, signals
from celery.beat import PersistentScheduler

from kraken_hist.core.config import Settings
from kraken_hist.ops.locks import DEFAULT_TTL

logger = logging.getLogger("kraken_hist.celery")

TASKS = "kraken_hist.tasks"
BACKFILL_TASK = f"{TASKS}.backfill_symbol"
FILL_GAPS_TASK = f"{TASKS}.fill_gaps"
REFRESH_TASK = f"{TASKS}.refresh_aggregates"
IMPORT_CSV_TASK = f"{TASKS}.import_csv"

# With acks_late, Redis hands an unacknowledged message to another worker after this many
# seconds; it must exceed the longest hard time limit of a task (kraken_hist.tasks), or a
# long backfill would be started a second time while it still runs.
VISIBILITY_TIMEOUT = 4 * 3600
SCHEDULE_FILE = "celerybeat-schedule"
# Loggers shown at INFO even when the worker or beat runs at its default level (WARNING):
# task received / succeeded / failed lines, our own started / finished lines, beat's sends.
ACTIVITY_LOGGERS = ("kraken_hist", "celery.app.trace", "celery.worker.strategy", "celery.beat")


class DataDirScheduler(PersistentScheduler):
    """Celery's file-backed beat scheduler, creating the data directory its file lives in."""

    def setup_schedule(self) -> None:
        Path(self.schedule_filename).expanduser().parent.mkdir(parents=True, exist_ok=True)
        super().setup_schedule()


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """The periodic jobs: gap fill, aggregate refresh, and one catch-up backfill per symbol.

    An interval of 0 seconds switches that job off. Each message expires after one interval,
    so a stopped worker does not come back to a pile of stale runs of the same job.
    """
    schedule: dict[str, dict[str, Any]] = {}
    if settings.gap_fill_every > 0:
        schedule["fill-gaps"] = {
            "task": FILL_GAPS_TASK,
            "schedule": settings.gap_fill_every,
            "kwargs": {"symbols": list(settings.symbols)},
            "options": {"expires": settings.gap_fill_every},
        }
    if settings.refresh_every > 0:
        schedule["refresh-aggregates"] = {
            "task": REFRESH_TASK,
            "schedule": settings.refresh_every,
            "options": {"expires": settings.refresh_every},
        }
    if settings.backfill_every > 0:
        for symbol in settings.symbols:
            schedule[f"backfill {symbol}"] = {
                "task": BACKFILL_TASK,
                "schedule": settings.backfill_every,
                "args": [symbol],
                "options": {"expires": settings.backfill_every},
            }
    return schedule


def create_app(settings: Settings | None = None) -> Celery:
    """Build the app from settings (the environment when none are given)."""
    settings = settings if settings is not None else Settings.from_env()
    celery = Celery("kraken_hist", broker=settings.redis_url, backend=settings.redis_url, include=[TASKS])
    celery.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        timezone="UTC",
        enable_utc=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        result_expires=7 * 24 * 3600,
        result_extended=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT},
        beat_schedule=beat_schedule(settings),
        beat_scheduler=f"{__name__}:DataDirScheduler",
        beat_schedule_filename=str(Path(settings.data_dir) / SCHEDULE_FILE),
    )
    celery.conf.kraken_hist_settings = settings
    celery.conf.kraken_hist_lock_ttl = DEFAULT_TTL  # seconds a dead worker's job lock outlives it
    return celery


def settings_of(app: Celery) -> Settings:
    settings = app.conf.get("kraken_hist_settings")
    return settings if isinstance(settings, Settings) else Settings.from_env()


# --- signals: logging, the start-up database check, metrics -------------------------------


@signals.after_setup_logger.connect(dispatch_uid="kraken_hist.activity_logging")
def show_task_activity(**_: Any) -> None:
    """Task activity at INFO by default; a lower level asked for (``-l DEBUG``) stays."""
    for name in ACTIVITY_LOGGERS:
        named = logging.getLogger(name)
        if named.getEffectiveLevel() > logging.INFO:
            named.setLevel(logging.INFO)


def check_database(settings: Settings) -> str | None:
    """None when the configured database answers at the schema's head revision, else the
    one line that tells the operator what to do. (The embedded default migrates itself.)"""
    from kraken_hist.core.errors import KrakenHistError
    from kraken_hist.storage.migrate import prepare_database

    if settings.database_url is None:
        return None  # the embedded server is started and migrated by the first task that needs it
    try:
        prepare_database(settings=settings)
    except KrakenHistError as exc:
        return f"kraken_hist: the database is not ready, tasks will fail until it is: {exc}"
    return None


@signals.worker_ready.connect(dispatch_uid="kraken_hist.check_database")
def report_database_at_start(sender: Any = None, **_: Any) -> None:
    settings = settings_of(sender.app) if sender is not None else Settings.from_env()
    problem = check_database(settings)
    if problem:
        logger.error("%s", problem, extra={"event": "worker.database_not_ready"})


@signals.celeryd_init.connect(dispatch_uid="kraken_hist.metrics_dir")
def prepare_metrics(instance: Any = None, **_: Any) -> None:
    """In the worker's main process, before its pool forks: make every pool process record
    metrics into files of one directory, which the main process serves summed."""
    settings = settings_of(instance.app) if instance is not None else Settings.from_env()
    if settings.metrics_port is None:
        return
    from kraken_hist.ops import metrics

    directory = Path(settings.data_dir) / "metrics" / f"worker-{os.getpid()}"
    metrics.use_multiprocess_dir(directory)


_servers: list[Any] = []


@signals.worker_ready.connect(dispatch_uid="kraken_hist.metrics_server")
def serve_metrics(sender: Any = None, **_: Any) -> None:
    settings = settings_of(sender.app) if sender is not None else Settings.from_env()
    if settings.metrics_port is None or not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    from kraken_hist.kraken.ratelimit import limiter_for
    from kraken_hist.ops import metrics
    from kraken_hist.query.provider import HealthCheckOnFirstUse

    registry = metrics.multiprocess_registry()
    registry.register(metrics.DatabaseCollector(HealthCheckOnFirstUse(None, settings)))
    registry.register(metrics.LimiterCollector(limiter_for(settings)))
    server = metrics.MetricsServer(settings.metrics_port, registry, health=lambda: (True, {"pid": os.getpid()}))
    _servers.append(server.start())
    logger.info("metrics of this worker on port %d (/metrics, /healthz)", server.port,
                extra={"event": "worker.metrics"})


@signals.worker_process_shutdown.connect(dispatch_uid="kraken_hist.metrics_child_exit")
def forget_child_metrics(pid: int | None = None, **_: Any) -> None:
    from kraken_hist.ops import metrics

    metrics.process_exited(pid or os.getpid())


_started: dict[str, float] = {}
_started_lock = threading.Lock()


@signals.task_prerun.connect(dispatch_uid="kraken_hist.task_started")
def task_started(task_id: str | None = None, **_: Any) -> None:
    with _started_lock:
        _started[str(task_id)] = time.monotonic()


@signals.task_postrun.connect(dispatch_uid="kraken_hist.task_finished")
def task_finished(task_id: str | None = None, task: Any = None, state: str | None = None, **_: Any) -> None:
    with _started_lock:
        began = _started.pop(str(task_id), None)
    if began is None or task is None:
        return
    from kraken_hist.ops import metrics

    metrics.task_finished(task.name, state or "UNKNOWN", time.monotonic() - began)


app = create_app()
