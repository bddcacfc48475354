"""Search space: DARTS primitives, cells, supernet, genotypes and derived networks (pure torch)."""

from maenas_ray.space.complexity import count_macs
from maenas_ray.space.genotype import (
    DEFAULT_CONCAT,
    NODES,
    NUM_EDGES,
    PUBLISHED,
    Genotype,
    derive_genotype,
)
from maenas_ray.space.networks import KNOWN_DATASETS, EvalNetwork, build_network, count_parameters
from maenas_ray.space.ops import NONE_OP, OPS, PRIMITIVES, build_op
from maenas_ray.space.supernet import Supernet

__all__ = [
    "DEFAULT_CONCAT",
    "KNOWN_DATASETS",
    "NODES",
    "NONE_OP",
    "NUM_EDGES",
    "OPS",
    "PRIMITIVES",
    "PUBLISHED",
    "EvalNetwork",
    "Genotype",
    "Supernet",
    "build_network",
    "build_op",
    "count_macs",
    "count_parameters",
    "derive_genotype",
]
