"""The Celery application: Redis broker and result backend from KRAKEN_HIST_* settings.

Run a worker with beat:  celery -A celery_app worker -B
"""

from __future__ import annotations

from celery import Celery

from kraken_hist.config import Settings


def create_app(settings: Settings | None = None) -> Celery:
    """Build the app from settings (the environment when none are given)."""
    settings = settings if settings is not None else Settings.from_env()
    celery = Celery("kraken_hist", broker=settings.redis_url, backend=settings.redis_url)
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
        broker_connection_retry_on_startup=True,
    )
    celery.conf.kraken_hist_settings = settings
    return celery


app = create_app()
