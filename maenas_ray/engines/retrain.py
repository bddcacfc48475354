"""Supervised retraining of a derived genotype (docs/method.md §1.6): pure torch, no Ray.

``run_retrain(config, genotype, callbacks)`` trains the evaluation network of the
genotype with the ``retrain`` recipe: SGD with momentum, cosine or exponential learning
rate, cutout, drop path ramped linearly over the epochs, auxiliary head, label smoothing,
gradient clipping. After every epoch it measures top-1 / top-5 on the held-out split and
hands the metrics and a checkpoint hook to the callbacks; ``resume_from`` continues a run.

Data parallel: when ``torch.distributed`` is initialised, the model is wrapped by
``prepare_model`` (Ray Train's ``prepare_model``; ``DistributedDataParallel`` by default)
and each rank takes its share of every global batch and of the held-out set.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from maenas_ray.config import Config
from maenas_ray.data.datasets import ImageDataset
from maenas_ray.data.labelled import RetrainData, retrain_data
from maenas_ray.engines.common import (
    CheckpointMismatchError,
    EpochReport,
    SearchCallback,
    autocast_for,
    config_changes,
    rank_and_world,
    resolve_device,
)
from maenas_ray.engines.state import load_state, save_state
from maenas_ray.space import Genotype, build_network, count_macs, count_parameters
from maenas_ray.space.networks import KNOWN_DATASETS

RETRAIN_FILE = "retrain_state.pt"
RETRAIN_FORMAT = "maenas-retrain-v1"


@dataclass(frozen=True)
class RetrainPlan:
    """The network and schedule of one retraining: the full protocol or the proxy."""

    channels: int | None
    layers: int | None
    epochs: int

    @classmethod
    def of(cls, cfg: Config, proxy: bool) -> RetrainPlan:
        r = cfg.retrain
        if proxy:
            return cls(r.proxy_channels, r.proxy_layers, r.proxy_epochs)
        return cls(r.channels, r.layers, r.epochs)


def build_retrain_network(cfg: Config, genotype: Genotype, plan: RetrainPlan, num_classes: int):
    """The evaluation network of ``genotype`` for the configured data and plan."""
    r, data = cfg.retrain, cfg.data
    known = KNOWN_DATASETS.get(data.dataset)
    try:
        return build_network(
            genotype,
            data.dataset if known else "custom",
            channels=plan.channels,
            layers=plan.layers,
            auxiliary=r.auxiliary and r.auxiliary_weight > 0,  # DDP: no unused head
            drop_path=r.drop_path,
            num_classes=None if known else num_classes,
            image_size=None if known else data.image_size,
        )
    except ValueError as err:
        raise ValueError(f"retrain: {err} (retrain.auxiliary = false)") from None


#: What a retrain checkpoint holds (``_Retrain.state``).
STATE_KEYS = ("epoch", "epochs", "config", "genotype", "model", "optimizer", "scheduler", "rng",
              "history")  # fmt: skip


def load_retrain_state(path: str | Path) -> dict[str, Any]:
    """Load a retrain checkpoint file or a directory holding one (no pickled code)."""
    return load_state(path, RETRAIN_FILE, RETRAIN_FORMAT, "retrain", STATE_KEYS)


def save_retrain_state(state: dict[str, Any], directory: str | Path) -> Path:
    return save_state(state, directory, RETRAIN_FILE)


@dataclass
class RetrainResult:
    metrics: dict[str, Any]  # the last epoch's
    history: list[dict[str, Any]] = field(default_factory=list)
    parameters: int = 0  # without the auxiliary head
    macs: int = 0  # multiply-adds at the input size


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...]) -> torch.Tensor:
    """Number of samples whose label is among the top-k logits, for each k."""
    k_max = min(max(ks), logits.shape[1])
    top = logits.topk(k_max, dim=1).indices
    hit = top == labels[:, None]
    return torch.stack([hit[:, : min(k, k_max)].any(dim=1).sum() for k in ks])


def _sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    if rank_and_world()[1] > 1:
        dist.all_reduce(t)
    return t


class _Retrain:
    def __init__(
        self,
        cfg: Config,
        genotype: Genotype,
        proxy: bool,
        datasets: tuple[ImageDataset, ImageDataset] | None,
        prepare_model: Callable[[nn.Module], nn.Module] | None,
    ) -> None:
        r = cfg.retrain
        self.cfg, self.genotype, self.plan = cfg, genotype, RetrainPlan.of(cfg, proxy)
        self.device = resolve_device(r.device)
        self.autocast = autocast_for(self.device, r.precision)
        self.rank, self.world = rank_and_world()
        if r.batch_size % self.world:
            raise ValueError(
                f"retrain.batch_size = {r.batch_size} must be divisible by the {self.world} "
                "data-parallel workers"
            )
        self.data_gen = torch.Generator().manual_seed(r.seed + 1)
        self.data: RetrainData = retrain_data(
            cfg.data, r.batch_size, self.device, self.data_gen, cutout_size=r.cutout,
            eval_images=r.eval_images, shard=(self.rank, self.world), datasets=datasets,
            validation_fraction=r.proxy_val_fraction if proxy else 0.0,
        )  # fmt: skip
        torch.manual_seed(r.seed)
        self.net = build_retrain_network(cfg, genotype, self.plan, self.data.num_classes)
        self.parameters = count_parameters(self.net)
        self.macs = count_macs(self.net, cfg.data.image_size)
        self.net.to(self.device)
        if self.world > 1:
            if prepare_model is not None:
                self.model = prepare_model(self.net)
            else:
                ids = [self.device.index or 0] if self.device.type == "cuda" else None
                self.model = nn.parallel.DistributedDataParallel(self.net, device_ids=ids)
        else:
            self.model = self.net
        self.opt = torch.optim.SGD(
            self.net.parameters(), lr=r.lr, momentum=r.momentum, weight_decay=r.weight_decay
        )
        if r.lr_schedule == "cosine":
            self.scheduler: torch.optim.lr_scheduler.LRScheduler = (
                torch.optim.lr_scheduler.CosineAnnealingLR(
                    self.opt, T_max=self.plan.epochs, eta_min=r.lr_min
                )
            )
        else:
            self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.opt, gamma=r.lr_decay)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=r.label_smoothing)
        self.epoch = 0
        self.history: list[dict[str, Any]] = []

    def state(self) -> dict[str, Any]:
        return {
            "format": RETRAIN_FORMAT,
            "epoch": self.epoch,
            "epochs": self.plan.epochs,
            "config": self.cfg.to_dict(),
            "genotype": self.genotype.to_json(),
            "model": self.net.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "data": self.data_gen.get_state()},
            "history": json.dumps(self.history),
        }

    def restore(self, state: dict[str, Any]) -> None:
        changes = config_changes(state["config"], self.cfg.to_dict(), "retrain")
        if state.get("genotype") != self.genotype.to_json():
            changes.append("the genotype")
        if int(state.get("epochs", -1)) != self.plan.epochs:
            changes.append(f"epochs: {state.get('epochs')} -> {self.plan.epochs}")
        if changes:
            raise CheckpointMismatchError(
                "the retrain checkpoint was written for another run; changed: " + "; ".join(changes)
            )
        try:
            self.net.load_state_dict(state["model"])
            self.opt.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng"]["torch"])
            self.data_gen.set_state(state["rng"]["data"])
            self.epoch = int(state["epoch"])
            self.history = json.loads(state["history"])
        except (KeyError, RuntimeError, ValueError) as err:
            raise CheckpointMismatchError(f"the retrain checkpoint does not fit: {err}") from None

    def run_epoch(self) -> dict[str, Any]:
        r = self.cfg.retrain
        # drop-path masks (and worker-path augmentation) draw from the global RNGs: seeded
        # per epoch and rank, so ranks differ and a resumed run draws the same (CPU, CUDA)
        torch.manual_seed(r.seed + 1_000_003 * (self.epoch + 1) + 7919 * self.rank)
        self.net.drop_path_prob = r.drop_path * self.epoch / self.plan.epochs
        self.model.train()
        steps = len(self.data.train)
        if r.steps_per_epoch is not None:
            steps = min(steps, r.steps_per_epoch)
        lr = self.scheduler.get_last_lr()[0]
        sums = torch.zeros(3, device=self.device)  # loss * n, correct, n
        start = time.perf_counter()
        for _, (x, y) in zip(range(steps), self.data.train, strict=False):
            self.opt.zero_grad(set_to_none=True)
            with self.autocast():
                logits, logits_aux = self.model(x)
                loss = self.criterion(logits.float(), y)
                if logits_aux is not None and r.auxiliary_weight > 0:
                    loss = loss + r.auxiliary_weight * self.criterion(logits_aux.float(), y)
            loss.backward()
            nn.utils.clip_grad_norm_(self.net.parameters(), r.grad_clip)
            self.opt.step()
            with torch.no_grad():
                n = torch.tensor(float(y.shape[0]), device=self.device)
                correct = topk_correct(logits.detach(), y, (1,))[0].float()
                sums += torch.stack([loss.detach().float() * n, correct, n])
        _sum_over_ranks(sums)
        train_loss, train_correct, train_n = sums.tolist()  # the epoch's one host sync
        elapsed = time.perf_counter() - start
        if not math.isfinite(train_loss):
            raise FloatingPointError(
                f"non-finite training loss in retrain epoch {self.epoch + 1} (retrain.lr={r.lr})"
            )
        self.scheduler.step()
        self.epoch += 1
        held = self.evaluate()
        metrics = {
            "epoch": self.epoch,
            "train_loss": train_loss / train_n,
            "train_top1": train_correct / train_n,
            **held,
            "lr": lr,
            "drop_path": self.net.drop_path_prob,
            "steps": steps,
            "images_per_sec": train_n / elapsed,
            "epoch_time": elapsed,
            "parameters": self.parameters,
            "macs": self.macs,
            "held_out_images": self.data.held_out_images,
        }
        self.history.append(metrics)
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss, top-1 and top-5 on the held-out images (summed over the ranks)."""
        self.model.eval()
        sums = torch.zeros(4, device=self.device)  # loss * n, top1, top5, n
        for x, y in self.data.held_out:
            with self.autocast():
                logits, _ = self.model(x)
            logits = logits.float()
            n = float(y.shape[0])
            loss = nn.functional.cross_entropy(logits, y, reduction="sum")
            hits = topk_correct(logits, y, (1, 5)).float()
            sums += torch.stack([loss, hits[0], hits[1], torch.tensor(n, device=self.device)])
        _sum_over_ranks(sums)
        loss, top1, top5, n = sums.tolist()
        n = max(n, 1.0)
        return {"test_loss": loss / n, "top1": top1 / n, "top5": top5 / n}


def run_retrain(
    config: Config,
    genotype: Genotype,
    callbacks: SearchCallback | Iterable[SearchCallback] | None = None,
    *,
    proxy: bool = False,
    resume_from: str | Path | dict[str, Any] | None = None,
    datasets: tuple[ImageDataset, ImageDataset] | None = None,
    prepare_model: Callable[[nn.Module], nn.Module] | None = None,
) -> RetrainResult:
    """Train ``genotype``'s evaluation network with the ``retrain`` recipe.

    ``proxy=True`` trains the smaller proxy network for ``retrain.proxy_epochs`` (a sweep's
    objective). Callbacks get an :class:`EpochReport` after every epoch (metrics: epoch,
    train_loss, train_top1, test_loss, top1, top5, lr, drop_path, steps, images_per_sec,
    epoch_time, parameters, macs, held_out_images; ``save_checkpoint(dir)`` writes
    ``retrain_state.pt``). The proxy is scored on the last ``retrain.proxy_val_fraction``
    of the training images (held out from its training), never on the test split.
    ``datasets`` replaces the configured (train, held-out) datasets (tests).
    """
    if callbacks is None:
        callbacks = []
    elif isinstance(callbacks, SearchCallback):
        callbacks = [callbacks]
    callbacks = list(callbacks)
    run = _Retrain(config, genotype, proxy, datasets, prepare_model)
    if resume_from is not None:
        state = resume_from if isinstance(resume_from, dict) else load_retrain_state(resume_from)
        run.restore(state)
    while run.epoch < run.plan.epochs:
        metrics = run.run_epoch()
        report = EpochReport(
            run.epoch, run.plan.epochs, metrics, genotype, run.state, save_retrain_state
        )
        for cb in callbacks:
            cb.on_epoch_end(report)
    final = run.history[-1] if run.history else {}
    return RetrainResult(final, list(run.history), run.parameters, run.macs)
