"""Clusters: the launcher YAMLs in cluster/, multi-node sweeps on one machine
(``ray.cluster_utils.Cluster`` with logical GPUs), scheduling at simulated scale, and the
shared-storage checks."""

import json
import re
import threading
import time
from pathlib import Path

import pyarrow.fs
import pytest
import ray
import ray.tune
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.cluster_utils import Cluster
from test_sweep import TINY  # tests/ is on sys.path (pytest's rootdir conftest)

from maenas_ray import cli
from maenas_ray.cli import STORAGE_ENV, check_shared_storage, nodes_missing
from maenas_ray.config import config_from_dict, merge
from maenas_ray.genotypes import main as genotypes
from maenas_ray.orchestration import experiment as ex
from maenas_ray.orchestration.stages import NotSharedError, require_visible
from maenas_ray.results import load_experiment
from maenas_ray.storage import StorageError, resolve_storage
from maenas_ray.sweep import main as sweep
from maenas_ray.sweep_space import check_sweep

REPO = Path(__file__).resolve().parent.parent
CLUSTER_YAMLS = sorted((REPO / "cluster").glob("*.yaml"))
SHARED_SCHEME = {"aws": "s3://", "gcp": "gs://", "local": "/"}


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_cluster_yaml_is_valid_and_installs_the_package_with_shared_storage(path):
    raw = yaml.safe_load(path.read_text())
    cfg = prepare_config(raw)  # Ray's defaults merged in, as `ray up` does (offline)
    validate_config(cfg)  # Ray's own cluster-config schema
    provider = cfg["provider"]["type"]
    assert provider in SHARED_SCHEME
    # every node gets this checkout and installs it (with its pinned dependencies)
    assert cfg["file_mounts"]["~/maenas-ray"] == "."
    for commands in (cfg["head_setup_commands"], cfg["worker_setup_commands"]):
        joined = "\n".join(commands)
        assert "pip install -q -e ~/maenas-ray" in joined
        # the node's shells (`ray start`, submitted jobs, `ray attach`) get the venv, the
        # token mode and the storage every node writes to: object storage, or the NFS mount
        assert "echo 'source ~/.maenas_ray_env'" in joined
        (env,) = re.findall(r"printf '(.*)' > ~/.maenas_ray_env", joined)
        lines = env.split("\\n")
        assert lines[:2] == ["source ~/maenas-venv/bin/activate", "export RAY_AUTH_MODE=token"]
        (storage,) = re.findall(rf"^export {STORAGE_ENV}=(\S+)$", lines[2])
        assert storage.startswith(SHARED_SCHEME[provider]), storage
    if provider == "local":
        (mount,) = re.findall(
            r"mount -t nfs \S+ (\S+)\)", "\n".join(cfg["initialization_commands"])
        )
        assert storage.startswith(mount + "/")
    else:  # the head runs no trial; GPU worker types autoscale from zero
        types = cfg["available_node_types"]
        assert types[cfg["head_node_type"]]["resources"]["CPU"] == 0
        gpu_types = [t for t in types.values() if t["resources"].get("GPU", 0) > 0]
        assert gpu_types and all(t["min_workers"] == 0 for t in gpu_types)
    # the dashboard stays on the head's localhost (reached through `ray dashboard`), and
    # every node runs with token authentication
    for command in cfg["head_start_ray_commands"][1:] + cfg["worker_start_ray_commands"][1:]:
        assert "RAY_AUTH_MODE=token ray start" in command
    assert "--dashboard-host=127.0.0.1" in cfg["head_start_ray_commands"][1]
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_the_storage_default_comes_from_the_environment(tmp_path, monkeypatch, capsys):
    """Lowest priority first: the config's storage_path, $MAENAS_RAY_STORAGE_PATH, --set
    storage_path=..., --storage-path."""
    monkeypatch.setenv(STORAGE_ENV, str(tmp_path / "env"))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({**TINY, "storage_path": str(tmp_path / "config")}))
    for where in ("config", "env", "set", "flag"):
        (tmp_path / where / "x").mkdir(parents=True)  # an existing experiment is refused
    cases = [
        ([], "env"),
        (["--set", f"storage_path={tmp_path / 'set'}"], "set"),
        (["--set", f"storage_path={tmp_path / 'set'}", "--storage-path", str(tmp_path / "flag")],
         "flag"),
    ]  # fmt: skip
    for extra, where in cases:
        assert sweep(["--config", str(config), "--name", "x", *extra]) == 2
        assert f"experiment {tmp_path / where / 'x'} already exists" in capsys.readouterr().err


def test_a_node_that_cannot_see_the_storage_fails_with_a_clear_error(tmp_path):
    fs = pyarrow.fs.LocalFileSystem()
    (tmp_path / "sweep_config.yaml").write_text("")
    require_visible(fs, str(tmp_path / "sweep_config.yaml"), "the sweep's config")
    message = r"not shared storage: the sweep's config .*/elsewhere/sweep_config.yaml is not"
    with pytest.raises(NotSharedError, match=message + " visible from node"):
        require_visible(fs, str(tmp_path / "elsewhere" / "sweep_config.yaml"), "the sweep's config")
    bucket = pyarrow.fs.SubTreeFileSystem(str(tmp_path), fs)  # object storage: not checked
    require_visible(bucket, "nowhere/sweep_config.yaml", "the sweep's config")


@pytest.fixture
def three_nodes():
    """A head without CPUs and two worker nodes with one logical GPU each (not connected:
    the sweep's ``--address`` connects). This module runs first (conftest.py): a process
    that has run a loopback-only local Ray cannot drive trials on a cluster afterwards."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [cluster.add_node(num_cpus=2, num_gpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    yield cluster, [w.node_id for w in workers]
    ray.shutdown()
    cluster.shutdown()


def test_a_sweep_spreads_trials_over_worker_nodes_into_one_shared_directory(
    three_nodes, tmp_path, capsys
):
    cluster, worker_ids = three_nodes
    store = tmp_path / "shared"
    config = tmp_path / "sweep.yaml"
    changes = {"search": {"device": "auto"},  # CUDA is absent: the logical GPUs run on CPU
               "tune": {"num_samples": 2, "cpus_per_trial": 1, "gpus_per_trial": 1}}  # fmt: skip
    config.write_text(yaml.safe_dump(merge(TINY, changes)))
    rc = sweep(["--config", str(config), "--storage-path", str(store), "--name", "mn",
                "--address", cluster.address])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "at most 2 at once" in out  # two logical GPUs, one per trial
    # each trial (one worker: the search runs in the trial's own process) ran on its own
    # worker node, at the same time
    from ray.util.state import list_actors

    spans, pids = [], set()
    for trial in sorted(store.glob("mn/trial_*")):
        rows = [json.loads(line) for line in (trial / "result.json").read_text().splitlines()]
        spans.append((rows[0]["timestamp"] - rows[0]["time_total_s"], rows[-1]["timestamp"]))
        pids.add(rows[0]["pid"])
        assert (trial / "genotype.json").is_file() and (trial / "search").is_dir()
    assert len(spans) == 2 and max(s for s, _ in spans) < min(e for _, e in spans)
    trial_actors = [a for a in list_actors(detail=True, limit=10_000) if a.pid in pids]
    assert sorted(a.node_id for a in trial_actors) == sorted(worker_ids)
    assert not list_actors(filters=[("class_name", "=", "RayTrainWorker")])
    # everything is in the one shared directory; the genotypes pull reads it
    exp = load_experiment(str(store / "mn"))
    assert [t.status for t in exp.trials()] == ["done", "done"]
    assert genotypes([str(store / "mn"), "--top", "2"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2
    # the sweep left the cluster (it joined with --address); the shared-storage check it
    # passed: every node sees the directory (one machine), while a path that no node has is
    # reported for all three
    assert not ray.is_initialized()
    ray.init(address=cluster.address)
    check_shared_storage(resolve_storage(str(store)))
    assert len(nodes_missing(str(tmp_path / "nowhere"))) == 3


def test_a_multi_node_cluster_refuses_node_local_storage(three_nodes, tmp_path, monkeypatch):
    ray.init(address=three_nodes[0].address)
    # as if a worker node could not see the directory: its probe task finds nothing
    monkeypatch.setattr(cli, "nodes_missing", lambda path: ["192.0.2.7 (0123abcd)"])
    with pytest.raises(StorageError, match=r"is node-local: node\(s\) 192.0.2.7 \(0123abcd\) "
                       r"of this multi-node cluster cannot see it; give s3://"):  # fmt: skip
        check_shared_storage(resolve_storage(str(tmp_path / "store")))
    assert list((tmp_path / "store").iterdir()) == []  # the marker is gone


@pytest.mark.scale  # about 2 minutes: outside the default run (pytest -m scale)
def test_32_trials_on_8_nodes_of_4_gpus_run_16_at_a_time(tmp_path, monkeypatch):
    """The sweep's own Tuner (OptunaSearch, concurrency from the cluster, the trial's
    resources) on 8 x 4 logical GPUs; each trial takes its Train workers' resources as a
    placement group, as Ray Train does, holds them briefly and reports."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(8):
        cluster.add_node(num_cpus=4, num_gpus=4)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        cfg = config_from_dict(
            merge(TINY, {"tune": {"num_samples": 32, "gpus_per_trial": 2, "cpus_per_trial": 2}})
        )
        check_sweep(cfg)
        concurrency = ex.max_concurrent(cfg, ray.cluster_resources())
        assert concurrency == 16

        @ray.remote(num_cpus=0)
        class Gauge:
            def __init__(self):
                self.now = self.most = self.total = 0

            def enter(self):
                self.now += 1
                self.total += 1
                self.most = max(self.most, self.now)

            def leave(self):
                self.now -= 1

            def read(self):
                return self.most, self.total

            def entered(self):
                return self.total

        gauge = Gauge.remote()

        def light_trial(params, base):
            from ray.util.placement_group import placement_group, remove_placement_group

            from maenas_ray.orchestration.stages import worker_resources

            trial_cfg = config_from_dict(merge(base, params))
            bundles = [worker_resources(trial_cfg)] * trial_cfg.tune.workers()
            group = placement_group(bundles, strategy="PACK")
            ray.get(group.ready(), timeout=300)
            ray.get(gauge.enter.remote())
            # the first 16 trials hold their resources until all 16 are in (so the peak
            # is reached whatever the start-up delays); later trials do not wait. Starting
            # 16 trial actors on a loaded 2-core CI machine can take well over 20 s; the
            # deadline only guards against a hang
            deadline = time.monotonic() + 150
            while ray.get(gauge.entered.remote()) < 16 and time.monotonic() < deadline:
                time.sleep(0.2)
            ray.get(gauge.leave.remote())
            remove_placement_group(group)
            ray.tune.report({"epoch": 2, "eval_loss": params["search"]["mask_ratio"]})

        monkeypatch.setattr(ex, "search_trial", light_trial)
        storage = resolve_storage(str(tmp_path))
        (tmp_path / "scale").mkdir()  # as the sweep CLI does
        tuner = ex.build_tuner(cfg, storage, "scale", concurrency)
        results = []
        runner = threading.Thread(target=lambda: results.append(tuner.fit()), daemon=True)
        runner.start()
        runner.join(timeout=600)
        assert results, "the sweep did not finish in 10 minutes: deadlock?"
        (grid,) = results
        assert len(grid) == 32 and not grid.errors
        most, total = ray.get(gauge.read.remote())
        assert total == 32 and most == 16
    finally:
        ray.shutdown()
        cluster.shutdown()
