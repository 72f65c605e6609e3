"""Baseline for ``make bench-sandbox``: the seed's naive sandbox, a subprocess per request.

FastAPI writes the code to a temp file and runs ``python file.py`` for every request (a fresh
interpreter each time, no isolation). Same ``/run_code`` contract as the real service, so the
benchmark drives both with one client. Never expose it: it is not secure.

    python scripts/naive_sandbox_server.py --port 8090
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from sandbox.schemas import CommandRunResult, RunCodeRequest, RunCodeResponse

app = FastAPI(title="naive subprocess sandbox (benchmark baseline)")


@app.get("/v1/ping")
async def ping() -> str:
    return "pong"


@app.post("/run_code")
async def run_code(req: RunCodeRequest) -> RunCodeResponse:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "main.py"
        path.write_text(req.code)
        start = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(path),
            cwd=tmp,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(
                proc.communicate((req.stdin or "").encode()), req.run_timeout
            )
        except TimeoutError:
            proc.kill()
            await proc.wait()
            run = CommandRunResult(status="TimeLimitExceeded", execution_time=req.run_timeout)
            return RunCodeResponse(status="Failed", run_result=run)
    run = CommandRunResult(
        status="Finished",
        execution_time=time.monotonic() - start,
        return_code=proc.returncode,
        stdout=out.decode(errors="replace"),
        stderr=err.decode(errors="replace"),
    )
    return RunCodeResponse(status="Success" if proc.returncode == 0 else "Failed", run_result=run)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    args = parser.parse_args()
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
