# scout-diff-cache in a container: the same command and environment as `scout-diff-cache` on a host.
#   docker build -t scout-diff-cache .
#   docker run --rm -p 127.0.0.1:8787:8787 -v "$PWD":/repo:ro -e PROXY_API_KEY=choose-a-key \
#       -e TARGET_API_URL=http://host.docker.internal:8000 --add-host=host.docker.internal:host-gateway \
#       scout-diff-cache
# The repository is mounted read-only at /repo (the proxy never writes to it). Inside the container
# the proxy listens on every interface so the port can be published, which it refuses without
# PROXY_API_KEY (or ALLOW_REMOTE_WITHOUT_KEY=true). Settings: the README's table, as -e NAME=value.
# The build cache (README "Restarts") is /home/scout/.cache/scout-diff-cache: -v scout-cache:/home/scout/.cache
# keeps it across containers.
# Checked by tests/test_install.py: hadolint, and these install and start steps in a fresh venv.

FROM python:3.12-slim AS build
WORKDIR /src
COPY pyproject.toml README.md config.yaml ./
COPY addon ./addon
RUN python -m venv /opt/scout && /opt/scout/bin/pip install --no-cache-dir /src

FROM python:3.12-slim
# git reads the mounted repository, which belongs to the host's user: allow exactly that path.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/* \
    && git config --system --add safe.directory /repo \
    && useradd --system --uid 10001 --create-home --home-dir /home/scout scout \
    && install -d -o 10001 -m 0700 /home/scout/.cache
COPY --from=build /opt/scout /opt/scout
ENV PATH=/opt/scout/bin:$PATH \
    GIT_REPO_PATH=/repo \
    TARGET_API_URL=http://host.docker.internal:8000 \
    HOST=0.0.0.0 \
    PORT=8787 \
    STOP_GRACE_MS=8000
USER 10001
WORKDIR /home/scout
EXPOSE 8787
# /health answers 200 once the proxy serves; with PROXY_API_KEY set it needs the key too.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; k = os.environ.get('PROXY_API_KEY'); u.urlopen(u.Request('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8787'), headers={'authorization': 'Bearer ' + k} if k else {}), timeout=4)"]
# SIGTERM: in-flight answers finish within STOP_GRACE_MS (docker stop waits 10 s unless -t says more).
STOPSIGNAL SIGTERM
ENTRYPOINT ["scout-diff-cache"]
