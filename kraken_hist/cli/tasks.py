"""``kraken-hist task result ID``: a Celery task's state and result, as JSON.

``celery -A celery_app result ID`` prints a result as a Python value; this prints what the
result backend holds (tasks return plain JSON values) as JSON, for people and scripts.
"""

from __future__ import annotations

import json
from typing import Any

import click

from kraken_hist.cli.common import friendly_errors, settings_from


@click.group("task")
def task() -> None:
    """Celery jobs: the results of ad-hoc and scheduled runs."""


@task.command("result")
@click.argument("task_id")
@click.option("--wait", "wait_seconds", type=float, default=0.0, show_default=True,
              help="Seconds to wait for a task that has not finished yet.")
@click.pass_context
@friendly_errors
def result(ctx: click.Context, task_id: str, wait_seconds: float) -> None:
    """Print task TASK_ID's state and result (or error) as JSON; exit 1 if it failed."""
    from celery.exceptions import TimeoutError as CeleryTimeout

    from celery_app import create_app

    app = create_app(settings_from(ctx))
    try:
        outcome = app.AsyncResult(task_id)
        if wait_seconds > 0:
            try:
                outcome.get(timeout=wait_seconds, propagate=False)
            except CeleryTimeout:
                pass
        report: dict[str, Any] = {"id": task_id, "state": outcome.state}
        if outcome.successful():
            report["result"] = outcome.result
        elif outcome.failed():
            report["error"] = f"{type(outcome.result).__name__}: {outcome.result}"
            report["traceback"] = outcome.traceback
        failed = outcome.failed()
    finally:
        app.close()
    click.echo(json.dumps(report, indent=2, default=str))
    if failed:
        ctx.exit(1)
