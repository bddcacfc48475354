"""How far bf16 autocast takes the α gradient from fp32, and what the Hessian costs.

At the paper's search size (C=16, 8 cells, 32-pixel images, batch 64) by default, on the
built-in synthetic images, from weights trained for ``--warmup`` weight steps:

- first order: ∇α of the A-loss under bf16 autocast against the same gradient in full
  fp32 (same batch, same masks), and, as the yardstick, the fp32 gradient of a second
  A-batch (the mini-batch noise every α step carries anyway);
- second order: DARTS' unrolled gradient with its passes under bf16 autocast (what the
  search did before it ran them in full fp32) against full fp32;
- the Hessian eigenvalue: the time of its set-up (a forward and a graph-keeping backward)
  and of one power-iteration step (a Hessian-vector product), timed with 1 and 3 steps;
  from them, a ``--hessian-iters`` measurement against one search iteration and the share
  of a CIFAR-10 epoch (25,000 A-images / batch = 390 iterations) that one measurement per
  epoch costs (``search.hessian_every: 1``).

Agreement is given as the cosine of the two gradients, the relative error
‖g_bf16 − g_fp32‖ / ‖g_fp32‖, and the share of α entries whose sign agrees.

    python benchmarks/alpha_precision.py              # CPU, bf16 autocast on the CPU
    python benchmarks/alpha_precision.py --batch 16   # quicker
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path

import torch

from maenas_ray.config import config_from_dict
from maenas_ray.engines import SearchLoop
from maenas_ray.engines.architect import _unrolled
from maenas_ray.engines.hessian import exact_fp32

#: A-images in one epoch of the paper's CIFAR-10 search (50,000 training images, half each).
CIFAR_A_IMAGES = 25_000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3, help="weight steps before measuring")
    p.add_argument("--hessian-iters", type=int, default=20)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return p.parse_args(argv)


def compare(got: list[torch.Tensor], want: list[torch.Tensor]) -> dict[str, float]:
    g = torch.cat([t.flatten().double() for t in got])
    w = torch.cat([t.flatten().double() for t in want])
    return {
        "cosine": float(torch.nn.functional.cosine_similarity(g, w, dim=0)),
        "relative_error": float((g - w).norm() / w.norm()),
        "sign_agreement": float((g.sign() == w.sign()).double().mean()),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = config_from_dict(
        {
            "data": {
                "dataset": "synthetic",
                "image_size": args.image_size,
                "num_images": max(16 * args.batch, 512),
            },
            "search": {
                "channels": args.channels,
                "layers": args.layers,
                "batch_size": args.batch,
                "device": args.device,
                "eval_images": args.batch,
                "precision": "fp32",
                "hessian_iters": args.hessian_iters,
            },
        }
    )
    loop = SearchLoop(cfg)
    batches = zip(loop.data.w, loop.data.a, strict=False)
    for _ in range(args.warmup):
        x_w, _ = next(batches)
        loop.weight_step(x_w, loop.masks()[1])
    x_w, x_a = next(batches)
    _, x_a2 = next(batches)
    mask_a, mask_w = loop.masks()
    mask_a2, _ = loop.masks()
    dev = loop.device.type
    bf16 = lambda: torch.autocast(dev, dtype=torch.bfloat16)  # noqa: E731

    def first_order(x: torch.Tensor, m: torch.Tensor, half: bool) -> list[torch.Tensor]:
        with exact_fp32(loop.device):
            with bf16() if half else torch.autocast(dev, enabled=False):
                loss, _ = loop._loss(x, m, autocast=False)
            return list(torch.autograd.grad(loss, loop.alphas))

    def second_order(half: bool) -> list[torch.Tensor]:
        s = cfg.search
        lr = loop.scheduler.get_last_lr()[0]
        buffers = {
            n: loop.w_opt.state[p]["momentum_buffer"]
            for n, p in zip(loop.weight_names, loop.weights, strict=True)
            if "momentum_buffer" in loop.w_opt.state.get(p, {})
        }
        call = (loop.model, loop.arch_names, x_w, mask_w, x_a, mask_a, lr, s.weight_decay,
                buffers, s.momentum, s.norm_pix_loss, 0.01, None)  # fmt: skip
        if half:
            with bf16():
                return _unrolled(*call)
        with exact_fp32(loop.device):
            return _unrolled(*call)

    figures: dict[str, object] = {
        "size": {"channels": args.channels, "layers": args.layers,
                 "image_size": args.image_size, "batch": args.batch,
                 "warmup_weight_steps": args.warmup, "device": dev,
                 "threads": torch.get_num_threads()},
    }  # fmt: skip
    fp32 = first_order(x_a, mask_a, False)
    figures["first_order_bf16_vs_fp32"] = compare(first_order(x_a, mask_a, True), fp32)
    figures["first_order_other_batch_fp32"] = compare(first_order(x_a2, mask_a2, False), fp32)
    exact = second_order(False)
    figures["second_order_bf16_vs_fp32"] = compare(second_order(True), exact)
    figures["second_order_vs_first_order_fp32"] = compare(exact, fp32)
    for key, value in figures.items():
        print(f"{key}: {value}", flush=True)

    start = time.perf_counter()
    x_w, x_a = next(batches)
    loop.iteration(x_w, x_a)
    iteration_s = time.perf_counter() - start
    # one measurement = a forward and a backward that keeps its graph, then one
    # Hessian-vector product per power-iteration step: timed with 1 and with 3 steps
    timed = {}
    for steps in (1, 3):
        loop.cfg.search.hessian_iters = steps
        start = time.perf_counter()
        loop.hessian_eigenvalue()
        timed[steps] = time.perf_counter() - start
    per_step = (timed[3] - timed[1]) / 2
    hessian_s = timed[1] - per_step + args.hessian_iters * per_step
    iterations = CIFAR_A_IMAGES // args.batch
    share = hessian_s / (hessian_s + iterations * iteration_s)
    figures["hessian"] = {
        "iteration_s": iteration_s, "setup_s": timed[1] - per_step,
        "hessian_vector_product_s": per_step, "iters": args.hessian_iters,
        "hessian_over_iteration": hessian_s / iteration_s,
        "cifar10_epoch_iterations": iterations, "share_of_cifar10_epoch": share,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }  # fmt: skip
    print(f"hessian: {figures['hessian']}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    ok = all(math.isfinite(v) for k, v in figures["hessian"].items() if isinstance(v, float))
    print(f"hessian share of a CIFAR-10 epoch: {share:.1%}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
