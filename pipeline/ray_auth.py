"""Keep Ray's token authentication on for every cluster fluxbatch starts.

Ray 2.60 turns token authentication on by default when `ray.init()` starts a local cluster, unless
`RAY_AUTH_MODE` says otherwise. A renderer cluster runs arbitrary code for whoever reaches its ports,
so a cluster we start always requires the token; a cluster we only join keeps the mode its operator chose.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)
AUTH_MODE_ENV_VAR = "RAY_AUTH_MODE"


def starts_local_cluster(address: str | None) -> bool:
    """Whether `ray.init(address)` would start a new cluster rather than join one (Ray's own rule)."""
    from ray._private.services import canonicalize_bootstrap_address

    return canonicalize_bootstrap_address(address) is None


def keep_token_auth(address: str | None) -> None:
    """Before `ray.init(address)`: require the token if that call starts a cluster, whatever the environment."""
    if not starts_local_cluster(address):
        return
    mode = os.environ.get(AUTH_MODE_ENV_VAR)
    if mode is not None and mode.lower() != "token":
        log.warning("%s=%s ignored: fluxbatch starts Ray clusters with token authentication only",
                    AUTH_MODE_ENV_VAR, mode)
    os.environ[AUTH_MODE_ENV_VAR] = "token"
    from ray._raylet import Config

    Config.initialize("")  # Ray caches its config per process; re-read it, as Ray's own default does
