# scout-diff-cache in a container. The repository to snapshot is mounted read-only at /repo:
#   docker build -t scout-diff-cache .
#   docker run --rm -p 127.0.0.1:8787:8787 -v "$PWD":/repo:ro -e PROXY_API_KEY=choose-a-key \
#       -e UPSTREAM=http://host.docker.internal:8000 --add-host=host.docker.internal:host-gateway \
#       scout-diff-cache
# Inside the container the proxy listens on all interfaces so the port can be published; the
# addon refuses that without PROXY_API_KEY (or an explicit ALLOW_REMOTE_WITHOUT_KEY=true).
FROM python:3.12-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/* \
    # the mounted repository belongs to the host user; allow exactly that path
    && git config --system --add safe.directory /repo

WORKDIR /app
COPY pyproject.toml README.md config.yaml ./
COPY addon ./addon
RUN pip install --no-cache-dir .

ENV GIT_REPO_PATH=/repo \
    SCOUT_CONFIG=/app/config.yaml \
    UPSTREAM=http://host.docker.internal:8000

EXPOSE 8787
ENTRYPOINT ["sh", "-c", "exec mitmdump -s /app/addon/scout.py --mode \"reverse:$UPSTREAM\" --listen-host 0.0.0.0 -p 8787 \"$@\"", "--"]
