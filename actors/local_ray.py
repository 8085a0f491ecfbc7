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

import json
import logging
import math
import os
import secrets
import signal
import subprocess
import sys
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import ray
import ray._private.ray_constants as ray_constants
from ray._private.utils import get_num_cpus
from ray._raylet import AuthenticationTokenLoader, Config

log = logging.getLogger(__name__)

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


@contextmanager
def local_ray_for_other_processes(min_cpus: float = 0.0) -> Iterator[dict[str, str]]:
    """A local instance for other processes to join (a sweep's runs), started by :func:`start_local_ray` in a
    keeper process: yields the environment (this process's, plus the instance's address and token) of a process
    that joins it; stopped on exit, and when this process dies, however (the keeper reads EOF on its stdin).

    It declares the machine's cores as its CPUs, or ``min_cpus`` logical CPUs when that is more (processes that
    together reserve more than the cores then share them instead of waiting for each other), and the machine's
    GPUs, never more: Ray hands a worker its GPU ids as CUDA_VISIBLE_DEVICES, where a logical GPU beyond the
    machine's would name a device that does not exist. The token travels through a pipe and lives only in the
    yielded mapping: give it to a child process's environment, never to a file or a command line (``ps`` shows
    those). This process does not connect to the instance, and keeps its own signal handlers.
    """
    check_auth_mode(os.environ)  # the keeper would refuse it too, less legibly
    num_cpus = max(math.ceil(get_num_cpus()), math.ceil(min_cpus))
    keeper = subprocess.Popen([sys.executable, "-m", __name__, str(num_cpus)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        started = keeper.stdout.readline()
        if not started:
            raise RuntimeError(f"the local Ray instance did not start (exit {keeper.wait()}); see Ray's error above")
        instance = json.loads(started)
        log.info("a local Ray instance at %s (%d CPUs) for other processes to join", instance["address"], num_cpus)
        environ = {**os.environ, **local_ray_environment(instance["token"]), "RAY_ADDRESS": instance["address"]}
        yield {name: value for name, value in environ.items() if value is not None}
    finally:
        keeper.stdin.close()  # the keeper stops the instance and exits
        keeper.wait()


def _keep_local_ray(num_cpus: int) -> None:
    """The keeper of :func:`local_ray_for_other_processes`: starts the instance, writes its address and token to
    stdout, and stops it cleanly (every process, Ray's agents too) when stdin ends: its parent closed it or died.
    Ctrl-C is the parent's to handle (it stops its runs first); SIGTERM stops the instance at once."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    handshake = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # whatever Ray prints goes to stderr, not into the handshake
    start_local_ray(num_cpus=num_cpus, log_to_driver=False)  # ray.init's SIGTERM handler exits through finally
    try:
        token = AuthenticationTokenLoader.instance().get_raw_token()  # the one start_local_ray made
        handshake.write(json.dumps({"address": ray.get_runtime_context().gcs_address, "token": token}) + "\n")
        handshake.close()
        sys.stdin.read()
    finally:
        stop_local_ray()


if __name__ == "__main__":
    _keep_local_ray(int(sys.argv[1]))
