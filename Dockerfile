# Claw, production image: one image for the web, worker, beat and migrate services
# (see compose.yaml). Configuration comes from CLAW_* environment variables.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app \
    CLAW_DATA_DIR=/app/var \
    CLAW_MEDIA_ROOT=/data/media

WORKDIR /app
RUN useradd --system --uid 1000 --home-dir /app --shell /usr/sbin/nologin claw

COPY . /app
# Installs the dependencies (and the console scripts); PYTHONPATH keeps /app first, so
# settings find templates/ and static/ next to the code.
RUN pip install . \
 && CLAW_PRODUCTION=1 CLAW_ALLOWED_HOSTS=build.invalid \
    CLAW_SECRET_KEY=build-only-not-secret-build-only-not-secret-build-only-not-secret \
    python manage.py collectstatic --noinput --verbosity 0 \
 && mkdir -p /data/media /data/metrics \
 && chown -R claw:claw /app/var /data/media /data/metrics

USER claw
EXPOSE 8000
CMD ["python", "-m", "claw.web", "-b", "0.0.0.0", "-p", "8000", "--proxy-headers", \
     "--websocket-max-message-size", "262144", "claw.asgi:application"]
