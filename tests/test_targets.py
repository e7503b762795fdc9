"""Target discovery and coupled neuron groups, checked against the models' own configs."""
import pytest
import torch
from torch import nn

from rowsft.data.models import tiny_model
from rowsft.targets import (
    find_targets,
    is_linear_like,
    layer_index,
    linear_shape,
    module_type,
    neuron_groups,
    weight_out_in,
)


@pytest.fixture(scope="module", params=["llama", "gpt2", "bert"])
def model(request):
    return tiny_model(request.param, vocab_size=128)


def test_all_linear_excludes_heads(model):
    names = list(find_targets(model))
    assert names, "no targets"
    assert not any(n.endswith(("lm_head", "classifier", "pooler.dense")) for n in names)
    assert all(is_linear_like(model.get_submodule(n)) for n in names)


def test_weight_orientation_is_out_in(model):
    x = torch.randn(3, model.config.hidden_size)
    for name, m in find_targets(model).items():
        if linear_shape(m)[1] != x.shape[-1]:
            continue
        w = weight_out_in(m)
        expected = x @ w.T + (m.bias if m.bias is not None else 0)
        torch.testing.assert_close(m(x), expected)


def test_layer_and_type_filters():
    m = tiny_model("llama", vocab_size=128, layers=3)
    chosen = find_targets(m, ["q_proj", "down_proj"], layers=[2])
    assert list(chosen) == ["model.layers.2.self_attn.q_proj", "model.layers.2.mlp.down_proj"]
    assert all(module_type(n) in ("gate_proj", "up_proj", "down_proj") for n in find_targets(m, "mlp"))
    assert all(layer_index(n) == 1 for n in find_targets(m, r".*layers\.1\..*"))


def test_llama_groups_are_gqa_aware():
    m = tiny_model("llama", vocab_size=128)
    cfg = m.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    attn = [g for g in neuron_groups(m) if g.kind == "attention"]
    assert len(attn) == cfg.num_hidden_layers and attn[0].size == cfg.num_key_value_heads
    q, k, v, o = attn[0].members
    per_kv = cfg.num_attention_heads // cfg.num_key_value_heads
    # kv head 1 owns query heads [per_kv, 2*per_kv) — the way HF repeats kv heads
    assert q.indices(torch.tensor([1])).tolist() == list(range(per_kv * head_dim, 2 * per_kv * head_dim))
    assert k.indices(torch.tensor([1])).tolist() == list(range(head_dim, 2 * head_dim))
    assert o.unit == "column" and o.indices(torch.tensor([1])).tolist() == q.indices(torch.tensor([1])).tolist()
    mlp = [g for g in neuron_groups(m) if g.kind == "mlp"]
    assert mlp[0].size == cfg.intermediate_size
    assert [(mm.module.rsplit(".", 1)[1], mm.unit) for mm in mlp[0].members] == [
        ("gate_proj", "row"), ("up_proj", "row"), ("down_proj", "column")]


def test_head_group_really_is_a_head():
    """Zeroing the rows/columns of one coupled attention group must equal masking that head's output."""
    m = tiny_model("gpt2", vocab_size=128).double()
    g = [g for g in neuron_groups(m) if g.kind == "attention"][0]
    attn = m.get_submodule(g.name)
    x = torch.randn(1, 5, m.config.n_embd, dtype=torch.float64)
    cattn, cproj = g.members
    rows = cattn.indices(torch.tensor([2]))
    cols = cproj.indices(torch.tensor([2]))
    # independent reference: zero the value rows of head 2 -> head 2's output is zero -> same as dropping its o-columns
    with torch.no_grad():
        w = attn.c_attn.weight.clone(); b = attn.c_attn.bias.clone()
        d = m.config.n_embd
        v_rows = rows[rows >= 2 * d]
        attn.c_attn.weight[:, v_rows] = 0; attn.c_attn.bias[v_rows] = 0
        y_v = attn(x)[0]
        attn.c_attn.weight.copy_(w); attn.c_attn.bias.copy_(b)
        wp = attn.c_proj.weight.clone()
        attn.c_proj.weight[cols, :] = 0
        y_o = attn(x)[0]
        attn.c_proj.weight.copy_(wp)
    torch.testing.assert_close(y_v, y_o)


def test_bert_groups():
    m = tiny_model("bert", vocab_size=128)
    kinds = [(g.kind, g.size) for g in neuron_groups(m)]
    assert kinds == [("attention", 4), ("mlp", 128)] * 2


def test_bad_targets_say_what_exists():
    m = tiny_model("llama", vocab_size=128)
    with pytest.raises(ValueError, match="q_proj"):
        find_targets(m, ["qproj"])
    with pytest.raises(ValueError, match=r"layers \[99\] do not exist; block indices here: \[0, 1\]"):
        find_targets(m, layers=[99])
    with pytest.raises(ValueError, match="no linear layers"):
        find_targets(nn.Sequential(nn.ReLU()))
