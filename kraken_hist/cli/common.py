"""What every command shares: settings from the environment, logging, errors as messages."""

from __future__ import annotations

import functools
import logging
import sys
from typing import Any, Callable, Iterable, TypeVar

import click

from ..config import Settings
from ..errors import KrakenHistError

F = TypeVar("F", bound=Callable[..., Any])


def setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def settings_from(ctx: click.Context) -> Settings:
    """The settings object built once in the root command."""
    obj = ctx.find_root().obj
    if not isinstance(obj, Settings):  # pragma: no cover - only when a command runs standalone
        obj = Settings.from_env()
    return obj


def resolve_symbols(settings: Settings, db_url: str, names: Iterable[str], *, client: Any = None) -> list[str]:
    """Names in any of Kraken's spellings, patterns (``*/USD``) or ``all`` → canonical symbols,
    through the database's pair table; a name it does not know is looked up in Kraken's
    AssetPairs once (and stored), so every listed pair works from every command."""
    from ..pair_store import resolver_for

    return resolver_for(settings, db_url, client=client).expand(names)


def friendly_errors(func: F) -> F:
    """Show our errors as one clear line (exit 1) instead of a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except KrakenHistError as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper  # type: ignore[return-value]
