"""The equal-cost fast path of global selection gives exactly the sorted path's counts."""
import pytest
import torch

from rowsft.selection.budgets import Pool, global_counts


def pools_with_ties(seed):
    g = torch.Generator().manual_seed(seed)
    sizes = [50, 7, 120, 33]
    # few distinct values: many ties at any threshold
    return [Pool(name=f"l{i}", unit="element", scores=torch.randint(0, 6, (n,), generator=g).float(), cost=1,
                 lora=None, row_cost=1, expand=None) for i, n in enumerate(sizes)]


def sorted_reference(pools, total, floor):
    """Floors first, then one stable descending order over the rest (earlier pool wins ties)."""
    values, owners = [], []
    for i, p in enumerate(pools):
        ranked = torch.sort(p.scores.double(), descending=True, stable=True).values[floor:]
        values.append(ranked)
        owners.append(torch.full(ranked.shape, i))
    values, owners = torch.cat(values), torch.cat(owners)
    order = torch.sort(values, descending=True, stable=True).indices
    n_take = int(total - floor * len(pools))
    extra = torch.bincount(owners[order[:n_take]], minlength=len(pools)).tolist()
    return [floor + e for e in extra]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("total,floor", [(40, 0), (40, 1), (111, 3), (210, 0)])
def test_equal_cost_path_matches_sorted_reference(seed, total, floor):
    pools = pools_with_ties(seed)
    counts, threshold = global_counts(pools, total, multiple_of=1, min_per_layer=floor, max_per_layer=None)
    assert counts == sorted_reference(pools, total, floor)
    assert sum(counts) == min(total, sum(p.scores.numel() for p in pools))
