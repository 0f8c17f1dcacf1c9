"""Connecting the driver to Ray: join the cluster at `ray.address`, waiting for it with backoff, or start a
local one. Every failure is one line with a hint (`RayConnectError`), never Ray's traceback.

  1. `ray.address` set ("auto", "HOST:6379", "ray://HOST:10001"): `ray.init(address=...)`. While no cluster
     answers there (e.g. the Ray head still starting in the container beside this one), log one line and
     retry after 0.5, 1, 2, ... 10 s until `ray.connect_timeout_s`; then fail naming the address. An address
     with a port is first probed with a plain TCP connect: `ray.init` itself keeps retrying a silent GCS for
     minutes, past any budget of ours.
  2. No address: start a local cluster of our own (`ray.init(address="local")`: a plain `ray.init()` joins
     any cluster another process on the host started). Ray's own start-up can time out on a loaded host
     ("The current node timed out during startup", once in 8 start-ups on a 2-core machine): shut the
     half-started node down and retry within the same budget.
  3. What waiting cannot fix (no or a wrong auth token, a malformed address) fails without our retries (Ray
     itself retries a refused token for about 20 s, logging a warning a second, before it gives up).
  4. A stop asked for while waiting (`cancel` set: the server got SIGTERM before it served) ends the wait at
     once (`StartupCancelled`): a pod deleted while its Ray head never came up exits within its grace
     period instead of being killed after it.

A local cluster advertises `server.host` when that is a concrete address (a multi-homed host serving on one
interface). Ray 2.60 listens on every interface whatever it advertises, and turns a loopback address into
the host's routable one, so what keeps a single machine's Ray closed is its token auth, which `ray.init`
turns on for every cluster it starts (token in ~/.ray/auth_token, generated when missing).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time

import ray

from moe_runtime.config import RayConfig
from moe_runtime.errors import MoeRuntimeError

log = logging.getLogger(__name__)

# Backoff between attempts: first delay and cap, seconds.
FIRST_DELAY_S, MAX_DELAY_S = 0.5, 10.0
# Ray 2.60: a driver joining an explicit address ("HOST:6379") sends a token only with RAY_AUTH_MODE=token in
# its environment, even when ~/.ray/auth_token exists (only "auto" turns token auth on from the file): the
# usual cause of a refusal by a cluster whose nodes were started with token auth.
_AUTH_HINT = ("Ray refused this process's auth token (missing or wrong): run it with RAY_AUTH_MODE=token and the "
              "cluster's token (RAY_AUTH_TOKEN, or the file ~/.ray/auth_token; on Kubernetes the Secret that the "
              "RayCluster's authOptions.secretName names)")


class RayConnectError(MoeRuntimeError):
    """The driver could not join or start Ray; the message names the address, the cause and a fix."""


class StartupCancelled(RayConnectError):
    """Start-up was stopped (SIGTERM) while it waited for Ray or for the workers' bundles."""


def connect(cfg: RayConfig, local_init: dict, server_host: str = "",
            cancel: threading.Event | None = None) -> None:
    """`ray.init` per `cfg` (steps 1-4 of the module docstring). local_init: extra `ray.init` arguments
    for a local cluster (num_cpus). cancel: set to stop waiting. Raises `RayConnectError`
    (`StartupCancelled` when `cancel` was set)."""
    what = f"ray.address={cfg.address!r}" if cfg.address else "ray.address=null (a local cluster)"
    kwargs = {"address": cfg.address or "local", "include_dashboard": False}
    if not cfg.address:
        kwargs.update(local_init)
        if _one_interface(server_host):
            kwargs["_node_ip_address"] = server_host.strip("[]")
    deadline, delay, attempt = time.monotonic() + cfg.connect_timeout_s, FIRST_DELAY_S, 1
    while True:
        try:
            _probe(cfg.address)
            ray.init(**kwargs)
        except Exception as e:  # noqa: BLE001 - Ray raises bare Exception for a timed-out start-up
            _shutdown_quietly()  # a half-started local node holds processes and ports
            cause = _first_line(e)
            if not _worth_retrying(e, local=not cfg.address):
                raise RayConnectError(f"{what}: {cause}; {_hint(e, cfg)}") from None
            left = deadline - time.monotonic()
            if left <= 0:
                raise RayConnectError(
                    f"{what}: no Ray after {attempt} attempt(s) in {cfg.connect_timeout_s:g} s "
                    f"(ray.connect_timeout_s); last error: {cause}; {_hint(e, cfg)}") from None
            wait = min(delay, left)
            log.warning("Ray at %s not ready (%s); retrying in %.1f s (attempt %d, ray.connect_timeout_s=%g)",
                        cfg.address or "a new local cluster", cause, wait, attempt, cfg.connect_timeout_s)
            if sleep_unless_cancelled(wait, cancel):
                raise StartupCancelled(f"{what}: start-up stopped while waiting for Ray (attempt {attempt})") from None
            delay, attempt = min(delay * 2, MAX_DELAY_S), attempt + 1
            continue
        resources = ray.cluster_resources()
        log.info("Ray: %s %s (%g CPU, %g GPU)", "joined" if cfg.address else "started a local cluster at",
                 _gcs_address(cfg.address), resources.get("CPU", 0), resources.get("GPU", 0))
        return


def sleep_unless_cancelled(seconds: float, cancel: threading.Event | None) -> bool:
    """Sleep `seconds`, waking early when `cancel` is set. Returns whether it was set."""
    if cancel is None:
        time.sleep(seconds)
        return False
    return cancel.wait(seconds)


def _gcs_address(fallback: str | None) -> str:
    try:
        return ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001 - a Ray Client connection (ray://) has no GCS address of its own
        return fallback or "?"


def _one_interface(host: str) -> bool:
    """Whether `host` is an IP address of one interface (not loopback, which Ray replaces anyway, nor any);
    a host name is left to Ray too.

    >>> [_one_interface(h) for h in ("10.1.2.3", "127.0.0.1", "0.0.0.0", "[::]", "localhost", "fd00::2")]
    [True, False, False, False, False, True]
    """
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return not (ip.is_loopback or ip.is_unspecified)


def _probe(address: str | None, timeout_s: float = 2.0) -> None:
    """Raise `ConnectionError` when nothing accepts TCP at an address's HOST:PORT ("auto" and no address
    are left to Ray, which answers at once)."""
    host, sep, port = (address or "").removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ConnectionError(f"nothing accepts connections at {host}:{port} ({e.strerror or e})") from None


def _is_auth(error: BaseException) -> bool:
    """Ray reports a missing or wrong token as a ConnectionError whose cause says so."""
    text = f"{error} {error.__cause__ or ''} {error.__context__ or ''}".lower()
    return "authentication" in text or "auth_token" in text or "auth token" in text


def _worth_retrying(error: Exception, local: bool) -> bool:
    """A cluster not up yet, or a local start-up that timed out; never auth or a malformed address."""
    text = str(error).lower()
    if _is_auth(error):
        return False
    if local:
        return "timed out during startup" in text
    return isinstance(error, ConnectionError)


def _hint(error: Exception, cfg: RayConfig) -> str:
    if _is_auth(error):
        return _AUTH_HINT
    if not cfg.address:
        return ("the host may be short of CPU, memory or /dev/shm: see /tmp/ray/session_latest/logs/raylet.err, "
                "retry, or run `ray start --head` yourself and set ray.address: auto")
    return (f"start Ray first (`ray start --head` on this node, or `ray start --address=HEAD:6379` to join) and "
            f"check `ray status`; ray.address {cfg.address!r} must name it ('auto' finds one on this node); "
            "raise ray.connect_timeout_s to wait longer")


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def _shutdown_quietly() -> None:
    try:
        ray.shutdown()
    except Exception:  # noqa: BLE001 - nothing was started
        pass
