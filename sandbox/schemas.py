"""Request/response models: exactly SandboxFusion's ``/run_code`` contract.

Source of truth: bytedance/SandboxFusion ``sandbox/server``.

Field names, defaults and status strings match the real service so that its PyPI client and verl's
``call_sandbox_api`` work unchanged. ``status`` separates "the user's code failed" (``Failed``) from
"the sandbox failed" (``SandboxError``, which clients retry).
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, Field

SUPPORTED_LANGUAGES = ("python", "python3", "bash")


class RunStatus(StrEnum):
    success = "Success"
    failed = "Failed"
    sandbox_error = "SandboxError"


class CommandRunStatus(StrEnum):
    finished = "Finished"
    error = "Error"
    time_limit_exceeded = "TimeLimitExceeded"


class RunCodeRequest(BaseModel):
    compile_timeout: float = Field(
        10, gt=0, description="Compile phase limit in seconds (unused for interpreted languages)."
    )
    run_timeout: float = Field(
        10,
        gt=0,
        description="Wall-clock limit of the run; the whole process tree is killed.",
        examples=[10],
    )
    memory_limit_MB: int = Field(
        -1,
        description="Memory limit in MiB; -1 (or any value <= 0) means the server default (1024).",
        examples=[-1],
    )
    code: str = Field(description="Source code to run.", examples=["print(2 + 2)"])
    stdin: str | None = Field(None, description="Data fed to the program's standard input.")
    language: str = Field(
        description=f"Language of ``code``; one of {', '.join(SUPPORTED_LANGUAGES)}.",
        examples=["python"],
    )
    files: dict[str, str | None] = Field(
        default_factory=dict,
        description="Files to create before the run: path (relative to the working dir, or "
        "absolute under /tmp) -> base64 content (null: the entry is skipped).",
        examples=[{"data/input.txt": "aGVsbG8K"}],
    )
    fetch_files: list[str] = Field(
        default_factory=list,
        description="Paths to read back after the run; returned base64-encoded in ``files``.",
        examples=[["out.txt"]],
    )


class CommandRunResult(BaseModel):
    status: CommandRunStatus = Field(description="Finished, Error or TimeLimitExceeded.")
    execution_time: float | None = Field(None, description="Wall time of the run in seconds.")
    return_code: int | None = Field(
        None, description="Exit status; negative = killed by that signal; None on time-out."
    )
    stdout: str | None = Field(None, description="Standard output (capped, see docs).")
    stderr: str | None = Field(None, description="Standard error (capped, see docs).")


class RunCodeResponse(BaseModel):
    status: RunStatus = Field(description="Success, Failed (the code failed) or SandboxError.")
    message: str = Field("", description="Why the sandbox failed, if it did.")
    compile_result: CommandRunResult | None = Field(None, description="Compile phase, if any.")
    run_result: CommandRunResult | None = Field(None, description="Run phase, if it started.")
    executor_pod_name: str | None = Field(None, description="Which server ran it.")
    files: dict[str, str] = Field(
        default_factory=dict, description="Fetched files: path -> base64 content."
    )
