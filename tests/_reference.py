"""Independent references for tests: the causal-LM loss from every position's logits, in the model's dtype.

transformers' own loss casts logits to float32 (so a float64 model would be compared through a float32
loss), and rowsft's training loss keeps only the labelled positions (rowsft.lean_loss); this one does
neither, so float64 comparisons against it hold to 1e-10.
"""
import torch
import torch.nn.functional as F


def dense_loss(model, batch: dict) -> torch.Tensor:
    """Mean cross-entropy of the shifted labels over all positions (classification: the model's loss)."""
    labels = batch.get("labels")
    if not (torch.is_tensor(labels) and labels.dim() == 2):
        return model(**batch).loss
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits     # (B, T, V)
    if logits.dtype != torch.float64:
        logits = logits.float()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


def random_batches(n: int = 4, batch_size: int = 2, seq_len: int = 16, vocab_size: int = 128, seed: int = 0,
                   first_token: int = 3) -> list[dict]:
    """``n`` causal-LM batches of seeded random tokens, every position labelled (labels = inputs).

    For tests and memory/time measurements where the text does not matter; token ids start at
    ``first_token`` to stay clear of the tiny models' pad/bos/eos ids (0, 1, 2).
    """
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(first_token, vocab_size, (batch_size, seq_len), generator=g)  # (batch, seq)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def mask_of(choice) -> torch.Tensor:
    """The boolean ``(d_out, d_in)`` mask of the weights a `LayerChoice` trains (rows, columns or flat elements)."""
    mask = torch.zeros(choice.shape, dtype=torch.bool)
    if choice.unit == "row":
        mask[choice.indices] = True
    elif choice.unit == "column":
        mask[:, choice.indices] = True
    else:
        mask.view(-1)[choice.indices] = True
    return mask


def train_beside_masked_dense(original, selection, make_optimizer, batches, apply):
    """Train ``apply(copy of original)`` and, step for step on ``batches``, a dense copy of ``original`` whose
    selected modules' whole weights train with their gradients masked to the selection (rows, columns, elements;
    a Conv1D's stored transpose handled); every step's losses must agree to 1e-10 (run in float64).
    ``make_optimizer(params)`` builds each side's optimizer. Returns ``(reference, model, masks)``."""
    import copy

    from transformers.pytorch_utils import Conv1D

    reference = copy.deepcopy(original)
    for p in reference.parameters():
        p.requires_grad_(False)
    weights = {name: reference.get_submodule(name).weight.requires_grad_(True) for name in selection.layers}
    masks = {name: mask_of(selection.layers[name]) for name in selection.layers}
    ref_opt = make_optimizer(list(weights.values()))
    model = apply(copy.deepcopy(original))
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad])
    for batch in batches:
        ref_opt.zero_grad()
        ref_loss = reference(**batch).loss
        ref_loss.backward()
        for name, w in weights.items():
            stored = masks[name].t() if isinstance(reference.get_submodule(name), Conv1D) else masks[name]
            w.grad[~stored] = 0
        ref_opt.step()
        opt.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        assert abs(loss.item() - ref_loss.item()) < 1e-10
    return reference, model, masks


def adamw_steps(model, steps, autocast=False, **adamw) -> list[float]:
    """AdamW (lr 1e-2) over ``model``'s trainable parameters, one step per batch of ``steps``, the forward under bf16
    autocast if asked; the losses."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, **adamw)
    losses = []
    for batch in steps:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


# Row, column and element layers over two blocks of a tiny Llama and a tiny GPT-2 (Conv1D), for tests that train all
# three units side by side (`selection_for`).
MIXED_UNITS = {"llama": {"model.layers.0.self_attn.q_proj": "row", "model.layers.0.self_attn.k_proj": "row",
                         "model.layers.0.self_attn.v_proj": "row", "model.layers.0.self_attn.o_proj": "column",
                         "model.layers.1.mlp.gate_proj": "row", "model.layers.1.mlp.up_proj": "row",
                         "model.layers.1.mlp.down_proj": "row", "model.layers.0.mlp.up_proj": "element"},
               "gpt2": {"transformer.h.0.attn.c_attn": "row", "transformer.h.0.attn.c_proj": "column",
                        "transformer.h.1.mlp.c_fc": "row", "transformer.h.1.mlp.c_proj": "row"}}


def out_in(module) -> torch.Tensor:
    """(d_out, d_in) view of a plain module's weight, written independently of rowsft."""
    from transformers.pytorch_utils import Conv1D
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


def selection_for(model, units: dict, seed: int = 0):
    """A seeded random `rowsft.Selection` of ``units`` (``{module name: unit}``): 5 rows, 4 columns or 37 elements."""
    from rowsft.selection.choice import LayerChoice, Selection
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name, unit in units.items():
        d_out, d_in = out_in(model.get_submodule(name)).shape
        limit, k = {"row": (d_out, 5), "column": (d_in, 4), "element": (d_out * d_in, 37)}[unit]
        layers[name] = LayerChoice(unit, torch.sort(torch.randperm(limit, generator=g)[:k]).values, (d_out, d_in))
    return Selection(layers)


def logits_bf16(model, batch: dict) -> torch.Tensor:
    """The logits of ``batch``'s inputs under bf16 autocast, without grad."""
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return model(input_ids=batch["input_ids"]).logits


def assert_train_alike(model, reference, steps, autocast: bool = True) -> None:
    """Train ``model`` and ``reference`` with the same AdamW steps (`adamw_steps`): the same losses and the same
    trained updates of every sparse layer, bit for bit, each of them moved from zero."""
    from rowsft.layers import tuner
    assert adamw_steps(model, steps, autocast=autocast) == adamw_steps(reference, steps, autocast=autocast)
    for (name, a), b in zip(tuner.sparse_layers(model).items(), tuner.sparse_layers(reference).values()):
        assert torch.equal(a.update, b.update), name
        assert a.update.abs().max() > 0, name


def node_names(loss) -> list[str]:
    """The names of every autograd node behind ``loss`` (each node once), e.g. ``"LentRowProductsBackward"``."""
    seen, stack, names = set(), [loss.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(node.name())
        stack.extend(n for n, _ in node.next_functions)
    return names
