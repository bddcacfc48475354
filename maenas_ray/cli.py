"""What the Ray command lines (sweep, retrain) share: the Ray arguments, connecting, errors."""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
from collections.abc import Iterator

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


def unreachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> str | None:
    """Why ``host:port`` (a Ray cluster's GCS) does not accept a connection within
    ``timeout`` seconds, or None when it does or when the address is not host:port (``auto``
    or ``ray://``: Ray resolves those itself). Ray would otherwise retry for ever."""
    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return None
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return None
    except OSError as err:
        return err.strerror or str(err) or type(err).__name__


@contextlib.contextmanager
def connected_ray(args: argparse.Namespace) -> Iterator[bool]:
    """Start a local Ray (reachable from this machine only) or join ``--address``, printing
    where, for the ``with`` block; it yields False (error printed) when that cannot be done.
    Ray is shut down (or left) at the end of the block."""
    from maenas_ray.orchestration.experiment import ray_session

    if args.num_cpus is not None and args.num_cpus < 1:
        print(f"error: --num-cpus {args.num_cpus}: must be >= 1", file=sys.stderr)
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
