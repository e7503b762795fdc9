"""Stage 3, the sparse layers: a frozen linear layer plus a trainable sparse update, put into a model
and taken out again.

- :mod:`rowsft.layers.sparse`: ``RowSparseLinear``, ``ColumnSparseLinear``, ``ElementSparseLinear``;
- :mod:`rowsft.layers.forward_paths`: how their forward runs (fused with the frozen matmul, or added into its output);
- :mod:`rowsft.layers.update_forms`: an update as a dense tensor, folded into a weight, and what a layer keeps;
- :mod:`rowsft.layers.autograd`: their autograd functions (no dense weight-sized tensor);
- :mod:`rowsft.layers.products`: the tensor products those functions are made of;
- :mod:`rowsft.layers.grouped`: row layers that read one input (q/k/v, gate/up) updated in one product;
- :mod:`rowsft.layers.group_products`: the one autograd node such a group runs as (a row layer alone too, when its
  rows are written into its weight or its kept cast);
- :mod:`rowsft.layers.lent_rows`: rows lent to a float32/float64 base weight for each frozen product (the default);
- :mod:`rowsft.layers.in_weight`: rows trained inside the base weight (``apply(..., train_in_weight=True)``), or
  under autocast inside its kept cast (the default there);
- :mod:`rowsft.layers.rebuild`: inputs rebuilt in backward from what the frozen graph keeps;
- :mod:`rowsft.layers.cast_weights`: under autocast, base weights cast once and kept across steps;
- :mod:`rowsft.layers.tuner`: ``apply``, ``merge``, ``unmerge``, ``unload``, parameter counts;
- :mod:`rowsft.layers.adapters`: ``save_adapter`` / ``load_adapter`` (PEFT-style folders).
"""
from __future__ import annotations

from rowsft.layers.adapter_checks import read_adapter_config
from rowsft.layers.adapters import load_adapter, save_adapter
from rowsft.layers.sparse import (
                                  SPARSE_LAYERS,
                                  ColumnSparseLinear,
                                  ElementSparseLinear,
                                  RowSparseLinear,
                                  SparseLinear,
                                  input_kept_elsewhere,
                                  kept_input_width,
                                  sparse_layer,
)
from rowsft.layers.tuner import (
                                  apply,
                                  current_selection,
                                  merge,
                                  merge_and_unload,
                                  parameters_to_train,
                                  print_trainable_parameters,
                                  sparse_layers,
                                  trainable_parameters,
                                  unload,
                                  unmerge,
)

__all__ = ["ColumnSparseLinear", "ElementSparseLinear", "RowSparseLinear", "SPARSE_LAYERS", "SparseLinear", "apply",
           "current_selection", "input_kept_elsewhere", "kept_input_width", "load_adapter", "merge",
           "merge_and_unload", "parameters_to_train", "print_trainable_parameters", "read_adapter_config",
           "save_adapter", "sparse_layer", "sparse_layers", "trainable_parameters", "unload", "unmerge"]
