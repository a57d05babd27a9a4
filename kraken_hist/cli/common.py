"""What every command shares: settings from the environment, logging, errors as messages."""

from __future__ import annotations

import logging
import sys
from typing import Any, Callable, Iterable, TypeVar

import click

from kraken_hist.core.config import Settings, settings_or_env
from kraken_hist.core.errors import KrakenHistError

F = TypeVar("F", bound=Callable[..., Any])


def setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def settings_from(ctx: click.Context) -> Settings:
    """The settings object built once in the root command."""
    obj = ctx.find_root().obj
    if not isinstance(obj, Settings):  # pragma: no cover - only when a command runs standalone
        obj = settings_or_env()
    return obj


def resolve_symbols(settings: Settings, db_url: str, names: Iterable[str], *, client: Any = None) -> list[str]:
    """Names in any of Kraken's spellings, patterns (``*/USD``) or ``all`` → canonical symbols,
    through the database's pair table; a name it does not know is looked up in Kraken's
    AssetPairs once (and stored), so every listed pair works from every command."""
    from kraken_hist.storage.pair_store import resolver_for

    return resolver_for(settings, db_url, client=client).expand(names)


def friendly_errors(func: F) -> F:
    """Kept for the commands that still wear it: errors are turned into one line by the root
    group (:class:`Commands`), the one place for every command."""
    return func


#: Exit codes, one per kind of error (README, "Command line").
EXIT_RUNTIME = 1  # the command could not do its work: exchange, database, data, configuration
EXIT_USAGE = 2  # the command line itself is wrong: an unknown option, a value that cannot be right
EXIT_INTERRUPTED = 130  # Ctrl-C


def one_line(text: str) -> str:
    """A message on one line (a multi-line driver message joined with "; ")."""
    return "; ".join(part.strip() for part in str(text).splitlines() if part.strip())


class Commands(click.Group):
    """The root group: whatever a command raises ends as one line on stderr and the exit code
    of its kind (:data:`EXIT_USAGE` for the command line, :data:`EXIT_RUNTIME` for the rest,
    :data:`EXIT_INTERRUPTED` for Ctrl-C), never a traceback (``-vv`` logs it)."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        name = prog_name or "kraken-hist"
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Abort:
            code, message = EXIT_INTERRUPTED, "interrupted"
        except click.UsageError as exc:
            where = f"{exc.ctx.command_path}: " if exc.ctx is not None else f"{name}: "
            hint = f" (see {exc.ctx.command_path} --help)" if exc.ctx is not None else ""
            code, message = EXIT_USAGE, f"{where}{one_line(exc.format_message())}{hint}"
        except click.ClickException as exc:
            code, message = exc.exit_code, one_line(exc.format_message())
        except KrakenHistError as exc:
            code, message = EXIT_RUNTIME, one_line(str(exc))
        except Exception as exc:  # a driver's or a bug's: still one line, the traceback in the log
            logging.getLogger(__name__).debug("%s failed", name, exc_info=True)
            code, message = EXIT_RUNTIME, f"{type(exc).__name__}: {one_line(str(exc))}"
        else:
            code, message = (code if isinstance(code, int) else 0), None
        if message is not None:
            click.echo(f"Error: {message}", err=True)
        if standalone_mode:
            sys.exit(code)
        return code


def parse_time_option(_ctx: click.Context | None, param: click.Parameter | None, value: str | None) -> Any:
    """A ``--since``/``--until``/``--start``/``--end`` value (ISO-8601 or unix seconds, UTC) → an
    aware datetime; a usage error naming the option when it is not a time a datetime holds."""
    if value is None or value == "":
        return None
    from kraken_hist.core.timeutils import parse_time

    try:
        return parse_time(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param=param) from None
