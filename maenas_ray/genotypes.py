"""``python -m maenas_ray.genotypes PATH``: the best genotypes of a sweep experiment.

Reads the experiment directory (local, NFS, ``s3://`` or ``gs://``; no Ray cluster
needed, a running experiment is fine) and prints its ``--top K`` genotypes by the sweep's
objective or ``--metric`` / ``--mode``:

- ``json``: one genotype per line, each loadable by ``Genotype.from_json``;
- ``python``: ``Genotype(...)`` lines to paste into code;
- ``table``: a leaderboard of every trial;
- ``parquet``: one row per trial (tuned parameters, final metrics, genotype JSON, status)
  written to ``--out``, readable by pandas or duckdb.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from maenas_ray.config import flatten
from maenas_ray.engines.search import NEAR_UNIFORM, UNIFORM_ENTROPY, uniform_alpha_warning
from maenas_ray.results import Experiment, ExperimentError, Trial, load_experiment


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m maenas_ray.genotypes", description=__doc__)
    p.add_argument("path", help="the experiment directory: <storage_path>/<name>")
    p.add_argument("--top", type=int, default=1, help="how many genotypes (default 1)")
    p.add_argument("--metric", help="rank by this metric (default: the sweep's objective)")
    p.add_argument("--mode", choices=["min", "max"], help="min or max (default: the metric's)")
    p.add_argument(
        "--format", default="json", choices=["json", "python", "table", "parquet"],
        help="output format (default json)",
    )  # fmt: skip
    p.add_argument("--out", help="write to this file (needed for parquet) instead of stdout")
    return p


def _ranked(exp: Experiment, metric: str | None = None, mode: str | None = None) -> list[Trial]:
    """The trials with a score by ``metric`` (default: the objective), best first."""
    try:
        return [t for _, _, t in exp.best(len(exp.trials()), metric, mode)]
    except ExperimentError:  # nothing scored yet
        return []


def trial_rows(exp: Experiment) -> list[dict[str, Any]]:
    """One flat row per trial: id, rank by the objective (None: no score yet, or errored),
    status, tuned parameters, final numeric metrics, genotype JSON, error and directory."""
    rows = []
    ranks = {t.trial_id: i for i, t in enumerate(_ranked(exp), 1)}
    for t in exp.trials():
        row: dict[str, Any] = {
            "trial_id": t.trial_id,
            "rank": ranks.get(t.trial_id),
            "status": t.status,
        }
        row.update(flatten(t.params, "param."))
        row.update(
            {
                f"metric.{k}": float(v)
                for k, v in t.metrics.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)
            }
        )
        row["genotype"] = t.genotype.to_json() if t.genotype else None
        row["error"] = t.error
        row["path"] = t.path
        rows.append(row)
    return rows


def leaderboard_rows(
    exp: Experiment, metric: str | None = None, mode: str | None = None
) -> list[list[str]]:
    """The leaderboard as a header and one row of strings per trial, best ``metric``
    (default: the objective) first: rank, trial, tuned parameters, metric, skip count,
    status (``unfinished@<epoch>`` while running, interrupted or stopped by the scheduler;
    ``early@<epoch>-><kept epoch>`` after a collapse early stop; an error's last line) and
    genotype summary. Trials without a score (not reported yet, NaN,
    errored) come last without a rank."""
    metric = metric or exp.config.objective.metric
    ranked = _ranked(exp, metric, mode)
    tuned = list(exp.config.space)
    rows = [["rank", "trial", *tuned, metric, "skips", "status", "genotype"]]
    others = [t for t in exp.trials() if t not in ranked]
    for i, t in enumerate([*ranked, *others], 1):
        status = {"unfinished": f"unfinished@{t.metrics.get('epoch', 0)}"}.get(t.status, t.status)
        if t.metrics.get("stopped_early"):  # DARTS-ES: the search ended early
            status = f"{status}, early@{t.metrics['epoch']}->{t.metrics['kept_epoch']}"
        rows.append(
            [
                str(i) if t in ranked else "-",
                t.trial_id,
                *[_fmt(t.params.get("search", {}).get(k)) for k in tuned],
                _fmt(t.score(metric)),
                _fmt(t.metrics.get("skip_count")),
                status + (f": {t.error[:60]}" if t.error else ""),
                t.genotype.summary() if t.genotype else "-",
            ]
        )
    return rows


def leaderboard(exp: Experiment, metric: str | None = None, mode: str | None = None) -> str:
    """:func:`leaderboard_rows` as a plain-text table (the genotype summary unpadded),
    followed by :func:`leaderboard_notes`."""
    rows = leaderboard_rows(exp, metric, mode)
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]) - 1)]
    table = [
        "  ".join(c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1]
        for row in rows
    ]
    notes = leaderboard_notes(exp)
    return "\n".join([*table, *(["", *notes] if notes else [])])


def leaderboard_notes(exp: Experiment) -> list[str]:
    """What a reader of the leaderboard must know: how the label-free score ranks the trials
    against accuracy (Kendall τ / Spearman ρ; against the full retrains too, where the sweep
    has any), trials whose α ended close to uniform (their genotypes carry little
    information) and trials stopped early on collapse."""
    notes = [exp.correlation("proxy_top1").line()]
    if exp.retrains():
        notes.append(exp.correlation("retrain_top1").line())
    flat = [t for t in exp.trials() if uniform_alpha_warning(t.metrics.get("alpha_entropy"))]
    if flat:
        entropies = ", ".join(f"{t.trial_id} {t.metrics['alpha_entropy']:.3f}" for t in flat)
        notes.append(
            f"note: {len(flat)} of {len(exp.trials())} trials ended with α close to uniform "
            f"(mean entropy above {NEAR_UNIFORM:g} x ln 8 = {NEAR_UNIFORM * UNIFORM_ENTROPY:.3f}: "
            f"{entropies}); their genotypes carry little information. Raise search.arch_lr, "
            "or search.epochs / search.steps_per_epoch"
        )
    for t in exp.trials():
        if t.metrics.get("stopped_early"):
            notes.append(
                f"note: trial {t.trial_id} stopped early after epoch {t.metrics['epoch']} "
                f"({t.metrics.get('stop_reason', 'collapse')}); its genotype is that of epoch "
                f"{t.metrics['kept_epoch']}"
            )
    return notes


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.top < 1:
            raise ExperimentError(f"--top {args.top}: must be >= 1")
        if args.format == "parquet" and not args.out:
            raise ExperimentError("--format parquet writes a file: give --out FILE.parquet")
        exp = load_experiment(args.path)
        if args.format == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            rows = trial_rows(exp)
            if not rows:
                raise ExperimentError(f"{exp.uri} has no trials yet")
            pq.write_table(pa.Table.from_pylist(rows), args.out)
            print(f"wrote {len(rows)} trials to {args.out}", file=sys.stderr)
            return 0
        metric, mode = exp.resolve_metric(args.metric, args.mode)
        if args.format == "table":
            text = leaderboard(exp, metric, mode)
        else:
            best = exp.best(args.top, metric, mode)
    except ExperimentError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.format == "json":
        text = "\n".join(g.to_json() for g, _, _ in best)
    elif args.format == "python":
        text = "\n".join(
            f"# trial {t.trial_id}: {metric} = {s:.6g}\nTOP{i} = {g!r}"
            for i, (g, s, t) in enumerate(best, 1)
        )
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
