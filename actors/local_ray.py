"""Start the Ray instance of a local run so that nobody else can reach it: loopback only, token auth.

Ray 2.60 binds its GCS, raylet and worker ports to all interfaces unless the node's IP is 127.0.0.1, which
it picks only when ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``; and a local ``ray.init()`` either runs without
authentication or with a token it stores in ``~/.ray/auth_token``. Every Ray instance fedsim starts goes
through :func:`start_local_ray`, which starts it with both closed: each of its processes inherits that
variable and a token made for this instance alone, held in their environment and never written to disk.
The caller's own environment is left as it was: this process keeps the token in Ray's cache instead.
Joining a cluster (``RAY_ADDRESS``, ``runtime.address``) leaves everything to that cluster's settings.
"""

from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import ray
import ray._private.ray_constants as ray_constants
from ray._raylet import AuthenticationTokenLoader, Config

LOOPBACK_VAR = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
AUTH_MODE_VAR = "RAY_AUTH_MODE"


def check_auth_mode(environ: Mapping[str, str]) -> None:
    """Refuse an explicit request for a local Ray without token authentication (e.g. RAY_AUTH_MODE=disabled)."""
    mode = environ.get(AUTH_MODE_VAR)
    if mode is not None and mode.lower() != "token":
        raise RuntimeError(
            f"{AUTH_MODE_VAR}={mode!r} asks for a Ray instance anyone who reaches its ports may use; fedsim starts "
            f"its local Ray with token authentication only. Unset {AUTH_MODE_VAR} (or set it to token), or start "
            "Ray yourself with the settings you want (ray start --head ...) and let the run join it (RAY_ADDRESS "
            "or runtime.address)")


def local_ray_environment(token: str) -> dict[str, str | None]:
    """The variables (None: unset) that keep a new instance on loopback and make ``token`` its only key."""
    # RAY_AUTH_TOKEN_PATH would point the Ray processes at a token file instead of this one.
    return {LOOPBACK_VAR: "0", AUTH_MODE_VAR: "token", "RAY_AUTH_TOKEN": token, "RAY_AUTH_TOKEN_PATH": None}


@contextmanager
def _environment(values: dict[str, str | None]) -> Iterator[None]:
    """os.environ with ``values`` applied, restored as it was on exit."""
    saved = {name: os.environ.get(name) for name in values}
    try:
        _apply(values)
        yield
    finally:
        _apply(saved)


def _apply(values: dict[str, str | None]) -> None:
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@contextmanager
def _loopback_node_ip() -> Iterator[None]:
    """Ray reads LOOPBACK_VAR into this constant at import: the driver picks its node IP from the constant."""
    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def reload_ray_auth() -> None:
    """Make this process's next ``ray.init`` read the authentication settings from the environment again.

    Ray caches the auth mode and token at first use and keeps them across ``ray.shutdown()``; without this, an
    instance started later in the same process (a notebook's second run) would be sent an earlier one's token.
    Never call it while connected: the connection would lose its token.
    """
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def start_local_ray(**init_kwargs: Any) -> None:
    """``ray.init(address="local", include_dashboard=False, **init_kwargs)``, every port on 127.0.0.1, a fresh token.

    The environment and Ray's loopback constant are restored once the instance runs: its processes carry their
    own copies, and this driver's connection keeps the token in Ray's cache until :func:`stop_local_ray`.
    """
    check_auth_mode(os.environ)
    if ray.is_initialized():  # checked before reload_ray_auth, which would cut that connection off
        raise RuntimeError("Ray is already initialised in this process; call ray.shutdown() first")
    with _environment(local_ray_environment(secrets.token_hex(32))), _loopback_node_ip():
        reload_ray_auth()  # this instance's token, not one cached by an earlier instance in this process
        ray.init(address="local", include_dashboard=False, **init_kwargs)


def stop_local_ray() -> None:
    """``ray.shutdown()``, then forget the instance's token so that a later ``ray.init`` reads the environment."""
    ray.shutdown()
    reload_ray_auth()
