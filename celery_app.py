"""The Celery application: Redis broker and result backend, the task modules, the beat schedule.

All configuration comes from ``KRAKEN_HIST_*`` settings, read once here (an entry point):

    celery -A celery_app worker -B          # one worker with the beat scheduler inside it
    celery -A celery_app call kraken_hist.tasks.backfill_symbol --args='["BTC/USD"]'
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from kraken_hist.config import Settings
from kraken_hist.locks import DEFAULT_TTL

TASKS = "kraken_hist.tasks"
BACKFILL_TASK = f"{TASKS}.backfill_symbol"
FILL_GAPS_TASK = f"{TASKS}.fill_gaps"
REFRESH_TASK = f"{TASKS}.refresh_aggregates"
IMPORT_CSV_TASK = f"{TASKS}.import_csv"

# With acks_late, Redis hands an unacknowledged message to another worker after this many
# seconds; it must exceed the longest hard time limit of a task (kraken_hist.tasks), or a
# long backfill would be started a second time while it still runs.
VISIBILITY_TIMEOUT = 4 * 3600


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
    )
    celery.conf.kraken_hist_settings = settings
    celery.conf.kraken_hist_lock_ttl = DEFAULT_TTL  # seconds a dead worker's job lock outlives it
    return celery


app = create_app()
