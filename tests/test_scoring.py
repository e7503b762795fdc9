"""Importance scores against independent float64 references (plain full backward, per-example runs,
finite differences), plus restoration of the model and error messages."""
import copy

import pytest
import torch
from _ranks import gloo_ranks, run_ranks
from _reference import dense_loss

from rowsft.data.models import tiny_model
from rowsft.scoring import allowed_metrics, group_scores, score
from rowsft.scoring.scores import Scores
from rowsft.targets import find_targets, is_transposed, neuron_groups, weight_out_in

VOCAB = 128


def make_batches(arch, n=2, b=3, t=6, seed=0, pad=False):
    """Fixed-length batches (labels = inputs for causal LMs, class ids for BERT)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (b, t), generator=g)
        mask = torch.ones_like(ids)
        if pad:
            mask[0, -2:] = 0
        labels = torch.randint(0, 2, (b,), generator=g) if arch == "bert" else ids.clone()
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def model64(arch, **kw):
    return tiny_model(arch, vocab_size=VOCAB, dtype=torch.float64, **kw)


def oriented_grad(module):
    g = module.weight.grad
    return g.t() if is_transposed(module) else g


def plain_grads(model, batch):
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(True)
    dense_loss(ref, batch).backward()
    return {n: oriented_grad(m).detach().clone() for n, m in find_targets(ref).items()}


def weights(model):
    return {n: weight_out_in(m).detach() for n, m in find_targets(model).items()}


def exact(unit, **kw):
    return dict(unit=unit, normalize="none", dtype=torch.float64, **kw)


# ---------------------------------------------------------------- gradient metrics vs a full backward
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_taylor_rows_and_columns_equal_full_backward(arch):
    model, batches = model64(arch), make_batches(arch)
    w = weights(model)
    ref = {n: torch.zeros_like(v) for n, v in w.items()}
    for b in batches:
        for n, g in plain_grads(model, b).items():
            ref[n] += (w[n] * g).abs()          # per-batch Taylor, element level
    rows = score(model, batches, "taylor", **exact("row"))
    cols = score(model, batches, "taylor", **exact("column"))
    for n in w:
        torch.testing.assert_close(rows[n], ref[n].sum(1), rtol=1e-8, atol=0)
        torch.testing.assert_close(cols[n], ref[n].sum(0), rtol=1e-8, atol=0)
    default = score(model, batches, "taylor", normalize="none")
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in default.values())
    n0 = next(iter(w))
    torch.testing.assert_close(default[n0], ref[n0].sum(1).float(), rtol=1e-6, atol=0)


def test_snip_and_gradient_use_the_total_gradient():
    model, batches = model64("llama", layers=1), make_batches("llama")
    w = weights(model)
    total = {n: torch.zeros_like(v) for n, v in w.items()}
    for b in batches:
        for n, g in plain_grads(model, b).items():
            total[n] += g
    snip = score(model, batches, "snip", **exact("row"))
    grad = score(model, batches, "gradient", **exact("element"))
    tfo = score(model, batches, "taylor-fo", **exact("column"))
    for n in w:
        torch.testing.assert_close(snip[n], (w[n] * total[n]).abs().sum(1), rtol=1e-8, atol=0)
        torch.testing.assert_close(grad[n], total[n].abs(), rtol=1e-8, atol=1e-300)
        torch.testing.assert_close(tfo[n], ((w[n] * total[n]) ** 2).sum(0), rtol=1e-8, atol=0)


def example_shares(model, batch, arch):
    """Per-example shares of the batch loss, computed by hand from one batched forward (causal LM in
    the model's float64, as rowsft's loss keeps it; transformers' own loss would cast to float32)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if arch == "bert":
        return torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none") / logits.shape[0]
    labels = batch["labels"][:, 1:]
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels.reshape(-1),
                                           reduction="none", ignore_index=-100).reshape(labels.shape)
    return ce.sum(1) / (labels != -100).sum()


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_hessian_and_fisher_equal_per_example_backward(arch):
    """OBD with per-example gradients: backward of each example's share of its batch loss, one at a time."""
    model, batches = model64(arch, layers=1), make_batches(arch)
    if arch != "bert":
        batches[1]["labels"][0, :3] = -100  # examples of unequal weight in their batch loss
    w = weights(model)
    sq = {n: torch.zeros_like(v) for n, v in w.items()}
    count = 0
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(True)
    for b in batches:
        shares = example_shares(ref, b, arch)
        for share in shares:
            ref.zero_grad()
            share.backward(retain_graph=True)
            for n, m in find_targets(ref).items():
                sq[n] += oriented_grad(m) ** 2
            count += 1
        # the shares make up the model's own loss
        torch.testing.assert_close(shares.sum(), dense_loss(model, b).to(shares.dtype), rtol=1e-12, atol=0)
    hess_r = score(model, batches, "hessian", **exact("row"))
    hess_c = score(model, batches, "hessian", **exact("column"))
    fisher = score(model, batches, "fisher", **exact("element"), max_example_elements=1000)  # chunked examples
    for n in w:
        obd = w[n] ** 2 * sq[n] / count
        torch.testing.assert_close(hess_r[n], obd.sum(1), rtol=1e-8, atol=0)
        torch.testing.assert_close(hess_c[n], obd.sum(0), rtol=1e-8, atol=0)
        torch.testing.assert_close(fisher[n], sq[n] / count, rtol=1e-8, atol=1e-300)


def test_streaming_leaves_weights_frozen_and_allocates_no_grad():
    model, batches = model64("llama", layers=1), make_batches("llama")
    for p in model.parameters():
        p.requires_grad_(True)
    seen = []
    q = model.model.layers[0].self_attn.q_proj
    h = q.register_forward_pre_hook(lambda m, a: seen.append((m.weight.requires_grad, torch.is_grad_enabled())))
    try:
        score(model, batches, "hessian", unit="row")
    finally:
        h.remove()
    assert seen and all(flag is False for flag, _ in seen), "weights required grad during scoring"
    assert all(enabled for _, enabled in seen)
    assert all(p.grad is None for p in model.parameters()), "scoring allocated weight gradients"
    assert all(p.requires_grad for p in model.parameters()), "requires_grad flags not restored"


# ---------------------------------------------------------------- forward-only metrics
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_magnitude_is_row_and_column_norm(arch):
    model = tiny_model(arch, vocab_size=VOCAB)
    for p in (1, 2):
        rows = score(model, metric=f"magnitude-l{p}", unit="row", normalize="none")
        cols = score(model, metric="magnitude", p=p, unit="column", normalize="none")
        for n, m in find_targets(model).items():
            w = m.weight.t() if arch == "gpt2" else m.weight
            torch.testing.assert_close(rows[n], torch.linalg.norm(w, ord=p, dim=1).detach())
            torch.testing.assert_close(cols[n], torch.linalg.norm(w, ord=p, dim=0).detach())
            assert rows[n].shape == (rows.shapes[n][0],)


def test_gpt2_conv1d_scores_use_out_in_orientation():
    model = model64("gpt2", layers=1)
    name = "transformer.h.0.mlp.c_fc"
    d_in, d_out = model.get_submodule(name).weight.shape      # Conv1D stores (d_in, d_out)
    rows = score(model, make_batches("gpt2"), "taylor", **exact("row"))
    elem = score(model, metric="magnitude", unit="element", normalize="none")
    assert rows[name].shape == (d_out,) and rows.shapes[name] == (d_out, d_in)
    assert elem[name].shape == (d_out, d_in)
    torch.testing.assert_close(elem[name], model.get_submodule(name).weight.t().abs().float())


def captured_io(model, batches):
    """{target: (inputs, outputs)} of every forward, through plain hooks."""
    seen = {n: ([], []) for n in find_targets(model)}

    def keep(name):
        def hook(module, args, output):
            seen[name][0].append(args[0].detach())
            seen[name][1].append(output.detach())
        return hook
    hooks = [m.register_forward_hook(keep(n)) for n, m in find_targets(model).items()]
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in hooks:
        h.remove()
    return seen


def test_wanda_and_activation_norms_skip_padding():
    model, batches = model64("llama", layers=1), make_batches("llama", pad=True)
    io = captured_io(model, batches)
    wanda = score(model, batches, "wanda", **exact("row"))
    act_r = score(model, batches, "activation", **exact("row"))
    act_c = score(model, batches, "activation", **exact("column"))
    for n, w in weights(model).items():
        xs = torch.cat([x[b["attention_mask"].bool()] for x, b in zip(io[n][0], batches)])
        ys = torch.cat([y[b["attention_mask"].bool()] for y, b in zip(io[n][1], batches)])
        x_norm = xs.norm(dim=0)
        torch.testing.assert_close(wanda[n], (w.abs() * x_norm).sum(1), rtol=1e-8, atol=0)
        torch.testing.assert_close(act_r[n], ys.norm(dim=0), rtol=1e-8, atol=0)
        torch.testing.assert_close(act_c[n], x_norm, rtol=1e-8, atol=0)


def test_zo_taylor_ranks_like_exact_taylor():
    """2000 SPSA perturbations of one 8x16 layer: the estimate ranks rows as the exact gradient does
    (one batch, so the per-batch and total-gradient Taylor scores coincide)."""
    model = model64("llama", layers=1, hidden=16)
    batches = make_batches("llama", n=1, b=2, t=6)
    targets = ["v_proj"]
    zo = score(model, batches, "zo-taylor", unit="row", targets=targets, num_perturbations=2000, eps=1e-3, seed=3)
    ref = score(model, batches, "taylor", unit="row", targets=targets)
    rho = zo.rank_correlation(ref)
    assert min(rho.values()) > 0.8, rho
    again = score(model, batches, "zo-taylor", unit="row", targets=targets, num_perturbations=3, seed=3)
    repeat = score(model, batches, "zo-taylor", unit="row", targets=targets, num_perturbations=3, seed=3)
    assert all(torch.equal(again[n], repeat[n]) for n in again)


def test_zo_taylor_does_not_touch_the_weights():
    model = tiny_model("llama", vocab_size=VOCAB, layers=1)
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    score(model, make_batches("llama", n=1), "zo-taylor", num_perturbations=4, eps=1e-2, perturbation="gaussian")
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())


# ---------------------------------------------------------------- element saliences
def test_grasp_matches_finite_difference_hessian_vector_product():
    """BERT: its classification loss stays in float64 (the causal-LM loss is computed in float32)."""
    model, batches = model64("bert", layers=1, hidden=16), make_batches("bert", n=2, b=2, t=5)
    w = weights(model)

    def total_grad(m):
        out = {n: torch.zeros_like(v) for n, v in w.items()}
        for b in batches:
            for n, g in plain_grads(m, b).items():
                out[n] += g
        return out
    g = total_grad(model)
    h = 1e-5
    shifted = []
    for sign in (1, -1):
        m = copy.deepcopy(model)
        with torch.no_grad():
            for n, mod in find_targets(m).items():
                weight_out_in(mod).add_(sign * h * g[n])
        shifted.append(total_grad(m))
    got = score(model, batches, "grasp", **exact("element"))
    for n in w:
        hg = (shifted[0][n] - shifted[1][n]) / (2 * h)
        torch.testing.assert_close(got[n], -w[n] * hg, rtol=1e-4, atol=1e-9 * float(hg.abs().max() * w[n].abs().max()))


def test_synflow_is_abs_weight_times_flow_gradient():
    model = model64("llama", layers=1)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p in ref.parameters():
            p.abs_()
            p.requires_grad_(True)
    ones = torch.ones(1, 7, model.config.hidden_size, dtype=torch.float64)
    ref(inputs_embeds=ones, attention_mask=torch.ones(1, 7, dtype=torch.long)).logits.sum().backward()
    got = score(model, metric="synflow", synflow_seq_len=7, **exact("row"))
    for n, m in find_targets(ref).items():
        torch.testing.assert_close(got[n], (m.weight * m.weight.grad).abs().sum(1), rtol=1e-8, atol=0)


# ---------------------------------------------------------------- groups
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_group_scores_are_sums_of_member_rows_and_columns(arch):
    model, batches = model64(arch), make_batches(arch)
    rows = score(model, batches, "taylor", **exact("row"))
    cols = score(model, batches, "taylor", **exact("column"))
    groups = score(model, batches, "taylor", **exact("group"))
    maxed = score(model, batches, "taylor", **exact("group"), combine="max")
    assert set(groups) == {g.name for g in neuron_groups(model)}
    for g in neuron_groups(model):
        by_hand = torch.zeros(g.size, dtype=torch.float64)
        per_member = []
        for j in range(g.size):
            shares = []
            for m in g.members:
                source = rows if m.unit == "row" else cols
                shares.append(float(source[m.module][m.indices([j])].sum()))
            by_hand[j] = sum(shares)
            per_member.append(max(shares))
        torch.testing.assert_close(groups[g.name], by_hand, rtol=1e-10, atol=0)
        torch.testing.assert_close(maxed[g.name], torch.tensor(per_member, dtype=torch.float64), rtol=1e-10, atol=0)
        assert groups.groups[g.name] == g


def test_group_layout_helper_matches_member_indices():
    model = tiny_model("gpt2", vocab_size=VOCAB, layers=1)
    g = [g for g in neuron_groups(model) if g.kind == "attention"][0]
    fake = {m.module: {m.unit: torch.arange(500, dtype=torch.float64)} for m in g.members}
    got = group_scores(g, fake)
    for j in range(g.size):
        assert float(got[j]) == sum(float(m.indices([j]).double().sum()) for m in g.members)


# ---------------------------------------------------------------- normalisation, errors, restoration
def test_normalisation_per_layer_and_raw_values():
    model = tiny_model("llama", vocab_size=VOCAB, layers=1)
    s = score(model, metric="magnitude", unit="row")
    for n in s:
        assert abs(float(s[n].abs().mean()) - 1) < 1e-5
        torch.testing.assert_close(s.raw(n), torch.linalg.norm(weight_out_in(model.get_submodule(n)), dim=1).detach())
    assert abs(float(s.renormalize("max")[n].max()) - 1) < 1e-6


def test_random_is_seeded():
    model = tiny_model("llama", vocab_size=VOCAB, layers=1)
    a, b, c = (score(model, metric="random", unit="group", seed=s) for s in (1, 1, 2))
    assert all(torch.equal(a[n], b[n]) for n in a) and not all(torch.equal(a[n], c[n]) for n in a)


def test_unknown_metric_for_unit_lists_the_allowed_ones():
    model = tiny_model("llama", vocab_size=VOCAB, layers=1)
    with pytest.raises(ValueError, match="allowed") as err:
        score(model, make_batches("llama"), "activation", unit="element")
    assert "snip" in str(err.value) and "activation" not in allowed_metrics("element")
    with pytest.raises(ValueError, match="unit"):
        score(model, None, "magnitude", unit="neuron")
    with pytest.raises(ValueError, match="normalize"):
        score(model, None, "magnitude", normalize="median")
    with pytest.raises(ValueError, match="empty"):
        score(model, [], "taylor")
    with pytest.raises(ValueError, match="needs calibration batches"):
        score(model, None, "taylor")
    with pytest.raises(TypeError, match="unknown options"):
        score(model, None, "magnitude", pp=2)


def test_nan_scores_name_the_layer():
    model = tiny_model("llama", vocab_size=VOCAB, layers=1)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj"):
        score(model, None, "magnitude")


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


@pytest.mark.parametrize("metric", ["taylor", "grasp", "zo-taylor", "wanda"])
def test_model_is_restored_even_on_error(metric):
    model = tiny_model("llama", vocab_size=VOCAB, layers=1)
    model.train()
    model.model.layers[0].mlp.eval()
    for i, p in enumerate(model.parameters()):
        p.requires_grad_(i % 2 == 0)
    flags = [p.requires_grad for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    hooks = hook_count(model)
    good = make_batches("llama")
    score(model, good, metric, num_perturbations=2)
    broken = good[:1] + [{"input_ids": good[1]["input_ids"], "labels": good[1]["labels"][:, :2]}]
    with pytest.raises(Exception):
        score(model, broken, metric, num_perturbations=2)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert [m.training for m in model.modules()] == modes
    assert hook_count(model) == hooks
    assert all(p.grad is None for p in model.parameters())


def test_num_batches_caps_any_iterable():
    model = model64("llama", layers=1)
    batches = make_batches("llama", n=3)
    capped = score(model, iter(batches), "taylor", num_batches=2, **exact("row"))
    first_two = score(model, batches[:2], "taylor", num_batches=None, **exact("row"))
    assert capped.meta["num_batches"] == 2
    assert all(torch.equal(capped[n], first_two[n]) for n in capped)
    assert isinstance(capped, Scores) and capped.metric == "taylor" and capped.unit == "row"


# ---------------------------------------------------------------- torch.distributed
def _rank_scores(rank, init_file, out_dir):
    torch.set_num_threads(1)
    with gloo_ranks(rank, 2, init_file):
        model, batches = model64("llama", layers=1), make_batches("llama", n=2)
        for metric in ("taylor", "hessian", "wanda", "zo-taylor"):
            s = score(model, batches[rank:rank + 1], metric, num_perturbations=3, **exact("row"))
            torch.save(dict(s.items()), f"{out_dir}/{metric}-{rank}.pt")


def test_distributed_ranks_sum_their_batches(tmp_path):
    """Two gloo ranks scoring one batch each get what one process gets from both batches."""
    model, batches = model64("llama", layers=1), make_batches("llama", n=2)
    alone = {m: score(model, batches, m, **exact("row")) for m in ("taylor", "hessian", "wanda")}  # warms imports
    run_ranks(_rank_scores, str(tmp_path), nprocs=2, start_method="fork")  # forked children reuse the imports: fast
    for metric, ref in alone.items():
        for rank in (0, 1):
            got = torch.load(tmp_path / f"{metric}-{rank}.pt")
            for n in ref:
                torch.testing.assert_close(got[n], ref[n], rtol=1e-10, atol=0)
    zo = [torch.load(tmp_path / f"zo-taylor-{r}.pt") for r in (0, 1)]
    assert all(torch.equal(zo[0][n], zo[1][n]) for n in zo[0])


def test_a_layer_without_gradient_scores_zero_with_a_warning():
    model, batches = model64("llama", layers=1), make_batches("llama")
    model.model.layers[0].mlp.spare = torch.nn.Linear(4, 4, dtype=torch.float64)  # never called
    with pytest.warns(UserWarning, match="score 0"):
        s = score(model, batches, "taylor", **exact("row"))
    assert torch.equal(s["model.layers.0.mlp.spare"], torch.zeros(4, dtype=torch.float64))
    assert float(s["model.layers.0.mlp.up_proj"].sum()) > 0


# ---------------------------------------------------------------- block recomputation
@pytest.mark.parametrize("arch,metric", [("llama", "taylor"), ("gpt2", "taylor"), ("bert", "hessian"), ("llama", "snip")])
def test_recomputing_blocks_gives_the_same_scores(arch, metric):
    from rowsft.scoring.recompute import transformer_blocks
    model, batches = model64(arch), make_batches(arch, pad=True)
    assert len(transformer_blocks(model)) == model.config.num_hidden_layers
    kept = score(model, batches, metric, recompute=False, **exact("row"))
    recomputed = score(model, batches, metric, recompute=True, **exact("row"))
    for n in kept:
        torch.testing.assert_close(recomputed[n], kept[n], rtol=1e-12, atol=0)
    assert all("forward" not in b.__dict__ for b in transformer_blocks(model)), "block forwards not restored"


def test_recomputing_blocks_keeps_far_fewer_bytes_alive():
    """Peak bytes allocated above the start (the profiler's allocation accounting) over one calibration pass:
    recomputation keeps block inputs, not every block's activations and layer inputs."""
    from rowsft.memory.measure import cpu_peak
    model = tiny_model("llama", vocab_size=VOCAB, layers=6)
    batches = make_batches("llama", n=1, b=4, t=64)
    peaks = {flag: cpu_peak(lambda: score(model, batches, "taylor", recompute=flag))["peak_delta"]
             for flag in (False, True)}
    assert peaks[True] < 0.5 * peaks[False], peaks


def test_block_forwards_are_restored_after_a_failed_pass():
    from rowsft.scoring.recompute import transformer_blocks
    model = tiny_model("llama", vocab_size=VOCAB, layers=2)
    good = make_batches("llama")
    broken = [{"input_ids": good[0]["input_ids"], "labels": good[0]["labels"][:, :2]}]
    with pytest.raises(Exception):
        score(model, broken, "taylor")
    assert all("forward" not in b.__dict__ for b in transformer_blocks(model))
