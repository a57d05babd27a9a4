"""The Celery app: configuration from settings, the beat schedule, the registered tasks."""

from __future__ import annotations

import pytest

import celery_app
from kraken_hist.core.config import Settings

TASK_NAMES = {
    "kraken_hist.tasks.backfill_symbol",
    "kraken_hist.tasks.fill_gaps",
    "kraken_hist.tasks.refresh_aggregates",
    "kraken_hist.tasks.import_csv",
}


def test_broker_and_backend_come_from_settings() -> None:
    app = celery_app.create_app(Settings(redis_url="redis://redis.example:6380/3"))
    assert app.conf.broker_url == "redis://redis.example:6380/3"
    assert app.conf.result_backend == "redis://redis.example:6380/3"
    assert app.conf.task_serializer == "json" and app.conf.accept_content == ["json"]
    assert app.conf.task_acks_late is True and app.conf.task_reject_on_worker_lost is True
    assert app.conf.worker_prefetch_multiplier == 1


def test_visibility_timeout_outlasts_every_hard_time_limit() -> None:
    """Redis redelivers unacknowledged (acks_late) messages after the visibility timeout:
    a shorter one would start a long backfill twice."""
    app = celery_app.create_app(Settings())
    app.loader.import_default_modules()
    limits = [app.tasks[name].time_limit for name in TASK_NAMES]
    assert all(limit for limit in limits)
    assert app.conf.broker_transport_options["visibility_timeout"] > max(limits)


def test_the_task_module_is_included_and_registers_named_tasks() -> None:
    app = celery_app.create_app(Settings())
    assert "kraken_hist.tasks" in app.conf.include
    app.loader.import_default_modules()
    assert TASK_NAMES <= set(app.tasks)
    for name in TASK_NAMES:
        task = app.tasks[name]
        assert task.acks_late and task.reject_on_worker_lost
        assert task.soft_time_limit < task.time_limit


def test_beat_schedule_has_the_entries_and_intervals_settings_give() -> None:
    settings = Settings(
        symbols=("BTC/USD", "ETH/USD"), gap_fill_every=120.0, refresh_every=30.0, backfill_every=600.0
    )
    schedule = celery_app.create_app(settings).conf.beat_schedule
    assert set(schedule) == {"fill-gaps", "refresh-aggregates", "backfill BTC/USD", "backfill ETH/USD"}
    assert schedule["fill-gaps"]["task"] == "kraken_hist.tasks.fill_gaps"
    assert schedule["fill-gaps"]["schedule"] == 120.0
    assert schedule["fill-gaps"]["kwargs"] == {"symbols": ["BTC/USD", "ETH/USD"]}
    assert schedule["refresh-aggregates"]["task"] == "kraken_hist.tasks.refresh_aggregates"
    assert schedule["refresh-aggregates"]["schedule"] == 30.0
    for symbol in ("BTC/USD", "ETH/USD"):
        entry = schedule[f"backfill {symbol}"]
        assert entry["task"] == "kraken_hist.tasks.backfill_symbol"
        assert entry["args"] == [symbol]
        assert entry["schedule"] == 600.0
    assert all(entry["options"]["expires"] == entry["schedule"] for entry in schedule.values())


def test_default_schedule_is_five_minutes_one_minute_fifteen_minutes() -> None:
    schedule = celery_app.beat_schedule(Settings())
    assert schedule["fill-gaps"]["schedule"] == 300.0
    assert schedule["refresh-aggregates"]["schedule"] == 60.0
    assert schedule["backfill BTC/USD"]["schedule"] == 900.0


def test_schedule_follows_the_environment() -> None:
    settings = Settings.from_env(
        {
            "KRAKEN_HIST_SYMBOLS": "XBTUSD,SOLUSD",
            "KRAKEN_HIST_GAP_FILL_EVERY": "90",
            "KRAKEN_HIST_REFRESH_EVERY": "15",
            "KRAKEN_HIST_BACKFILL_EVERY": "0",
        }
    )
    schedule = celery_app.beat_schedule(settings)
    assert set(schedule) == {"fill-gaps", "refresh-aggregates"}  # 0 switches the backfill off
    # names as configured (patterns and 'all' too); the task resolves them through the pair table
    assert schedule["fill-gaps"]["kwargs"] == {"symbols": ["XBTUSD", "SOLUSD"]}
    assert schedule["fill-gaps"]["schedule"] == 90.0 and schedule["refresh-aggregates"]["schedule"] == 15.0


@pytest.mark.parametrize("field", ["gap_fill_every", "refresh_every", "backfill_every"])
def test_zero_interval_switches_a_job_off(field: str) -> None:
    schedule = celery_app.beat_schedule(Settings(**{field: 0.0}))
    tasks = {entry["task"] for entry in schedule.values()}
    switched_off = {
        "gap_fill_every": "kraken_hist.tasks.fill_gaps",
        "refresh_every": "kraken_hist.tasks.refresh_aggregates",
        "backfill_every": "kraken_hist.tasks.backfill_symbol",
    }[field]
    assert switched_off not in tasks
    assert len(tasks) == 2


def test_beat_turns_the_schedule_into_interval_entries() -> None:
    """What celery beat itself reads: run_every intervals in seconds, expiring messages."""
    from celery.beat import Scheduler

    app = celery_app.create_app(Settings(gap_fill_every=120.0, refresh_every=30.0, backfill_every=600.0))
    scheduler = Scheduler(app, lazy=True)
    scheduler.setup_schedule()
    scheduler.merge_inplace(app.conf.beat_schedule)
    entries = scheduler.schedule
    assert entries["fill-gaps"].schedule.run_every.total_seconds() == 120.0
    assert entries["refresh-aggregates"].schedule.run_every.total_seconds() == 30.0
    assert entries["backfill BTC/USD"].schedule.run_every.total_seconds() == 600.0
    assert entries["backfill BTC/USD"].args == ["BTC/USD"]
    assert entries["refresh-aggregates"].options["expires"] == 30.0


def test_module_app_is_built_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KRAKEN_HIST_REDIS_URL", "redis://10.1.2.3:6379/5")
    monkeypatch.setenv("KRAKEN_HIST_REFRESH_EVERY", "42")
    app = celery_app.create_app()
    assert app.conf.broker_url == "redis://10.1.2.3:6379/5"
    assert app.conf.beat_schedule["refresh-aggregates"]["schedule"] == 42.0
    assert app.conf.kraken_hist_settings.redis_url == "redis://10.1.2.3:6379/5"


def test_beat_keeps_its_schedule_file_in_the_data_dir(tmp_path) -> None:
    app = celery_app.create_app(Settings(data_dir=tmp_path / "kh"))
    assert app.conf.beat_schedule_filename == str(tmp_path / "kh" / "celerybeat-schedule")
    assert app.conf.beat_scheduler == "celery_app:DataDirScheduler"
    scheduler = celery_app.DataDirScheduler(app, schedule_filename=app.conf.beat_schedule_filename)
    scheduler.close()
    assert list((tmp_path / "kh").glob("celerybeat-schedule*"))  # the directory was made for it
