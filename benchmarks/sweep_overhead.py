"""What running a search as a Ray Tune trial costs on top of the search itself.

Runs the same 1-epoch quickstart search twice:

- standalone: ``python -m maenas_ray.search`` (in this process, imports already done):
  the search, its per-epoch checkpoint and its pictures;
- as a sweep: ``python -m maenas_ray.sweep`` in a fresh process (it starts its own local
  Ray), ``--samples`` trials one after the other. Each trial is a Ray Tune trial that runs
  the search, reports the epoch with a checkpoint on the storage path and writes its
  genotype and pictures there.

It prints the time from starting ``python -m maenas_ray.sweep`` to the first reported
epoch, and each trial's time measured two ways: Tune's ``time_total_s`` (the trial function
up to its last report), and the wall time from one trial's search end to the next one's
(the whole trial as the cluster sees it: teardown, scheduling, process start, imports,
search, checkpoints, reports). The per-trial overhead is that time minus the standalone
search time, as a share of the trial time; the last line gives the larger of the two
shares. The objective is ``eval_loss`` (no proxy retrain), so the trial is the search alone
and the share is not diluted by a retrain.

    python benchmarks/sweep_overhead.py              # about 1 minute on a 2-core CPU
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from maenas_ray import search as search_cli
from maenas_ray.sweep_space import load_sweep

QUICKSTART = Path(__file__).resolve().parent.parent / "tune_configs" / "quickstart.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=QUICKSTART, help="sweep YAML (quickstart)")
    p.add_argument("--samples", type=int, default=3, help="trials, run one at a time (3)")
    p.add_argument("--epochs", type=int, default=1, help="search epochs per trial (1)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    if args.samples < 1 or args.epochs < 1:
        p.error("--samples and --epochs must be >= 1")
    return args


def search_ends(experiment: Path) -> list[float]:
    """When each trial's search finished (its ``search_result.json`` written), in order."""
    return sorted(p.stat().st_mtime for p in experiment.glob("trial_*/search_result.json"))


def trial_results(experiment: Path) -> list[list[dict]]:
    """Each trial's result rows, in trial-directory order."""
    trials = []
    for result in sorted(experiment.glob("trial_*/result.json")):
        rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        if rows:
            trials.append(rows)
    return trials


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    search_sets = [f"search.epochs={args.epochs}", "search.device=cpu"]
    with tempfile.TemporaryDirectory(prefix="maenas-overhead-") as tmp:
        root = Path(tmp)
        # the same search, standalone (twice: the first run pays one-time costs), on the
        # threads a trial gets (tune.cpus_per_trial), as the trial runs it
        trial_threads = max(1, round(load_sweep(args.config).tune.cpus_per_trial))
        threads = torch.get_num_threads()
        torch.set_num_threads(trial_threads)
        standalone = []
        for i in range(2):
            argv_search = ["--config", str(args.config), "--out", str(root / f"alone{i}")]
            for item in search_sets:
                argv_search += ["--set", item]
            start = time.perf_counter()
            if search_cli.main(argv_search) != 0:
                raise SystemExit("the standalone search failed")
            standalone.append(time.perf_counter() - start)
        torch.set_num_threads(threads)
        alone = min(standalone)

        command = [
            sys.executable, "-m", "maenas_ray.sweep", "--config", str(args.config),
            "--storage-path", str(root / "store"), "--name", "overhead", "--num-cpus", "2",
            "--no-dashboard", "--set", f"tune.num_samples={args.samples}",
            "--set", "tune.max_concurrent_trials=1", "--set", "objective.metric=eval_loss",
            "--set", "objective.mode=min",
        ]  # fmt: skip
        for item in search_sets:
            command += ["--set", item]
        env = {k: v for k, v in os.environ.items() if k != "MAENAS_RAY_STORAGE_PATH"}
        started = time.time()
        run = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        wall = time.time() - started
        if run.returncode != 0:
            sys.stderr.write(run.stdout[-3000:] + run.stderr[-3000:])
            raise SystemExit(f"the sweep failed (exit {run.returncode})")
        trials = trial_results(root / "store" / "overhead")
        ends = search_ends(root / "store" / "overhead")
    if len(trials) != args.samples:
        raise SystemExit(f"expected {args.samples} trials with results, found {len(trials)}")

    first_epoch = min(rows[0]["timestamp"] for rows in trials) - started
    trial_times = [rows[-1]["time_total_s"] for rows in trials]
    trial = statistics.mean(trial_times)
    overhead = trial - alone
    share = overhead / trial
    # one trial after the other: from one search's end to the next one's is a whole trial
    # as the cluster sees it (trial teardown, scheduling, process start, imports, search,
    # checkpoints, reports), which Tune's time_total_s does not count in full
    spans = [b - a for a, b in itertools.pairwise(ends)]
    span = statistics.mean(spans) if spans else float("nan")
    span_share = (span - alone) / span
    print(f"1-epoch quickstart search ({args.config.name}, objective eval_loss), CPU")
    print(f"standalone search (python -m maenas_ray.search, {trial_threads} thread(s) as "
          f"in a trial): {alone:.1f} s "
          f"(runs: {', '.join(f'{t:.1f}' for t in standalone)})")  # fmt: skip
    print(f"sweep of {args.samples} trials, one at a time: {wall:.1f} s wall; first reported "
          f"epoch {first_epoch:.1f} s after the start (Ray start included)")  # fmt: skip
    print(f"trial time (Tune time_total_s): {', '.join(f'{t:.1f}' for t in trial_times)} s; "
          f"mean {trial:.1f} s")  # fmt: skip
    print(f"per-trial overhead: {overhead:.1f} s = {100 * share:.1f}% of the trial time")
    if spans:
        print(f"wall time per trial (one search's end to the next's): "
              f"{', '.join(f'{t:.1f}' for t in spans)} s; mean {span:.1f} s; overhead "
              f"{span - alone:.1f} s = {100 * span_share:.1f}%")  # fmt: skip
    if args.json is not None:
        figures = {"standalone_s": standalone, "sweep_wall_s": wall,
                   "first_epoch_s": first_epoch, "trial_s": trial_times,
                   "overhead_s": overhead, "overhead_share": share,
                   "trial_wall_s": spans, "wall_overhead_share": span_share}  # fmt: skip
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    # the larger of the two measures is the one that counts
    print(f"overhead share: {max(share, span_share) if spans else share:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
