"""Grouped row updates: the row layers that read one input (``q/k/v``; ``gate/up``) run as one autograd node.

Each row layer's update is a thin product, ``x deltaᵀ`` in forward and ``g_rowsᵀ x`` / ``g_rows delta`` in backward.
Layers that read the same ``x`` pay for reading it once per layer; grouped, they read it once per group. The first
layer of a group to run with a new input (the *leader*) computes every member's whole output in one node
(`rowsft.layers.group_products`): the frozen products, and ``[delta_1; ...; delta_m] xᵀ`` ``(K, N)`` in one product
added into each output's rows; the other layers (*members*) take their outputs when they are called with the same
``x``. In backward the node gathers every output's rows' gradients into ``G (N, K)`` and computes ``grad x = Σ g_i W_i
+ G [delta_1; ...]`` in place (separate layers would each make a ``(..., d_in)`` gradient for autograd to add up) and
``grad [delta_1; ...] = Gᵀ x`` once. Nothing dense is made (the concatenated deltas are ``(K, d_in)``, rebuilt in
backward rather than kept), what the node keeps of ``x`` is what one row layer keeps (the input itself, or a
`rowsft.layers.rebuild.Source`), and the results equal the ungrouped layers' up to float rounding (the products are
summed in another order).

A member takes the leader's output only for the very tensor the leader saw (same object, same version) and the delta
it was computed from (same tensor, same version). A group whose layers turn out not to read one tensor (cross-
attention, cached generation: see `RowGroup`) stops grouping; a merged or non-row sibling, a quantized base (its
product runs in bitsandbytes), ``torch.compile`` (which would trace Python state), or a layer run on its own falls
back to the ungrouped update. Layers whose rows train inside their weights (`rowsft.layers.in_weight`) or inside their
kept autocast casts (the default under autocast) run the same way with their rows written into the weights the node
reads (`rowsft.layers.group_products.InWeightProducts`); layers whose rows go different ways in one group form
separate rounds. `assign_groups` forms the groups when `rowsft.apply` builds the layers: row layers of one parent
module with the role ``qkv`` or ``up``.
"""
from __future__ import annotations

import weakref
from collections import defaultdict

import torch

from rowsft.layers.forward_paths import frozen_weight, fusable
from rowsft.layers.group_products import added_rows_outputs, lent_rows_outputs
from rowsft.layers.in_weight import WRITTEN, in_weight_outputs, rows_mode
from rowsft.layers.products import compute_dtype
from rowsft.targets import is_transposed, role

GROUPED_ROLES = ("qkv", "up")


class RowGroup:
    """Row layers that read one input; hands the outputs the leader computed to the members (see the module docstring).

    A group exists to serve layers that read the very same tensor in one forward (self-attention's q/k/v, an MLP's
    gate/up). A miss (a member called with another tensor while outputs wait for it, or a leader called again before
    its members took theirs) drops the waiting outputs and lets that layer lead a new round; a second miss before
    any member takes an output (cross-attention, cached generation: it happens every forward) stops grouping for good
    (``shared_input = False``) and drops every output. One miss alone, as a forward interrupted between q and k
    leaves, changes nothing."""

    MISSES_TO_STOP = 2

    def __init__(self, layers):
        self.layers = list(layers)
        self.shared_input, self._misses = True, 0
        self._pending: dict[int, tuple] = {}      # id(member) -> (weakref to x, x's version, delta's key, output)

    def __getstate__(self):                       # deepcopy / pickle: a pending output is a graph tensor
        return {**self.__dict__, "_pending": {}}

    def groupable(self, layer) -> bool:
        lead = self.layers[0]
        return (self.shared_input and layer.unit == "row" and not layer.merged
                and fusable(layer.base_layer)
                and layer.in_features == lead.in_features and layer.delta.dtype == lead.delta.dtype
                and layer.delta.device == lead.delta.device and not torch.compiler.is_compiling())

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor | None:
        """``layer``'s output (frozen product plus its update) through the group, or None to run it ungrouped (also
        under ``torch.inference_mode``: its tensors have no version to check an output against)."""
        entry = self._pending.get(id(layer))
        if (entry is not None and entry[0]() is x and entry[1] == x._version
                and entry[2] == _delta_key(layer, rows_mode(layer, x))):
            del self._pending[id(layer)]          # the leader found this member groupable for this very x and delta
            self._misses = 0
            return entry[3]                       # its whole output, computed by the leader
        if not self.groupable(layer) or x.is_inference():
            return None
        self._pending.pop(id(layer), None)
        if entry is not None or self._pending:    # outputs for another input (or delta), or members that never came
            self._miss()
            if not self.shared_input:
                return None
        mode = rows_mode(layer, x)
        members = [m for m in self.layers if m is not layer and self.groupable(m) and rows_mode(m, x) == mode]
        if not members:
            return None
        group = [layer, *members]
        if mode in WRITTEN:
            outputs = in_weight_outputs(group, x, layer._input_source(x))
        else:                                     # rows lent to the weights (no autocast: the base weights), or added
            bases = [m.base_layer for m in group]
            products = (x, layer._input_source(x), tuple(is_transposed(b) for b in bases),
                        [frozen_weight(b, x, m.keep_cast_weight) for b, m in zip(bases, group)],
                        [b.bias for b in bases], [m.indices for m in group], [m.delta for m in group])
            if mode == "lent":
                outputs = lent_rows_outputs(*products)
            else:                                 # under autocast x is rebuilt and cast, not folded
                outputs = added_rows_outputs(*products, fold_scaled=compute_dtype(x, layer.delta.dtype) == x.dtype)
        version = x._version
        self._pending = {id(m): (weakref.ref(x), version, _delta_key(m, mode), out)     # members share its mode
                         for m, out in zip(members, outputs[1:])}
        return outputs[0]

    def _miss(self) -> None:
        self._pending, self._misses = {}, self._misses + 1
        self.shared_input = self._misses < self.MISSES_TO_STOP


def _delta_key(layer, mode: str | None) -> tuple:
    """Which delta, in which state, with its rows going where (``mode``, `rows_mode`: the weight, the cast, lent, or
    the usual update): an output computed from it is valid only while this is unchanged."""
    return id(layer.delta), layer.delta._version, mode


def assign_groups(layers: dict) -> list[RowGroup]:
    """Give the row layers (``{name: SparseLinear}``) that share a parent module and read one input (role ``qkv`` or
    ``up``) a common `RowGroup` (``layer.row_group``); every other layer gets None. Returns the groups."""
    by_parent = defaultdict(list)
    for name, layer in layers.items():
        layer.row_group = None
        if layer.unit == "row" and role(name) in GROUPED_ROLES:     # one input width: cross-attention k/v differ
            by_parent[(name.rpartition(".")[0], role(name), layer.in_features)].append(layer)
    groups = []
    for members in by_parent.values():
        if len(members) > 1:
            group = RowGroup(members)
            for layer in members:
                layer.row_group = group
            groups.append(group)
    return groups


__all__ = ["RowGroup", "assign_groups"]
