"""What the Ray command lines (sweep, retrain) share: the Ray arguments, connecting, errors."""

from __future__ import annotations

import argparse
import os
import sys

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


def connect_ray(args: argparse.Namespace) -> bool:
    """Start a local Ray or join ``--address``, printing where; False (error printed) when
    it cannot be done."""
    from maenas_ray.orchestration.experiment import start_ray

    try:
        dashboard = start_ray(args.address, args.num_cpus, not args.no_dashboard)
    except (ConnectionError, RuntimeError, ValueError) as err:
        where = f"the Ray cluster at --address {args.address}" if args.address else "a local Ray"
        print(f"error: cannot start or reach {where}: {err}", file=sys.stderr)
        return False
    if args.address:
        print(f"connected to the Ray cluster at {args.address}", flush=True)
    if dashboard:
        print(f"Ray dashboard: {dashboard}", flush=True)
    return True
