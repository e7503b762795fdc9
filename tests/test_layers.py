"""Sparse layers against independent references: dense float64 training with a masked gradient,
finite differences, saved-tensor accounting and the shapes of every tensor an op creates."""
import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.pytorch_utils import Conv1D

from rowsft.layers import ColumnSparseLinear, ElementSparseLinear, RowSparseLinear

D_OUT, D_IN = 12, 10
INDICES = {"row": [1, 4, 9], "column": [0, 3, 7, 8], "element": [5, 17, 18, 61, 119]}
CLASSES = {"row": RowSparseLinear, "column": ColumnSparseLinear, "element": ElementSparseLinear}


def make_base(kind, dtype=torch.float64, d_out=D_OUT, d_in=D_IN, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out) if kind == "linear" else Conv1D(d_out, d_in)
    with torch.no_grad():
        base.weight.normal_()
        base.bias.normal_()
    return base.to(dtype)


def make_layer(unit, base, indices, path="fused", **kwargs):
    """``path="hooked"``: a forward hook on the base layer forces the fallback path (the base runs
    itself and the update is added into its output afterwards)."""
    if path == "hooked":
        base.register_forward_hook(lambda module, args, output: None)
    layer = CLASSES[unit](base, indices, **kwargs)
    assert layer._fusable() == (path == "fused")
    return layer


PATHS = pytest.mark.parametrize("path", ["fused", "hooked"])


def out_in(base):
    """The base weight as (d_out, d_in), written independently of rowsft.targets."""
    return base.weight.t() if isinstance(base, Conv1D) else base.weight


def mask_for(unit, idx, d_out=D_OUT, d_in=D_IN):
    mask = torch.zeros(d_out, d_in, dtype=torch.bool)
    if unit == "row":
        mask[idx] = True
    elif unit == "column":
        mask[:, idx] = True
    else:
        mask.view(-1)[torch.tensor(idx)] = True
    return mask


def loss_fn(y, target):
    return ((y - target) ** 2).sum() + torch.tanh(y).sum()


def batches(n, d_in=D_IN, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(2, 3, d_in, generator=g, dtype=dtype), torch.randn(2, 3, D_OUT, generator=g, dtype=dtype))
            for _ in range(n)]


def optimizer(name, params, weight_decay=0.0):
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9)
    return torch.optim.AdamW(params, lr=0.01, weight_decay=weight_decay)


# ---------------------------------------------------------------- training equals masked dense training
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("unit", ["row", "column", "element"])
@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
@PATHS
def test_training_equals_masked_dense_float64(kind, unit, opt_name, path):
    base = make_base(kind)
    w0 = out_in(base).detach().clone()
    mask = mask_for(unit, INDICES[unit])

    ref = copy.deepcopy(base)                      # dense reference: full weight trainable, grad masked
    ref.bias.requires_grad_(False)
    ref_opt = optimizer(opt_name, [ref.weight])
    stored_mask = mask.t() if kind == "conv1d" else mask

    layer = make_layer(unit, copy.deepcopy(base), INDICES[unit], path)
    opt = optimizer(opt_name, [layer.update])
    for x, target in batches(4):
        ref_opt.zero_grad()
        xr = x.clone().requires_grad_(True)
        loss_ref = loss_fn(ref(xr), target)
        loss_ref.backward()
        ref.weight.grad[~stored_mask] = 0
        ref_opt.step()

        opt.zero_grad()
        xs = x.clone().requires_grad_(True)
        loss = loss_fn(layer(xs), target)
        loss.backward()
        opt.step()
        assert abs(loss.item() - loss_ref.item()) < 1e-10
        torch.testing.assert_close(xs.grad, xr.grad, rtol=0, atol=1e-10)

    ref_update = out_in(ref).detach() - w0
    assert torch.equal(ref_update[~mask], torch.zeros_like(ref_update[~mask]))
    torch.testing.assert_close(layer.delta_weight(), ref_update, rtol=0, atol=1e-10)
    assert torch.equal(out_in(layer.base_layer), w0), "the base weight must stay untouched"


@pytest.mark.parametrize("unit", ["row", "column", "element"])
def test_weight_decay_pulls_update_toward_zero(unit):
    """Documented semantics: AdamW's decay acts on the update, i.e. pulls W toward its pretrained value.
    Reference: y = (W0 + D) x with D dense, grad masked, AdamW(weight_decay) on D."""
    base = make_base("linear")
    w0 = base.weight.detach().clone()
    mask = mask_for(unit, INDICES[unit])
    dense = torch.zeros(D_OUT, D_IN, dtype=torch.float64, requires_grad=True)
    ref_opt = optimizer("adamw", [dense], weight_decay=0.3)
    layer = CLASSES[unit](copy.deepcopy(base), INDICES[unit])
    opt = optimizer("adamw", [layer.update], weight_decay=0.3)
    for x, target in batches(3):
        ref_opt.zero_grad()
        loss_fn(F.linear(x, w0 + dense, base.bias.detach()), target).backward()
        dense.grad[~mask] = 0
        ref_opt.step()
        opt.zero_grad()
        loss_fn(layer(x), target).backward()
        opt.step()
    torch.testing.assert_close(layer.delta_weight(), dense.detach(), rtol=0, atol=1e-10)


@pytest.mark.parametrize("unit", ["row", "column", "element"])
@PATHS
def test_trained_bias_matches_masked_dense_bias(unit, path):
    base = make_base("conv1d")
    b0 = base.bias.detach().clone()
    bias_mask = mask_for(unit, INDICES[unit]).any(dim=1)       # rows that receive an update
    ref = copy.deepcopy(base)
    ref_opt = optimizer("adamw", [ref.weight, ref.bias])
    layer = make_layer(unit, copy.deepcopy(base), INDICES[unit], path, train_bias=True)
    opt = optimizer("adamw", [layer.update, layer.bias_delta])
    w_mask = mask_for(unit, INDICES[unit]).t()
    for x, target in batches(3):
        ref_opt.zero_grad()
        loss_fn(ref(x), target).backward()
        ref.weight.grad[~w_mask] = 0
        ref.bias.grad[~bias_mask] = 0
        ref_opt.step()
        opt.zero_grad()
        loss_fn(layer(x), target).backward()
        opt.step()
    torch.testing.assert_close(layer.delta_bias(), ref.bias.detach() - b0, rtol=0, atol=1e-10)
    torch.testing.assert_close(layer.delta_weight(), out_in(ref).detach() - out_in(base).detach(), rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("unit", ["row", "column", "element"])
@PATHS
def test_gradcheck_against_finite_differences(kind, unit, path):
    layer = make_layer(unit, make_base(kind), INDICES[unit], path)
    with torch.no_grad():
        layer.update.normal_()
    x = torch.randn(2, 3, D_IN, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, u: layer(x), (x, layer.update))


# ---------------------------------------------------------------- exactness at step 0, merge, unmerge
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("unit", ["row", "column", "element"])
@PATHS
def test_step0_equal_and_merge_roundtrip(kind, unit, path):
    base = make_base(kind, torch.float32)
    x = torch.randn(4, 5, D_IN)
    y0 = base(x)
    w0 = out_in(base).detach().clone()
    layer = make_layer(unit, base, INDICES[unit], path)
    assert layer.base_layer is base
    assert torch.equal(layer(x), y0)
    with torch.no_grad():
        layer.update.normal_()
        expected = F.linear(x, w0 + layer.delta_weight(), base.bias)   # independent dense result
    y = layer(x)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-5)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), y, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out_in(base).detach(), w0 + layer.delta_weight(), rtol=0, atol=1e-6)
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(out_in(base).detach(), w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), y, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_step0_bit_identical_for_any_input_layout(dtype, kind):
    base = make_base(kind, dtype)
    layouts = {"1d": torch.randn(D_IN), "2d": torch.randn(7, D_IN), "3d": torch.randn(2, 7, D_IN),
               "4d": torch.randn(2, 3, 5, D_IN), "3d transposed": torch.randn(2, D_IN, 7).transpose(1, 2),
               "3d slice": torch.randn(2, 7, 2 * D_IN)[..., :D_IN], "2d transposed": torch.randn(D_IN, 7).T}
    for unit in ("row", "column", "element"):
        layer = CLASSES[unit](base, INDICES[unit])
        for name, x in layouts.items():
            x = x.to(dtype)
            try:
                expected = base(x)
            except RuntimeError:          # Conv1D refuses some strided inputs (view); so may we
                continue
            assert torch.equal(layer(x), expected), (unit, name)
            assert torch.equal(layer(x.requires_grad_(True)), expected), (unit, name)


def test_shapes_dtypes_and_repr():
    row = RowSparseLinear(make_base("linear"), [3, 1])
    assert row.delta.shape == (2, D_IN) and row.unit == "row" and row.indices.tolist() == [1, 3]
    col = ColumnSparseLinear(make_base("conv1d"), [2])
    assert col.delta.shape == (D_OUT, 1) and col.unit == "column"
    el = ElementSparseLinear(make_base("linear"), [7, 3])
    assert el.values.shape == (2,) and el.indices.dtype == torch.int32 and el.indices.tolist() == [3, 7]
    assert not any(p.requires_grad for p in row.base_layer.parameters())
    assert [n for n, p in row.named_parameters() if p.requires_grad] == ["delta"]
    assert "unit=row" in repr(row) and "k=2" in repr(row)
    assert torch.count_nonzero(row.delta) == 0


# ---------------------------------------------------------------- what is kept for backward
def _saved_activation_bytes(layer, x):
    """Bytes of unique storages saved for backward that are neither parameters nor buffers."""
    own = {t.untyped_storage().data_ptr() for t in list(layer.parameters()) + list(layer.buffers())}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in own:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    y.sum().backward()
    return sum(storages.values())


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("x_requires_grad", [False, True])
@pytest.mark.parametrize("unit", ["row", "column"])
@PATHS
def test_saved_bytes_match_analytic(kind, unit, x_requires_grad, path):
    layer = make_layer(unit, make_base(kind, torch.float32, d_out=48, d_in=40), [2, 5, 11], path)
    x = torch.randn(3, 7, 40, requires_grad=x_requires_grad)
    measured = _saved_activation_bytes(layer, x)
    assert measured == layer.saved_activation_bytes(x.shape, x.dtype)
    if unit == "column":
        assert measured == 3 * 7 * 3 * 4            # the k selected columns, not the whole input


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@PATHS
def test_element_layer_keeps_no_dense_update(kind, path):
    d_out, d_in = 48, 32
    layer = make_layer("element", make_base(kind, torch.float32, d_out=d_out, d_in=d_in), [3, 40, 41, 900, 1500], path)
    weight_storage = layer.base_layer.weight.untyped_storage().data_ptr()
    x = torch.randn(2, 5, d_in, requires_grad=True)              # 320 < 1536 elements
    big = []

    def pack(t):
        if t.numel() >= d_out * d_in and t.untyped_storage().data_ptr() != weight_storage:
            big.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    y.sum().backward()
    assert big == []
    other = ElementSparseLinear(make_base(kind, torch.float32, d_out, d_in), [3, 40])
    assert _saved_activation_bytes(other, x) == other.saved_activation_bytes(x.shape, x.dtype)
    assert _saved_activation_bytes(layer, x.detach().requires_grad_(True)) == layer.saved_activation_bytes(x.shape, x.dtype)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op allocates (views of an op's inputs do not count)."""
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in list(args) + list((kwargs or {}).values()) if isinstance(a, torch.Tensor)]
        seen = {a.untyped_storage().data_ptr() for a in inputs}
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("unit", ["row", "column", "element"])
@PATHS
def test_no_dense_weight_sized_tensor_in_forward_or_backward(kind, unit, path):
    """Rows and columns never build a (d_out, d_in) tensor; elements only their touched rows."""
    d_out, d_in = 64, 48
    idx = {"row": [1, 30], "column": [0, 47], "element": [5, 50, 49 * 48 + 7]}[unit]
    layer = make_layer(unit, make_base(kind, torch.float32, d_out=d_out, d_in=d_in), idx, path)
    x = torch.randn(2, 4, d_in, requires_grad=True)
    with _LargestTensor() as mode:
        layer(x).square().sum().backward()
    assert layer.update.grad is not None and x.grad is not None
    assert mode.largest < d_out * d_in


# ---------------------------------------------------------------- mixed precision
@pytest.mark.parametrize("unit", ["row", "column", "element"])
@PATHS
def test_bf16_base_with_fp32_update_trains_and_merges(unit, path):
    base = make_base("linear", torch.bfloat16)
    w0 = base.weight.detach().clone()
    layer = make_layer(unit, base, INDICES[unit], path, delta_dtype=torch.float32)
    assert layer.update.dtype == torch.float32
    opt = torch.optim.AdamW([layer.update], lr=0.05)
    x, target = batches(1, dtype=torch.bfloat16)[0]
    losses = []
    for _ in range(3):
        opt.zero_grad()
        y = layer(x)
        assert y.dtype == torch.bfloat16
        loss = loss_fn(y.float(), target.float())
        loss.backward()
        assert layer.update.grad.dtype == torch.float32
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    y = layer(x)
    layer.merge()
    merged_w = base.weight.detach().float()
    torch.testing.assert_close(merged_w, (w0.float() + layer.delta_weight()).bfloat16().float())
    torch.testing.assert_close(layer(x).float(), y.float(), rtol=2e-2, atol=5e-2)
    layer.unmerge()
    torch.testing.assert_close(base.weight.detach().float(), w0.float(), rtol=1e-2, atol=1e-2)


def _autocast_case(unit, device, path="fused"):
    base = make_base("linear", torch.float32).to(device)
    layer = make_layer(unit, base, INDICES[unit], path)
    with torch.no_grad():
        layer.update.normal_()
    x = torch.randn(2, 3, D_IN, device=device)
    y_ref = layer(x)
    layer(x).square().sum().backward()
    grad_ref = layer.update.grad.clone()
    dtype = torch.bfloat16 if device == "cpu" else torch.float16
    for in_cast in (True, False) if unit == "row" else (True,):   # rows: written into the kept cast, or the usual way
        layer.train_in_cast = in_cast
        layer.update.grad = None
        with torch.autocast(device, dtype=dtype):
            y = layer(x)
            assert y.dtype == dtype
            loss = y.float().square().sum()
        loss.backward()
        assert layer.update.grad.dtype == torch.float32
        torch.testing.assert_close(y.float(), y_ref, rtol=3e-2, atol=0.15)
        torch.testing.assert_close(layer.update.grad, grad_ref, rtol=5e-2, atol=0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("contiguous", [True, False])
def test_add_into_columns_equals_index_add(dtype, contiguous):
    """The half-precision CPU path (gather, add, write back) gives index_add_'s bits, also into a view."""
    from rowsft.layers.autograd import add_into_columns
    g = torch.Generator().manual_seed(0)
    target = torch.randn(3, 5, 40, generator=g).to(dtype)
    if not contiguous:
        target = torch.randn(3, 40, 5, generator=g).to(dtype).transpose(1, 2)
    index = torch.tensor([1, 7, 8, 30])
    values = torch.randn(3, 5, 4, generator=g).to(dtype)
    expected = target.clone().index_add_(-1, index, values)
    assert add_into_columns(target, index, values) is target
    assert torch.equal(target, expected)


@pytest.mark.parametrize("unit", ["row", "column", "element"])
@PATHS
def test_autocast_cpu(unit, path):
    _autocast_case(unit, "cpu", path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("unit", ["row", "column", "element"])
def test_autocast_cuda(unit):
    _autocast_case(unit, "cuda")


@pytest.mark.parametrize("unit", ["row", "column", "element"])
@PATHS
def test_output_accepts_inplace_ops_downstream(unit, path):
    """Models modify linear outputs in place; the result must stay legal and the gradients right."""
    layer = make_layer(unit, make_base("conv1d"), INDICES[unit], path, train_bias=True)
    with torch.no_grad():
        layer.update.normal_()
    x = torch.randn(2, 3, D_IN, dtype=torch.float64, requires_grad=True)
    layer(x).sum().backward()
    grads = (x.grad.clone(), layer.update.grad.clone(), layer.bias_delta.grad.clone())
    x.grad = layer.update.grad = layer.bias_delta.grad = None
    y = layer(x)
    y.mul_(3.0)
    y.sum().backward()
    for got, ref in zip((x.grad, layer.update.grad, layer.bias_delta.grad), grads):
        torch.testing.assert_close(got, 3.0 * ref, rtol=1e-12, atol=1e-12)


def test_no_grad_and_inference_mode_forward():
    layer = RowSparseLinear(make_base("linear", torch.float32), [1, 2])
    with torch.no_grad():
        layer.delta.normal_()
    x = torch.randn(3, D_IN)
    y = layer(x).detach()
    with torch.no_grad():
        assert torch.equal(layer(x), y)
    with torch.inference_mode():
        assert torch.equal(layer(x), y)


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("indices, error, words", [
    ([0, D_OUT], IndexError, "[0, 12)"),
    ([-1, 2], IndexError, "min -1"),
    ([2, 2], ValueError, "duplicated"),
    ([], ValueError, "empty"),
    (torch.tensor([0.0, 1.0]), TypeError, "integer"),
    (torch.tensor([True, False]), TypeError, "integer"),
])
def test_bad_indices(indices, error, words):
    with pytest.raises(error, match=re.escape(words)):
        RowSparseLinear(make_base("linear"), indices)


def test_element_and_column_ranges():
    with pytest.raises(IndexError, match=r"\[0, 10\)"):
        ColumnSparseLinear(make_base("linear"), [10])
    with pytest.raises(IndexError, match=r"\[0, 120\)"):
        ElementSparseLinear(make_base("linear"), [120])


def test_non_linear_module_is_refused():
    with pytest.raises(TypeError, match="LayerNorm"):
        RowSparseLinear(nn.LayerNorm(8), [0])
    with pytest.raises(TypeError, match="Embedding"):
        ElementSparseLinear(nn.Embedding(4, 4), [0])
    with pytest.raises(TypeError, match="already a rowsft sparse layer"):
        RowSparseLinear(RowSparseLinear(make_base("linear"), [0]), [1])


def test_train_bias_needs_a_bias():
    with pytest.raises(ValueError, match="no bias"):
        RowSparseLinear(nn.Linear(4, 3, bias=False), [0], train_bias=True)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("fuse_fraction", [0.0, 1.0])   # always fused W + D / never fused
@pytest.mark.parametrize("lean_fraction", [0.0, 1.0])   # keep the whole input / only its touched columns
def test_element_fused_and_unfused_paths_equal_dense_reference(kind, fuse_fraction, lean_fraction, monkeypatch):
    from rowsft.layers.autograd import ElementUpdate
    monkeypatch.setattr(ElementUpdate, "FUSE_FRACTION", fuse_fraction)
    monkeypatch.setattr(ElementUpdate, "LEAN_COLUMN_FRACTION", lean_fraction)
    base = make_base(kind)
    idx = torch.tensor([0, 3, D_IN + 1, 5 * D_IN + 2, D_OUT * D_IN - 1])
    layer = ElementSparseLinear(base, idx)
    with torch.no_grad():
        layer.values.copy_(torch.randn(idx.numel(), dtype=torch.float64))
    x = torch.randn(2, 3, D_IN, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, D_OUT, dtype=torch.float64)
    (layer(x) * g).sum().backward()
    # independent reference: the dense weight W + D, plain autograd
    w = out_in(base).detach().clone()
    update = torch.zeros(D_OUT * D_IN, dtype=torch.float64)
    update[idx] = layer.values.detach()
    dense = (w + update.reshape(D_OUT, D_IN)).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = x_ref @ dense.T + (base.bias if base.bias is not None else 0)
    (y_ref * g).sum().backward()
    torch.testing.assert_close(layer(x.detach()), y_ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.values.grad, dense.grad.reshape(-1)[idx], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@PATHS
def test_element_layer_keeps_only_touched_columns_when_few(kind, path):
    """A mask on 3 of 40 input columns keeps those 3 columns of x; one spread over 30 keeps all of x."""
    base = make_base(kind, torch.float32, d_out=48, d_in=40)
    few = [0 * 40 + 5, 1 * 40 + 5, 7 * 40 + 9, 20 * 40 + 31, 47 * 40 + 9]     # columns 5, 9, 31
    many = [r * 40 + c for r, c in zip(range(30), range(30))]                  # columns 0..29
    x = torch.randn(3, 7, 40, requires_grad=True)
    lean, whole = make_layer("element", base, few, path), make_layer("element", base, many, path)
    assert lean.kept_input_width() == 3 and whole.kept_input_width() == 40
    assert _saved_activation_bytes(lean, x) == lean.saved_activation_bytes(x.shape) == 3 * 7 * 3 * 4
    assert _saved_activation_bytes(whole, x) == whole.saved_activation_bytes(x.shape) == 3 * 7 * 40 * 4


def test_element_layers_keep_column_subsets_only_where_the_input_has_no_other_keeper():
    """q/k/v and gate/up share an input, o_proj's is the attention kernel's saved output: a subset there
    would be paid on top of the whole input. down_proj's input (the gated activation) has no other keeper."""
    from rowsft.data.models import tiny_model
    from rowsft.layers import tuner
    from rowsft.selection.choice import LayerChoice, Selection
    from rowsft.targets import find_targets, linear_shape
    model = tiny_model("llama", layers=1)
    layers = {n: LayerChoice("element", torch.tensor([0, 1]), linear_shape(m)) for n, m in find_targets(model).items()}
    tuner.apply(model, Selection(layers))
    lean = {n.rsplit(".", 1)[-1]: m.lean_input for n, m in model.named_modules() if isinstance(m, ElementSparseLinear)}
    assert lean == {"q_proj": False, "k_proj": False, "v_proj": False, "o_proj": False,
                    "gate_proj": False, "up_proj": False, "down_proj": True}


def test_element_column_cache_follows_a_mask_loaded_in_place():
    """An adapter load copies new indices into the buffer in place; the kept columns must follow."""
    base = make_base("linear", torch.float64, d_out=48, d_in=40)
    layer = ElementSparseLinear(base, [5, 45, 85])                      # column 5 only
    x = torch.randn(2, 3, 40, dtype=torch.float64)
    layer(x.requires_grad_(True)).sum().backward()
    new = torch.tensor([1, 42, 83], dtype=layer.indices.dtype)           # columns 1, 2, 3
    with torch.no_grad():
        layer.indices.copy_(new)
    layer.values.grad = None
    g = torch.randn(2, 3, 48, dtype=torch.float64)
    (layer(x) * g).sum().backward()
    dense = g.reshape(-1, 48).T @ x.detach().reshape(-1, 40)              # (d_out, d_in) weight gradient
    torch.testing.assert_close(layer.values.grad, dense.reshape(-1)[new.long()], rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- issue 23: the row path's faster forms
@pytest.mark.parametrize("k", [1, 11, 16, 29])
@pytest.mark.parametrize("layout", ["3d", "2d", "strided"])
def test_thin_product_equals_linear(k, layout):
    """``delta xᵀ`` transposed back (the faster BLAS shape on CPU) is ``x deltaᵀ``, for any token layout."""
    from rowsft.layers.autograd import thin_product
    g = torch.Generator().manual_seed(k)
    x = torch.randn(2, 5, 24, generator=g, dtype=torch.float64)
    if layout == "2d":
        x = x.reshape(10, 24)
    elif layout == "strided":
        x = torch.randn(5, 2, 24, generator=g, dtype=torch.float64).transpose(0, 1)
    delta = torch.randn(k, 24, generator=g, dtype=torch.float64)
    got = thin_product(x, delta)
    assert got.shape == x.shape[:-1] + (k,)
    torch.testing.assert_close(got, F.linear(x, delta), rtol=1e-12, atol=1e-12)


def test_norm_output_rebuilt_from_the_saved_scale():
    """A Llama RMSNorm's output is rebuilt from what its last product keeps (``weight * (h * scale)``), bit for bit;
    a norm computed in another order is rebuilt by running it again."""
    import rowsft
    from rowsft.layers import rebuild

    class SwappedRMSNorm(nn.Module):          # (h * scale) * weight: the graph differs, so the rule must not apply
        def __init__(self, d):
            super().__init__()
            self.weight = nn.Parameter(torch.rand(d) + 0.5)

        def forward(self, h):
            return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)) * self.weight

    model = rowsft.tiny_model("llama", vocab_size=128, seed=3)
    norm = model.model.layers[0].post_attention_layernorm.requires_grad_(False)
    for module, scaled in ((norm, True), (SwappedRMSNorm(norm.weight.numel()).requires_grad_(False), False)):
        handles = rebuild.track_norm_outputs(module)
        h = torch.randn(2, 7, norm.weight.numel(), requires_grad=True)
        out = module(h)
        source = rebuild.source_of(out)
        assert source is not None and source.what == "norm"
        assert (source.rebuild.__name__ == "scaled") == scaled      # rebuild._norm_rebuild's two-product form
        assert torch.equal(source.rebuild(*source.tensors), out.detach())
        for handle in handles:
            handle.remove()
