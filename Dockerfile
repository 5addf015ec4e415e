# The service image: `python -m consumer migrate | run [--role …]` and `python -m producer_sim`.
# No secret is baked in: every setting comes from FLEET_ environment variables at run time.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY consumer ./consumer
COPY producer_sim ./producer_sim
# consumer/sql/ is package data: installed with the package, found by `migrate` anywhere.
RUN pip install . \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin fleet

USER 10001
EXPOSE 8080
# Liveness of the HTTP sidecar (every `run` role serves it); compose checks /readyz instead.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('FLEET_HTTP_PORT', '8080'), timeout=4)"]
CMD ["python", "-m", "consumer", "run"]
