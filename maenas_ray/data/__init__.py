"""Data: the dataset registry and the search batch streams (pure torch)."""

from maenas_ray.data.datasets import (
    DATASETS,
    FolderImages,
    ImageDataset,
    InMemoryImages,
    build_dataset,
    check_dataset,
    held_out_dataset,
    make_synthetic,
)
from maenas_ray.data.loaders import (
    DeviceBatches,
    SearchData,
    WorkerBatches,
    normalize,
    random_crop_flip,
    search_data,
)

__all__ = [
    "DATASETS",
    "DeviceBatches",
    "FolderImages",
    "ImageDataset",
    "InMemoryImages",
    "SearchData",
    "WorkerBatches",
    "build_dataset",
    "check_dataset",
    "held_out_dataset",
    "make_synthetic",
    "normalize",
    "random_crop_flip",
    "search_data",
]
