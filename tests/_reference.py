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
