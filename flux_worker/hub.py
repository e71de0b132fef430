"""Whether a hub id can be had, asked on the driver before any actor loads it: the local cache, else the hub.

Renderers load a hub id with diffusers' `from_pretrained`, which reads the local Hugging Face cache and, unless
HF_HUB_OFFLINE is set, downloads: a mistyped id would fail there, in every actor, as pages of tracebacks.
The driver asks first: the revision's `model_index.json` in the cache is enough; otherwise, unless offline,
the hub must say within a few seconds that the model exists.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from flux_worker.presets import PRESETS, UnknownModelError, did_you_mean
from schemas.errors import first_line

PROBE_SECONDS = 5.0  # the hub's answer, or none: either way the user hears within seconds
DEFAULT_ENDPOINT = "https://huggingface.co"


class HubUnreachableError(UnknownModelError):
    """A model in no local cache, and the hub could not be asked (HF_HUB_OFFLINE, no network): whether it exists is
    unknown here. `why` says which; `hint` is the "did you mean" (or ""). `fluxbatch k8s` notes it and goes on: the
    cluster's pods ask the hub themselves."""

    def __init__(self, message: str, why: str, hint: str):
        super().__init__(message)
        self.why, self.hint = why, hint


def cache_dir() -> Path:
    """The hub cache the workers' `from_pretrained` reads, from the environment as it is now.

    The order of huggingface_hub.constants (HF_HUB_CACHE, HF_HOME/hub, XDG_CACHE_HOME/huggingface/hub), read at
    call time: the library fixes its constants when first imported, before a caller may have set them.
    """
    if os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.environ.get("HF_HUB_CACHE") or os.environ["HUGGINGFACE_HUB_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(os.environ.get("HF_HOME") or os.path.join(xdg, "huggingface")).expanduser() / "hub"


def offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it: the workers will not download either."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def cached_ids(cache: Path) -> list[str]:
    """The model ids held in `cache` (its folders are named `models--<owner>--<name>`)."""
    try:
        names = [entry.name for entry in cache.iterdir() if entry.is_dir()]
    except OSError:
        return []
    return [name.removeprefix("models--").replace("--", "/", 1) for name in names if name.startswith("models--")]


def check_hub_model(repo_id: str, revision: str | None = None, named: str | None = None,
                    file: str = "model_index.json") -> None:
    """Return if `repo_id` (at `revision`) is cached or the hub has it; else UnknownModelError saying which.
    `named`: the preset name the user gave for `repo_id`, which the message names first; `file`: the file a cached
    copy holds (a diffusers pipeline's model_index.json, a transformers model's config.json)."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    cache = cache_dir()
    try:
        found = try_to_load_from_cache(repo_id, file, cache_dir=cache, revision=revision)
    except HFValidationError as error:
        raise UnknownModelError(f"model {repo_id!r} is not a valid hub id: {first_line(error)}") from None
    if isinstance(found, str):
        return
    at = f" at revision {revision!r}" if revision else ""
    hint = "" if named else did_you_mean(repo_id, [*PRESETS, *(p.source for p in PRESETS.values()),
                                                   *cached_ids(cache)])
    what = f"{named!r} ({repo_id} on the hub)" if named and named != repo_id else repr(repo_id)
    if offline():
        raise HubUnreachableError(
            f"model {what}{at} is not in the local Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set, "
            f"so it cannot be downloaded{hint or '; give a local folder, or unset HF_HUB_OFFLINE'}",
            "HF_HUB_OFFLINE is set", hint)
    endpoint = os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT
    answer = _ask_hub(endpoint, repo_id, revision)
    if answer:
        problem, unreachable = answer
        message = f"model {what}{at} is not in the local Hugging Face cache ({cache}) and {problem}{hint}"
        if unreachable:
            raise HubUnreachableError(message, problem.split("; ")[0], hint)  # without the advice for a local run
        raise UnknownModelError(message)


def _ask_hub(endpoint: str, repo_id: str, revision: str | None) -> tuple[str, bool] | None:
    """None if the hub at `endpoint` knows the model; else what it (or the network) said, in a few words, and
    whether the hub could not be asked at all (True) rather than said it has no such model (False).

    Asked in a daemon thread joined for at most PROBE_SECONDS: a name lookup that hangs must not hang the run.
    """
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    answer: dict[str, BaseException | None] = {}
    token = get_token()  # what renderers get from this driver (pipeline/render_stage.py, hub_token)

    def ask() -> None:
        try:
            api = HfApi(endpoint=endpoint, token=token)
            api.model_info(repo_id, revision=revision, timeout=PROBE_SECONDS)
            try:
                api.auth_check(repo_id)  # a gated model: may this token read its files?
            except GatedRepoError:
                raise
            except Exception:  # noqa: BLE001 - a hub proxy without /auth-check: model_info's answer stands
                pass
            answer["error"] = None
        except BaseException as error:  # noqa: BLE001 - every failure is reported in words below
            answer["error"] = error

    thread = threading.Thread(target=ask, name="hub-probe", daemon=True)
    thread.start()
    thread.join(PROBE_SECONDS + 1)
    if "error" not in answer:
        return f"the hub at {endpoint} did not answer within {PROBE_SECONDS:.0f} s (no network?)", True
    error = answer["error"]
    if error is None:
        return None
    if isinstance(error, GatedRepoError):
        if token:
            return (f"the hub at {endpoint} says it is gated and the token here cannot read it: accept its licence "
                    "on the hub with the account of that token (HF_TOKEN, or `hf auth login`)"), False
        return (f"the hub at {endpoint} says it is gated: accept its licence there and set HF_TOKEN (or run `hf auth "
                "login`) where you run fluxbatch; renderers get this machine's token"), False
    if isinstance(error, RevisionNotFoundError):
        return f"the hub at {endpoint} has no revision {revision!r} of it", False
    if isinstance(error, RepositoryNotFoundError):
        return (f"the hub at {endpoint} has no such model (or it is private and no token gives access: "
                "set HF_TOKEN)"), False
    reason = first_line(error)
    return f"the hub at {endpoint} cannot be reached ({reason}); give a local folder, or check the network", True
