"""Time one MAE-DARTS search iteration: the fast path against the reference formulation.

One iteration is what the search loop does per step: draw an A-batch and a W-batch, draw
their masks, take the architecture step (α gradient of the masked reconstruction loss,
first or second order) and the weight step. Both paths run the project's own
``SearchLoop`` with the same config and seed (so the same initial weights):

- reference: ``Supernet(formulation="reference")`` -- every primitive on every edge,
  the ``none`` op's zero tensor included, then the softmax-weighted sum; float32, NCHW;
  batches from a ``DataLoader`` (``data.loader = workers``, no worker processes);
- fast: ``Supernet(formulation="fast")`` (``maenas_ray/space/fastpath.py``), channels_last,
  batches from the device-resident dataset with on-device augmentation, bf16 autocast
  on CUDA (``search.precision = auto``);
- with ``--partial-channels K`` (K > 1) the fast path runs PC-DARTS' partial-channel
  edges (``search.partial_channels = K``, ``maenas_ray/space/partial.py``) and is named
  ``pc-fast``; the reference stays exact DARTS, so the ratio is the search cost of
  PC-DARTS on the fast path against DARTS' own formulation.

The iterations are alternated (reference, fast, fast, reference, ...) so that both see
the same machine state. Before timing, both paths compute the loss and the α gradient
of the same batch and masks in float32 from the same weights, and the reference also in
float64: the two float32 paths must differ by no more than float32 rounding does, i.e.
about as much as the float32 reference differs from its float64 self. With partial
channels that check is made against the reference formulation of the same PC-DARTS
supernet (α and β gradients), which is not timed.

    python benchmarks/search_step.py                    # CPU default, < 2 min on 2 cores
    python benchmarks/search_step.py --device cuda --batch 256
    python benchmarks/search_step.py --partial-channels 4   # PC-DARTS against DARTS

The last line is ``speedup: X.XX`` (fast images/s over reference images/s).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from maenas_ray.config import Config, config_from_dict
from maenas_ray.engines import SearchLoop, resolve_device


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--channels", type=int, default=16, help="supernet C (default 16)")
    p.add_argument("--layers", type=int, default=8, help="cells (default 8)")
    p.add_argument("--image-size", type=int, default=32, help="image side (default 32)")
    p.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="the fast path's (auto: bf16 on CUDA, fp32 on CPU); the reference "
                        "is always fp32")  # fmt: skip
    p.add_argument("--unrolled", action="store_true", help="second-order α gradient")
    p.add_argument("--partial-channels", type=int, default=1, metavar="K",
                   help="the fast path's PC-DARTS partial channels (default 1: DARTS)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=3, help="timed iterations per path")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-float64", action="store_true",
                   help="skip the float64 reference (the rounding yardstick)")  # fmt: skip
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    for name in ("channels", "layers", "image_size", "batch", "repeats", "partial_channels"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def configs(args: argparse.Namespace) -> tuple[Config, Config, Config]:
    """The fast path's config, the reference's (same search but DARTS' full edges, other
    data loader) and that of the reference the fast path is checked against (the
    reference's with the fast path's partial channels)."""
    images = max(4 * args.batch, 256)
    base = {
        "data": {"dataset": "synthetic", "image_size": args.image_size, "num_images": images},
        "search": {
            "channels": args.channels, "layers": args.layers, "batch_size": args.batch,
            "unrolled": args.unrolled, "device": args.device, "eval_images": args.batch,
            "precision": args.precision,
        },
    }  # fmt: skip
    fast = copy.deepcopy(base)
    fast["search"]["partial_channels"] = args.partial_channels
    ref = copy.deepcopy(base)
    ref["data"].update(loader="workers", num_workers=0)
    ref["search"]["precision"] = "fp32"
    check = copy.deepcopy(ref)
    check["search"]["partial_channels"] = args.partial_channels
    return config_from_dict(fast), config_from_dict(ref), config_from_dict(check)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(loop: SearchLoop, step: Callable[[], object]) -> int:
    """Bytes allocated at the peak of ``step`` beyond what was allocated before it."""
    device = loop.device
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    # CPU: the profiler records every allocation with the allocator's running total
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    memory = [
        e["args"] for e in sorted(events, key=lambda e: e.get("ts", 0))
        if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0
    ]  # fmt: skip
    if not memory:
        return 0
    start = memory[0]["Total Allocated"] - memory[0]["Bytes"]
    return max(a["Total Allocated"] for a in memory) - start


def alpha_check(
    fast: SearchLoop, ref: SearchLoop, ref_cfg: Config, float64: bool
) -> dict[str, float]:
    """Loss and α gradient of one batch by both paths in float32 (and the reference in
    float64), from the same weights; their largest absolute differences."""
    x_w, x_a = next(iter(fast.data.w)), next(iter(fast.data.a))
    mask_a, mask_w = fast.masks()
    autocast = fast.autocast
    fast.autocast = ref.autocast  # float32 for the comparison
    try:
        g_fast, l_fast, _ = fast.alpha_gradients(x_a, mask_a, x_w, mask_w)
    finally:
        fast.autocast = autocast
    g_ref, l_ref, _ = ref.alpha_gradients(x_a, mask_a, x_w, mask_w)
    out = {
        "loss": float(l_ref),
        "alpha_grad_max": max(float(g.abs().max()) for g in g_ref),
        "loss_diff": abs(float(l_fast) - float(l_ref)),
        "alpha_grad_diff": _max_diff(g_fast, g_ref),
    }  # fmt: skip
    if float64:
        # the yardstick: how far float32 is from float64 for the reference formulation, on
        # NCHW tensors and on the fast path's channels_last ones (other CPU kernels)
        exact = SearchLoop(ref_cfg, formulation="reference")
        exact.model.load_state_dict(ref.model.state_dict())
        g_cl, _, _ = _with_channels_last(exact, x_a, mask_a, x_w, mask_w)
        exact.model.double()
        g64, l64, _ = exact.alpha_gradients(x_a.double(), mask_a, x_w.double(), mask_w)
        out["ref32_vs_64_loss"] = abs(float(l_ref) - float(l64))
        out["ref32_vs_64_alpha_grad"] = _max_diff(g_ref, g64)
        out["ref32_channels_last_vs_64_alpha_grad"] = _max_diff(g_cl, g64)
        out["fast32_vs_64_alpha_grad"] = _max_diff(g_fast, g64)
    return out


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x.double() - y.double()).abs().max()) for x, y in zip(a, b, strict=True))


def _with_channels_last(
    loop: SearchLoop, *batch: torch.Tensor
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    encoder = loop.model.encoder
    encoder.channels_last = True
    try:
        return loop.alpha_gradients(*batch)
    finally:
        encoder.channels_last = False


class Stream:
    """A path's own batches, drawn as its search loop would (part of the timed work)."""

    def __init__(self, loop: SearchLoop) -> None:
        self.loop = loop
        self.w, self.a = iter(loop.data.w), iter(loop.data.a)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return next(self.w), next(self.a)
        except StopIteration:
            self.w, self.a = iter(self.loop.data.w), iter(self.loop.data.a)
            return next(self.w), next(self.a)

    def iteration(self) -> None:
        x_w, x_a = self.next()
        loss_w, loss_a, _, _ = self.loop.iteration(x_w, x_a)
        float(loss_w + loss_a)  # wait for the step to finish (one sync, as per epoch)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    fast_cfg, ref_cfg, check_cfg = configs(args)
    pc = args.partial_channels
    fast = SearchLoop(fast_cfg, formulation="fast")
    ref = SearchLoop(ref_cfg, formulation="reference")
    check_ref = ref if pc == 1 else SearchLoop(check_cfg, formulation="reference")
    states = fast.model.state_dict(), check_ref.model.state_dict()
    if states[0].keys() != states[1].keys() or not all(
        torch.equal(states[0][k], states[1][k]) for k in states[0]
    ):
        raise SystemExit("the two paths did not start from the same weights")
    order = "second" if args.unrolled else "first"
    fast_name = "fast" if pc == 1 else "pc-fast"
    print(
        f"search iteration (α step, {order} order + weight step), C={args.channels}, "
        f"{args.layers} cells, batch {args.batch}, {args.image_size}x{args.image_size}, "
        f"{device} ({torch.get_num_threads()} threads), torch {torch.__version__}"
    )
    print(f"  reference: DARTS, float32, NCHW, DataLoader; {fast_name}: "
          f"{'DARTS' if pc == 1 else f'PC-DARTS (partial channels K={pc})'}, "
          f"{fast_precision(fast)}, channels_last, {fast.data.loader} data")  # fmt: skip
    if pc > 1:
        print(f"  supernet weights: reference {count(ref)}, {fast_name} {count(fast)}; "
              f"{fast_name} checked against the reference formulation with K={pc} "
              "(α and β gradients)")  # fmt: skip

    check = alpha_check(fast, check_ref, check_cfg, not args.no_float64)
    streams = {"reference": Stream(ref), fast_name: Stream(fast)}
    for s in streams.values():  # warm-up (allocator, kernel selection)
        s.iteration()
    memory = {name: peak_memory(s.loop, s.iteration) for name, s in streams.items()}
    times: dict[str, list[float]] = {name: [] for name in streams}
    for r in range(args.repeats):
        names = ["reference", fast_name] if r % 2 == 0 else [fast_name, "reference"]
        for name in names:
            synchronize(device)
            start = time.perf_counter()
            streams[name].iteration()
            times[name].append(time.perf_counter() - start)

    rate = {n: 2 * args.batch / statistics.median(t) for n, t in times.items()}
    print(f"{'path':10s} {'images/s':>10s} {'s/iteration':>12s} {'peak MiB':>9s}")
    for name in streams:
        print(f"{name:10s} {rate[name]:10.1f} {statistics.median(times[name]):12.3f} "
              f"{memory[name] / 2**20:9.1f}")  # fmt: skip
    checked = "reference" if pc == 1 else f"reference K={pc}"
    print(f"loss: {check['loss']:.6f}; |{fast_name} - {checked}|: loss {check['loss_diff']:.2e}, "
          f"α gradient {check['alpha_grad_diff']:.2e} (largest α gradient "
          f"{check['alpha_grad_max']:.2e})")  # fmt: skip
    ok = True
    if "ref32_vs_64_alpha_grad" in check:
        rounding = max(
            check["ref32_vs_64_alpha_grad"], check["ref32_channels_last_vs_64_alpha_grad"]
        )
        print(f"float32 rounding, |float32 - float64| of the α gradient: reference "
              f"{check['ref32_vs_64_alpha_grad']:.2e} (NCHW), "
              f"{check['ref32_channels_last_vs_64_alpha_grad']:.2e} (channels_last); fast "
              f"{check['fast32_vs_64_alpha_grad']:.2e}")  # fmt: skip
        tolerance = 2 * rounding + 1e-6 * check["alpha_grad_max"]
        ok = check["fast32_vs_64_alpha_grad"] <= tolerance
        print(f"same mathematics: {'yes' if ok else 'NO'} (the fast path is "
              f"{'within' if ok else 'beyond'} 2 x the reference's own float32 rounding of "
              "the float64 α gradient)")  # fmt: skip
    speedup = rate[fast_name] / rate["reference"]
    if args.json is not None:
        figures = {"args": {k: str(v) for k, v in vars(args).items()}, "check": check,
                   "images_per_s": rate, "peak_bytes": memory, "times": times,
                   "speedup": speedup, "device": str(device)}  # fmt: skip
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"speedup: {speedup:.2f}")
    return 0 if ok else 1


def count(loop: SearchLoop) -> int:
    """The supernet's weights (not its architecture weights)."""
    return sum(p.numel() for p in loop.model.encoder.weight_parameters())


def fast_precision(loop: SearchLoop) -> str:
    with loop.autocast():
        return "bf16 autocast" if torch.is_autocast_enabled(loop.device.type) else "float32"


if __name__ == "__main__":
    sys.exit(main())
