# The sandbox service (sandbox/): SandboxFusion-compatible /run_code with a warm, isolated pool.
#   docker compose up sandbox        (compose.yaml, which explains each option below)
#   docker build -f images/sandbox.Dockerfile -t retool-sandbox .
#   docker run --rm -p 127.0.0.1:8080:8080 --cap-add SYS_ADMIN --cap-add NET_ADMIN \
#       --security-opt seccomp=unconfined --security-opt apparmor=unconfined retool-sandbox
# bubblewrap needs to create namespaces; without those options the service refuses to start
# (or runs in a weaker mode only with SANDBOX_ALLOW_INSECURE=1).
FROM python:3.11-slim-bookworm

RUN apt-get update \
    && apt-get install -y --no-install-recommends bubblewrap=0.8.0-2+deb12u1 \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SANDBOX_PYTHON=/usr/local/bin/python3

WORKDIR /app
# One list of the sandbox's runtime deps: the `sandbox` extra in pyproject.toml (exact pins).
COPY pyproject.toml ./
RUN python -c "import tomllib; d = tomllib.load(open('pyproject.toml', 'rb')); \
print('\n'.join(d['project']['optional-dependencies']['sandbox']))" > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt
COPY sandbox/ ./sandbox/

EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8080/v1/ping', timeout=3)"]
CMD ["python", "-m", "sandbox", "serve", "--host", "0.0.0.0", "--port", "8080"]
