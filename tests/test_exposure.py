"""What the sweep exposes on the network: the Ray it starts listens on the loopback
interface only (dashboard, GCS, raylet, workers and the Prometheus metrics endpoints), and
its dashboard asks for the token. The test connects to this machine's own addresses only."""

import os
import shutil
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import ray

from maenas_ray.cli import ray_session


@pytest.fixture
def local_ray():
    with ray_session(None, 2, True) as url:  # as `python -m maenas_ray.sweep` starts it
        yield url


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


def _descendants(pid: int) -> set[int]:
    """``pid`` and every process below it (from /proc)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        children = [p for p, pp in parents.items() if pp == parent and p not in found]
        found.update(children)
        frontier.extend(children)
    return found


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
def test_every_server_of_the_local_ray_listens_on_loopback_only(local_ray):
    ours = _descendants(os.getpid())
    listening = []
    for line in subprocess.run(
        ["ss", "-ltnpH"], capture_output=True, text=True
    ).stdout.splitlines():
        fields = line.split()
        pids = {int(p.split("=")[1]) for p in fields[-1].split(",") if p.startswith("pid=")}
        if pids & ours:
            listening.append((fields[3], fields[-1]))
    assert len(listening) >= 5, listening  # GCS, raylet, dashboard, agent, metrics at least
    exposed = [
        (address, who) for address, who in listening
        if not address.rsplit(":", 1)[0].strip("[]").removeprefix("::ffff:").startswith("127.")
    ]  # fmt: skip
    assert exposed == [], exposed
    # and nothing answers on the machine's own network address
    ip = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    ports = [int(address.rsplit(":", 1)[1]) for address, _ in listening]
    for address in [a for a in ip if ":" not in a and not a.startswith("127.")][:1]:
        for port in ports:
            with socket.socket() as s, pytest.raises(OSError):
                s.settimeout(2)
                s.connect((address, port))


def test_the_local_ray_s_own_processes_know_its_address(local_ray):
    """Ray processes that look their cluster up (Ray Train's placement group cleaner asks
    the State API) find this one by RAY_ADDRESS, not by scanning the machine, which fails
    when another Ray runs there ("Found multiple active Ray instances")."""

    @ray.remote(num_cpus=0)
    def address() -> str | None:
        return os.environ.get("RAY_ADDRESS")

    gcs = ray.get_runtime_context().gcs_address
    assert gcs.startswith("127.0.0.1:") and ray.get(address.remote()) == gcs
