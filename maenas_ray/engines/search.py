"""The MAE-DARTS search loop (docs/method.md §1.4): pure torch, no Ray.

It holds the loop (``SearchLoop``, ``run_search``), the search checkpoint (save, load,
what it holds) and the search's own metrics (α entropy, objectives). The α gradient it
steps with is in :mod:`~maenas_ray.engines.architect`; what it shares with the retraining
(ranks, device, precision, epoch reports, config checks) in :mod:`~maenas_ray.engines.common`.

``run_search(config, callbacks)`` runs the bi-level optimisation: per iteration an
architecture step on an A-batch, then a weight step on a W-batch, each with its own
freshly drawn mask; labels are never read. After every epoch the callbacks get the
metrics and can write a checkpoint of the whole search state, from which
``run_search(..., resume_from=...)`` continues bit-for-bit (on CPU, fixed seed).

Data parallel: when ``torch.distributed`` is initialised (e.g. by Ray Train) each rank
takes its share of every global batch and of every mask, and the weight and α gradients
are averaged over the ranks before each step; all ranks draw the same random numbers, so
their weights, α and optimiser states stay identical (only the unused BatchNorm running
statistics differ) and one rank's checkpoint is the whole search.
"""

from __future__ import annotations

import copy
import json
import math
import time
import warnings
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from maenas_ray.config import Config
from maenas_ray.data import ImageDataset, SearchData, search_data
from maenas_ray.engines.architect import (
    first_order_arch_gradients,
    momentum_buffers,
    parameter_names,
    unrolled_arch_gradients,
)
from maenas_ray.engines.common import (
    CheckpointMismatchError,
    EpochReport,
    SearchCallback,
    autocast_for,
    average_over_ranks,
    config_changes,
    frozen,
    rank_and_world,
    resolve_device,
)
from maenas_ray.engines.hessian import collapse_stop, dominant_eigenvalue
from maenas_ray.engines.state import load_state, save_state
from maenas_ray.mae import (
    MaskedAutoencoder,
    apply_mask,
    build_decoder,
    masked_mse,
    masked_psnr,
    patch_size_of,
    random_patch_mask,
    unnormalize_patches,
)
from maenas_ray.space import PRIMITIVES, Genotype, Supernet
from maenas_ray.space.cells import BN_STATISTICS
from maenas_ray.space.supernet import Formulation

CHECKPOINT_FILE = "search_state.pt"
CHECKPOINT_FORMAT = "maenas-search-v1"

#: Final search metrics a sweep may optimise, with their natural direction.
SEARCH_OBJECTIVES = {
    "eval_loss": "min",  # masked reconstruction loss on fixed images and fixed masks
    "eval_psnr": "max",
    "val_loss": "min",  # mean A-split loss of the last epoch (the α objective)
    "val_psnr": "max",
}


def alpha_entropy(alphas: torch.Tensor) -> float:
    """Mean over edges of the entropy (nats) of softmax(α); log(8) ≈ 2.08 is uniform."""
    p = torch.softmax(alphas.detach().float(), dim=-1)
    return float(-(p * p.clamp_min(1e-12).log()).sum(dim=-1).mean())


#: The α entropy of a uniform softmax over the primitives (ln 8 ≈ 2.079), where α starts.
UNIFORM_ENTROPY = math.log(len(PRIMITIVES))
#: A search whose final mean α entropy is above this share of uniform barely moved α.
NEAR_UNIFORM = 0.98


def uniform_alpha_warning(entropy: float | None) -> str | None:
    """A warning when a search ended with α close to uniform (its genotype is then little
    more than the tie-breaking of near-equal weights), or None."""
    if entropy is None or entropy <= NEAR_UNIFORM * UNIFORM_ENTROPY:
        return None
    return (
        f"α ended close to uniform (mean entropy {entropy:.3f}; uniform is ln 8 = "
        f"{UNIFORM_ENTROPY:.3f}): the genotype carries little information. Give the "
        "architecture step more to go on: raise search.arch_lr, or search.epochs / "
        "search.steps_per_epoch"
    )


def save_search_state(state: dict[str, Any], directory: str | Path) -> Path:
    """Write a search state to ``directory/search_state.pt`` atomically; returns the file."""
    return save_state(state, directory, CHECKPOINT_FILE)


@dataclass
class SearchResult:
    genotype: Genotype
    metrics: dict[str, Any]  # the last epoch's
    history: list[dict[str, Any]] = field(default_factory=list)
    alphas_normal: torch.Tensor | None = None
    alphas_reduce: torch.Tensor | None = None


#: What a search checkpoint holds (``SearchLoop.state``).
STATE_KEYS = ("epoch", "config", "model", "w_opt", "a_opt", "scheduler", "rng", "history")
#: What it holds since early stopping exists: checkpoints written before resume without it.
OPTIONAL_STATE_KEYS = ("arch_trace",)


def load_search_state(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file or a directory holding one; tensors only, no pickled code."""
    return load_state(path, CHECKPOINT_FILE, CHECKPOINT_FORMAT, "search", STATE_KEYS)


class SearchLoop:
    """The state of one search and its steps; ``run_search`` drives it.

    ``formulation`` is the supernet's (``fast`` or ``reference``, the same mathematics; see
    :class:`~maenas_ray.space.Supernet`); ``benchmarks/search_step.py`` times both.
    """

    def __init__(
        self, cfg: Config, dataset: ImageDataset | None = None, *, formulation: Formulation = "fast"
    ) -> None:
        self.cfg = cfg
        s = cfg.search
        self.device = resolve_device(s.device)
        self.rank, self.world = rank_and_world()
        if s.batch_size % self.world:
            raise ValueError(
                f"search.batch_size = {s.batch_size} must be divisible by the {self.world} "
                "data-parallel workers"
            )
        self.autocast = autocast_for(self.device, s.precision)
        torch.manual_seed(s.seed)
        encoder = Supernet(
            s.channels, s.layers, stem=s.stem, formulation=formulation,
            partial_channels=s.partial_channels,
        )  # fmt: skip
        decoder = build_decoder(
            s.decoder, encoder.feature_channels, s.decoder_width, s.decoder_depth
        )
        self.model = MaskedAutoencoder(encoder, decoder).to(self.device)
        self.encoder = encoder  # the supernet inside the model (moved with it)
        self.alphas = encoder.arch_parameters()  # α, then β with partial channels
        self.arch_names = parameter_names(self.model, self.alphas)
        named = dict(self.model.named_parameters())
        self.weight_names = [n for n in named if n not in self.arch_names]
        self.weights = [named[n] for n in self.weight_names]
        self.w_opt = torch.optim.SGD(
            self.weights, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay
        )
        self.a_opt = torch.optim.Adam(
            self.alphas, lr=s.arch_lr, betas=s.arch_betas, weight_decay=s.arch_weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.w_opt, T_max=s.epochs, eta_min=s.lr_min
        )
        self.data_gen = torch.Generator().manual_seed(s.seed + 1)
        self.mask_gen = torch.Generator().manual_seed(s.seed + 2)
        self.data: SearchData = search_data(
            cfg.data, s.batch_size, self.device, self.data_gen, s.eval_images, dataset,
            shard=(self.rank, self.world),
        )  # fmt: skip
        self.epoch = 0
        self.history: list[dict[str, Any]] = []
        #: the architecture parameters at the end of each epoch (CPU copies): early
        #: stopping returns those of an earlier epoch
        self.arch_trace: list[list[torch.Tensor]] = []
        self._hessian_batch: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def stopped(self) -> bool:
        """Whether the search ended early (DARTS-ES): it takes no more epochs."""
        return bool(self.history and self.history[-1].get("stopped_early"))

    # --- checkpoint -------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        rng = {
            "torch": torch.get_rng_state(),
            "data": self.data_gen.get_state(),
            "mask": self.mask_gen.get_state(),
        }
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "format": CHECKPOINT_FORMAT,
            "epoch": self.epoch,
            "config": self.cfg.to_dict(),
            "model": self.model.state_dict(),
            "w_opt": self.w_opt.state_dict(),
            "a_opt": self.a_opt.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng,
            "history": json.dumps(self.history),
            "arch_trace": [[a.clone() for a in epoch] for epoch in self.arch_trace],
        }

    def restore(self, state: dict[str, Any]) -> None:
        changes = config_changes(state["config"], self.cfg.to_dict())
        if changes:
            raise CheckpointMismatchError(
                "the checkpoint was written with another config; resuming would not continue "
                f"the same search. Changed: {'; '.join(changes)}"
            )
        # older checkpoints hold running statistics for the search cells' non-affine
        # BatchNorms, which now normalise with batch statistics only: dropped on load
        own = self.model.state_dict()
        model_state = {
            k: v for k, v in state["model"].items() if k in own or not k.endswith(BN_STATISTICS)
        }
        try:
            self.model.load_state_dict(model_state)
            self.w_opt.load_state_dict(state["w_opt"])
            self.a_opt.load_state_dict(state["a_opt"])
            self.scheduler.load_state_dict(state["scheduler"])
            rng = state["rng"]
            torch.set_rng_state(rng["torch"])
            self.data_gen.set_state(rng["data"])
            self.mask_gen.set_state(rng["mask"])
            if self.device.type == "cuda" and "cuda" in rng:
                torch.cuda.set_rng_state(rng["cuda"], self.device)
            self.epoch = int(state["epoch"])
            self.history = json.loads(state["history"])
            # checkpoints from before early stopping have no trace (OPTIONAL_STATE_KEYS)
            self.arch_trace = [[a.cpu().clone() for a in e] for e in state.get("arch_trace", [])]
        except (KeyError, RuntimeError, ValueError) as err:
            raise CheckpointMismatchError(
                f"the checkpoint does not fit this search: {err}"
            ) from None

    def scale_lr(self, factor: float) -> None:
        """Both learning rates times ``factor`` from here on (the cosine schedule of the
        weights scaled with them; kept in the checkpoints through the optimiser and
        scheduler states)."""
        for opt in (self.w_opt, self.a_opt):
            for group in opt.param_groups:
                group["lr"] *= factor
        sched = self.scheduler
        sched.base_lrs = [lr * factor for lr in sched.base_lrs]
        sched.eta_min *= factor
        sched._last_lr = [g["lr"] for g in self.w_opt.param_groups]  # what get_last_lr gives

    # --- steps ------------------------------------------------------------------------
    def _mask(self, batch: int, patch: int | None = None, ratio: float | None = None,
              generator: torch.Generator | None = None) -> torch.Tensor:  # fmt: skip
        s, size = self.cfg.search, self.cfg.data.image_size
        return random_patch_mask(
            batch, size, size, patch or s.patch_size, ratio or s.mask_ratio,
            generator=generator or self.mask_gen, device=self.device,
        )  # fmt: skip

    def _shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's share of a global batch (the whole batch without data parallel)."""
        return batch[self.rank :: self.world]

    def _loss(
        self, x: torch.Tensor, mask: torch.Tensor, autocast: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The masked loss and the reconstruction; under ``search.precision``'s autocast,
        or as the model's dtype computes it (``autocast=False``)."""
        with self.autocast() if autocast else nullcontext():
            pred = self.model(x, mask)
        return masked_mse(pred, x, mask, self.cfg.search.norm_pix_loss), pred

    def alpha_gradients(
        self, x_a: torch.Tensor, mask_a: torch.Tensor, x_w: torch.Tensor, mask_w: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """The gradient of the A-loss with respect to α (first order under
        ``search.precision``, second order in full fp32; averaged over the ranks), the A-loss
        at the current weights and the A-reconstruction; changes nothing."""
        s = self.cfg.search
        if s.unrolled:
            buffers = momentum_buffers(self.w_opt, self.weight_names, self.weights)
            grads = unrolled_arch_gradients(
                self.model, self.arch_names, x_w, mask_w, x_a, mask_a,
                lr=float(self.scheduler.get_last_lr()[0]), weight_decay=s.weight_decay,
                momentum_buffers=buffers, momentum=s.momentum,
                norm_pix=s.norm_pix_loss, reduce=average_over_ranks,
            )  # fmt: skip
            with torch.no_grad():  # the A-loss reported is that at w, not at the virtual w'
                loss, pred = self._loss(x_a, mask_a)
        else:
            grads, loss, pred = first_order_arch_gradients(
                lambda: self._loss(x_a, mask_a), self.alphas, self.weights
            )
        average_over_ranks(grads)
        return grads, loss.detach(), pred.detach()

    def arch_step(
        self, x_a: torch.Tensor, mask_a: torch.Tensor, x_w: torch.Tensor, mask_w: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.a_opt.zero_grad(set_to_none=True)
        grads, loss, pred = self.alpha_gradients(x_a, mask_a, x_w, mask_w)
        for a, g in zip(self.alphas, grads, strict=True):
            a.grad = g
        self.a_opt.step()
        return loss, pred

    def weight_step(self, x_w: torch.Tensor, mask_w: torch.Tensor) -> torch.Tensor:
        self.w_opt.zero_grad(set_to_none=True)
        with frozen(self.alphas):  # no α-gradient work in the backward
            loss, _ = self._loss(x_w, mask_w)
        loss.backward(inputs=self.weights)
        if self.world > 1:
            for p in self.weights:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            average_over_ranks([p.grad for p in self.weights if p.grad is not None])
        nn.utils.clip_grad_norm_(self.weights, self.cfg.search.grad_clip)
        self.w_opt.step()
        return loss.detach()

    def masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of the next A-mask and W-mask."""
        s = self.cfg.search
        return self._shard(self._mask(s.batch_size)), self._shard(self._mask(s.batch_size))

    def iteration(
        self, x_w: torch.Tensor, x_a: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One bi-level iteration: an architecture step on ``x_a`` and a weight step on
        ``x_w``, each with a freshly drawn mask. Returns the W-loss, the A-loss, the
        A-reconstruction and the A-mask (device tensors; nothing is synchronised)."""
        mask_a, mask_w = self.masks()
        loss_a, pred_a = self.arch_step(x_a, mask_a, x_w, mask_w)
        return self.weight_step(x_w, mask_w), loss_a, pred_a, mask_a

    def run_epoch(self) -> dict[str, Any]:
        s = self.cfg.search
        self.model.train()
        steps = min(len(self.data.w), len(self.data.a))
        if s.steps_per_epoch is not None:
            steps = min(steps, s.steps_per_epoch)
        lr = self.scheduler.get_last_lr()[0]
        sums = torch.zeros(3, device=self.device)  # W loss, A loss, A psnr
        bad_step = torch.full((), -1, device=self.device, dtype=torch.long)
        start = time.perf_counter()
        for step, x_w, x_a in zip(range(steps), self.data.w, self.data.a, strict=False):
            loss_w, loss_a, pred_a, mask_a = self.iteration(x_w, x_a)
            with torch.no_grad():
                pred_a = self.in_image_space(pred_a, x_a, mask_a)
                psnr = masked_psnr(pred_a, x_a, mask_a, self.data.mean, self.data.std)
                sums += torch.stack([loss_w, loss_a, psnr])
                finite = torch.isfinite(loss_w) & torch.isfinite(loss_a)
                bad_step = torch.where(~finite & (bad_step < 0), step, bad_step)
        if self.world > 1:
            average_over_ranks([sums])
            dist.all_reduce(bad_step, op=dist.ReduceOp.MAX)
        means = (sums / steps).tolist()  # the one host sync of the epoch
        elapsed = time.perf_counter() - start
        if int(bad_step) >= 0:
            raise FloatingPointError(
                f"non-finite reconstruction loss in epoch {self.epoch + 1}, step {int(bad_step)} "
                f"(learning rates: weights {lr:.3g}, α {self.a_opt.param_groups[0]['lr']:.3g}; "
                "lower search.lr / search.arch_lr, or set search.nan_retries)"
            )
        self.scheduler.step()
        self.epoch += 1
        metrics: dict[str, Any] = {
            "epoch": self.epoch,
            "train_loss": means[0],
            "val_loss": means[1],
            "val_psnr": means[2],
            "lr": lr,
            "steps": steps,
            "images_per_sec": 2 * steps * s.batch_size / elapsed,
            "epoch_time": elapsed,
        }
        if s.hessian_every and self.epoch % s.hessian_every == 0:
            start = time.perf_counter()
            metrics["hessian_eigenvalue"] = self.hessian_eigenvalue()
            metrics["hessian_time"] = time.perf_counter() - start
        self.arch_trace.append([a.detach().cpu().clone() for a in self.alphas])
        if s.early_stop:
            self._early_stop(metrics)
        # what follows describes the architecture the search returns so far
        eval_loss, eval_psnr = self.evaluate()
        normal, reduce = (a.detach() for a in self.alphas[:2])
        genotype = self.encoder.genotype()
        entropy = alpha_entropy(normal), alpha_entropy(reduce)
        metrics.update(
            eval_loss=eval_loss,
            eval_psnr=eval_psnr,
            skip_count=genotype.count("skip_connect"),
            alpha_entropy_normal=entropy[0],
            alpha_entropy_reduce=entropy[1],
            alpha_entropy=sum(entropy) / 2,
            genotype=genotype.to_json(),
        )
        self.history.append(metrics)
        return metrics

    def _early_stop(self, metrics: dict[str, Any]) -> None:
        """DARTS-ES: when the eigenvalue grew too fast, go back to the architecture of
        ``early_stop_window`` epochs ago and mark the search stopped (in ``metrics``)."""
        s = self.cfg.search
        measured = [
            (m["epoch"], m["hessian_eigenvalue"])
            for m in [*self.history, metrics]
            if "hessian_eigenvalue" in m
        ]
        stop = collapse_stop(measured, self.epoch, s.early_stop_window, s.early_stop_ratio)
        if stop is None or len(self.arch_trace) < stop[0]:
            return  # (a search resumed from a checkpoint without the trace cannot go back)
        kept, reason = stop
        with torch.no_grad():
            for a, saved in zip(self.alphas, self.arch_trace[kept - 1], strict=True):
                a.copy_(saved)
        metrics.update(stopped_early=True, kept_epoch=kept, stop_reason=reason)

    def hessian_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of the eigenvalue's batch: the first ``search.batch_size``
        A-split images (not augmented) with masks drawn from a fixed seed, the same in
        every epoch, so the eigenvalues of a search compare."""
        if self._hessian_batch is None:
            s = self.cfg.search
            images = self.data.a.head(s.batch_size)
            masks = self._mask(images.shape[0], generator=torch.Generator().manual_seed(s.seed + 4))
            self._hessian_batch = self._shard(images), self._shard(masks)
        return self._hessian_batch

    def hessian_eigenvalue(self) -> float:
        """The dominant eigenvalue of the Hessian of the A-split loss with respect to the
        architecture parameters, on :meth:`hessian_batch` (RobustDARTS), in full fp32."""
        s = self.cfg.search
        x, mask = self.hessian_batch()
        with frozen(self.weights):
            return dominant_eigenvalue(
                lambda: self._loss(x, mask, autocast=False)[0],
                self.alphas,
                s.hessian_iters,
                generator=torch.Generator().manual_seed(s.seed + 5),
                reduce=average_over_ranks if self.world > 1 else None,
            )

    def in_image_space(
        self, pred: torch.Tensor, x: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """The reconstruction as a (normalised) image: with ``norm_pix_loss`` the model
        predicts each patch normalised by its own mean and deviation, which the target
        patch's statistics undo (as MAE's visualisation does); otherwise ``pred`` itself."""
        if not self.cfg.search.norm_pix_loss:
            return pred
        return unnormalize_patches(pred, x, patch_size_of(mask, *x.shape[-2:]))

    def eval_masks(self) -> torch.Tensor:
        """The fixed evaluation masks: the same every epoch and in every run with this config."""
        s = self.cfg.search
        gen = torch.Generator().manual_seed(s.seed + 3)
        n = self.data.eval_images.shape[0]
        return self._mask(n, s.eval_patch_size, s.eval_mask_ratio, generator=gen)

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """Masked loss and PSNR on the fixed evaluation images with the fixed masks.

        BatchNorm stays in training mode (batch statistics), as in every search step:
        the search-time BN is non-affine and its running statistics are never used.
        """
        images, masks = self.data.eval_images, self.eval_masks()
        bs = self.cfg.search.batch_size
        total_loss = torch.zeros((), device=self.device)
        total_psnr = torch.zeros((), device=self.device)
        chunks = 0
        for i in range(0, images.shape[0], bs):
            x, m = images[i : i + bs], masks[i : i + bs]
            loss, pred = self._loss(x, m)
            total_loss += loss
            total_psnr += masked_psnr(
                self.in_image_space(pred, x, m), x, m, self.data.mean, self.data.std
            )
            chunks += 1
        return float(total_loss / chunks), float(total_psnr / chunks)

    @torch.no_grad()
    def reconstruction_rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """8 held-out images, masked (this search's ratio and patch size, a fixed seed)
        and reconstructed, in normalised space."""
        s = self.cfg.search
        x = self.data.eval_images[:8]
        mask = self._mask(x.shape[0], generator=torch.Generator().manual_seed(s.seed + 3))
        with self.autocast():
            pred = self.in_image_space(self.model(x, mask), x, mask)
        return x, apply_mask(x, mask, s.patch_size), pred

    def reconstruction_image(self) -> torch.Tensor:
        """:meth:`reconstruction_rows` as one image (3, H, W) in [0, 1], a row each."""
        from maenas_ray import viz

        mean, std = self.data.mean.tolist(), self.data.std.tolist()
        return viz.reconstruction_tensor(*self.reconstruction_rows(), mean, std)

    @torch.no_grad()
    def write_artifacts(self, out_dir: Path) -> None:
        """``genotype.json``, the reconstruction grid (8 held-out images under masks of
        the search's own ratio and patch size, drawn from a fixed seed), the α heatmaps and
        the cell drawings."""
        from maenas_ray import viz

        out_dir.mkdir(parents=True, exist_ok=True)
        genotype = self.encoder.genotype()
        (out_dir / "genotype.json").write_text(genotype.to_json(indent=2) + "\n")
        s = self.cfg.search
        mean, std = self.data.mean.tolist(), self.data.std.tolist()
        viz.save_reconstruction_grid(
            out_dir / "reconstruction.png", *self.reconstruction_rows(), mean, std,
            title=f"epoch {self.epoch}: original / masked / reconstruction (held-out "
            f"images; this search's masks: ratio {s.mask_ratio:g}, patch {s.patch_size})",
        )  # fmt: skip
        viz.save_alpha_heatmaps(
            out_dir / "alphas.png",
            self.alphas[0],
            self.alphas[1],
            title=f"α after epoch {self.epoch}",
        )
        viz.save_cell_drawings(out_dir / "cells.png", genotype, title="derived cells")


def _cpu_copy(tree: Any) -> Any:
    """A deep copy of a (nested) state with every tensor copied to the CPU."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {k: _cpu_copy(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(_cpu_copy(v) for v in tree)
    return copy.deepcopy(tree)


def run_search(
    config: Config,
    callbacks: SearchCallback | Iterable[SearchCallback] | None = None,
    *,
    resume_from: str | Path | dict[str, Any] | None = None,
    out_dir: str | Path | None = None,
    dataset: ImageDataset | None = None,
) -> SearchResult:
    """Run one MAE-DARTS search to ``config.search.epochs``.

    ``callbacks`` get an :class:`EpochReport` after each epoch (metrics, genotype and a
    ``save_checkpoint(dir)`` hook). With ``search.early_stop`` the search may end before
    the last epoch (its last metrics say ``stopped_early``). ``resume_from`` (a checkpoint
    file or directory, or a loaded state) continues a search. With ``out_dir`` the final
    ``genotype.json`` and the pictures (reconstruction grid, α heatmaps, cell drawings) are
    written there.
    ``dataset`` replaces the configured dataset (tests).
    """
    if callbacks is None:
        callbacks = []
    elif isinstance(callbacks, SearchCallback):
        callbacks = [callbacks]
    callbacks = list(callbacks)
    search = SearchLoop(config, dataset)
    if resume_from is not None:
        state = resume_from if isinstance(resume_from, dict) else load_search_state(resume_from)
        search.restore(state)
    epochs = config.search.epochs
    retries, factor = config.search.nan_retries, config.search.nan_lr_factor
    # the state at the last epoch's end, on the CPU, restored from a copy: the optimisers
    # keep using the tensors they are restored from
    snapshot = _cpu_copy(search.state()) if retries else None
    scale = 1.0  # of the learning rates, since the snapshot
    while search.epoch < epochs and not search.stopped:
        try:
            metrics = search.run_epoch()
            if not all(math.isfinite(v) for v in metrics.values() if isinstance(v, float)):
                raise FloatingPointError(
                    f"non-finite metrics after epoch {search.epoch}: {metrics}"
                )
        except FloatingPointError as err:
            if snapshot is None or retries == 0:
                raise
            retries, scale = retries - 1, scale * factor
            search.restore(copy.deepcopy(snapshot))
            search.scale_lr(scale)
            warnings.warn(
                f"{err}; retrying from epoch {search.epoch} with the learning rates times "
                f"{factor:g} (weights now {search.scheduler.get_last_lr()[0]:.3g}; "
                f"{retries} retries left)",
                stacklevel=2,
            )
            continue
        if snapshot is not None:
            snapshot, scale = _cpu_copy(search.state()), 1.0
        report = EpochReport(
            search.epoch, epochs, metrics, search.encoder.genotype(), search.state,
            save_search_state, search.reconstruction_image,
        )  # fmt: skip
        for cb in callbacks:
            cb.on_epoch_end(report)
    if out_dir is not None:
        search.write_artifacts(Path(out_dir))
    final = search.history[-1] if search.history else {}
    return SearchResult(
        genotype=search.encoder.genotype(),
        metrics=final,
        history=list(search.history),
        alphas_normal=search.alphas[0].detach().cpu().clone(),
        alphas_reduce=search.alphas[1].detach().cpu().clone(),
    )
