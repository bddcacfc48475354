"""``python -m maenas_ray.search``: one MAE-DARTS search, no Ray.

Prints progress per epoch and writes to ``--out``: ``config.yaml``, ``metrics.jsonl``
(one JSON object per epoch), ``checkpoint/search_state.pt`` (every epoch),
``genotype.json`` and the pictures. ``--resume`` continues from the checkpoint there.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

from maenas_ray.config import ConfigError, load_config
from maenas_ray.engines import check_registered
from maenas_ray.engines.common import CheckpointMismatchError, EpochReport, SearchCallback
from maenas_ray.engines.search import (
    CHECKPOINT_FILE,
    load_search_state,
    run_search,
    uniform_alpha_warning,
)


class ConsoleAndFiles(SearchCallback):
    """Prints one line per epoch, appends metrics.jsonl, writes the checkpoint."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.started = time.perf_counter()

    def on_epoch_end(self, report: EpochReport) -> None:
        m = report.metrics
        report.save_checkpoint(self.out_dir / "checkpoint")
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(m) + "\n")
        eigenvalue = f"  λ {m['hessian_eigenvalue']:.3g}" if "hessian_eigenvalue" in m else ""
        print(
            f"epoch {report.epoch}/{report.epochs}  train {m['train_loss']:.4f}  "
            f"val {m['val_loss']:.4f}  eval {m['eval_loss']:.4f} "
            f"(PSNR {m['eval_psnr']:.2f} dB)  skip {m['skip_count']}  "
            f"H(α) {m['alpha_entropy']:.3f}{eigenvalue}  {m['images_per_sec']:.0f} img/s  "
            f"[{time.perf_counter() - self.started:.0f}s]",
            flush=True,
        )
        if m.get("stopped_early"):
            print(
                f"stopped early after epoch {report.epoch}: {m['stop_reason']}; the result is "
                f"the architecture of epoch {m['kept_epoch']}",
                flush=True,
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m maenas_ray.search", description=__doc__)
    parser.add_argument("--config", type=Path, help="YAML config (sections data, search)")
    parser.add_argument("--out", type=Path, help="output directory (default: runs/search-<time>)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set search.mask_ratio=0.6 (repeatable)",
    )  # fmt: skip
    parser.add_argument("--resume", action="store_true", help="continue from --out's checkpoint")
    args = parser.parse_args(argv)
    if args.resume and args.out is None:
        print(
            "error: --resume needs --out, the directory of the search to continue", file=sys.stderr
        )
        return 2
    out = args.out or Path("runs") / time.strftime("search-%Y%m%d-%H%M%S")
    blocked = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        print(
            f"error: --out {str(out)!r}: {str(blocked)!r} is a file, not a directory",
            file=sys.stderr,
        )
        return 2
    checkpoint = out / "checkpoint" / CHECKPOINT_FILE
    if args.resume and not checkpoint.is_file():
        print(f"error: --resume: no checkpoint at {checkpoint}", file=sys.stderr)
        return 2
    config_path = args.config
    if args.resume and config_path is None:
        config_path = out / "config.yaml"  # continue with the config the search started with
    try:
        cfg = load_config(config_path, args.overrides)
        check_registered(cfg)
        cfg.check_search_splits()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not args.resume and checkpoint.is_file():
        print(
            f"error: {out} already holds a search checkpoint; pass --resume to continue it "
            "or choose another --out",
            file=sys.stderr,
        )
        return 2
    state = None
    if args.resume:
        try:
            state = load_search_state(checkpoint)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    if state is not None:  # metrics.jsonl = the checkpoint's history, then the new epochs
        history = json.loads(state["history"])
        (out / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in history))
        print(f"resuming {out.resolve()} after epoch {state['epoch']}", flush=True)
    else:
        print(f"search -> {out.resolve()}", flush=True)
    try:
        result = run_search(cfg, ConsoleAndFiles(out), resume_from=state, out_dir=out)
    except CheckpointMismatchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"genotype: {result.genotype!r}")
    print(f"wrote {out / 'genotype.json'}, metrics.jsonl and pictures (*.png) to {out}")
    warning = uniform_alpha_warning(result.metrics.get("alpha_entropy"))
    if warning:
        print(f"warning: {warning}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
