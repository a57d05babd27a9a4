"""Attempts at one fill: a transient failure (the exchange or the database away for a moment)
is retried after the shared back-off; a permanent one ends the fill. Neither escapes: the
outcome says what happened, so one gap's failure never stops the others."""

from __future__ import annotations

import logging
from collections.abc import Callable

import psycopg

from kraken_hist.core.errors import PermanentError, TransientError
from kraken_hist.core.types import DataGap
from kraken_hist.gaps.plan import FillMethod
from kraken_hist.gaps.report import GapFill
from kraken_hist.rules.backoff import Backoff

logger = logging.getLogger(__name__)

RETRY_BASE_SECONDS = 0.5
RETRY_CAP_SECONDS = 10.0


def with_retries(gap: DataGap, method: FillMethod, fill: Callable[[DataGap], GapFill], *, max_retries: int,
                 sleep: Callable[[float], None]) -> GapFill:
    """`fill`(`gap`), retried up to `max_retries` times after a transient failure; the
    outcome's ``attempts`` counts the calls."""
    attempt = 0
    while True:
        attempt += 1
        try:
            result = fill(gap)
        except PermanentError as exc:
            logger.warning("gap %s: %s fill failed for good: %s", gap.symbol, method.value, exc)
            return GapFill(gap=gap, status="failed", method=method, attempts=attempt, reason=str(exc))
        except (TransientError, psycopg.OperationalError) as exc:
            if attempt > max_retries:
                return GapFill(gap=gap, status="failed", method=method, attempts=attempt,
                               reason=f"{exc} (after {attempt} attempts)")
            pause = Backoff(RETRY_BASE_SECONDS, RETRY_CAP_SECONDS).delay(attempt)
            logger.info("gap %s: %s fill attempt %d failed (%s); retrying in %.1f s",
                        gap.symbol, method.value, attempt, exc, pause)
            sleep(pause)
            continue
        return GapFill(gap=result.gap, status=result.status, method=result.method,
                       trades_stored=result.trades_stored, candles_written=result.candles_written,
                       attempts=attempt, reason=result.reason)
