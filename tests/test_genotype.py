import json

import pytest
import torch

from maenas_ray.space import (
    NUM_EDGES,
    PRIMITIVES,
    PUBLISHED,
    Genotype,
    build_network,
    derive_genotype,
)
from maenas_ray.space.genotype import node_softmax

OPS_NO_NONE = [p for p in PRIMITIVES if p != "none"]


def _edge_rows(node: int) -> range:
    start = sum(2 + i for i in range(node))
    return range(start, start + node + 2)


def _reference_parse(alphas: torch.Tensor, betas=None) -> list[tuple[str, int]]:
    """DARTS' model_search.py `_parse`, written out independently on numpy arrays; with
    ``betas``, PC-DARTS' (each edge's op weights times the softmax of β over the node)."""
    weights = torch.softmax(alphas.double(), dim=-1).numpy()
    none = PRIMITIVES.index("none")
    gene, start, n = [], 0, 2
    for _ in range(4):
        w = weights[start : start + n].copy()
        if betas is not None:
            edge = torch.softmax(betas[start : start + n].double(), dim=0).numpy()
            for j in range(n):
                w[j, :] = w[j, :] * edge[j]
        edges = sorted(
            range(n), key=lambda x: -max(w[x][k] for k in range(len(w[x])) if k != none)
        )[:2]
        for j in edges:
            k_best = None
            for k in range(len(w[j])):
                if k != none and (k_best is None or w[j][k] > w[j][k_best]):
                    k_best = k
            gene.append((PRIMITIVES[k_best], j))
        start += n
        n += 1
    return gene


def test_published_darts_v2_is_the_design_reference():
    g = PUBLISHED["DARTS_V2"]
    assert g.normal == (
        ("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
        ("sep_conv_3x3", 1), ("skip_connect", 0), ("skip_connect", 0), ("dil_conv_3x3", 2),
    )  # fmt: skip
    assert g.reduce == (
        ("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 1),
        ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("max_pool_3x3", 1),
    )  # fmt: skip
    assert g.normal_concat == g.reduce_concat == (2, 3, 4, 5)
    assert {"DARTS_V1", "DARTS_V2"} <= set(PUBLISHED)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_json_round_trip(name):
    g = PUBLISHED[name]
    text = g.to_json()
    assert json.loads(text)["normal"][0] == list(g.normal[0])
    assert Genotype.from_json(text) == g
    assert Genotype.from_json(g.to_json(indent=2)) == g


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_repr_is_pasteable_python(name):
    g = PUBLISHED[name]
    assert eval(repr(g), {"Genotype": Genotype}) == g


def _bad(**changes):
    data = PUBLISHED["DARTS_V2"].to_dict()
    data.update(changes)
    return json.dumps(data)


V2 = PUBLISHED["DARTS_V2"].to_dict()


def _swap(edges: list, position: int, edge: list) -> list:
    return [edge if i == position else e for i, e in enumerate(edges)]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (_bad(normal=_swap(V2["normal"], 0, ["conv_9x9", 0])),
         r"'normal' edge 0: unknown op 'conv_9x9'"),
        (_bad(reduce=_swap(V2["reduce"], 7, ["none", 1])), r"'reduce' edge 7: unknown op 'none'"),
        (_bad(normal=_swap(V2["normal"], 2, ["sep_conv_3x3", 3])),
         r"'normal' edge 2 \(node 1\): bad input index 3; node 1 can take states 0..2"),
        (_bad(normal=_swap(V2["normal"], 1, ["sep_conv_3x3", -1])), r"bad input index -1"),
        (_bad(normal=_swap(V2["normal"], 1, ["sep_conv_3x3", True])), r"bad input index True"),
        (_bad(normal=V2["normal"][:7]), r"'normal' has 7 edges; a cell has exactly 8"),
        (_bad(reduce=[*V2["reduce"], ["skip_connect", 0], ["skip_connect", 1]]),
         r"'reduce' has 10 edges"),
        (_bad(normal="sep_conv_3x3"), r"'normal' must be a list of \[op, input_index\] pairs"),
        (_bad(normal_concat=[2, 3, 9]), r"'normal_concat' is \[2, 3, 9\]"),
        (_bad(reduce_concat=[]), r"'reduce_concat' is \[\]"),
        (_bad(normal=_swap(V2["normal"], 3, ["sep_conv_3x3"])),
         r"edge 3 is \['sep_conv_3x3'\]; expected an \[op, input_index\] pair"),
        (json.dumps({k: v for k, v in V2.items() if k != "reduce"}), r"missing \['reduce'\]"),
        (json.dumps({**V2, "extra": 1}), r"unknown \['extra'\]"),
        ("{not json", r"genotype JSON is malformed"),
        ("[1, 2]", r"must be a JSON object"),
    ],
)  # fmt: skip
def test_from_json_rejects_bad_genotypes(text, message):
    with pytest.raises(ValueError, match=message):
        Genotype.from_json(text)


def _alphas(entries: dict[tuple[int, int, str], float]) -> torch.Tensor:
    a = torch.zeros(NUM_EDGES, len(PRIMITIVES))
    for (node, j, op), value in entries.items():
        a[_edge_rows(node)[j], PRIMITIVES.index(op)] = value
    return a


def test_derive_all_ties_take_lowest_inputs_and_first_op():
    z = torch.zeros(NUM_EDGES, len(PRIMITIVES))
    g = derive_genotype(z, z)
    assert g.normal == (("max_pool_3x3", 0), ("max_pool_3x3", 1)) * 4
    assert g == derive_genotype(z + 3.0, z - 1.0)  # softmax is shift invariant per edge


def test_derive_hand_built_alphas():
    normal = _alphas(
        {
            (0, 0, "sep_conv_3x3"): 2.0, (0, 1, "skip_connect"): 1.0,
            # node 1: input 0 is dominated by 'none' -> its non-none weights are tiny, so
            # inputs 2 and 1 win although 'none' on input 0 is the largest logit of the node
            (1, 0, "none"): 9.0, (1, 0, "sep_conv_5x5"): 3.0,
            (1, 1, "dil_conv_3x3"): 1.0, (1, 2, "dil_conv_5x5"): 2.0,
            # node 2: none wins the edge's own arg-max but is never chosen as the op
            (2, 0, "none"): 5.0, (2, 0, "avg_pool_3x3"): 4.0, (2, 3, "sep_conv_3x3"): 6.0,
            # node 3: top-2 of 5 inputs, strongest first
            (3, 4, "skip_connect"): 3.0, (3, 2, "sep_conv_5x5"): 4.0, (3, 1, "dil_conv_5x5"): 0.5,
        }
    )  # fmt: skip
    reduce = _alphas({(n, 1, "max_pool_3x3"): 1.0 for n in range(4)})
    g = derive_genotype(normal, reduce)
    assert g.normal == (
        ("sep_conv_3x3", 0), ("skip_connect", 1),
        ("dil_conv_5x5", 2), ("dil_conv_3x3", 1),
        ("sep_conv_3x3", 3), ("avg_pool_3x3", 0),
        ("sep_conv_5x5", 2), ("skip_connect", 4),
    )  # fmt: skip
    # with only input 1 raised, input 0 ties the rest and wins the second slot (lower index)
    assert g.reduce == (("max_pool_3x3", 1), ("max_pool_3x3", 0)) * 4


def test_derive_none_tie_with_real_op_picks_the_real_op():
    a = _alphas({(0, 0, "none"): 2.0, (0, 0, "sep_conv_3x3"): 2.0})
    g = derive_genotype(a, a)
    assert g.normal[0] == ("sep_conv_3x3", 0)


@pytest.mark.parametrize("seed", range(5))
def test_derive_matches_darts_reference_on_random_alphas(seed):
    gen = torch.Generator().manual_seed(seed)
    normal = torch.randn(NUM_EDGES, len(PRIMITIVES), generator=gen)
    reduce = torch.randn(NUM_EDGES, len(PRIMITIVES), generator=gen)
    g = derive_genotype(normal, reduce)
    assert list(g.normal) == _reference_parse(normal)
    assert list(g.reduce) == _reference_parse(reduce)


def test_derive_rejects_wrong_shape():
    with pytest.raises(ValueError, match=r"alphas_normal has shape \(14, 7\); expected \(14, 8\)"):
        derive_genotype(torch.zeros(14, 7), torch.zeros(14, 8))
    a = torch.zeros(14, 8)
    with pytest.raises(ValueError, match=r"betas_reduce has shape \(13,\); expected \(14,\)"):
        derive_genotype(a, a, torch.zeros(14), torch.zeros(13))
    with pytest.raises(ValueError, match="both betas_normal and betas_reduce, or neither"):
        derive_genotype(a, a, torch.zeros(14))


def test_node_softmax_normalises_the_edges_into_each_node():
    betas = torch.randn(NUM_EDGES, dtype=torch.float64)
    w = node_softmax(betas)
    for node in range(4):
        rows = _edge_rows(node)
        torch.testing.assert_close(w[rows.start : rows.stop].sum(), torch.tensor(1.0).double())
        torch.testing.assert_close(
            w[rows.start : rows.stop], torch.softmax(betas[rows.start : rows.stop], dim=0)
        )


def test_derive_with_betas_ranks_edges_by_edge_weight_times_op_weight():
    a = _alphas({(n, j, "sep_conv_3x3"): 1.0 for n in range(4) for j in range(n + 2)})
    a = a + _alphas({(3, 0, "sep_conv_3x3"): 1.0})  # α alone: inputs 0 and 1 of node 3
    assert derive_genotype(a, a).normal[6:] == (("sep_conv_3x3", 0), ("sep_conv_3x3", 1))
    betas = torch.zeros(NUM_EDGES)
    betas[_edge_rows(3)[4]] = 2.0  # β makes input 4 the strongest, input 0 still second
    betas[_edge_rows(2)[3]] = 0.5  # and input 3 the strongest into node 2
    g = derive_genotype(a, a, betas, torch.zeros(NUM_EDGES))
    assert g.normal[6:] == (("sep_conv_3x3", 4), ("sep_conv_3x3", 0))
    assert g.normal[4:6] == (("sep_conv_3x3", 3), ("sep_conv_3x3", 0))
    assert g.reduce == derive_genotype(a, a).reduce  # uniform β changes nothing


@pytest.mark.parametrize("seed", range(5))
def test_derive_with_betas_matches_pc_darts_reference_on_random_logits(seed):
    gen = torch.Generator().manual_seed(seed)
    normal, reduce = (torch.randn(NUM_EDGES, len(PRIMITIVES), generator=gen) for _ in "nr")
    b_normal, b_reduce = (2 * torch.randn(NUM_EDGES, generator=gen) for _ in "nr")
    g = derive_genotype(normal, reduce, b_normal, b_reduce)
    assert list(g.normal) == _reference_parse(normal, b_normal)
    assert list(g.reduce) == _reference_parse(reduce, b_reduce)


def test_count_ops():
    g = PUBLISHED["DARTS_V2"]
    assert g.count("skip_connect") == 2
    assert g.count("max_pool_3x3", "reduce") == 5


def test_supernet_derive_json_load_build(tmp_path):
    from maenas_ray.space import Supernet

    net = Supernet(C=4, layers=5)
    with torch.no_grad():
        net.alphas_normal.copy_(torch.randn_like(net.alphas_normal))
    g = net.genotype()
    path = tmp_path / "genotype.json"
    path.write_text(g.to_json())
    loaded = Genotype.from_json(path.read_text())
    assert loaded == g
    model = build_network(loaded, "cifar10", channels=8, layers=5)
    logits, aux = model.train()(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10) and aux.shape == (2, 10)
