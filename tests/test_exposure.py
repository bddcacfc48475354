"""What the sweep exposes on the network: the Ray it starts has its dashboard on localhost
only, and token authentication on."""

import os
import socket
import urllib.error
import urllib.request

import pytest
import ray

from maenas_ray.orchestration.experiment import start_ray


@pytest.fixture
def local_ray():
    url = start_ray(None, 2, True)  # as `python -m maenas_ray.sweep` starts it
    yield url
    ray.shutdown()


def _get(url: str, headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


def test_the_dashboard_is_on_localhost_and_asks_for_the_token(local_ray):
    url = local_ray
    assert url is not None and url.startswith("http://127.0.0.1:")
    assert _get(f"{url}/api/version") == 401  # no token, no answer
    token_file = os.path.expanduser("~/.ray/auth_token")
    assert os.environ.get("RAY_AUTH_MODE") == "token" and os.path.isfile(token_file)
    with open(token_file) as f:
        token = f.read().strip()
    assert _get(f"{url}/api/version", {"Authorization": f"Bearer {token}"}) == 200
    # not reachable on the machine's network address
    ip, port = ray.util.get_node_ip_address(), int(url.rsplit(":", 1)[1])
    if not ip.startswith("127."):
        with socket.socket() as s, pytest.raises(OSError):
            s.settimeout(5)
            s.connect((ip, port))
