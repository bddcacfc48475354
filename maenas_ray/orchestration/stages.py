"""The stages of this project on Ray, each described once and run through one function.

A stage is a search (``run_search``) or a retraining (``run_retrain``, the sweep's proxy
retrain included). A :class:`Run` says which stage, with which config, in which run
directory on the storage; :func:`execute` runs it, resumed from the newest readable
checkpoint of that directory, either

- **in the Tune trial process** (a one-worker trial: one GPU, a GPU fraction or CPUs):
  :class:`TuneReports` writes each epoch's checkpoint to ``<run>/checkpoint_epoch_<n>``,
  keeps the newest ``checkpoints_to_keep``, and reports the epoch to Ray Tune, or
- **in the workers of a Ray Train job** (:func:`stage_trainer`: data parallel, and the
  ``retrain`` CLI): rank 0 reports each epoch with its checkpoint to Ray Train, which
  writes it in the same layout and keeps the newest ones; inside a sweep, Ray's own
  ``TuneReportCallback`` passes each report on to Ray Tune.

Each checkpoint is stored once, by one owner. Ray Tune records, per report, only a
*pointer*: a few bytes naming the stage's run, its epoch and its checkpoint (and every
report carries ``checkpoint_path``). The pointer tells a restarted trial which epochs Tune
already has; epochs whose checkpoints reached the storage but whose reports did not are
reported again (:func:`replay_unreported`), so each epoch is in Tune's history once.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs
import ray.train
import ray.train.torch
import ray.tune
import torch
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback

from maenas_ray.config import Config, config_from_dict
from maenas_ray.engines import (
    CHECKPOINT_FILE,
    EpochReport,
    SearchCallback,
    load_search_state,
    run_search,
)
from maenas_ray.engines.retrain import (
    RETRAIN_FILE,
    RetrainPlan,
    load_retrain_state,
    run_retrain,
    save_retrain_state,
)
from maenas_ray.results import CONFIG_FILE
from maenas_ray.runs import (
    checkpoint_dir_name,
    inject_fault,
    latest_state,
    log_reconstructions,
    prune_checkpoints,
    read_json,
    remove_stale_scratch,
    retrain_line,
    scratch,
    upload,
    use_cpus,
)
from maenas_ray.space import Genotype

#: Sub-directories of a trial directory holding its two stages' runs.
SEARCH_RUN = "search"
PROXY_RUN = "proxy"
#: CPU the trial driver of a Train-job trial reserves; taken out of ``tune.cpus_per_trial``.
DRIVER_CPU = 0.01
#: The search's final metrics (JSON), written with the artifacts: the stage is done.
SEARCH_RESULT = "search_result.json"
#: Files every finished search writes into its trial directory; the result last, as it
#: marks the stage done.
ARTIFACTS = ("genotype.json", "reconstruction.png", "alphas.png", "cells.png", SEARCH_RESULT)
#: The result key saying where a trial stands (``search 4/6``, ``proxy 1/2``): the
#: progress table's stage column (Tune's iteration counts the two stages together).
STAGE_KEY = "stage"
POINTER_FILE = "pointer.json"  # the file of Tune's pointer checkpoint
State = dict[str, Any] | None  # a stage's loaded checkpoint, if it resumes


@dataclass(frozen=True)
class TuneView:
    """How a stage's epoch metrics appear in Ray Tune: ``extra`` keys first (a placeholder
    objective, the search's results), the epoch's own keys with ``prefix``, and the stage
    column (``search 4/6``)."""

    label: str
    epochs: int
    extra: dict[str, Any] = field(default_factory=dict)
    prefix: str = ""

    def __call__(self, metrics: dict[str, Any]) -> dict[str, Any]:
        own = {f"{self.prefix}{k}": v for k, v in metrics.items()}
        return {**self.extra, **own, STAGE_KEY: f"{self.label} {metrics['epoch']}/{self.epochs}"}


@dataclass(frozen=True)
class Run:
    """One run of a stage in the directory ``path`` of the storage ``fs`` (Train's workers
    get it whole)."""

    stage: str  # a key of STAGES
    config: Config
    fs: pyarrow.fs.FileSystem
    path: str  # the run's directory: checkpoint_epoch_<n>/ inside
    genotype: Genotype | None = None  # the retrain stages
    proxy: bool = False
    tune: TuneView | None = None  # inside a sweep trial

    @property
    def trial_dir(self) -> str:
        """Where the run's artifacts, TensorBoard images and fault markers go."""
        return self.path.rsplit("/", 1)[0]


# --- running a stage ------------------------------------------------------------------


def _search(run: Run, state: State, reporter: Reporter, in_train_job: bool) -> dict[str, Any]:
    """The search; rank 0 copies its genotype, pictures and final metrics to the trial."""
    rank = reporter.rank
    with scratch("artifacts") as out:
        # one that had finished before a restart reports nothing (see replay_unreported)
        out_dir = out if rank == 0 else None
        result = run_search(run.config, reporter, resume_from=state, out_dir=out_dir)
        if rank == 0:
            (Path(out) / SEARCH_RESULT).write_text(json.dumps(result.metrics) + "\n")
            upload(Path(out), ARTIFACTS, run.fs, run.trial_dir)
    return result.metrics


def _retrain(run: Run, state: State, reporter: Reporter, in_train_job: bool) -> dict[str, Any]:
    """A retraining (a sweep's proxy, or the retrain CLI's) of ``run.genotype``."""
    cfg, genotype = run.config, run.genotype
    assert genotype is not None
    prepare = prepare_model if in_train_job else None
    done = run_retrain(
        cfg, genotype, reporter, proxy=run.proxy, resume_from=state, prepare_model=prepare
    )
    epochs = RetrainPlan.of(cfg, run.proxy).epochs
    if run.tune is None and state is not None and state["epoch"] >= epochs:
        # a retrain run that had finished: its result once more, for Train's Result
        assert isinstance(reporter, TrainReports)
        reporter.final(done.metrics, lambda d: save_retrain_state(state, d), epochs)
    if run.proxy and reporter.rank == 0:  # a retrain run's driver prints its own result line
        print(
            f"retrained: {done.parameters:,} parameters, {done.macs / 1e6:.1f}M multiply-adds, "
            f"top-1 {done.metrics.get('top1', float('nan')):.4f}",
            flush=True,
        )
    return done.metrics


@dataclass(frozen=True)
class Stage:
    """A kind of stage, described once: what runs it, its checkpoint file and how that
    loads, the device setting it runs on, and its name in the "resuming" line."""

    body: Callable[[Run, State, Reporter, bool], dict[str, Any]]
    state_file: str
    load: Callable[[Path], dict[str, Any]]
    device: Callable[[Config], str]
    noun: str


STAGES = {
    "search": Stage(_search, CHECKPOINT_FILE, load_search_state, lambda c: c.search.device,
                    "search"),
    "retrain": Stage(_retrain, RETRAIN_FILE, load_retrain_state, lambda c: c.retrain.device,
                     "retraining"),
}  # fmt: skip


def execute(run: Run, reporter: Reporter, in_train_job: bool = False) -> dict[str, Any]:
    """Run the stage of ``run`` to its end, resumed from the newest readable checkpoint of
    its directory; ``reporter`` reports each epoch. Returns the stage's final metrics."""
    stage = STAGES[run.stage]
    remove_stale_scratch()
    state = None
    found = latest_state(run.fs, run.path, stage.state_file, stage.load)
    if found is not None:
        state, path = found
        if reporter.rank == 0:
            print(f"resuming the {stage.noun} from epoch {state['epoch']} ({path})", flush=True)
    return stage.body(run, state, reporter, in_train_job)


def stage_worker(loop_config: dict[str, Any]) -> None:
    """The Ray Train worker loop: one data-parallel share of ``loop_config["run"]``."""
    run: Run = loop_config["run"]
    rank = setup_worker(STAGES[run.stage].device(run.config), loop_config["cpus"])
    if run.tune is not None:  # a sweep's: a worker may run on another node than its trial
        experiment = run.trial_dir.rsplit("/", 1)[0]
        require_visible(run.fs, f"{experiment}/{CONFIG_FILE}", "the sweep's config")
    execute(run, TrainReports(rank, run), in_train_job=True)


def stage_trainer(
    run: Run, scaling: ray.train.ScalingConfig, keep: int, callbacks: list | None = None
) -> TorchTrainer:
    """The Ray Train job running ``run`` over ``scaling``'s workers; Train keeps the newest
    ``keep`` checkpoints in the run directory and retries nothing (the caller decides)."""
    storage_path, name = run.path.rsplit("/", 1)
    cpus = (scaling.resources_per_worker or {}).get("CPU", 1.0)
    return TorchTrainer(
        stage_worker,
        train_loop_config={"run": run, "cpus": cpus},
        scaling_config=scaling,
        torch_config=ray.train.torch.TorchConfig(backend=PROCESS_GROUP_BACKEND),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=run.fs,
            callbacks=callbacks or [],
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep),
            failure_config=ray.train.FailureConfig(max_failures=0),
            # progress is printed by the stages; Train's per-report INFO lines repeat it
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            # Train's print patch sends a worker's print to its logger as well as to
            # stdout, which shows every progress line twice
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
        ),
    )


# --- reporting ------------------------------------------------------------------------


class TrainReports(SearchCallback):
    """In a Ray Train worker: every rank reports each epoch to Ray Train; rank 0 attaches
    the checkpoint, which Train stores in the run directory (and prunes)."""

    def __init__(self, rank: int, run: Run) -> None:
        self.rank, self.run = rank, run

    def on_epoch_end(self, report: EpochReport) -> None:
        self._report(report.metrics, report.save_checkpoint, checkpoint_dir_name(report.epoch))
        if self.rank != 0:
            return
        if self.run.stage == "retrain":
            print(retrain_line(report.epoch, report.epochs, report.metrics), flush=True)
        log_reconstructions(report, self.run.fs, self.run.trial_dir)
        inject_fault(self.run.stage, report.epoch, self.run.fs, self.run.trial_dir)

    def final(self, metrics: dict[str, Any], save: Any, epoch: int) -> None:
        """Report a run that had finished before its restart once more, for Train's Result."""
        self._report(metrics, save, checkpoint_dir_name(epoch, "_final"))

    def _report(self, metrics: dict[str, Any], save: Any, name: str) -> None:
        if self.run.tune is not None:
            metrics = self.run.tune(metrics)
        if self.rank != 0:
            ray.train.report(metrics)
            return
        with scratch("ckpt") as tmp:
            save(tmp)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)


class TuneReports(SearchCallback):
    """In the Tune trial process itself: each epoch's checkpoint goes to
    ``<run>/checkpoint_epoch_<n>`` (the layout of a Train run; the newest ``keep`` are
    kept), then the epoch is reported to Ray Tune with a pointer to it."""

    rank = 0

    def __init__(self, run: Run, keep: int) -> None:
        self.run, self.keep = run, keep

    def on_epoch_end(self, report: EpochReport) -> None:
        run = self.run
        path = f"{run.path}/{checkpoint_dir_name(report.epoch)}"
        with scratch("ckpt") as tmp:
            report.save_checkpoint(tmp)
            run.fs.create_dir(path, recursive=True)
            pyarrow.fs.copy_files(
                tmp, path, source_filesystem=pyarrow.fs.LocalFileSystem(),
                destination_filesystem=run.fs,
            )  # fmt: skip
        # pruned first: a scheduler that stops the trial does so inside report()
        prune_checkpoints(run.fs, run.path, self.keep)
        log_reconstructions(report, run.fs, run.trial_dir)
        inject_fault(run.stage, report.epoch, run.fs, run.trial_dir, "exit-unreported")
        report_to_tune(run, report.metrics, path)
        inject_fault(run.stage, report.epoch, run.fs, run.trial_dir)


def report_to_tune(run: Run, metrics: dict[str, Any], checkpoint: str | None) -> None:
    """One epoch of ``run`` to Ray Tune; with ``checkpoint`` (its directory on the
    storage), Tune records a pointer to it as the trial's checkpoint."""
    assert run.tune is not None
    shown = run.tune(metrics)
    if checkpoint is None:
        ray.tune.report(shown)
        return
    pointer = {"run": run.path.rsplit("/", 1)[1], "epoch": metrics["epoch"],
               CHECKPOINT_PATH_KEY: checkpoint}  # fmt: skip
    with scratch("ckpt") as tmp:
        (Path(tmp) / POINTER_FILE).write_text(json.dumps(pointer) + "\n")
        shown[CHECKPOINT_PATH_KEY] = checkpoint
        ray.tune.report(shown, checkpoint=ray.tune.Checkpoint.from_directory(tmp))


def recorded_epoch(run: Run) -> int | None:
    """The last epoch of ``run`` that Ray Tune has recorded for this trial (its pointer
    checkpoint): 0 when Tune has none, None when it points at another run."""
    checkpoint = ray.tune.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as directory:
        file = Path(directory) / POINTER_FILE
        pointer: dict[str, Any] = json.loads(file.read_text()) if file.is_file() else {}
    return int(pointer["epoch"]) if pointer.get("run") == run.path.rsplit("/", 1)[1] else None


def replay_unreported(run: Run) -> None:
    """Report to Ray Tune, once each, the epochs of ``run`` whose checkpoints reached the
    storage but whose reports never reached Tune (the trial died in between), the newest
    with its checkpoint. The stage then resumes after them, so every epoch is in Tune's
    history once and none is computed twice.

    A Train-job trial's reports come through Ray's ``TuneReportCallback``, which gives Tune
    no checkpoint: after a restart such a trial reports its stored epochs from the first
    (Tune, too, restarts a trial without a checkpoint from its first iteration)."""
    stage = STAGES[run.stage]
    recorded = recorded_epoch(run)
    found = latest_state(run.fs, run.path, stage.state_file, stage.load)
    if recorded is None or found is None or int(found[0]["epoch"]) <= recorded:
        return
    state, path = found
    missing = json.loads(state["history"])[recorded : int(state["epoch"])]
    print(
        f"reporting epochs {recorded + 1}-{state['epoch']} to Ray Tune again: their "
        f"checkpoints are on the storage, their reports were lost ({path})",
        flush=True,
    )
    for metrics in missing[:-1]:
        report_to_tune(run, metrics, None)
    report_to_tune(run, missing[-1], path.rsplit("/", 1)[0])


# --- a sweep trial --------------------------------------------------------------------


def search_trial(params: dict[str, Any], base: dict[str, Any]) -> None:
    """Ray Tune trainable: the sweep's ``base`` config with this trial's tuned ``params``
    (``{"search": {"mask_ratio": 0.6, ...}}``, see ``experiment.param_space``): its search,
    then, for the ``proxy_*`` objectives, the proxy retrain of the derived genotype, each
    in this process (one worker) or as a Ray Train job (several)."""
    # Tune's line per stored checkpoint would repeat the progress table in the driver's log
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    tuned = {**base, "search": {**base["search"], **params["search"]}}
    try:
        _trial(config_from_dict(tuned))
    finally:
        if torch.cuda.is_available():  # the process may go on with another trial
            torch.cuda.empty_cache()  # (reuse_actors): its cached GPU memory goes back


def _trial(cfg: Config) -> None:
    storage = ray.tune.get_context().get_storage()
    trial_dir, fs = storage.trial_fs_path, storage.storage_filesystem
    require_visible(fs, f"{storage.experiment_fs_path}/{CONFIG_FILE}", "the sweep's config")
    if in_trial_process(cfg):
        use_cpus(cfg.tune.cpus_per_trial)
    metric = cfg.objective.metric
    proxy = metric.startswith("proxy_")
    # Tune needs the objective in every result: a placeholder until the proxy has one
    view = TuneView("search", cfg.search.epochs, {metric: math.nan} if proxy else {})
    run = Run("search", cfg, fs, f"{trial_dir}/{SEARCH_RUN}", tune=view)
    replay_unreported(run)
    search = read_json(fs, f"{trial_dir}/{SEARCH_RESULT}")
    if search is None:  # not done yet (a restarted trial whose search finished skips it)
        run_in_trial(run)
        search = read_json(fs, f"{trial_dir}/{SEARCH_RESULT}")
        if search is None:
            raise RuntimeError(f"the search ended without writing {trial_dir}/{SEARCH_RESULT}")
    if proxy:
        view = TuneView("proxy", cfg.retrain.proxy_epochs, search, prefix="proxy_")
        genotype = Genotype.from_json(search["genotype"])
        run = Run("retrain", cfg, fs, f"{trial_dir}/{PROXY_RUN}", genotype, True, view)
        replay_unreported(run)
        run_in_trial(run)


def run_in_trial(run: Run) -> None:
    """Run ``run`` for a sweep trial: in this process, or as a Train job whose reports
    Ray's ``TuneReportCallback`` passes to Tune."""
    cfg = run.config
    keep = cfg.tune.checkpoints_to_keep
    if in_trial_process(cfg):
        execute(run, TuneReports(run, keep))
        return
    scaling = ray.train.ScalingConfig(
        num_workers=cfg.tune.workers(),
        use_gpu=cfg.tune.gpus_per_trial > 0,
        resources_per_worker=worker_resources(cfg),
    )
    stage_trainer(run, scaling, keep, [TuneReportCallback()]).fit()


def in_trial_process(cfg: Config) -> bool:
    """Whether a trial runs its stages in the Tune trial process itself: with one worker
    there is nothing to distribute, and a Ray Train job would only add its controller,
    worker process and process group to every trial."""
    return cfg.tune.workers() == 1


def trial_resources(cfg: Config) -> dict[str, float]:
    """What the Tune trial itself reserves: all of the trial's CPUs and GPUs when it runs
    in its own process, else only the driver's share (the Train workers get their own)."""
    if not in_trial_process(cfg):
        return {"cpu": DRIVER_CPU}
    resources = {"cpu": cfg.tune.cpus_per_trial}
    if cfg.tune.gpus_per_trial > 0:
        resources["gpu"] = cfg.tune.gpus_per_trial
    return resources


def worker_resources(cfg: Config) -> dict[str, float]:
    """Resources of one Ray Train worker: the trial's share, minus the driver's CPU."""
    workers = cfg.tune.workers()
    resources = {"CPU": (cfg.tune.cpus_per_trial - DRIVER_CPU) / workers}
    if cfg.tune.gpus_per_trial > 0:
        resources["GPU"] = cfg.tune.gpus_per_trial / workers
    return resources


# --- the process a stage runs in ------------------------------------------------------


#: The torch.distributed backend of the Train jobs. Ray picks NCCL for any worker with a GPU
#: resource, which fails where the GPUs are only logical (no CUDA); "undefined" lets torch
#: pick by the worker's real accelerator: NCCL where CUDA is, gloo elsewhere.
PROCESS_GROUP_BACKEND = "undefined"


def prepare_model(net: torch.nn.Module) -> torch.nn.Module:
    """Ray Train's ``prepare_model`` (DDP) on the device the engine chose, so that a worker
    holding a logical GPU on a machine without CUDA trains on its CPU."""
    device = next(net.parameters()).device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return ray.train.torch.prepare_model(net, move_to_device=device)


class NotSharedError(RuntimeError):
    """A node cannot see the storage the sweep writes to."""


def require_visible(fs: pyarrow.fs.FileSystem, path: str, what: str) -> None:
    """Fail with a clear error when ``path`` (written by the sweep's driver) is not visible
    from this node: a local ``storage_path`` that is not shared by every node."""
    if not isinstance(fs, pyarrow.fs.LocalFileSystem):
        return  # object storage is the same from every node
    if fs.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
        node = ray.util.get_node_ip_address()
        raise NotSharedError(
            f"storage_path is not shared storage: {what} {path} is not visible from node "
            f"{node}; a multi-node sweep needs s3://, gs:// or a directory on NFS mounted at "
            "the same path on every node"
        )


def _no_report_lines(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Reporting training result")


def setup_worker(device: str, cpus: float) -> int:
    """Threads for this worker's CPUs, the worker's own GPU when it has one; the rank.
    Train's line per report (``Reporting training result ...``) is silenced: the stage
    prints its own line per epoch."""
    from ray.train.v2._internal.execution import context  # its logger is named by its file

    logging.getLogger(context.__file__).addFilter(_no_report_lines)
    use_cpus(cpus)
    if device != "cpu" and torch.cuda.is_available():
        torch.cuda.set_device(ray.train.torch.get_device())
    return ray.train.get_context().get_world_rank()


Reporter = TrainReports | TuneReports  # where a stage's epochs go
