# The real SandboxFusion (bytedance/SandboxFusion), pinned by tag: the reference our sandbox's
# contract tests run against (`make sandbox-parity`, compose service `sandbox-fusion`).
# Nothing is added; the file exists so that compose builds every image from images/.
FROM volcengine/sandbox-fusion:server-20250609

EXPOSE 8080
# curl comes with the image; /v1/ping answers "pong" once the server is up (it starts slowly).
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["curl", "-fsS", "http://127.0.0.1:8080/v1/ping"]
