"""What a sweep and a retrain print as they go fits a 120-column terminal: the progress
table, as Ray Tune prints it, and the retrain's line per epoch."""

from pathlib import Path
from types import SimpleNamespace

import pytest
from ray.tune.progress_reporter import _trial_progress_table

from maenas_ray.orchestration.experiment import progress_table
from maenas_ray.runs import retrain_line
from maenas_ray.sweep_space import load_sweep

REPO = Path(__file__).resolve().parents[1]
SWEEPS = ["quickstart", "cifar10", "imagenet", "ablation_decoder", "ablation_quick"]


def _trial(cfg, status: str, stage: str):
    """A trial as the table reads it, at its widest: a 7-digit pid (Linux's pid_max is
    4194304 on many systems), the config's largest epoch counts, 6-digit metrics."""
    values = {k: (spec.choice or [spec.high])[-1] for k, spec in cfg.space.items()}
    result = {
        "node_ip": "127.0.0.1", "pid": 4194304, "stage": stage,
        "eval_loss": 0.845609, cfg.objective.metric: 0.880859,
    }  # fmt: skip

    class Trial(SimpleNamespace):
        def __str__(self) -> str:
            return "trial_21334251"  # Tune's name of a trial: the trainable's, its id

    return Trial(status=status, config={"search": values}, last_result=result)


@pytest.mark.parametrize("name", SWEEPS)
def test_the_progress_table_shows_stage_and_objective_within_120_columns(name):
    cfg = load_sweep(REPO / "tune_configs" / f"{name}.yaml", [f"data.root={REPO}"])
    reporter = progress_table(cfg)
    epochs, proxy = cfg.search.epochs, cfg.retrain.proxy_epochs
    trials = [
        _trial(cfg, "TERMINATED", f"search {epochs}/{epochs}"),
        _trial(cfg, "RUNNING", f"proxy {proxy}/{proxy}"),
    ]
    lines = _trial_progress_table(
        trials=trials,
        metric_columns=reporter._metric_columns,
        parameter_columns=reporter._parameter_columns,
        fmt="psql",
        max_rows=None,
        max_column_length=reporter._max_column_length,
    )
    lines = "\n".join(lines).splitlines()
    table = "\n".join(lines)
    assert max(map(len, lines)) <= 120, table
    header = " ".join(lines[1:3])
    assert "stage" in header and "eval" in header
    top, bottom = cfg.objective.metric.split("_", 1)
    assert top in lines[1] and bottom in lines[2], table  # the objective, on two lines
    assert f"search {epochs}/{epochs}" in table and "0.880859" in table


def test_a_retrain_epoch_line_fits_120_columns_behind_ray_s_prefix():
    """At its widest: a 600-epoch protocol, a 7-digit pid, tens of thousands of images/s."""
    metrics = {"train_loss": 12.3456, "test_loss": 10.0, "top1": 0.9999, "top5": 1.0,
               "lr": 0.0125, "images_per_sec": 65432.1}  # fmt: skip
    line = f"(RayTrainWorker pid=4194304) {retrain_line(600, 600, metrics)}"
    assert len(line) <= 120, (len(line), line)
    assert retrain_line(3, 3, metrics).startswith("epoch 3/3  train 12.3456  test 10.0000")
