"""`fluxbatch submit SPEC.yaml --address http://HEAD:8265`: run a fluxbatch job on a Ray cluster.

The job goes through the Ray Jobs API (`JobSubmissionClient`): the folder holding SPEC (or
`--working-dir`) is uploaded as the job's working directory, minus virtual environments, caches and
local outputs, and the cluster runs `python -m jobs.cli <command> ...` there. Paths in SPEC are read
from that folder on the cluster, so keep them relative to it, or use s3:// URLs. The client follows
the job's logs to the end and its exit code is the job's outcome (0 only when the job SUCCEEDED).

Ray 2.60 clusters require a token (token authentication is on by default). The client sends it as
`Authorization: Bearer ...`, read from `--token-file`, `$RAY_AUTH_TOKEN`, the file named by
`$RAY_AUTH_TOKEN_PATH`, or `~/.ray/auth_token`, in that order (the places Ray itself looks). The token
is never accepted on the command line, where other users of the machine could read it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from pipeline.cluster.ray_session import job_name
from schemas.errors import FluxbatchError, first_line
from schemas.overrides import read_spec_file

# Never uploaded: environments, caches, and the outputs a local run leaves behind.
EXCLUDES = [".venv", "venv", ".git", "**/__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache",
            ".hypothesis", ".fluxbatch", "demo-output"]
# Storage settings that say where, not who: shipped by default. Credentials only with --env NAME.
SHIPPED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class SubmitError(FluxbatchError, RuntimeError):
    """The job could not be submitted: no cluster at the address, a missing token, a bad spec path."""


@dataclass
class Submission:
    """What was sent: the id Ray knows the job by, its entrypoint, its runtime environment and the name the
    dashboard's Jobs page shows."""

    submission_id: str
    entrypoint: str
    runtime_env: dict[str, Any]
    name: str


def command_for(spec: dict[str, Any]) -> list[str]:
    """The fluxbatch subcommand a spec is for: render (has `manifest`), catalog run (`products`), synthesize."""
    if "manifest" in spec:
        return ["render"]
    if "products" in spec:
        return ["catalog", "run"]
    if "templates" in spec:
        return ["synthesize"]
    raise SubmitError("cannot tell which job this spec is: it has no `manifest` (render), `products` (catalog) "
                      "or `templates` (synthesize) field; pass --command")


def output_of(spec: dict[str, Any]) -> str | None:
    """The spec's `output` (a URI, or a mapping with `uri`), as written."""
    output = spec.get("output")
    uri = output.get("uri") if isinstance(output, dict) else output
    return uri if isinstance(uri, str) and uri else None


def entrypoint_args(spec_path: str, spec: dict[str, Any], command: list[str], python: str) -> list[str]:
    """The command line the cluster runs, as a list; `spec_path` is relative to the working directory."""
    args = [python, "-m", "jobs.cli", *command]
    if command == ["render"]:
        output_uri = output_of(spec)
        if not output_uri:
            raise SubmitError(f"{spec_path}: field 'output.uri' is missing; a render job needs an output")
        return [*args, str(spec["manifest"]), str(output_uri), "--job", spec_path, "--no-progress"]
    return [*args, spec_path]


def read_token(token_file: str | None = None) -> str | None:
    """The cluster's auth token, from the first of --token-file, $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, ~/.ray."""
    if token_file:
        return _token_from(Path(token_file).expanduser(), "--token-file")
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return _token_from(Path(os.environ["RAY_AUTH_TOKEN_PATH"]).expanduser(), "RAY_AUTH_TOKEN_PATH")
    default = Path.home() / ".ray" / "auth_token"
    return _token_from(default, "~/.ray/auth_token") if default.is_file() else None


def _token_from(path: Path, where: str) -> str:
    try:
        token = path.read_text().strip()
    except OSError as error:
        raise SubmitError(f"cannot read the Ray auth token from {where} ({path}): {error.strerror}") from error
    if not token:
        raise SubmitError(f"the Ray auth token file {path} ({where}) is empty")
    return token


def prepare(spec_file: str | Path, *, working_dir: str | Path | None = None, command: list[str] | None = None,
            python: str = "python", env_names: list[str] | None = None, excludes: list[str] | None = None,
            submission_id: str | None = None) -> Submission:
    """Build the submission for a spec without contacting the cluster (so it can be checked and printed)."""
    spec_path = Path(spec_file).resolve()
    if not spec_path.is_file():
        raise SubmitError(f"no job spec at {spec_file!r}")
    root = Path(working_dir).resolve() if working_dir else spec_path.parent
    if not root.is_dir():
        raise SubmitError(f"working directory {str(working_dir)!r} is not a folder")
    try:
        relative = spec_path.relative_to(root).as_posix()
    except ValueError:
        raise SubmitError(f"the spec {spec_file} is not inside the working directory {root}; "
                          "it is uploaded from there, so pass a --working-dir that holds it") from None
    spec = read_spec_file(spec_file, "spec")
    command = command or command_for(spec)
    args = entrypoint_args(relative, spec, command, python)
    env = {name: os.environ[name] for name in SHIPPED_ENV if os.environ.get(name)}
    for name in env_names or []:
        if name not in os.environ:
            raise SubmitError(f"--env {name}: no such variable in this environment")
        env[name] = os.environ[name]
    runtime_env: dict[str, Any] = {"working_dir": str(root),
                                   "excludes": EXCLUDES + _local_output_excludes(spec, root) + list(excludes or [])}
    if env:
        runtime_env["env_vars"] = env
    stem = "".join(c if c.isalnum() or c in "-_" else "-" for c in spec_path.stem)[:40]
    submission_id = submission_id or f"fluxbatch-{command[0]}-{stem}-{time.strftime('%Y%m%d-%H%M%S')}-" \
                                     f"{uuid.uuid4().hex[:6]}"
    name = job_name(" ".join(command), output_of(spec) or relative)
    return Submission(submission_id, shlex.join(args), runtime_env, name)


def _local_output_excludes(spec: dict[str, Any], root: Path) -> list[str]:
    """A local output folder inside the working directory holds images: never upload it back."""
    uri = output_of(spec)
    if uri is None or "://" in uri:
        return []
    path = (root / uri).resolve()
    try:
        return ["/" + path.relative_to(root).as_posix()]
    except ValueError:
        return []


def connect(address: str, token: str | None) -> Any:
    """A JobSubmissionClient for `address` that sends the token; fails with what to do when it cannot."""
    from ray.job_submission import JobSubmissionClient

    from pipeline.cluster.ray_session import verbose

    if not verbose():  # Ray's loggers print INFO lines of their own ("Uploading package ..."); -v shows them
        for handler in logging.getLogger("ray").handlers:  # its job SDK modules set their loggers to INFO themselves
            handler.setLevel(logging.WARNING)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except Exception as error:  # noqa: BLE001 - every refusal becomes one line saying what to do
        raise explain(error, address, token) from error


def explain(error: Exception, address: str, token: str | None) -> SubmitError:
    """A refusal by the cluster, as a SubmitError that says what to do next."""
    from ray.exceptions import AuthenticationError

    text = str(error).strip()
    if isinstance(error, AuthenticationError) or "Authentication" in text:
        hint = ("the cluster refused the token: check it is this cluster's (`ray get-auth-token` on the head node)"
                if token else "the cluster requires a token: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, or pass "
                "--token-file (`ray get-auth-token` on the head node prints it)")
        return SubmitError(f"cannot submit to {address}: {hint}")
    return SubmitError(f"cannot submit to the Ray Jobs API at {address}: {first_line(error)}")


def submit(spec_file: str | Path, address: str, *, token_file: str | None = None, follow: bool = True,
           out: TextIO | None = None, **prepare_options: Any) -> int:
    """Submit a spec to the cluster at `address`, follow its logs, and return 0 if the job succeeded."""
    out = out or sys.stdout
    submission = prepare(spec_file, **prepare_options)
    token = read_token(token_file)
    client = connect(address, token)
    try:
        job_id = client.submit_job(entrypoint=submission.entrypoint, runtime_env=submission.runtime_env,
                                   submission_id=submission.submission_id,
                                   metadata={"fluxbatch_spec": Path(spec_file).name, "job_name": submission.name})
    except Exception as error:  # noqa: BLE001
        raise explain(error, address, token) from error
    print(f"submitted {job_id} to {address}: {submission.entrypoint}", file=sys.stderr)
    if not follow:
        return 0
    print("following its logs (Ctrl-C stops following; the job keeps running)", file=sys.stderr)
    try:
        asyncio.run(_print_logs(client, job_id, out))
        status = _wait(client, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following {job_id}; it keeps running. Stop it with: "
              f"ray job stop {job_id} --address {address}", file=sys.stderr)
        return 130
    info = client.get_job_info(job_id)
    detail = f": {info.message}" if status != "SUCCEEDED" and info.message else ""
    print(f"job {job_id} {status}{detail}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


async def _print_logs(client: Any, job_id: str, out: TextIO) -> None:
    async for lines in client.tail_job_logs(job_id):
        out.write(lines)
        out.flush()


def _wait(client: Any, job_id: str) -> str:
    """The log stream ends when the driver exits; the status can lag it by a moment."""
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL:
            return status
        time.sleep(0.5)
