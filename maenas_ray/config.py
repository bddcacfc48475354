"""The typed config tree and its generic loader: YAML in, validated dataclasses out.

Every error is a :class:`ConfigError` naming the key, the bad value and what is allowed.
Defaults live here and nowhere else; the defaults that depend on other keys (the
evaluation masks) are resolved when a config is built, so every reader sees values.

This module knows the schema and the structural checks only. Names picked from a
registry are checked next to the registry (``maenas_ray.data.check_dataset``,
``maenas_ray.engines.check_objective``; both: ``maenas_ray.engines.check_registered``),
and what only a sweep needs in ``maenas_ray.sweep_space``: the command lines call those
after :func:`load_config`, before any work starts. It imports nothing from the data,
engines or orchestration layers, which all import it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config value is invalid; the message names the key, the value and what is allowed."""


def fail(key: str, value: Any, allowed: str) -> typing.NoReturn:
    """Raise the :class:`ConfigError` ``"<key> = <value>: <allowed>"``."""
    raise ConfigError(f"{key} = {value!r}: {allowed}")


def suggest(value: Any, names: Iterable[Any]) -> str:
    """``"; did you mean 'mask_ratio'?"`` when ``value`` is close to one of ``names``."""
    names = [str(n) for n in names]
    close = difflib.get_close_matches(str(value), names, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def not_one_of(key: str, value: Any, names: Iterable[Any]) -> typing.NoReturn:
    """Raise the :class:`ConfigError` of a ``value`` that is none of ``names`` (a
    registry's keys), listing them with a ``did you mean`` when one is close."""
    names = list(names)
    fail(key, value, f"allowed: {', '.join(map(str, names))}{suggest(value, names)}")


#: Search keys whose null means "the value of that other search key": the evaluation masks
#: default to the search's own. Resolved when a :class:`SearchConfig` is built (so at load),
#: and in a saved config dict by :func:`resolve_defaults`.
EVAL_MASK_DEFAULTS = {"eval_mask_ratio": "mask_ratio", "eval_patch_size": "patch_size"}


@dataclass
class DataConfig:
    """``data`` section: where images come from and how they are fed."""

    #: a registered dataset: see ``maenas_ray.data.DATASETS``
    dataset: str = "synthetic"
    #: download/cache directory (cifar10/cifar100) or the class-folder root (imagefolder)
    root: str = "~/.cache/maenas_ray/data"
    #: download CIFAR when it is not under ``root`` (needs the network)
    download: bool = True
    #: side of the (square) images fed to the network
    image_size: int = 32
    #: synthetic only: number of training images and of classes
    num_images: int = 4096
    num_classes: int = 10
    #: seed of the synthetic images and of the W/A split
    seed: int = 0
    #: fraction of the training images used for weights (W-split); the rest drive α (A-split)
    train_portion: float = 0.5
    #: use only the first N training images (quick runs); null = all
    max_images: int | None = None
    #: device: whole dataset as uint8 on the device, augmentation on the device;
    #: workers: DataLoader workers; auto: device for in-memory datasets, workers otherwise
    loader: Literal["auto", "device", "workers"] = "auto"
    num_workers: int = 2
    #: random crop (with padding) and horizontal flip during search
    augment: bool = True

    def check(self) -> None:
        """The structural checks; the name against the registry: ``data.check_dataset``."""
        _positive("data.image_size", self.image_size)
        _positive("data.num_images", self.num_images)
        if self.num_classes < 2:
            fail("data.num_classes", self.num_classes, "must be >= 2")
        if not 0.0 < self.train_portion < 1.0:
            fail("data.train_portion", self.train_portion, "must be in (0, 1)")
        if self.max_images is not None:
            _positive("data.max_images", self.max_images)
        if self.num_workers < 0:
            fail("data.num_workers", self.num_workers, "must be >= 0")
        if self.dataset in ("cifar10", "cifar100") and self.image_size != 32:
            fail("data.image_size", self.image_size, f"{self.dataset} images are 32 pixels")
        if self.dataset == "imagefolder" and not Path(self.root).expanduser().is_dir():
            fail("data.root", self.root, "imagefolder needs an existing directory of class folders")


@dataclass
class SearchConfig:
    """``search`` section: the supernet, the masked autoencoder and the bi-level loop."""

    # supernet (docs/method.md §1.2)
    channels: int = 16
    layers: int = 8
    stem: Literal["cifar", "imagenet"] = "cifar"
    #: PC-DARTS: 1/K of each edge's channels go through its mixed op, with per-edge β
    #: (edge normalisation) as architecture weights; 1 = DARTS. Must divide ``channels``.
    partial_channels: int = 1
    # masked autoencoder (§1.1, §1.3)
    mask_ratio: float = 0.5
    patch_size: int = 4
    #: a registered decoder: see ``maenas_ray.mae.DECODERS``
    decoder: str = "hierarchical"
    decoder_width: int = 64
    decoder_depth: int = 1
    norm_pix_loss: bool = False
    # bi-level optimisation (§1.4, DARTS defaults)
    epochs: int = 50
    batch_size: int = 64
    #: cap on iterations per epoch (quick runs); null = one pass over the smaller split
    steps_per_epoch: int | None = None
    lr: float = 0.025
    lr_min: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: float = 5.0
    arch_lr: float = 3e-4
    arch_betas: tuple[float, float] = (0.5, 0.999)
    arch_weight_decay: float = 1e-3
    #: on a non-finite loss, go back to the end of the last epoch (the last checkpoint)
    #: and retry with both learning rates times ``nan_lr_factor``, at most this many times;
    #: 0 = the search stops with an error naming the epoch and step
    nan_retries: int = 0
    nan_lr_factor: float = 0.1
    #: second-order DARTS (unrolled step + finite-difference Hessian-vector product);
    #: always computed in full fp32 (no autocast, no TF32), whatever ``precision`` says
    unrolled: bool = False
    #: the dominant eigenvalue of the Hessian of the A-split loss with respect to α
    #: (RobustDARTS' collapse signal, metric ``hessian_eigenvalue``), measured at the end of
    #: every N-th epoch on fixed A-split images and masks; 0 = off
    hessian_every: int = 1
    #: power-iteration steps of one measurement (its cost: about this many double-backward
    #: passes over one batch)
    hessian_iters: int = 20
    #: DARTS-ES: stop when the eigenvalue's mean over the last ``early_stop_window`` epochs
    #: grew by more than 1 / ``early_stop_ratio`` over the window before (needs
    #: hessian_every > 0); the result is then the architecture of ``window`` epochs earlier
    early_stop: bool = False
    early_stop_window: int = 5
    early_stop_ratio: float = 0.75
    # evaluation at the end of each epoch: fixed images, fixed masks, so runs compare
    eval_images: int = 256
    #: mask ratio / patch size of the evaluation masks; null = the search's own, resolved
    #: when the config is built (:data:`EVAL_MASK_DEFAULTS`): a sweep's trials, which may
    #: tune the masking, all evaluate with the masks of the sweep's own config
    eval_mask_ratio: float | None = None
    eval_patch_size: int | None = None
    # runtime
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: the weight step, the first-order α gradient and the evaluation: auto = bf16
    #: autocast on CUDA, fp32 on CPU. The second-order α gradient and the Hessian
    #: eigenvalue always run in full fp32 with TF32 off (docs/performance.md: bf16 and the
    #: α gradient)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        for key, own in EVAL_MASK_DEFAULTS.items():
            if getattr(self, key) is None:
                setattr(self, key, getattr(self, own))

    def check(self) -> None:
        from maenas_ray.mae import DECODERS
        from maenas_ray.space.partial import partial_channels_problem

        _positive("search.channels", self.channels)
        if self.layers < 3:
            fail("search.layers", self.layers, "must be >= 3 (one cell per resolution)")
        problem = partial_channels_problem(self.channels, self.partial_channels)
        if problem is not None:
            fail("search.partial_channels", self.partial_channels, problem)
        for key in ("mask_ratio", "eval_mask_ratio"):
            value = getattr(self, key)
            if not 0.0 < value < 1.0:
                fail(f"search.{key}", value, "must be in (0, 1)")
        _positive("search.patch_size", self.patch_size)
        _positive("search.eval_patch_size", self.eval_patch_size)
        if self.decoder not in DECODERS:
            not_one_of("search.decoder", self.decoder, DECODERS)
        _positive("search.decoder_width", self.decoder_width)
        if self.decoder_depth < 1:
            fail("search.decoder_depth", self.decoder_depth, "must be >= 1")
        _positive("search.epochs", self.epochs)
        _positive("search.batch_size", self.batch_size)
        if self.steps_per_epoch is not None:
            _positive("search.steps_per_epoch", self.steps_per_epoch)
        for key in ("lr", "arch_lr", "grad_clip"):
            if getattr(self, key) <= 0:
                fail(f"search.{key}", getattr(self, key), "must be > 0")
        for key in ("lr_min", "weight_decay", "arch_weight_decay"):
            if getattr(self, key) < 0:
                fail(f"search.{key}", getattr(self, key), "must be >= 0")
        if self.lr_min > self.lr:
            fail("search.lr_min", self.lr_min, f"must be <= search.lr ({self.lr})")
        if not 0.0 <= self.momentum < 1.0:
            fail("search.momentum", self.momentum, "must be in [0, 1)")
        if not all(0.0 <= b < 1.0 for b in self.arch_betas):
            fail("search.arch_betas", list(self.arch_betas), "both must be in [0, 1)")
        _positive("search.eval_images", self.eval_images)
        if self.nan_retries < 0:
            fail("search.nan_retries", self.nan_retries, "must be >= 0")
        if not 0.0 < self.nan_lr_factor < 1.0:
            fail("search.nan_lr_factor", self.nan_lr_factor, "must be in (0, 1)")
        if self.hessian_every < 0:
            fail("search.hessian_every", self.hessian_every, "must be >= 0 (epochs; 0 = off)")
        _positive("search.hessian_iters", self.hessian_iters)
        if self.early_stop_window < 1:
            fail("search.early_stop_window", self.early_stop_window, "must be >= 1 (epochs)")
        if not 0.0 < self.early_stop_ratio < 1.0:
            fail("search.early_stop_ratio", self.early_stop_ratio, "must be in (0, 1)")
        if self.early_stop and self.hessian_every == 0:
            fail("search.early_stop", True, "needs the eigenvalue: set search.hessian_every >= 1")


@dataclass
class RetrainConfig:
    """``retrain`` section: supervised training of a derived genotype (docs/method.md §1.6).

    The defaults are the CIFAR protocol; ``tune_configs/retrain_imagenet.yaml`` holds the
    ImageNet one. Labels are read here and only here.
    """

    #: network size; null = the protocol's (CIFAR: C=36, 20 cells; ImageNet: C=48, 14)
    channels: int | None = None
    layers: int | None = None
    #: auxiliary classifier at 2/3 depth and its loss weight
    auxiliary: bool = True
    auxiliary_weight: float = 0.4
    #: drop-path probability, ramped linearly from 0 to this over the epochs
    drop_path: float = 0.2
    epochs: int = 600
    #: global batch (split over the Ray Train workers)
    batch_size: int = 96
    #: cap on iterations per epoch (quick runs); null = one pass over the training images
    steps_per_epoch: int | None = None
    lr: float = 0.025
    #: cosine to lr_min over the epochs, or exponential (lr_decay per epoch, ImageNet)
    lr_schedule: Literal["cosine", "exponential"] = "cosine"
    lr_min: float = 0.0
    lr_decay: float = 0.97
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: float = 5.0
    label_smoothing: float = 0.0
    #: side of the cutout square (CIFAR: 16); 0 = no cutout
    cutout: int = 16
    #: held-out images evaluated per epoch; null = all
    eval_images: int | None = None
    # Ray Train workers (data parallel; DDP over NCCL on GPUs, gloo on CPUs)
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    # the proxy retrain of a sweep trial (objective.metric: proxy_top1): a short run of a
    # smaller network
    proxy_epochs: int = 10
    proxy_channels: int = 16
    proxy_layers: int = 8
    #: the proxy is scored on this last part of the training images, not on the test set
    proxy_val_fraction: float = 0.1
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    seed: int = 0

    def check(self) -> None:
        for key in ("channels", "layers"):
            if getattr(self, key) is not None:
                _positive(f"retrain.{key}", getattr(self, key))
        if self.layers is not None and self.layers < 3:
            fail("retrain.layers", self.layers, "must be >= 3 (two reduction cells)")
        if self.auxiliary_weight < 0:
            fail("retrain.auxiliary_weight", self.auxiliary_weight, "must be >= 0")
        if not 0.0 <= self.drop_path < 1.0:
            fail("retrain.drop_path", self.drop_path, "must be in [0, 1)")
        for key in ("epochs", "batch_size", "num_workers", "proxy_epochs", "proxy_channels"):
            _positive(f"retrain.{key}", getattr(self, key))
        if self.proxy_layers < 3:
            fail("retrain.proxy_layers", self.proxy_layers, "must be >= 3")
        for key in ("steps_per_epoch", "eval_images"):
            if getattr(self, key) is not None:
                _positive(f"retrain.{key}", getattr(self, key))
        for key in ("lr", "grad_clip", "cpus_per_worker"):
            if getattr(self, key) <= 0:
                fail(f"retrain.{key}", getattr(self, key), "must be > 0")
        for key in ("lr_min", "weight_decay"):
            if getattr(self, key) < 0:
                fail(f"retrain.{key}", getattr(self, key), "must be >= 0")
        if self.lr_min > self.lr:
            fail("retrain.lr_min", self.lr_min, f"must be <= retrain.lr ({self.lr})")
        if not 0.0 < self.lr_decay <= 1.0:
            fail("retrain.lr_decay", self.lr_decay, "must be in (0, 1]")
        if not 0.0 <= self.momentum < 1.0:
            fail("retrain.momentum", self.momentum, "must be in [0, 1)")
        if not 0.0 <= self.label_smoothing < 1.0:
            fail("retrain.label_smoothing", self.label_smoothing, "must be in [0, 1)")
        if self.cutout < 0:
            fail("retrain.cutout", self.cutout, "must be >= 0 (0 = off)")
        if not 0.0 < self.proxy_val_fraction < 1.0:
            fail("retrain.proxy_val_fraction", self.proxy_val_fraction, "must be in (0, 1)")
        if self.eval_images is not None and self.eval_images < self.num_workers:
            fail(
                "retrain.eval_images",
                self.eval_images,
                f"must be >= retrain.num_workers ({self.num_workers}): one per worker at least",
            )
        if self.batch_size % self.num_workers:
            fail(
                "retrain.batch_size",
                self.batch_size,
                f"must be divisible by retrain.num_workers ({self.num_workers})",
            )


@dataclass
class ParamSpec:
    """One tuned key of the ``space`` section: a range (``low``, ``high``) or a ``choice``."""

    low: float | None = None
    high: float | None = None
    #: sample on a log scale (ranges with low > 0)
    log: bool = False
    #: quantisation of a range (e.g. 0.05 for mask ratios, 2 for ints)
    step: float | None = None
    #: the values to choose from (instead of low/high)
    choice: list[Any] | None = None


@dataclass
class TuneSection:
    """``tune`` section: the Ray Tune experiment around the searches."""

    #: number of trials (each one full MAE-DARTS search)
    num_samples: int = 8
    #: trials running at once; null = as many as the cluster's GPUs (or CPUs) allow
    max_concurrent_trials: int | None = None
    #: resources of one trial (all its Ray Train workers together)
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    #: Ray Train workers per trial (data parallel); null = one per GPU, at least one
    num_workers: int | None = None
    #: Optuna sampler of the outer loop; grid runs every combination of the space's
    #: choices once (num_samples = the number of combinations)
    sampler: Literal["tpe", "random", "qmc", "gp", "grid"] = "tpe"
    #: fifo runs every trial to the end; asha stops poor trials early (per epoch)
    scheduler: Literal["fifo", "asha"] = "fifo"
    #: asha: epochs before a trial may be stopped, and the halving rate
    grace_period: int = 1
    reduction_factor: float = 2.0
    #: seed of the Optuna sampler
    seed: int = 0
    #: restarts of a failed trial (from its last checkpoint)
    max_failures: int = 2
    #: checkpoints kept per trial
    checkpoints_to_keep: int = 2
    #: Optuna storage URL (e.g. postgresql://...); null = a journal file in the experiment
    #: directory when storage_path is a local or NFS path, in memory otherwise
    study_storage: str | None = None

    def workers(self) -> int:
        """Ray Train workers of one trial."""
        if self.num_workers is not None:
            return self.num_workers
        return max(1, int(self.gpus_per_trial))

    def check(self) -> None:
        _positive("tune.num_samples", self.num_samples)
        if self.max_concurrent_trials is not None:
            _positive("tune.max_concurrent_trials", self.max_concurrent_trials)
        if self.cpus_per_trial <= 0:
            fail("tune.cpus_per_trial", self.cpus_per_trial, "must be > 0")
        g = self.gpus_per_trial
        if g < 0 or (g > 1 and g != int(g)):
            fail("tune.gpus_per_trial", g, "must be 0, a fraction below 1, or a whole number")
        if self.num_workers is not None:
            _positive("tune.num_workers", self.num_workers)
            if g >= 1 and self.num_workers > g:
                fail(
                    "tune.num_workers",
                    self.num_workers,
                    f"at most one worker per GPU (tune.gpus_per_trial = {g:g})",
                )
        _positive("tune.grace_period", self.grace_period)
        if self.reduction_factor <= 1:
            fail("tune.reduction_factor", self.reduction_factor, "must be > 1")
        if self.max_failures < 0:
            fail("tune.max_failures", self.max_failures, "must be >= 0")
        _positive("tune.checkpoints_to_keep", self.checkpoints_to_keep)
        if self.study_storage is not None and "://" not in self.study_storage:
            fail(
                "tune.study_storage",
                self.study_storage,
                "an Optuna storage URL such as postgresql://user@host/db or sqlite:///study.db",
            )


@dataclass
class ObjectiveSection:
    """``objective`` section: what the outer loop optimises."""

    #: a final trial metric: see ``maenas_ray.engines.OBJECTIVES`` (checked there,
    #: ``check_objective``, with the mode). proxy_top1: held-out
    #: top-1 of a short proxy retrain of each trial's genotype (uses the labels; the
    #: retrain section's proxy_* keys); eval_loss: the label-free masked reconstruction
    #: loss with fixed reference masks
    metric: str = "proxy_top1"
    #: null = the metric's natural direction (min for losses, max for PSNR and accuracy);
    #: given, it must agree with it (a loss is never maximised); ``engines.objective_mode``
    mode: Literal["min", "max"] | None = None


def _default_space() -> dict[str, ParamSpec]:
    return {
        "mask_ratio": ParamSpec(low=0.3, high=0.8),
        "patch_size": ParamSpec(choice=[2, 4, 8]),
        "decoder_depth": ParamSpec(low=1, high=3),
    }


@dataclass
class Config:
    """The root of the config tree.

    ``data`` and ``search`` describe one search; ``tune``, ``space``, ``objective``,
    ``storage_path`` and ``name`` describe a sweep of them (``python -m maenas_ray.sweep``).
    """

    data: DataConfig = field(default_factory=DataConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)
    tune: TuneSection = field(default_factory=TuneSection)
    #: search keys the outer loop tunes, each a range or a choice
    space: dict[str, ParamSpec] = field(default_factory=_default_space)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    #: where experiments live: a local or NFS directory, s3://bucket/path or gs://bucket/path
    storage_path: str = "~/maenas_ray_results"
    #: experiment name (a directory under storage_path); null = <config name>-<date-time>
    name: str | None = None

    def check(self) -> None:
        """The structural checks of every section (what a search needs of them).

        The registered names are checked by ``engines.check_registered``, a sweep by
        ``sweep_space.check_sweep``, a search's data by :meth:`check_search_splits` and a
        retrain run by :meth:`check_retrain`."""
        self.data.check()
        self.search.check()
        self.retrain.check()
        self.tune.check()
        self._check_search()

    def known_size(self) -> tuple[str, int] | None:
        """The number of training images when the config gives it (the synthetic dataset,
        or any capped by data.max_images), with the key that sets it; None otherwise."""
        d = self.data
        if d.max_images is not None and (d.dataset != "synthetic" or d.max_images < d.num_images):
            return "data.max_images", d.max_images
        return ("data.num_images", d.num_images) if d.dataset == "synthetic" else None

    def check_search_splits(self) -> None:
        """The W- and A-split each hold a search batch (found here, not inside a trial)."""
        known = self.known_size()
        if known is None:
            return  # known only once the dataset is read
        key, n = known
        w = int(n * self.data.train_portion)
        for split, size in (("W", w), ("A", n - w)):
            if size < self.search.batch_size:
                fail(
                    key, n, f"the {split}-split would hold {size} images (data.train_portion "
                    f"{self.data.train_portion}), fewer than search.batch_size "
                    f"({self.search.batch_size})",
                )  # fmt: skip

    def check_retrain(self) -> None:
        """The checks of a retrain run (``python -m maenas_ray.retrain``) on top of
        :meth:`check`: the batch splits over the workers and the network fits the images."""
        r = self.retrain
        if r.batch_size % r.num_workers:
            fail(
                "retrain.batch_size",
                r.batch_size,
                f"must be divisible by retrain.num_workers ({r.num_workers})",
            )
        known = self.known_size()
        if known is not None and known[1] < r.batch_size:
            fail(
                known[0], known[1], f"the retrain would train on {known[1]} images, fewer "
                f"than retrain.batch_size ({r.batch_size})",
            )  # fmt: skip
        self.check_network(proxy=False)

    def check_network(self, proxy: bool) -> None:
        """The retrain (or, ``proxy``, a sweep trial's proxy) network can be built at this
        image size (its auxiliary head needs room), as the retrain engine builds it."""
        from maenas_ray.space import PUBLISHED, build_network
        from maenas_ray.space.networks import KNOWN_DATASETS

        r, d = self.retrain, self.data
        known = d.dataset in KNOWN_DATASETS
        auxiliary = r.auxiliary and r.auxiliary_weight > 0
        what = "the proxy network" if proxy else "the retrain network"
        try:
            build_network(
                PUBLISHED["DARTS_V2"], d.dataset if known else "custom",
                channels=r.proxy_channels if proxy else r.channels,
                layers=r.proxy_layers if proxy else r.layers, auxiliary=auxiliary,
                num_classes=None if known else 2, image_size=None if known else d.image_size,
            )  # fmt: skip
        except ValueError as err:
            if auxiliary and "auxiliary" in str(err):
                fail(
                    "retrain.auxiliary",
                    r.auxiliary,
                    f"{what} at data.image_size {d.image_size}: {err}; "
                    "set retrain.auxiliary: false",
                )
            fail("data.image_size", d.image_size, f"{what}: {err}")

    def _check_search(self) -> None:
        from maenas_ray.mae import num_masked

        size = self.data.image_size
        s = self.search
        for ratio_key, patch_key in (
            ("mask_ratio", "patch_size"),
            ("eval_mask_ratio", "eval_patch_size"),
        ):
            ratio, patch = getattr(s, ratio_key), getattr(s, patch_key)
            if size % patch:
                fail(
                    f"search.{patch_key}",
                    patch,
                    f"must divide data.image_size ({size}); divisors: {_divisors(size)}",
                )
            patches = (size // patch) ** 2
            masked = num_masked(size, size, patch, ratio)
            if not 0 < masked < patches:
                fail(
                    f"search.{ratio_key}",
                    ratio,
                    f"masks {masked} of the {patches} patches of size {patch}; "
                    "at least one patch must be masked and one visible",
                )
        stride = 8 if s.stem == "imagenet" else 1
        if size % (stride * 4):
            fail("data.image_size", size, f"must be a multiple of {stride * 4} for stem {s.stem!r}")

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def numeric_type(tp: Any) -> type | None:
    """``int`` or ``float`` for a numeric field type (optional or not), else None."""
    args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    return args[0] if len(args) == 1 and args[0] in (int, float) else None


def _positive(key: str, value: Any) -> None:
    if value < 1:
        fail(key, value, "must be a positive integer")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {len(typing.get_args(tp))} numbers"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, str(tp)
    )


def coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is Any:
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        fail(key, value, "expected a number, a string, true or false")
    if origin is dict:
        _, inner = typing.get_args(tp)
        if not isinstance(value, Mapping):
            fail(key, value, "expected a mapping of keys to values")
        return {str(k): coerce(inner, v, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            fail(key, value, "expected a list")
        return [coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return coerce(inner, value, key)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        choices = typing.get_args(tp)
        fail(key, value, f"expected {_type_name(tp)}{suggest(value, choices)}")
    elif origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(
                coerce(a, v, f"{key}[{i}]")
                for i, (a, v) in enumerate(zip(args, value, strict=True))
            )
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                fail(key, value, "expected a finite number")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a field type this loader does not know
        raise TypeError(f"config field {key} has unsupported type {tp}")
    fail(key, value, f"expected {_type_name(tp)}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        fail(prefix or "config", data, "expected a mapping of keys to values")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            full = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(
                f"unknown key {full!r}; allowed keys here: {', '.join(names)}{suggest(key, names)}"
            )
    kwargs = {
        name: coerce(hints[name], data[name], f"{prefix}.{name}" if prefix else name)
        for name in names
        if name in data
    }
    return cls(**kwargs)


def yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error on one line: where, and what (PyYAML's own text spans several)."""
    if isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
        mark = err.problem_mark
        context = f" ({err.context})" if err.context else ""
        return f"line {mark.line + 1}, column {mark.column + 1}: {err.problem}{context}"
    return " ".join(str(err).split())


def parse_override(item: str) -> tuple[str, Any]:
    """``"search.mask_ratio=0.6"`` -> ``("search.mask_ratio", 0.6)``; the value is YAML."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. search.mask_ratio=0.6")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(
            f"--set {item!r}: the value is not valid YAML ({yaml_problem(err)})"
        ) from None
    return key.strip(), value


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested dict as one level of dotted keys: ``{"search": {"lr": 0.1}}`` ->
    ``{"search.lr": 0.1}`` (each key after ``prefix``)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` (not modified) with the nested keys of ``update`` set, e.g. a sweep's
    config with a trial's tuned ``{"search": {"mask_ratio": 0.6}}``."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def resolve_defaults(data: Mapping[str, Any]) -> dict[str, Any]:
    """A plain config dict with the defaults that building a config resolves
    (:data:`EVAL_MASK_DEFAULTS`) set: a config saved before they were resolved at load
    (a checkpoint's, with null evaluation masks) compares equal to the ``to_dict()`` of the
    same config loaded now."""
    search = data.get("search")
    if not isinstance(search, Mapping):
        return dict(data)
    own = {k: search.get(v) for k, v in EVAL_MASK_DEFAULTS.items() if search.get(k) is None}
    return merge(data, {"search": {k: v for k, v in own.items() if v is not None}})


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Set dotted keys in a nested dict (a copy); unknown keys are caught when it is built."""
    data = _to_plain(dict(data))
    for item in overrides:
        key, value = parse_override(item)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def config_from_dict(data: Mapping[str, Any] | None, overrides: Iterable[str] = ()) -> Config:
    """Build the config tree from plain data (e.g. parsed YAML) with ``--set`` items
    applied, and run its structural checks (:meth:`Config.check`).

    Entry points check on top: ``engines.check_registered`` (a search or retrain),
    ``sweep_space.check_sweep`` (a sweep), :meth:`Config.check_retrain` (a retrain).
    """
    cfg = _build(Config, apply_overrides(dict(data or {}), overrides), "")
    cfg.check()
    return cfg


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Load a YAML config file (or the defaults when ``path`` is None), apply ``--set``
    items and check it as :func:`config_from_dict` does."""
    data: Any = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text())
        except UnicodeDecodeError:
            raise ConfigError(f"config file {str(path)!r} is not a text (UTF-8) file") from None
        except yaml.YAMLError as err:
            raise ConfigError(
                f"config file {str(path)!r} is not valid YAML: {yaml_problem(err)}"
            ) from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r}: expected a mapping at the top level")
    return config_from_dict(data, overrides)
