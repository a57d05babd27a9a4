# The kraken_hist image: the library, the `kraken-hist` command and the Celery app.
# docker-compose.yml runs it as the one-shot migration, the worker and beat.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY setup.cfg setup.py pyproject.toml MANIFEST.in README.md alembic.ini ./
COPY kraken_hist ./kraken_hist
COPY migrations ./migrations
COPY celery_app.py ./
RUN pip install . \
    && useradd --create-home --uid 10001 kraken \
    && mkdir -p /data \
    && chown kraken:kraken /data

# Run from outside the source tree so the installed package (with its migrations) is used.
WORKDIR /app
USER kraken
ENV KRAKEN_HIST_DATA_DIR=/data
VOLUME ["/data"]

CMD ["celery", "-A", "celery_app", "worker", "--loglevel=INFO"]
