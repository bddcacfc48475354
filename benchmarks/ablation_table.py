"""The decoder ablation's table, from a finished sweep (docs/ablation.md).

One row per trial, by decoder and mask ratio: the final skip count of the derived normal
cell, the first epoch at which the skip count rose, the Hessian eigenvalue at the first and
the last epoch it was measured, the final mean α entropy, eval_loss and proxy_top1; then
Kendall τ / Spearman ρ between −eval_loss and proxy_top1 over the grid.

    python benchmarks/ablation_table.py ~/maenas_ray_results/ablation_quick-<date>-<time>
"""

from __future__ import annotations

import argparse
import itertools
import sys
from typing import Any

from maenas_ray.report import search_epochs
from maenas_ray.results import load_experiment


def first_rise(epochs: list[dict[str, Any]]) -> int | None:
    """The first epoch whose skip count is above the epoch before's, or None."""
    for before, now in itertools.pairwise(epochs):
        if now["skip_count"] > before["skip_count"]:
            return int(now["epoch"])
    return None


def rows(path: str) -> tuple[list[dict[str, Any]], str]:
    exp = load_experiment(path)
    table = []
    for t in exp.trials():
        epochs = search_epochs(t)
        search = t.params.get("search", {})
        eigen = [e["hessian_eigenvalue"] for e in epochs if "hessian_eigenvalue" in e]
        table.append({
            "decoder": search.get("decoder", exp.config.search.decoder),
            "mask_ratio": search.get("mask_ratio", exp.config.search.mask_ratio),
            "status": t.status,
            "skips": epochs[-1]["skip_count"] if epochs else None,
            "first_rise": first_rise(epochs),
            "skips_per_epoch": [e["skip_count"] for e in epochs],
            "eigen_start": eigen[0] if eigen else None,
            "eigen_end": eigen[-1] if eigen else None,
            "entropy": epochs[-1]["alpha_entropy"] if epochs else None,
            "eval_loss": t.score("eval_loss"),
            "proxy_top1": t.score("proxy_top1"),
        })  # fmt: skip
    table.sort(key=lambda r: (r["decoder"], r["mask_ratio"]))
    return table, exp.correlation().line()


def fmt(value: Any, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="the sweep experiment directory")
    args = p.parse_args(argv)
    table, correlation = rows(args.path)
    print("| decoder | mask ratio | final skips | skips per epoch | first rise | λ first | "
          "λ last | H(α) | eval_loss | proxy_top1 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in table:
        print(
            f"| {r['decoder']} | {r['mask_ratio']:g} | {fmt(r['skips'])} | "
            f"{' '.join(map(str, r['skips_per_epoch']))} | {fmt(r['first_rise'])} | "
            f"{fmt(r['eigen_start'], '.4f')} | {fmt(r['eigen_end'], '.4f')} | "
            f"{fmt(r['entropy'], '.3f')} | {fmt(r['eval_loss'], '.4f')} | "
            f"{fmt(r['proxy_top1'], '.4f')} |"
        )
    print()
    print(correlation)
    return 0


if __name__ == "__main__":
    sys.exit(main())
