"""The GPU check, in one run: search cost on CUDA, a paper-size search, and sweep packing.

Run it through ``benchmarks/device_check.sh`` (at most 8 minutes on one GPU). It writes
``device_check.json`` and ``device_check.md`` to ``--out`` (or ``$OUT``):

1. ``search_step.py`` at batch 64 and 256: exact DARTS and partial channels K = 4, each
   with the weight step in fp32 (TF32 as PyTorch configures it) and in bf16 autocast:
   images/s, peak memory, and the projected wall time of a 50-epoch CIFAR-10 search
   (25,000 W-images and 25,000 A-images per epoch);
2. a 2-epoch paper-size search (C=16, 8 cells, 32-pixel synthetic images) through
   ``python -m maenas_ray.search``, second order, with the Hessian eigenvalue every epoch;
   plus the checks the precision rules rest on, on the device: the second-order α
   gradient under ``precision: bf16`` against ``fp32`` (both must agree: it always runs in
   full fp32), and the search's 20-step eigenvalue against a 60-step one;
3. a 4-trial quickstart-sized sweep with four trials sharing one GPU
   (``tune.gpus_per_trial: 0.25``) against one trial per GPU, as trials per hour.

``--smoke`` runs every part at tiny sizes on the CPU (the test suite does, so the script
cannot rot); its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
#: W- and A-images of one epoch of the paper's CIFAR-10 search
CIFAR_IMAGES_PER_EPOCH = 50_000
EPOCHS = 50


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=os.environ.get("OUT") or "device-check")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (tests)")
    return p.parse_args(argv)


def run(command: list[str], timeout: float) -> tuple[int, str, float]:
    start = time.monotonic()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO)
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as err:
        code, output = 124, f"timed out after {timeout:.0f} s: {err.stdout or ''}"
    return code, output, time.monotonic() - start


def search_steps(out: Path, smoke: bool) -> list[dict[str, Any]]:
    rows = []
    size = ["--channels", "4", "--layers", "3", "--image-size", "16", "--repeats", "1",
            "--threads", "1"] if smoke else ["--repeats", "3", "--device", "cuda"]  # fmt: skip
    # the smoke run takes one of each value (the suite's time), the device run every pairing
    combos = [(8, 1, "fp32"), (8, 4, "bf16")] if smoke else [
        (b, k, p) for b in (64, 256) for k in (1, 4) for p in ("fp32", "bf16")
    ]  # fmt: skip
    for batch, k, precision in combos:
        path = out / f"step-b{batch}-k{k}-{precision}.json"
        command = [
            sys.executable, "benchmarks/search_step.py", *size, "--batch", str(batch),
            "--partial-channels", str(k), "--precision", precision, "--no-float64",
            "--json", str(path),
        ]  # fmt: skip
        code, output, _ = run(command, 600)
        row: dict[str, Any] = {"batch": batch, "partial_channels": k,
                               "precision": precision, "exit": code}  # fmt: skip
        if code == 0 and path.is_file():
            figures = json.loads(path.read_text())
            name = "fast" if k == 1 else "pc-fast"
            rate = figures["images_per_s"][name]
            row.update(
                images_per_s=rate,
                peak_mib=figures["peak_bytes"][name] / 2**20,
                reference_images_per_s=figures["images_per_s"]["reference"],
                projected_50_epoch_hours=EPOCHS * CIFAR_IMAGES_PER_EPOCH / rate / 3600,
            )
        else:
            row["error"] = output[-2000:]
        rows.append(row)
    return rows


CHECKS = """
import json, sys, torch
from maenas_ray.config import config_from_dict
from maenas_ray.engines import SearchLoop, dominant_eigenvalue
from maenas_ray.engines.common import autocast_for
smoke = sys.argv[1] == "smoke"
size = ({"channels": 4, "layers": 3, "batch_size": 8} if smoke else
        {"channels": 16, "layers": 8, "batch_size": 64})
data = {"dataset": "synthetic", "image_size": 16 if smoke else 32, "num_images": 512}
cfg = config_from_dict({"data": data, "search": {**size, "unrolled": True, "eval_images": 8,
                        "device": "cpu" if smoke else "cuda", "precision": "fp32"}})
loop = SearchLoop(cfg)
x_w, x_a = next(iter(loop.data.w)), next(iter(loop.data.a))
loop.weight_step(x_w, loop.masks()[1])
m_a, m_w = loop.masks()
fp32 = loop.alpha_gradients(x_a, m_a, x_w, m_w)[0]
loop.autocast = autocast_for(loop.device, "bf16")
bf16 = loop.alpha_gradients(x_a, m_a, x_w, m_w)[0]
flat = lambda g: torch.cat([t.flatten().double() for t in g])
cos = float(torch.nn.functional.cosine_similarity(flat(fp32), flat(bf16), dim=0))
measured = loop.hessian_eigenvalue()
x, m = loop.hessian_batch()
def loss():
    return loop._loss(x, m, autocast=False)[0]
longer = dominant_eigenvalue(loss, loop.alphas, 60, torch.Generator().manual_seed(9))
print(json.dumps({"second_order_bf16_vs_fp32_cosine": cos, "eigenvalue_20": measured,
                  "eigenvalue_60": longer}))
"""


def paper_search(out: Path, smoke: bool) -> dict[str, Any]:
    size = ["search.channels=4", "search.layers=3", "search.batch_size=8", "data.image_size=16",
            "data.num_images=128", "search.steps_per_epoch=2", "search.device=cpu",
            "search.eval_images=8", "search.hessian_iters=2"] if smoke else [
            "search.device=cuda", "data.num_images=4096"]  # fmt: skip
    overrides = [*size, "search.epochs=2", "search.unrolled=true", "search.hessian_every=1"]
    command = [sys.executable, "-m", "maenas_ray.search", "--out", str(out / "search")]
    for item in overrides:
        command += ["--set", item]
    code, output, seconds = run(command, 400)
    result: dict[str, Any] = {"exit": code, "seconds": seconds}
    metrics = out / "search" / "metrics.jsonl"
    if code == 0 and metrics.is_file():
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        result["epochs"] = [
            {k: r.get(k) for k in ("epoch", "eval_loss", "alpha_entropy", "skip_count",
                                   "hessian_eigenvalue", "hessian_time", "epoch_time",
                                   "images_per_sec")}
            for r in rows
        ]  # fmt: skip
    else:
        result["error"] = output[-2000:]
    code, output, _ = run([sys.executable, "-c", CHECKS, "smoke" if smoke else "cuda"], 300)
    if code == 0:
        result["checks"] = json.loads(output.strip().splitlines()[-1])
        checks = result["checks"]
        result["second_order_precision_ok"] = checks["second_order_bf16_vs_fp32_cosine"] > 0.999
        result["eigenvalue_converged"] = (
            abs(checks["eigenvalue_20"] - checks["eigenvalue_60"])
            <= 0.05 * abs(checks["eigenvalue_60"]) + 1e-12
        )
    else:
        result["checks_error"] = output[-2000:]
    return result


def sweep_packing(out: Path, smoke: bool) -> dict[str, Any]:
    trials = 2 if smoke else 4
    overrides = ["objective.metric=eval_loss", f"tune.num_samples={trials}", "search.epochs=2"]
    if smoke:
        overrides += [
            "search.steps_per_epoch=1",
            "search.layers=3",
            "search.batch_size=8",
            "data.num_images=256",
            "search.hessian_every=0",
            "search.device=cpu",
        ]
        shares = {"1 CPU each": ["tune.cpus_per_trial=1"]}  # one sweep: the suite's time
    else:
        overrides += ["search.device=cuda"]
        shares = {
            "4 trials per GPU": ["tune.gpus_per_trial=0.25", "tune.cpus_per_trial=2"],
            "1 trial per GPU": ["tune.gpus_per_trial=1", "tune.cpus_per_trial=2"],
        }
    result = {}
    for label, extra in shares.items():
        name = label.replace(" ", "-")
        command = [sys.executable, "-m", "maenas_ray.sweep", "--storage-path", str(out / "sweeps"),
                   "--name", name, "--no-dashboard"]  # fmt: skip
        if smoke:
            command += ["--num-cpus", "2"]
        for item in [*overrides, *extra]:
            command += ["--set", item]
        code, output, seconds = run(command, 300)
        rate = trials * 3600 / seconds if code == 0 else None
        result[label] = {"exit": code, "seconds": seconds, "trials_per_hour": rate}
        if code != 0:
            result[label]["error"] = output[-2000:]
    return result


def markdown(figures: dict[str, Any]) -> str:
    lines = [f"# Device check ({figures['device']})", "", "## Search iteration", "",
             "| batch | K | weight step | images/s | peak MiB | 50-epoch CIFAR-10 search |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in figures["search_step"]:
        if "images_per_s" in r:
            lines.append(
                f"| {r['batch']} | {r['partial_channels']} | {r['precision']} | "
                f"{r['images_per_s']:.0f} | {r['peak_mib']:.0f} | "
                f"{r['projected_50_epoch_hours']:.2f} h |"
            )
        else:
            lines.append(f"| {r['batch']} | {r['partial_channels']} | {r['precision']} | "
                         f"failed (exit {r['exit']}) | | |")  # fmt: skip
    search = figures["paper_search"]
    lines += ["", "## Paper-size search, 2 epochs, second order", "",
              f"exit {search['exit']}, {search['seconds']:.0f} s"]  # fmt: skip
    for e in search.get("epochs", []):
        lines.append(f"- epoch {e['epoch']}: eval_loss {e['eval_loss']:.4f}, H(α) "
                     f"{e['alpha_entropy']:.3f}, λ {e['hessian_eigenvalue']:.4g} "
                     f"({e['hessian_time']:.1f} s of a {e['epoch_time']:.1f} s epoch)")  # fmt: skip
    if "checks" in search:
        c = search["checks"]
        lines.append(f"- second order, bf16 against fp32: cosine "
                     f"{c['second_order_bf16_vs_fp32_cosine']:.6f}; eigenvalue 20 steps "
                     f"{c['eigenvalue_20']:.5g}, 60 steps {c['eigenvalue_60']:.5g}")  # fmt: skip
    lines += ["", "## Sweep packing (quickstart-sized trials, objective eval_loss)", ""]
    for label, r in figures["sweep"].items():
        rate = r["trials_per_hour"]
        lines.append(
            f"- {label}: {r['seconds']:.0f} s, "
            + (f"{rate:.0f} trials/hour" if rate else f"failed (exit {r['exit']})")
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("error: no CUDA device; use --smoke for the CPU smoke run", file=sys.stderr)
        return 2
    device = "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(0)
    figures: dict[str, Any] = {"device": device, "torch": torch.__version__}
    started = time.monotonic()
    figures["search_step"] = search_steps(args.out, args.smoke)
    figures["paper_search"] = paper_search(args.out, args.smoke)
    figures["sweep"] = sweep_packing(args.out, args.smoke)
    figures["seconds"] = time.monotonic() - started
    (args.out / "device_check.json").write_text(json.dumps(figures, indent=2) + "\n")
    (args.out / "device_check.md").write_text(markdown(figures))
    print(markdown(figures))
    failed = [r for r in figures["search_step"] if r["exit"] != 0]
    failed += [figures["paper_search"]] if figures["paper_search"]["exit"] != 0 else []
    failed += [r for r in figures["sweep"].values() if r["exit"] != 0]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
