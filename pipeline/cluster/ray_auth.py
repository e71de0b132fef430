"""Keep Ray's token authentication on for every cluster fluxbatch starts.

Ray 2.60 turns token authentication on by default when `ray.init()` starts a local cluster, unless
`RAY_AUTH_MODE` says otherwise. A renderer cluster runs arbitrary code for whoever reaches its ports,
so a cluster we start always requires the token; a cluster we only join keeps the mode its operator chose.
"""

from __future__ import annotations

import logging
import os

from pipeline.cluster.ray_private import reload_ray_config

log = logging.getLogger(__name__)
AUTH_MODE_ENV_VAR = "RAY_AUTH_MODE"


def starts_local_cluster(address: str) -> bool:
    """Whether `ray.init(address)` starts a new cluster rather than joining one.

    `ray.init`'s documented rule: "local" starts one; an address, "auto" or "ray://..." joins one (or fails).
    fluxbatch never passes None (which joins a cluster `ray start` left, if any): pipeline/run.py resolves an
    unset address to RAY_ADDRESS, else "local".
    """
    return address == "local"


def keep_token_auth(address: str) -> None:
    """Before `ray.init(address)`: require the token if that call starts a cluster, whatever the environment."""
    if not starts_local_cluster(address):
        return
    mode = os.environ.get(AUTH_MODE_ENV_VAR)
    if mode is not None and mode.lower() != "token":
        log.warning("%s=%s ignored: fluxbatch starts Ray clusters with token authentication only",
                    AUTH_MODE_ENV_VAR, mode)
    os.environ[AUTH_MODE_ENV_VAR] = "token"
    reload_ray_config()  # Ray caches its config per process; re-read it, as Ray's own default does
