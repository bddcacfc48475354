"""What the Ray command lines (sweep, retrain) share: the Ray arguments, the Ray session
(a local Ray on 127.0.0.1, or a cluster), the shared-storage check, errors."""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from unittest import mock

from maenas_ray.storage import Storage, StorageError

#: Default of ``--storage-path`` (before the config's ``storage_path``): the cluster YAMLs
#: set it on every node, so that a submitted sweep writes to the cluster's shared storage.
STORAGE_ENV = "MAENAS_RAY_STORAGE_PATH"


class UsageError(ValueError):
    """A command-line or config problem found before Ray starts."""


def add_ray_arguments(parser: argparse.ArgumentParser, set_example: str) -> None:
    """``--address``, ``--num-cpus``, ``--no-dashboard`` and ``--set KEY=VALUE``."""
    parser.add_argument("--address", help="connect to a running Ray cluster (e.g. auto)")
    parser.add_argument(
        "--num-cpus", type=int, help="CPUs of the local Ray started without --address"
    )
    parser.add_argument(
        "--no-dashboard", action="store_true", help="local Ray without the dashboard"
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help=f"override a config key, e.g. --set {set_example} (repeatable)",
    )  # fmt: skip


def config_overrides(args: argparse.Namespace) -> list[str]:
    """The ``--set`` overrides with the storage path around them, lowest priority first:
    ``$MAENAS_RAY_STORAGE_PATH``, then ``--set``, then ``--storage-path``."""
    overrides = list(args.overrides)
    if os.environ.get(STORAGE_ENV):
        overrides.insert(0, f"storage_path={os.environ[STORAGE_ENV]}")
    if args.storage_path:
        overrides.append(f"storage_path={args.storage_path}")
    return overrides


#: How long to wait for a Ray cluster's address to answer before giving up.
CONNECT_TIMEOUT_S = 15.0


def unreachable(address: str, timeout: float | None = None) -> str | None:
    """Why ``host:port`` is not a Ray cluster's GCS: it does not accept a connection within
    ``timeout`` seconds, or no GCS answers there in twice that; None when one does or when
    the address is not host:port (``auto`` or ``ray://``: Ray resolves those itself). Ray
    would otherwise retry for ever."""
    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return None
    timeout = CONNECT_TIMEOUT_S if timeout is None else timeout
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as err:
        return err.strerror or str(err) or type(err).__name__
    # Ray's own GCS client, in a process of its own: it logs its retries to stderr and
    # gives up only after about 40 s
    probe = f"from ray._raylet import GcsClient; GcsClient(address={address!r})"
    try:
        answered = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, timeout=2 * timeout
        ).returncode == 0  # fmt: skip
    except subprocess.TimeoutExpired:
        answered = False
    return None if answered else "it accepts connections, but no Ray GCS answers there"


def check_num_cpus(args: argparse.Namespace) -> None:
    """Raises UsageError when ``--num-cpus`` is given and below 1."""
    if args.num_cpus is not None and args.num_cpus < 1:
        raise UsageError(f"--num-cpus {args.num_cpus}: must be >= 1")


@contextlib.contextmanager
def connected_ray(args: argparse.Namespace) -> Iterator[bool]:
    """Start a local Ray (reachable from this machine only) or join ``--address``, printing
    where, for the ``with`` block; it yields False (error printed) when that cannot be done.
    Ray is shut down (or left) at the end of the block."""
    try:
        check_num_cpus(args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        yield False
        return
    problem = unreachable(args.address) if args.address else None
    if problem:
        print(
            f"error: cannot reach the Ray cluster at --address {args.address}: {problem}",
            file=sys.stderr,
        )
        yield False
        return
    with contextlib.ExitStack() as stack:
        try:
            dashboard = stack.enter_context(
                ray_session(args.address, args.num_cpus, not args.no_dashboard)
            )
        except (ConnectionError, RuntimeError, ValueError) as err:
            where = (
                f"the Ray cluster at --address {args.address}" if args.address else "a local Ray"
            )
            print(f"error: cannot start or reach {where}: {err}", file=sys.stderr)
            yield False
            return
        if args.address:
            print(f"connected to the Ray cluster at {args.address}", flush=True)
        if dashboard:
            print(f"Ray dashboard: {dashboard}", flush=True)
        yield True


#: Ray's switch for multi-node clusters (its name is about Windows and macOS, where they are
#: off). Off, a node takes 127.0.0.1 as its address, and every server it starts (GCS,
#: raylet, workers, the Prometheus metrics endpoints of the dashboard, its agent and the
#: autoscaler monitor) listens on the loopback interface only.
RAY_CLUSTER_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # ENABLE_RAY_CLUSTERS_ENV_VAR
#: Ray Train's switch for its preemption watcher actor.
PREEMPTION_WATCHER_SWITCH = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


@contextlib.contextmanager
def _loopback_only() -> Iterator[None]:
    """This process and the Ray processes it starts treat the node as single-machine: no
    multi-node switch, and no Train preemption watcher (a local machine is not a spot
    instance; its actor logs an error line on every Train run)."""
    from ray._private import ray_constants

    env = {RAY_CLUSTER_SWITCH: "0", PREEMPTION_WATCHER_SWITCH: "0"}
    # ENABLE_RAY_CLUSTER: what Ray read from the environment when it was imported
    with (
        mock.patch.dict(os.environ, env),
        mock.patch.object(ray_constants, "ENABLE_RAY_CLUSTER", False),
    ):
        yield


#: Ray's switch for the GCS port of a head node it starts (0 or unset: any free port).
GCS_PORT_ENV = "RAY_GCS_SERVER_PORT"


def _free_local_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def ray_session(address: str | None, num_cpus: int | None, dashboard: bool) -> Iterator[str | None]:
    """Connect to the cluster at ``address``, or start a local Ray reachable from this
    machine only (every server on 127.0.0.1, the dashboard too); yields the dashboard URL,
    if any, and shuts Ray down at the end (disconnects from a cluster)."""
    import ray

    with contextlib.ExitStack() as stack:
        if address:
            context = ray.init(address=address)
        else:
            stack.enter_context(_loopback_only())
            # Ray's own processes that look their cluster up (Train's placement group
            # cleaner asks the State API) find it by RAY_ADDRESS, or else by scanning the
            # machine, which fails when another Ray runs there (a second sweep, a retrain
            # beside a sweep): the GCS gets a port chosen here and every worker its address.
            port = _free_local_port()
            stack.enter_context(mock.patch.dict(os.environ, {GCS_PORT_ENV: str(port)}))
            context = ray.init(
                num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1",
                runtime_env={"env_vars": {"RAY_ADDRESS": f"127.0.0.1:{port}"}},
            )  # fmt: skip
        stack.callback(ray.shutdown)
        yield f"http://{context.dashboard_url}" if context.dashboard_url else None


def nodes_missing(path: str) -> list[str]:
    """The alive nodes (by address) that do not see ``path``: one zero-CPU task per node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    def sees(p: str) -> bool:
        return os.path.exists(p)

    nodes = [n for n in ray.nodes() if n["Alive"]]
    refs = [
        sees.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote(path)
        for n in nodes
    ]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=120)
    missing = []
    for node, ref in zip(nodes, refs, strict=True):
        try:  # a node that does not answer (busy, going away) counts as not seeing it
            ok = ref in ready and ray.get(ref)
        except ray.exceptions.RayError:
            ok = False
        if not ok:
            missing.append(f"{node['NodeManagerAddress']} ({node['NodeID'][:8]})")
    return missing


def check_shared_storage(storage: Storage) -> None:
    """On a multi-node cluster, a local ``storage_path`` must be one directory that every
    node sees (NFS mounted at the same path): a marker written here must be visible to a
    task on every alive node. Object storage (s3://, gs://) passes as it is."""
    import ray

    if not storage.is_local or len([n for n in ray.nodes() if n["Alive"]]) < 2:
        return
    storage.fs.create_dir(storage.path, recursive=True)
    marker = storage.join(f".maenas-shared-{uuid.uuid4().hex}")
    with storage.fs.open_output_stream(marker):
        pass
    try:
        missing = nodes_missing(marker)
    finally:
        storage.fs.delete_file(marker)
    if missing:
        raise StorageError(
            f"storage_path = {storage.uri!r} is node-local: node(s) {', '.join(missing)} of "
            "this multi-node cluster cannot see it; give s3://..., gs://... or a directory on "
            "NFS mounted at the same path on every node"
        )
