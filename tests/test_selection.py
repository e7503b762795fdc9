"""select(): budgets and strategies against hand-made references (torch.topk, a plain greedy loop, peft LoRA)."""
import copy
import json

import pytest
import torch

from rowsft.data.models import tiny_model
from rowsft.scoring import score
from rowsft.scoring.scores import Scores
from rowsft.selection import Selection, TotalParams, lora_parity, select
from rowsft.targets import find_targets, linear_shape, neuron_groups

SHAPES = {"model.layers.0.self_attn.q_proj": (16, 8), "model.layers.0.self_attn.o_proj": (8, 16),
          "model.layers.0.mlp.up_proj": (32, 8), "model.layers.1.mlp.up_proj": (32, 8)}


def random_scores(unit="row", seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    size = {"row": lambda s: (s[0],), "column": lambda s: (s[1],), "element": lambda s: s}[unit]
    return Scores({n: torch.rand(size(s), generator=g) for n, s in shapes.items()}, "taylor", unit, "mean", shapes)


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", vocab_size=128)


# ---------------------------------------------------------------- per-layer
@pytest.mark.parametrize("unit", ["row", "column", "element"])
def test_per_layer_is_exact_topk(unit):
    s = random_scores(unit)
    sel = select(s, 3)
    for name, values in s.items():
        expected = torch.sort(torch.topk(values.reshape(-1), 3).indices).values
        assert torch.equal(sel[name], expected)
        assert sel.unit(name) == unit and sel.layers[name].shape == SHAPES[name]
    assert sel.trainable_parameters == sum(3 * {"row": s_[1], "column": s_[0], "element": 1}[unit]
                                           for s_ in SHAPES.values())


def test_ties_go_to_the_lower_index():
    s = Scores({n: torch.ones(sh[0]) for n, sh in SHAPES.items()}, "random", "row", "none", SHAPES)
    sel = select(s, 4)
    assert all(sel[n].tolist() == [0, 1, 2, 3] for n in SHAPES)
    glob = select(s, 4, strategy="global", min_per_layer=0)  # 4 * (8 + 16 + 8 + 8) = 160 parameters
    assert glob["model.layers.0.self_attn.q_proj"].tolist() == list(range(16))  # earlier layer first: 128
    assert glob["model.layers.0.self_attn.o_proj"].tolist() == [0, 1]           # then 2 x 16
    assert set(glob) == {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj"}


def test_ratio_and_multiple_of():
    s = random_scores()
    sel = select(s, 0.25)
    assert {n: sel.layers[n].k for n in SHAPES} == {n: round(0.25 * sh[0]) for n, sh in SHAPES.items()}
    sel = select(s, 0.3, multiple_of=4)
    assert all(sel.layers[n].k % 4 == 0 and sel.layers[n].k > 0 for n in SHAPES)
    assert sel.layers["model.layers.0.mlp.up_proj"].k == 8  # 9.6 -> nearest multiple of 4
    assert select(s, 0.01).layers["model.layers.0.self_attn.o_proj"].k == 1  # at least min_per_layer


def test_per_layer_total_params_stays_within_budget():
    s = random_scores()
    sel = select(s, TotalParams(300))
    assert sel.trainable_parameters <= 300
    assert sel.meta["budget"] == {"total_params": 300}


def test_filters_by_module_type_and_layer():
    s = random_scores()
    assert list(select(s, 2, module_types=["up_proj"])) == ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]
    assert list(select(s, 2, layers=[1])) == ["model.layers.1.mlp.up_proj"]


# ---------------------------------------------------------------- global
def greedy_reference(s, total, floor, ceiling):
    """Plain loop: floors first, then units in descending score order while the budget lasts."""
    costs = {n: sh[1] for n, sh in s.shapes.items()}
    counts = {n: min(floor, s[n].numel()) for n in s}
    left = total - sum(counts[n] * costs[n] for n in s)
    items = []
    for li, n in enumerate(s):
        order = sorted(range(s[n].numel()), key=lambda i: (-float(s[n][i]), i))
        top = min(ceiling, s[n].numel())
        items += [(-float(s[n][i]), li, r, n) for r, i in enumerate(order) if counts[n] <= r < top]
    for neg, _, _, n in sorted(items):
        if costs[n] > left:
            break
        counts[n] += 1
        left -= costs[n]
    return counts


@pytest.mark.parametrize("floor,ceiling", [(1, None), (0, 10), (2, 6)])
def test_global_threshold_bounds_and_total(floor, ceiling):
    s = random_scores(seed=3)
    budget = 400
    sel = select(s, TotalParams(budget), strategy="global", min_per_layer=floor, max_per_layer=ceiling)
    assert sel.trainable_parameters <= budget
    expected = greedy_reference(s, budget, floor, ceiling or 10 ** 9)
    assert {n: sel.layers[n].k if n in sel.layers else 0 for n in s} == expected
    threshold = sel.meta["threshold"]
    for n, values in s.items():
        k = expected[n]
        assert floor <= k <= (ceiling or 10 ** 9)
        chosen = set(sel[n].tolist()) if n in sel.layers else set()
        ranked = torch.sort(values, descending=True).indices.tolist()
        assert chosen == set(ranked[:k])
        beyond = [float(values[i]) for r, i in enumerate(ranked) if r >= floor and i in chosen]
        assert all(v >= threshold for v in beyond)
        if ceiling is None or k < ceiling:
            assert all(float(values[i]) <= threshold for i in ranked[k:])


def test_global_counts_ratio_and_int_in_parameters():
    s = random_scores(seed=4)
    per_layer = select(s, 0.25)
    glob = select(s, 0.25, strategy="global")
    assert glob.trainable_parameters <= per_layer.trainable_parameters
    assert glob.trainable_parameters >= per_layer.trainable_parameters - max(sh[1] for sh in SHAPES.values())
    even = select(s, 4, strategy="global", multiple_of=2)
    assert even.trainable_parameters <= 4 * sum(sh[1] for sh in SHAPES.values())
    assert all(c.k % 2 == 0 for c in even.layers.values())


def test_global_element_top_k():
    s = random_scores("element", seed=5)
    sel = select(s, TotalParams(50), strategy="global", min_per_layer=0)
    assert sel.trainable_parameters == 50
    everything = torch.cat([v.reshape(-1) for v in s.values()])
    threshold = float(torch.topk(everything, 50).values[-1])
    for n, v in s.items():
        chosen = set(sel[n].tolist()) if n in sel.layers else set()
        assert chosen == set(torch.nonzero(v.reshape(-1) >= threshold).reshape(-1).tolist())


# ---------------------------------------------------------------- LoRA parity against peft
def peft_lora_counts(model, rank, targets):
    from peft import LoraConfig, get_peft_model
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=rank, target_modules=targets))
    counts = {}
    for name, p in peft_model.named_parameters():
        if p.requires_grad and ".lora_" in name:
            module = name.split("base_model.model.", 1)[1].split(".lora_")[0]
            counts[module] = counts.get(module, 0) + p.numel()
    return counts


@pytest.mark.parametrize("arch,targets", [("llama", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"]), ("gpt2", ["c_attn", "c_proj", "c_fc"])])
@pytest.mark.parametrize("rank", [3, 8])
def test_lora_parity_matches_peft_within_one_unit_per_layer(arch, targets, rank):
    model = tiny_model(arch, vocab_size=128)
    peft_counts = peft_lora_counts(model, rank, targets)
    for unit in ("row", "column", "element"):
        s = score(model, metric="magnitude", unit=unit, targets=targets)
        sel = select(s, lora_parity(rank))
        assert set(sel) == set(peft_counts)
        for name, choice in sel.layers.items():
            d_out, d_in = choice.shape
            unit_cost = {"row": d_in, "column": d_out, "element": 1}[unit]
            assert abs(choice.trainable_parameters - peft_counts[name]) <= unit_cost / 2, (unit, name)
        assert sel.meta["budget"] == {"lora_parity": rank}
    glob = select(score(model, metric="magnitude", targets=targets), lora_parity(rank), strategy="global")
    assert glob.trainable_parameters <= sum(peft_counts.values())


# ---------------------------------------------------------------- groups
def test_group_selection_expands_to_member_rows_and_columns(llama):
    s = score(llama, metric="magnitude", unit="group")
    sel = select(s, 1)
    for g in neuron_groups(llama):
        best = int(torch.argmax(s[g.name]))
        for m in g.members:
            assert sel.unit(m.module) == m.unit
            assert torch.equal(sel[m.module], m.indices([best]))
    mlp = "model.layers.0.mlp"
    j = int(torch.argmax(s[mlp]))
    assert sel["model.layers.0.mlp.gate_proj"].tolist() == [j] == sel["model.layers.0.mlp.down_proj"].tolist()
    attn = sel["model.layers.0.self_attn.q_proj"]
    assert attn.numel() == 32 and sel["model.layers.0.self_attn.o_proj"].numel() == 32  # 2 query heads of 16
    assert sel.meta["unit"] == "group"
    mlp_only = select(s, 4, module_types=["mlp"])
    assert all(".mlp." in n for n in mlp_only)


def test_group_global_budget(llama):
    s = score(llama, metric="magnitude", unit="group")
    sel = select(s, TotalParams(20_000), strategy="global", min_per_layer=0)
    assert 0 < sel.trainable_parameters <= 20_000


# ---------------------------------------------------------------- lean units
def test_lean_units_follow_the_activation_rule(llama):
    rows = score(llama, metric="magnitude", unit="row")
    cols = score(llama, metric="magnitude", unit="column")
    small = select({"row": rows, "column": cols}, lora_parity(4), unit_policy="lean", rebuilt_inputs=False)
    assert set(small.meta["unit_choice"].values()) == {"column"}
    # q/k/v share one input of d_in=64 per block: columns keep sum(P/d_out) = 8 + 12 + 12 = 32 < 64
    assert small.meta["unit_choice_saved_per_token"]["k_proj/q_proj/v_proj"] == {"row": 128.0, "column": 64.0}
    assert all(c.unit == "column" for c in small.layers.values())
    for name, choice in small.layers.items():
        d_out, d_in = choice.shape
        assert choice.k == round(4 * (d_in + d_out) / d_out)
    big = select({"row": rows, "column": cols}, 0.5, unit_policy="lean", rebuilt_inputs=False)
    choice = big.meta["unit_choice"]
    assert choice["q_proj"] == choice["k_proj"] == choice["v_proj"] == "row"   # 3 x 0.5 d_in > d_in
    assert choice["gate_proj"] == choice["up_proj"] == "row"                   # 2 x 0.5 d_in = d_in: tie keeps rows
    assert choice["o_proj"] == choice["down_proj"] == "column"                 # alone: k columns < d_in
    assert big.unit("model.layers.1.self_attn.o_proj") == "column"
    same = select({"row": rows, "column": cols}, 16, unit_policy="lean", rebuilt_inputs=False)
    o = same.layers["model.layers.0.mlp.down_proj"]
    assert o.unit == "column" and o.trainable_parameters == 16 * 128       # 16 rows' parameters as columns
    glob = select({"row": rows, "column": cols}, TotalParams(8000), strategy="global", unit_policy="lean")
    assert glob.trainable_parameters <= 8000 and glob.meta["unit"] == "lean"
    with pytest.raises(ValueError, match="row.*column"):
        select(rows, 4, unit_policy="lean")


def test_lean_units_count_rebuilt_row_inputs(llama):
    """Default rule (rowsft.layers.rebuild): q/k/v rows pay their input once (the first block), gate/up and down
    rows nothing, o rows d_in per block; 2 blocks of d_in 64 (i 128 for down) at LoRA-4 parity."""
    rows = score(llama, metric="magnitude", unit="row")
    cols = score(llama, metric="magnitude", unit="column")
    sel = select({"row": rows, "column": cols}, lora_parity(4), unit_policy="lean")
    saved = sel.meta["unit_choice_saved_per_token"]
    assert saved["k_proj/q_proj/v_proj"] == {"row": 64.0, "column": 64.0}       # a tie keeps rows
    assert saved["gate_proj/up_proj"]["row"] == 0.0 and saved["down_proj"]["row"] == 0.0
    assert saved["o_proj"]["row"] == 128.0
    choice = sel.meta["unit_choice"]
    assert choice["q_proj"] == choice["gate_proj"] == choice["down_proj"] == "row" and choice["o_proj"] == "column"


# ---------------------------------------------------------------- errors and records
@pytest.mark.parametrize("budget,match", [(2000, r"budget 2000 rows exceeds .*\(16 rows\); use at most 16 or a ratio"),
                                          (0, "positive"), (-3, "positive"), (float("nan"), r"\(0, 1\]"),
                                          (1.5, r"\(0, 1\]"), (True, "not understood"), ("sixty-four", "not understood"),
                                          ("lora:x", "not understood"), ("64", r"budget 64 rows exceeds")])
def test_bad_budgets_say_what_is_allowed(budget, match):
    with pytest.raises(ValueError, match=match):
        select(random_scores(), budget)


def test_budget_text_reads_as_the_command_line_writes_it():
    """One parser for every budget: text as a CLI or YAML job writes it means the same as the objects."""
    from rowsft.selection.budgets import parse_budget
    assert parse_budget("8") == 8 and isinstance(parse_budget("8"), int)
    assert parse_budget("0.25") == 0.25 and parse_budget(" LoRA:4 ") == lora_parity(4)
    assert parse_budget("params:1e3") == TotalParams(1000)
    scores = random_scores()
    by_text, by_object = select(scores, "lora:2"), select(scores, lora_parity(2))
    assert {n: c.indices.tolist() for n, c in by_text.layers.items()} == \
        {n: c.indices.tolist() for n, c in by_object.layers.items()}


def test_other_errors():
    s = random_scores()
    with pytest.raises(ValueError, match="block indices here"):
        select(s, 2, layers=[7])
    with pytest.raises(ValueError, match="module types here"):
        select(s, 2, module_types=["down_proj"])
    with pytest.raises(ValueError, match="strategy"):
        select(s, 2, strategy="best")
    with pytest.raises(ValueError, match="lora_parity"):
        select(s, lora_parity(64))
    with pytest.raises(ValueError, match="min_per_layer"):
        select(s, TotalParams(10), strategy="global", min_per_layer=2)
    with pytest.raises(ValueError, match="rank"):
        lora_parity(0)
    with pytest.raises(ValueError, match="empty"):
        select(Scores({}, "taylor", "row"), 2)
    nan = random_scores()
    nan._values["model.layers.0.mlp.up_proj"][3] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj.*NaN"):
        select(nan, 2)


def test_meta_records_how_and_round_trips(tmp_path):
    s = random_scores()
    sel = select(s, lora_parity(2), strategy="global")
    assert {k: sel.meta[k] for k in ("metric", "unit", "budget", "strategy")} == {
        "metric": "taylor", "unit": "row", "budget": {"lora_parity": 2}, "strategy": "global"}
    sel.save(tmp_path / "sel.json")
    back = Selection.load(tmp_path / "sel.json")
    assert back.meta == json.loads(json.dumps(sel.meta)) and all(torch.equal(back[n], sel[n]) for n in sel)


def test_selection_from_real_scores_fits_the_model(llama):
    sel = select(score(llama, metric="magnitude"), 0.1, strategy="global")
    for name, choice in sel.layers.items():
        assert choice.shape == linear_shape(find_targets(llama)[name])
