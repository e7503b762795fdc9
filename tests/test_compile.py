"""torch.compile over row- and column-sparse models: one graph, same gradients as eager (optional feature)."""
from __future__ import annotations

import copy

import pytest
import torch

import rowsft
from rowsft.layers import tuner
from rowsft.lean_loss import training_loss
from rowsft import scoring
from rowsft import selection

VOCAB = 300


def answer_batch() -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (2, 16), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, 10:12] = ids[:, 10:12]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


@pytest.mark.slow
@pytest.mark.parametrize("unit", ["row", "column"])
def test_compiled_sparse_model_is_one_graph_with_eager_gradients(unit):
    torch._dynamo.reset()
    batch = answer_batch()
    model = rowsft.tiny_model("llama", vocab_size=VOCAB)
    chosen = selection.select(scoring.score(model, [batch], metric="random", unit=unit, num_batches=1), 4)
    tuner.apply(model, chosen)
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, backend="aot_eager", fullgraph=True)   # fullgraph: a graph break raises

    eager_loss = training_loss(model, batch)
    eager_loss.backward()
    compiled_loss = training_loss(compiled, batch)
    compiled_loss.backward()

    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-6, atol=0)
    eager = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    other = {n: p.grad for n, p in twin.named_parameters() if p.requires_grad}
    assert eager.keys() == other.keys() and eager
    for name in eager:
        torch.testing.assert_close(other[name], eager[name], rtol=1e-5, atol=1e-7, msg=name)
