"""Migrations must run from an installed wheel, not only from a checkout."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from kraken_hist.storage.migrate import head_revision

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )
    (path,) = out.glob("kraken_hist-*.whl")
    return path


def test_wheel_carries_the_migrations_and_the_celery_app(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "kraken_hist/_migrations/env.py" in names
    assert "kraken_hist/_migrations/script.py.mako" in names
    assert all(any(n.startswith(f"kraken_hist/_migrations/versions/{rev}") for n in names) for rev in ("0001", "0002"))
    assert "celery_app.py" in names and "kraken_hist/py.typed" in names


def test_migrations_run_from_the_unpacked_wheel(wheel, empty_db_url, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KRAKEN_HIST_")}
    env.update({"PYTHONPATH": str(site), "KRAKEN_HIST_DATABASE_URL": empty_db_url})
    script = (
        "import kraken_hist, kraken_hist.storage.migrate as m, sys;"
        f"assert kraken_hist.__file__.startswith({str(site)!r}), kraken_hist.__file__;"
        f"assert str(m.migrations_path()).startswith({str(site)!r}), m.migrations_path();"
        "from kraken_hist.cli import main; sys.argv=['kraken-hist','db','upgrade']; main()"
    )
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"at revision {head_revision()}" in result.stdout
