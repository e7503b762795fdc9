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
