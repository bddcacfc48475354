"""``python -m maenas_ray.report PATH [--out DIR]``: a sweep report to look at.

Reads a sweep experiment (local, NFS, ``s3://``, ``gs://``; no Ray cluster needed, a
running sweep is fine) and writes PNG figures and one ``index.html`` that shows them:

- the leaderboard (every trial, its tuned values, objective, skip count, status), with
  Kendall τ / Spearman ρ between the label-free score and accuracy under it;
- the objective against each tuned parameter;
- the label-free score against the proxy accuracy, one point per trial, by decoder;
- Optuna's parameter importances and the optimisation history, from the sweep's study
  (``optuna.journal`` or ``tune.study_storage``; rebuilt from the trials' results when the
  study lived in memory only);
- the skip-connect count of the derived normal cell against the mask ratio, per decoder
  type: the collapse picture (a plain decoder drifts to skip connections);
- the collapse signals over time: skip count, α entropy and the dominant Hessian
  eigenvalue per search epoch, one line per trial;
- the best genotypes: their cell drawings and reconstruction grids.

``--out`` defaults to ``<experiment>/report`` for a local experiment and to
``./<name>-report`` for one on object storage.
"""

from __future__ import annotations

import argparse
import html
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs
from matplotlib.ticker import MaxNLocator

from maenas_ray.config import SearchConfig, numeric_type
from maenas_ray.engines import objective_mode
from maenas_ray.engines.search import UNIFORM_ENTROPY
from maenas_ray.genotypes import leaderboard_notes, leaderboard_rows
from maenas_ray.results import (
    LABEL_FREE_SCORE,
    Experiment,
    ExperimentError,
    Trial,
    load_experiment,
)
from maenas_ray.viz import new_figure, save_figure

#: below this many completed trials, parameter importances carry a caveat
FEW_TRIALS = 10
#: the trial pictures shown for the best genotypes (written by each trial's search)
BEST_PICTURES = ("cells.png", "reconstruction.png")
INDEX = "index.html"


@dataclass
class Section:
    """One part of the report: a title, figures (file names in the report directory) and
    notes (why a figure is missing, what it shows)."""

    title: str
    figures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    html: str = ""


def _tuned(trial: Trial, key: str, exp: Experiment) -> Any:
    """A trial's value of search key ``key``: tuned, else the sweep's fixed value."""
    return trial.params.get("search", {}).get(key, getattr(exp.config.search, key))


def _is_int(key: str) -> bool:
    """Whether search key ``key`` holds integers (optional or not)."""
    return numeric_type(typing.get_type_hints(SearchConfig)[key]) is int


# --------------------------------------------------------------------------- figures


def _objective_vs_params(exp: Experiment, metric: str, best: Trial | None, out: Path) -> Section:
    sec = Section(f"{metric} against each tuned parameter")
    keys = list(exp.config.space)
    scored = [t for t in exp.trials() if t.status != "error" and t.score(metric) is not None]
    if not keys or not scored:
        sec.notes.append("no tuned parameters" if not keys else f"no trial has a {metric} yet")
        return sec
    cols = min(len(keys), 3)
    rows = math.ceil(len(keys) / cols)
    fig = new_figure((4.2 * cols, 3.4 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, key in zip(axes, keys, strict=False):
        choices = exp.config.space[key].choice
        shown = [t for t in scored if _tuned(t, key, exp) is not None]
        values = [_tuned(t, key, exp) for t in shown]
        if choices is not None:  # categorical axis in the order of the choices
            xs = [choices.index(v) if v in choices else math.nan for v in values]
            ax.set_xticks(range(len(choices)), [str(c) for c in choices])
            ax.set_xlim(-0.5, len(choices) - 0.5)
        else:
            xs = [float(v) for v in values]
            if _is_int(key):
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for x, t in zip(xs, shown, strict=True):
            done = t.status == "done"
            ax.scatter(
                x, t.score(metric), s=36, zorder=2,
                facecolors="tab:blue" if done else "none", edgecolors="tab:blue",
            )  # fmt: skip
            if t is best:
                ax.scatter(x, t.score(metric), s=180, marker="*", color="tab:red", zorder=3)
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    for ax in axes[len(keys) :]:
        ax.set_visible(False)
    save_figure(fig, out / "objective_vs_params.png")
    sec.figures.append("objective_vs_params.png")
    sec.notes.append("filled: finished trials; hollow: unfinished; red star: the best trial")
    return sec


def _trials_study(exp: Experiment, metric: str, mode: str) -> Any:
    """An in-memory Optuna study rebuilt from the trials' tuned values and last scores."""
    import optuna
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    distributions: dict[str, Any] = {}
    for key, spec in exp.config.space.items():
        if spec.choice is not None:
            dist: Any = CategoricalDistribution(spec.choice)
        else:
            # a spec without choice has low and high (sweep_space.check_sweep)
            assert spec.low is not None and spec.high is not None
            if _is_int(key):
                dist = IntDistribution(int(spec.low), int(spec.high), log=spec.log)
            else:
                dist = FloatDistribution(spec.low, spec.high, log=spec.log)
        distributions[f"search/{key}"] = dist
    study = optuna.create_study(direction="minimize" if mode == "min" else "maximize")
    for t in exp.trials():
        score = t.score(metric)
        params = {f"search/{k}": _tuned(t, k, exp) for k in exp.config.space}
        if t.status != "done" or score is None or None in params.values():
            continue
        study.add_trial(
            optuna.trial.create_trial(params=params, distributions=distributions, value=score)
        )
    return study


def _study_sections(exp: Experiment, metric: str, mode: str, out: Path) -> list[Section]:
    import optuna

    history = Section("Optimisation history")
    importance = Section("Parameter importances")
    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        source = "the sweep's Optuna study"
        try:
            study = exp.study() if metric == exp.config.objective.metric else None
        except Exception as err:  # an unreachable or unreadable study database
            study, source = None, f"rebuilt from the trials' {metric} (the study: {err})"
        if study is None:
            study = _trials_study(exp, metric, mode)
            if source == "the sweep's Optuna study":
                source = f"rebuilt from the trials' {metric} (the sweep's study is not stored)"
        done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        for sec in (history, importance):
            sec.notes.append(f"from {source}: {len(done)} completed trials")
        if not done:
            return [history, importance]
        fig = new_figure((6.4, 3.6))
        ax = fig.add_subplot()
        numbers = [t.number for t in done]
        values: list[float] = []
        for t in done:
            assert t.value is not None  # a completed single-objective trial has its value
            values.append(t.value)
        pick = min if study.direction == optuna.study.StudyDirection.MINIMIZE else max
        running = [pick(values[: i + 1]) for i in range(len(values))]
        ax.scatter(numbers, values, color="tab:blue", label=metric, zorder=2)
        ax.step(numbers, running, where="post", color="tab:red", label="best so far")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("trial number (Optuna)")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
        save_figure(fig, out / "history.png")
        history.figures.append("history.png")
        try:
            scores = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.PedAnovaImportanceEvaluator()
            )
        except (ImportError, RuntimeError, ValueError) as err:  # too few trials, no variation
            importance.notes.append(f"not computed: {err}")
            return [history, importance]
        if not scores:
            importance.notes.append("not computed: the tuned values do not vary yet")
            return [history, importance]
        if len(done) < FEW_TRIALS:
            importance.notes.append(
                f"caveat: from {len(done)} trials; importances need about {FEW_TRIALS} or "
                "more to mean much, so read these as a hint"
            )
        names = [k.removeprefix("search/") for k in scores][::-1]
        fig = new_figure((6.4, 0.6 + 0.5 * len(names)))
        ax = fig.add_subplot()
        ax.barh(names, list(scores.values())[::-1], color="tab:blue")
        ax.set_xlabel(f"importance for {metric} (PED-ANOVA, Optuna)")
        ax.set_xlim(0, 1)
        save_figure(fig, out / "importances.png")
        importance.figures.append("importances.png")
    finally:
        optuna.logging.set_verbosity(previous)
    return [history, importance]


def _collapse(exp: Experiment, out: Path) -> Section:
    sec = Section("Skip connections against mask ratio, per decoder (the collapse picture)")
    points: dict[str, list[tuple[float, float]]] = {}
    for t in exp.trials():
        skips = t.metrics.get("skip_count")
        if isinstance(skips, (int, float)) and not isinstance(skips, bool):
            decoder = str(_tuned(t, "decoder", exp))
            points.setdefault(decoder, []).append((float(_tuned(t, "mask_ratio", exp)), skips))
    if not points:
        sec.notes.append("no trial has reported a skip count yet")
        return sec
    fig = new_figure((6.4, 3.8))
    ax = fig.add_subplot()
    for (decoder, pts), marker in zip(sorted(points.items()), "osD^v", strict=False):
        pts.sort()
        xs, ys = zip(*pts, strict=True)
        ax.scatter(xs, ys, marker=marker, s=40, alpha=0.7, label=decoder)
        ratios = sorted({r for r, _ in pts})
        means = [sum(s for r, s in pts if r == x) / sum(r == x for r, _ in pts) for x in ratios]
        ax.plot(ratios, means, alpha=0.6)
    ax.set_xlabel("mask ratio (search)")
    ax.set_ylabel("skip_connect in the normal cell")
    ax.set_ylim(-0.3, 8.3)
    ax.grid(alpha=0.3)
    ax.legend(title="decoder")
    save_figure(fig, out / "skips_vs_mask_ratio.png")
    sec.figures.append("skips_vs_mask_ratio.png")
    sec.notes.append("points: trials (last reported epoch); lines: the mean per mask ratio")
    return sec


def _score_vs_accuracy(exp: Experiment, out: Path) -> Section:
    sec = Section("The label-free score against accuracy")
    retrained = exp.retrains()
    # Kendall τ / Spearman ρ are stated once, under the leaderboard (leaderboard_notes);
    # here they title the scatter
    correlation = exp.correlation("proxy_top1")
    points: dict[str, list[tuple[float, float, str]]] = {}
    for t in exp.trials():
        score = t.score(LABEL_FREE_SCORE)
        acc = t.score("proxy_top1")
        if t.status != "done" or score is None or acc is None:
            continue
        decoder = str(_tuned(t, "decoder", exp))
        points.setdefault(decoder, []).append((score, acc, t.trial_id))
    if not points:
        sec.notes.append("no finished trial has both eval_loss and proxy_top1")
        return sec
    fig = new_figure((6.4, 4.2))
    ax = fig.add_subplot()
    for (decoder, pts), marker in zip(sorted(points.items()), "osD^v", strict=False):
        xs, ys, _ = zip(*pts, strict=True)
        ax.scatter(xs, ys, marker=marker, s=44, alpha=0.8, label=decoder, zorder=2)
        for x, y, tid in pts:
            ax.annotate(tid, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    stars = False
    for tid, metrics in retrained.items():
        trial = next((t for t in exp.trials() if t.trial_id == tid), None)
        top1, score = metrics.get("top1"), trial.score(LABEL_FREE_SCORE) if trial else None
        if isinstance(top1, (int, float)) and score is not None:
            ax.scatter(score, top1, marker="*", s=120, color="black", zorder=3)
            stars = True
    ax.set_xlabel(f"{LABEL_FREE_SCORE} (label-free, held-out images; lower is better)")
    ax.set_ylabel("proxy_top1 (held-out" + ("; black stars: full retrain top-1)" if stars else ")"))
    ax.grid(alpha=0.3)
    ax.legend(title="decoder")
    ax.set_title(correlation.line().split(";")[0], fontsize=8)
    save_figure(fig, out / "score_vs_accuracy.png")
    sec.figures.append("score_vs_accuracy.png")
    sec.notes.append(
        "one point per finished trial, labelled by its trial id; Kendall τ and Spearman ρ "
        "of these points are under the leaderboard"
    )
    return sec


#: The per-epoch collapse signals drawn over time: metric, axis label.
COLLAPSE_SIGNALS = (
    ("skip_count", "skip_connect in the normal cell"),
    ("alpha_entropy", "mean α entropy (ln 8 = uniform)"),
    ("hessian_eigenvalue", "dominant Hessian eigenvalue (α)"),
)


def search_epochs(trial: Trial) -> list[dict[str, Any]]:
    """A trial's search epochs, one row per epoch (its last report of it), in order; the
    proxy retrain's reports, which repeat the search's final metrics, left out."""
    rows: dict[int, dict[str, Any]] = {}
    for row in trial.history:
        if "proxy_epoch" not in row and isinstance(row.get("epoch"), int):
            rows[row["epoch"]] = row
    return [rows[e] for e in sorted(rows)]


def _collapse_over_time(exp: Experiment, out: Path) -> Section:
    sec = Section("Collapse over time: skip connections, α entropy and curvature per epoch")
    series = [(t, search_epochs(t)) for t in exp.trials()]
    series = [(t, rows) for t, rows in series if rows]
    if not series:
        sec.notes.append("no trial has reported a search epoch yet")
        return sec
    decoders = sorted({str(_tuned(t, "decoder", exp)) for t, _ in series})
    colours = dict(zip(decoders, ("tab:blue", "tab:orange", "tab:green", "tab:red"), strict=False))
    fig = new_figure((13.5, 3.8))
    axes = fig.subplots(1, len(COLLAPSE_SIGNALS))
    for ax, (key, label) in zip(axes, COLLAPSE_SIGNALS, strict=True):
        drawn = False
        for t, rows in series:
            pts = [(r["epoch"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if not pts:
                continue
            drawn = True
            decoder = str(_tuned(t, "decoder", exp))
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker=".", alpha=0.75, color=colours.get(decoder, "tab:gray"))
            ax.annotate(
                f"{_tuned(t, 'mask_ratio', exp):g}", (xs[-1], ys[-1]), fontsize=7,
                xytext=(3, 0), textcoords="offset points", va="center",
            )  # fmt: skip
        if key == "alpha_entropy":
            ax.axhline(UNIFORM_ENTROPY, color="gray", linestyle=":", linewidth=1)
        if not drawn:
            ax.text(0.5, 0.5, "not measured\n(search.hessian_every: 0)", ha="center",
                    va="center", transform=ax.transAxes, color="gray")  # fmt: skip
        ax.set_xlabel("search epoch")
        ax.set_ylabel(label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    handles = [axes[0].plot([], [], color=colours[d], label=d)[0] for d in decoders]
    axes[0].legend(handles=handles, title="decoder", fontsize=8)
    save_figure(fig, out / "collapse_over_time.png")
    sec.figures.append("collapse_over_time.png")
    sec.notes.append(
        "one line per trial, coloured by decoder, labelled by its mask ratio at the last epoch"
    )
    sec.notes.append(
        "what to look for: RobustDARTS (Zela et al. 2020) reported, at paper scale, the "
        "eigenvalue (right) growing during the search as the cells degrade towards "
        "parameter-free operations, so that it can warn before the skip count (left) "
        "rises; DARTS-ES stops on that growth. Whether this sweep shows such a lead is for "
        "these panels to say: a small or short search may show none"
    )
    return sec


def _best_genotypes(exp: Experiment, ranked: list[tuple[Any, float, Trial]], metric: str,
                    out: Path) -> Section:  # fmt: skip
    sec = Section(f"The best genotypes by {metric}")
    if not ranked:
        sec.notes.append(f"no trial has a genotype and a {metric} yet")
        return sec
    parts = []
    for rank, (genotype, score, trial) in enumerate(ranked, 1):
        pictures = []
        for name in BEST_PICTURES:
            try:
                with exp.fs.open_input_stream(f"{trial.path}/{name}") as f:
                    data = f.read()
            except (FileNotFoundError, OSError):
                continue  # the trial's search has not finished
            target = f"best/{rank}-{trial.path.rstrip('/').rsplit('/', 1)[-1]}-{name}"
            (out / "best").mkdir(exist_ok=True)
            (out / target).write_bytes(data)
            pictures.append(f'<img src="{target}" alt="{name} of trial {trial.trial_id}">')
        parts.append(
            f"<h3>{rank}. trial {html.escape(trial.trial_id)}: {metric} = {score:.4g}</h3>"
            f"<p>{html.escape(genotype.summary())}</p>"
            f"<pre>{html.escape(repr(genotype))}</pre>"
            + ("".join(pictures) or "<p class=note>no pictures yet</p>")
        )
    sec.html = "\n".join(parts)
    return sec


# --------------------------------------------------------------------------- page


def _leaderboard(exp: Experiment, metric: str, mode: str) -> str:
    head, *rows = leaderboard_rows(exp, metric, mode)
    cells = [[f"<th>{html.escape(h)}</th>" for h in head]]
    cells += [[f"<td>{html.escape(c)}</td>" for c in row] for row in rows]
    return "<table>" + "\n".join("<tr>" + "".join(r) + "</tr>" for r in cells) + "</table>"


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { margin-bottom: 0.2em; } .meta { color: #555; margin-top: 0; }
table { border-collapse: collapse; font-size: 0.85em; margin: 1em 0; }
td, th { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left; }
th { background: #f0f0f0; } tr:nth-child(2) td { background: #eef6ee; }
img { max-width: 100%; margin: 0.5em 0.5em 0.5em 0; border: 1px solid #eee; }
pre { background: #f6f6f6; padding: 0.6em; white-space: pre-wrap; font-size: 0.8em; }
.note { color: #666; font-size: 0.9em; } .row { display: flex; flex-wrap: wrap; gap: 1em; }
"""


def write_report(exp: Experiment, out: str | os.PathLike, top: int = 3) -> Path:
    """Write the report of ``exp`` into the local directory ``out``; returns its index.html."""
    trials = exp.trials()
    if not trials:
        raise ExperimentError(f"{exp.uri} has no trials yet: nothing to report")
    target = Path(out)
    target.mkdir(parents=True, exist_ok=True)
    metric, mode = exp.config.objective.metric, objective_mode(exp.config.objective)
    try:
        ranked = exp.best(len(trials), metric, mode)
    except ExperimentError:  # nothing scored yet
        ranked = []
    best = ranked[0][2] if ranked else None
    sections = [
        _objective_vs_params(exp, metric, best, target),
        _score_vs_accuracy(exp, target),
        *_study_sections(exp, metric, mode, target),
        _collapse(exp, target),
        _collapse_over_time(exp, target),
        _best_genotypes(exp, ranked[:top], metric, target),
    ]
    counts = {s: sum(t.status == s for t in trials) for s in ("done", "unfinished", "error")}
    status = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    body = [
        f"<h1>Sweep {html.escape(exp.name)}</h1>",
        f"<p class=meta>{html.escape(exp.uri)} &middot; {len(trials)} trials ({status}) "
        f"&middot; objective {html.escape(metric)} ({mode})</p>",
        "<h2>Leaderboard</h2>",
        _leaderboard(exp, metric, mode),
        *(f"<p class=note>{html.escape(n)}</p>" for n in leaderboard_notes(exp)),
    ]
    for sec in sections:
        body.append(f"<h2>{html.escape(sec.title)}</h2>")
        body.extend(f'<img src="{f}" alt="{html.escape(sec.title)}">' for f in sec.figures)
        body.extend(f"<p class=note>{html.escape(n)}</p>" for n in sec.notes)
        if sec.html:
            body.append(sec.html)
    page = (
        "<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
        f"<title>maenas-ray sweep {html.escape(exp.name)}</title><style>{_STYLE}</style>"
        "</head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
    index = target / INDEX
    index.write_text(page, encoding="utf-8")
    return index


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m maenas_ray.report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("path", help="the experiment directory: <storage_path>/<name>")
    p.add_argument(
        "--out",
        help="report directory (default: <experiment>/report; ./<name>-report for s3:// or gs://)",
    )
    p.add_argument("--top", type=int, default=3, help="best genotypes shown (default 3)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.top < 1:
            raise ExperimentError(f"--top {args.top}: must be >= 1")
        exp = load_experiment(args.path)
    except ExperimentError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    local = isinstance(exp.fs, pyarrow.fs.LocalFileSystem)
    out = args.out or (f"{exp.path}/report" if local else f"{exp.name}-report")
    try:
        index = write_report(exp, out, args.top)
    except ExperimentError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: --out {out!r}: cannot write the report there ({err})", file=sys.stderr)
        return 2
    print(f"report: {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
