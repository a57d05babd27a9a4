"""The README's quick start, run as written against the fake exchange (issue 18): the first
five minutes must work, and they do not spoil real data."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Iterator

import psycopg
import pytest
from click.testing import CliRunner

from kraken_hist.cli.main import cli
from kraken_hist.testing.fake_exchange import FakeExchange

from .helpers import drop_database

README = Path(__file__).resolve().parents[1] / "README.md"


def quickstart_blocks() -> list[list[str]]:
    """The bash blocks of "## First five minutes", one list of command lines each (the test
    block, which runs this very suite, excluded)."""
    section = README.read_text().split("## First five minutes", 1)[1].split("\n## ", 1)[0]
    blocks = [block.strip().splitlines() for block in re.findall(r"```bash\n(.*?)```", section, re.S)]
    return [lines for lines in blocks if not any(line.startswith("pytest") for line in lines)]


@pytest.fixture
def exchange() -> Iterator[FakeExchange]:
    with FakeExchange(["BTC/USD"], days=1.0, trades_per_minute=6.0, trades_per_second=3.0) as fake:
        yield fake


def run_block(lines: list[str], env: dict[str, str], exchange: FakeExchange) -> list[str]:
    """Run each line: `kraken-hist …` through the CLI, `export` into `env`; `pip install` is
    the test's own install; the fake exchange's start is the running `exchange` (its ports)."""
    outputs = []
    for line in lines:
        command = line.split("  #", 1)[0].strip().rstrip("&").strip()
        words = shlex.split(command)
        if words[:2] == ["pip", "install"]:
            continue
        if words[:3] == ["python", "-m", "kraken_hist.testing.fake_exchange"]:
            assert "--symbols" in words and "BTC/USD" in words
            continue
        if words[0] == "export":
            for assignment in words[1:]:
                name, value = assignment.split("=", 1)
                value = value.replace("http://127.0.0.1:8080", exchange.rest_url)
                value = value.replace("ws://127.0.0.1:8081/v2", exchange.ws_url)
                env[name] = value
            continue
        assert words[0] == "kraken-hist", line
        result = CliRunner().invoke(cli, words[1:], env=env)
        assert result.exit_code == 0, f"{line}\n{result.output}"
        outputs.append(result.output)
    return outputs


def test_the_quick_start_runs_as_written(db_url: str, pg_admin_url: str, tmp_path: Path,
                                         exchange: FakeExchange) -> None:
    blocks = quickstart_blocks()
    assert [block[-1].split()[:2] for block in blocks][:1] == [["kraken-hist", "demo"]]
    demo_name = psycopg.conninfo.conninfo_to_dict(db_url)["dbname"] + "_demo"
    try:
        # 1. the demo, on a database of its own
        env = {"KRAKEN_HIST_DATABASE_URL": db_url, "KRAKEN_HIST_DATA_DIR": str(tmp_path / "user")}
        (demo_out,) = run_block(blocks[0], dict(env), exchange)
        assert "no gaps" in demo_out and "Your own data is not touched" in demo_out
        with psycopg.connect(db_url) as conn:
            assert conn.execute("SELECT count(*) FROM trades").fetchone()[0] == 0
        with psycopg.connect(db_url.rsplit("/", 1)[0] + "/" + demo_name) as conn:
            demo_sources = dict(conn.execute("SELECT source, count(*) FROM trades GROUP BY 1").fetchall())
        assert demo_sources.get("csv", 0) > 1000 and demo_sources.get("rest", 0) > 1000, demo_sources
        assert demo_sources.get("ws", 0) > 0, demo_sources  # the stream and REST tell one story
        # 2. "the real exchange" (here: the fake behind KRAKEN_HIST_REST_URL): recent history only
        real = dict(env, KRAKEN_HIST_REST_URL=exchange.rest_url, KRAKEN_HIST_REST_MIN_INTERVAL="0",
                    KRAKEN_HIST_REST_LIMITER="process")
        backfilled, shown = run_block(blocks[1], real, exchange)
        assert "caught up" in backfilled and "nothing stored yet, fetching the last 12 hours" in backfilled
        assert len([line for line in shown.splitlines() if line.startswith("20")]) == 12
        # 3. the fake by hand, with its own data directory
        by_hand = {"KRAKEN_HIST_DATABASE_URL": db_url, "KRAKEN_HIST_REST_LIMITER": "process"}
        outputs = run_block(blocks[2], by_hand, exchange)
        assert by_hand["KRAKEN_HIST_DATA_DIR"] == "/tmp/kraken-hist-offline"
        assert len(outputs) == 3 and "caught up" in outputs[0]
        with psycopg.connect(db_url) as conn:
            sources = dict(conn.execute("SELECT source, count(*) FROM trades GROUP BY 1").fetchall())
        assert sources.get("ws", 0) > 0 or "written" in outputs[1], sources
    finally:
        drop_database(pg_admin_url, demo_name)
