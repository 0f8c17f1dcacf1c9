"""`ray_connect.connect`: waits for a cluster that is not up yet with backoff, retries a local start-up that
timed out, gives up after `ray.connect_timeout_s` with one line naming the address and a fix, and never
retries what waiting cannot fix (a refused token), and stops waiting when start-up is cancelled (SIGTERM).
`ray.init` is a stand-in here: no Ray starts."""

from __future__ import annotations

import doctest
import logging
import socket
import threading

import pytest

from moe_runtime.cluster import ray_connect
from moe_runtime.cluster.ray_connect import RayConnectError, StartupCancelled, connect
from moe_runtime.config import RayConfig

TIMED_OUT = ("The current node timed out during startup. This could happen because some of the raylet failed to "
             "startup or the GCS has become overloaded.")


class FakeRay:
    """Raises the queued errors from `init`, one per call, then succeeds."""

    def __init__(self, *errors: BaseException):
        self.errors, self.calls, self.shutdowns = list(errors), [], 0

    def init(self, **kwargs):
        self.calls.append(kwargs)
        if self.errors:
            raise self.errors.pop(0)

    def shutdown(self):
        self.shutdowns += 1

    def cluster_resources(self):
        return {"CPU": 2.0}

    def get_runtime_context(self):
        return type("Ctx", (), {"gcs_address": "10.0.0.1:6379"})()


@pytest.fixture
def fake(monkeypatch):
    def install(*errors: BaseException) -> FakeRay:
        ray = FakeRay(*errors)
        monkeypatch.setattr(ray_connect, "ray", ray)
        monkeypatch.setattr(ray_connect, "FIRST_DELAY_S", 0.01)
        return ray
    return install


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_local_start_that_timed_out_is_retried(fake, caplog):
    ray = fake(Exception(TIMED_OUT))
    with caplog.at_level(logging.WARNING, logger="moe_runtime.cluster.ray_connect"):
        connect(RayConfig(connect_timeout_s=5), {"num_cpus": 2})
    assert len(ray.calls) == 2 and ray.shutdowns == 1  # the half-started node went first
    assert ray.calls[0]["num_cpus"] == 2 and ray.calls[0]["address"] == "local"  # never another's cluster
    assert "timed out during startup" in caplog.text and "retrying" in caplog.text


def test_local_start_failure_is_one_line_with_a_hint(fake):
    fake(*[Exception(TIMED_OUT)] * 50)
    with pytest.raises(RayConnectError) as err:
        connect(RayConfig(connect_timeout_s=0.2), {})
    message = str(err.value)
    assert "\n" not in message and "timed out during startup" in message
    assert "ray.connect_timeout_s" in message and "raylet.err" in message and "ray start --head" in message


def test_waits_for_a_cluster_that_comes_up(fake):
    ray = fake(ConnectionError("Could not find any running Ray instance."), ConnectionError("still not"))
    connect(RayConfig(address="auto", connect_timeout_s=5), {"num_cpus": 64})
    assert len(ray.calls) == 3 and "num_cpus" not in ray.calls[-1]  # joining: no local resources


def test_refused_token_fails_at_once(fake):
    error = ConnectionError("Failed to connect to Ray cluster at 10.0.0.1:6379")
    error.__cause__ = RuntimeError("Unauthenticated: RPC error: InvalidAuthToken: Authentication token is missing "
                                   "or incorrect")
    ray = fake(error)
    with pytest.raises(RayConnectError) as err:
        connect(RayConfig(address="auto", connect_timeout_s=30), {})
    assert len(ray.calls) == 1
    assert "RAY_AUTH_TOKEN" in str(err.value) and "authOptions.secretName" in str(err.value)
    assert "RAY_AUTH_MODE=token" in str(err.value)  # without it a driver sends no token at all


def test_nothing_listening_is_probed_not_left_to_ray(fake):
    """`ray.init` keeps retrying a silent GCS for minutes; the TCP probe keeps the budget ours."""
    ray = fake()
    address = f"127.0.0.1:{_free_port()}"
    with pytest.raises(RayConnectError) as err:
        connect(RayConfig(address=address, connect_timeout_s=0.5), {})
    assert not ray.calls  # the probe found nothing listening: ray.init never ran
    message = str(err.value)
    assert message.startswith(f"ray.address={address!r}: no Ray after") and "nothing accepts connections" in message
    assert "\n" not in message


def test_cancel_ends_the_wait_at_once(fake):
    """A server stopped while it waits (SIGTERM before Ray came up) stops retrying: no second attempt, even
    with the whole budget left."""
    ray = fake(ConnectionError("Could not find any running Ray instance."))
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(StartupCancelled) as err:
        connect(RayConfig(address="auto", connect_timeout_s=3600), {}, cancel=cancel)
    assert len(ray.calls) == 1 and ray.shutdowns == 1
    assert str(err.value) == "ray.address='auto': start-up stopped while waiting for Ray (attempt 1)"


def test_local_cluster_advertises_a_concrete_server_host(fake):
    ray = fake()
    connect(RayConfig(), {}, server_host="10.1.2.3")
    connect(RayConfig(), {}, server_host="127.0.0.1")
    connect(RayConfig(), {}, server_host="0.0.0.0")
    assert [c.get("_node_ip_address") for c in ray.calls] == ["10.1.2.3", None, None]


def test_doctests():
    assert doctest.testmod(ray_connect).failed == 0
