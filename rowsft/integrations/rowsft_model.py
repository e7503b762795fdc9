"""``RowSFTModel``: peft's calls on a model built with `rowsft.apply`, reading and writing rowsft's own folders.

rowsft is a peft method (``peft.get_peft_model(model, rowsft.RowSFTConfig(...))``, see
`rowsft.integrations.peft_config`); use that for new work. This wrapper stays for models made by the short
verb ``rowsft.apply(model, selection)`` and for the adapter folders `rowsft.save_adapter` and
`rowsft.integrations.RowSFTTrainerCallback` write (rowsft's own format, ``format_version``), which peft does
not read::

    rowsft.apply(model, selection)
    wrapped = RowSFTModel(model)
    wrapped.print_trainable_parameters()      # trainable params: 1,234 || all params: ... || trainable%: 0.1234
    wrapped.save_pretrained("runs/x")         # rowsft.save_adapter's folder
    wrapped = RowSFTModel.from_pretrained(fresh_base, "runs/x", is_trainable=True)
    plain = wrapped.merge_and_unload()

It needs no peft installed.
"""
from __future__ import annotations

import contextlib

from torch import nn

from rowsft.layers import adapters, tuner
from rowsft.layers.adapter_checks import read_adapter_config


class RowSFTModel(nn.Module):
    """A model carrying rowsft sparse layers, with PEFT's ``PeftModel`` calls.

    Attributes the wrapper lacks are looked up on the wrapped model (``config``, ``generate``, ...),
    and calling it calls the wrapped model.
    """

    def __init__(self, model: nn.Module, base_model_name_or_path: str | None = None):
        super().__init__()
        if not tuner.sparse_layers(model):
            raise ValueError("RowSFTModel wraps a model after rowsft.apply(model, selection); this one has no "
                             "rowsft sparse layers (for a peft model use peft.get_peft_model(model, "
                             "rowsft.RowSFTConfig(...)) or rowsft.integrations.get_rowsft_model)")
        self.base_model = model
        self.base_model_name_or_path = base_model_name_or_path

    # ---------------------------------------------------------------- delegation
    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def get_base_model(self) -> nn.Module:
        """The wrapped model (still carrying the sparse layers)."""
        return self.base_model

    @property
    def selection(self):
        """The `Selection` applied to the model."""
        return tuner.current_selection(self.base_model)

    # ---------------------------------------------------------------- PEFT's calls
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, all)`` parameter counts, as PEFT's method of that name."""
        return tuner.trainable_parameters(self.base_model)

    def print_trainable_parameters(self) -> None:
        """``trainable params: N || all params: M || trainable%: P`` (PEFT's format)."""
        tuner.print_trainable_parameters(self.base_model)

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """Write ``adapter_config.json`` + ``adapter_model.safetensors`` into ``save_directory``.

        As PEFT's ``save_pretrained``, the two files go beside whatever the folder already holds
        (``checkpoint-500/``, ``README.md``, ...): nothing else is replaced or deleted, and a killed save
        leaves the earlier adapter files. A file at ``save_directory`` is refused. Accepts and ignores
        PEFT's keyword arguments (``safe_serialization``, ...), except ``is_main_process=False`` which
        skips writing (as on non-zero ranks)."""
        if not kwargs.get("is_main_process", True):
            return
        adapters.save_adapter(self.base_model, save_directory, overwrite=True,
                              **({"base_model_name": self.base_model_name_or_path}
                                 if self.base_model_name_or_path else {}))

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id, is_trainable: bool = False, **kwargs) -> "RowSFTModel":
        """Load the adapter folder ``model_id`` into the plain ``model``.

        As in PEFT, the adapter is frozen (inference) unless ``is_trainable=True``."""
        config = read_adapter_config(model_id)
        adapters.load_adapter(model, model_id)
        if not is_trainable:
            for p in model.parameters():
                p.requires_grad_(False)
        return cls(model, config.get("base_model_name_or_path"))

    def merge_adapter(self) -> None:
        tuner.merge(self.base_model)

    def unmerge_adapter(self) -> None:
        tuner.unmerge(self.base_model)

    def merge_and_unload(self) -> nn.Module:
        """Fold the updates into the weights and return the plain model (with original module types)."""
        return tuner.merge_and_unload(self.base_model)

    def unload(self) -> nn.Module:
        """Drop the updates and return the plain model."""
        return tuner.unload(self.base_model)

    @contextlib.contextmanager
    def disable_adapter(self):
        """Run the base model without the updates inside the ``with`` block (merge-free: the updates
        are only skipped, the base weights are not touched)."""
        layers = [layer for layer in tuner.sparse_layers(self.base_model).values() if not layer.merged]
        if len(layers) != len(tuner.sparse_layers(self.base_model)):
            raise RuntimeError("disable_adapter needs unmerged updates; call unmerge_adapter() first")
        skipped = [_SkipUpdate(layer) for layer in layers]
        try:
            yield
        finally:
            for s in skipped:
                s.restore()

    def __repr__(self) -> str:
        return f"RowSFTModel({tuner.current_selection(self.base_model).summary()})\n{self.base_model!r}"


class _SkipUpdate:
    """Makes one sparse layer forward its base layer alone until ``restore()`` (a forward hook). A layer that trains
    its rows inside the base weight (`rowsft.layers.in_weight`) has them taken out meanwhile (the pretrained rows put
    back, bit for bit), else its base layer would run with the trained rows; they are written again at its next
    forward after ``restore()``."""

    def __init__(self, layer: nn.Module):
        base = layer.base_layer
        self.layer, self.in_weight = layer, bool(getattr(layer, "in_weight", False))
        if self.in_weight:
            layer.set_train_in_weight(False)
        self.handle = layer.register_forward_hook(lambda module, args, output: base(*args))

    def restore(self) -> None:
        self.handle.remove()
        if self.in_weight:
            self.layer.set_train_in_weight(True)


__all__ = ["RowSFTModel"]
