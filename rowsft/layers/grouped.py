"""Grouped row updates: the row layers that read one input (``q/k/v``; ``gate/up``) compute their updates as one product.

Each row layer's update is a thin product, ``x deltaᵀ`` in forward and ``g_rowsᵀ x`` / ``g_rows delta`` in backward.
Layers that read the same ``x`` pay for reading it once per layer; grouped, they read it once per group. The
first layer of a group to run with a new input (the *leader*) runs `GroupedRowUpdate`: its own frozen product, then
``[delta_1; ...; delta_m] xᵀ`` ``(K, N)`` in one product, adding its own share into its output and returning every
other member's share ``(..., k_i)`` as extra outputs. The others (*members*) run `GroupMemberUpdate` on the same
``x``: their frozen product plus the share the leader computed for them, whose gradient (``g[..., index]``) flows
back into the leader. In backward the leader gathers all shares' gradients into ``G (N, K)`` and computes
``grad x += G [delta_1; ...]`` and ``grad [delta_1; ...] = Gᵀ x`` once; members compute only their frozen
``g W``. Nothing dense is made (the concatenated deltas are ``(K, d_in)``, rebuilt in backward rather than kept),
what the leader keeps of ``x`` is what one row layer keeps (the input itself, or a `rowsft.layers.rebuild.Source`),
and the results equal the ungrouped layers' up to float rounding (the products are summed in another order).

A member uses the leader's share only for the very tensor the leader saw (same object, same version) and the delta
it was computed from (same tensor, same version). A group whose layers turn out not to read one tensor (cross-
attention, cached generation: see `RowGroup`) stops grouping; a merged or non-row sibling, a quantized base (its
product runs in bitsandbytes), ``torch.compile`` (which would trace Python state), or a layer run on its own falls
back to the ungrouped update. Layers whose rows train inside their weights (`rowsft.layers.in_weight`) have no shares:
their group's leader computes every such member's whole output (`rowsft.layers.in_weight.InWeightProducts`) and the
members take it; so do layers whose rows are written into their kept autocast casts (the default under autocast);
layers whose rows go different ways in one group form separate rounds. `assign_groups` forms the
groups when `rowsft.apply` builds the layers: row layers of one parent module with the role ``qkv`` or ``up``.
"""
from __future__ import annotations

import weakref
from collections import defaultdict

import torch

from rowsft.layers.autograd import RowUpdate, _save, _saved, saved_extra
from rowsft.layers.forward_paths import frozen_weight, fusable
from rowsft.layers.in_weight import in_weight_outputs, rows_mode
from rowsft.layers.products import (
    add_into_columns,
    add_product,
    cast,
    compute_dtype,
    flat,
    frozen_input_grad,
    frozen_linear,
    row_gradient,
)
from rowsft.targets import is_transposed, role

GROUPED_ROLES = ("qkv", "up")


class GroupedRowUpdate(torch.autograd.Function):
    """The leader: ``out = x Wᵀ + b`` with its own rows' share added, plus the other members' shares.

    Inputs: ``x (..., d_in)``, frozen ``weight (d_out, d_in)``, ``bias``, ``conv1d``, the leader's ``index (k_0,)``,
    ``source`` (a `rowsft.layers.rebuild.Source` of ``x`` or None), then ``delta_0 (k_0, d_in), ..., delta_m``.
    Outputs: ``out (..., d_out)``, then ``share_1 (..., k_1), ..., share_m``."""

    @staticmethod
    def forward(ctx, x, weight, bias, conv1d, index, source, *deltas):
        dt = compute_dtype(x, deltas[0].dtype)
        ctx.base_dt = compute_dtype(x, weight.dtype)
        base_x = cast(x, ctx.base_dt)
        out = frozen_linear(base_x, weight, bias, conv1d, ctx.base_dt)                    # (..., d_out)
        x_dt = base_x if base_x.dtype == dt else cast(x, dt)
        ctx.sizes = [d.shape[0] for d in deltas]
        stacked = torch.cat([cast(d, dt) for d in deltas])                                  # (K, d_in), transient
        shares = torch.mm(stacked, flat(x_dt).T).split(ctx.sizes)                         # each (k_i, N)
        lead_shape = (*x.shape[:-1], deltas[0].shape[0])
        add_into_columns(out, index, cast(shares[0].T.view(lead_shape), out.dtype))
        others = tuple(s.T.contiguous().view(*x.shape[:-1], s.shape[0]) for s in shares[1:])   # (..., k_i)
        ctx.dt, ctx.x_dtype, ctx.x_shape, ctx.update_dtype = dt, x.dtype, x.shape, deltas[0].dtype
        ctx.source, ctx.columns = source, None
        need_x, need_deltas = ctx.needs_input_grad[0], any(ctx.needs_input_grad[6:])
        _save(ctx, x if need_deltas else None, None, index, weight if need_x else None,
              fold_scaled=dt == x.dtype, extra=deltas if need_x else ())
        return (out, *others)

    @staticmethod
    def backward(ctx, grad_out, *grad_shares):
        kept, _, index, weight = _saved(ctx, RowUpdate)          # the kept input, rebuilt whole as for one row layer
        g_lead = cast(flat(grad_out).index_select(1, index), ctx.dt)                      # (N, k_0)
        rows = torch.cat([g_lead] + [cast(flat(g), ctx.dt) for g in grad_shares], dim=1)  # (N, K)
        grad_x = None
        if ctx.needs_input_grad[0]:                    # g W, then every member's G delta, as one row layer does
            grad_x = frozen_input_grad(grad_out, weight, ctx.base_dt, ctx.x_dtype, ctx.x_shape)   # (..., d_in)
            add_product(grad_x, rows, torch.cat([cast(d, ctx.dt) for d in saved_extra(ctx)]))   # + G (K, d_in)
        grad_deltas = [None] * len(ctx.sizes)
        if any(ctx.needs_input_grad[6:]):
            stacked_grad = row_gradient(rows, kept, ctx.dt)                                # (K, d_in)
            grad_deltas = [cast(g, ctx.update_dtype) if need else None
                           for g, need in zip(stacked_grad.split(ctx.sizes), ctx.needs_input_grad[6:])]
        return grad_x, None, None, None, None, None, *grad_deltas


class GroupMemberUpdate(torch.autograd.Function):
    """A member: ``out = x Wᵀ + b`` with the share the leader computed for its rows, ``share (..., k)``, added in."""

    @staticmethod
    def forward(ctx, x, weight, bias, conv1d, index, share):
        ctx.base_dt = compute_dtype(x, weight.dtype)
        out = frozen_linear(cast(x, ctx.base_dt), weight, bias, conv1d, ctx.base_dt)        # (..., d_out)
        add_into_columns(out, index, cast(share, out.dtype))
        ctx.x_dtype, ctx.x_shape, ctx.share_dtype, ctx.share_shape = x.dtype, x.shape, share.dtype, share.shape
        ctx.save_for_backward(weight if ctx.needs_input_grad[0] else None, index)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        weight, index = ctx.saved_tensors
        grad_x = grad_share = None
        if ctx.needs_input_grad[0]:
            grad_x = frozen_input_grad(grad_out, weight, ctx.base_dt, ctx.x_dtype, ctx.x_shape)   # (..., d_in): g W
        if ctx.needs_input_grad[5]:
            grad_share = cast(flat(grad_out).index_select(1, index), ctx.share_dtype).view(ctx.share_shape)
        return grad_x, None, None, None, None, grad_share


class RowGroup:
    """Row layers that read one input; hands the leader's shares to the members (see the module docstring).

    A group exists to serve layers that read the very same tensor in one forward (self-attention's q/k/v, an MLP's
    gate/up). A miss (a member called with another tensor while shares wait for it, or a leader called again before
    its members took theirs) drops the waiting shares and lets that layer lead a new round; a second miss before
    any member takes a share (cross-attention, cached generation: it happens every forward) stops grouping for good
    (``shared_input = False``) and drops every share. One miss alone, as a forward interrupted between q and k
    leaves, changes nothing."""

    MISSES_TO_STOP = 2

    def __init__(self, layers):
        self.layers = list(layers)
        self.shared_input, self._misses = True, 0
        self._pending: dict[int, tuple] = {}      # id(member) -> (weakref to x, x's version, delta's key, share)

    def __getstate__(self):                       # deepcopy / pickle: a pending share is a graph tensor
        return {**self.__dict__, "_pending": {}}

    def groupable(self, layer) -> bool:
        lead = self.layers[0]
        return (self.shared_input and layer.unit == "row" and not layer.merged
                and fusable(layer.base_layer)
                and layer.in_features == lead.in_features and layer.delta.dtype == lead.delta.dtype
                and layer.delta.device == lead.delta.device and not torch.compiler.is_compiling())

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor | None:
        """``layer``'s output (frozen product plus its update) through the group, or None to run it ungrouped (also
        under ``torch.inference_mode``: its tensors have no version to check a share against)."""
        entry = self._pending.get(id(layer))
        if (entry is not None and entry[0]() is x and entry[1] == x._version
                and entry[2] == _delta_key(layer, rows_mode(layer, x))):
            del self._pending[id(layer)]          # the leader found this member groupable for this very x and delta
            self._misses = 0
            if entry[2][2] is not None:           # rows in the weight or the cast: the leader computed the whole output
                return entry[3]
            base = layer.base_layer
            return GroupMemberUpdate.apply(x, frozen_weight(base, x, layer.keep_cast_weight), base.bias,
                                           is_transposed(base), layer.indices, entry[3])
        if not self.groupable(layer) or x.is_inference():
            return None
        self._pending.pop(id(layer), None)
        base = layer.base_layer
        if entry is not None or self._pending:    # shares for another input (or delta), or members that never came
            self._miss()
            if not self.shared_input:
                return None
        mode = rows_mode(layer, x)
        members = [m for m in self.layers if m is not layer and self.groupable(m) and rows_mode(m, x) == mode]
        if not members:
            return None
        if mode is not None:
            outputs = in_weight_outputs([layer, *members], x, layer._input_source(x))
        else:
            outputs = GroupedRowUpdate.apply(x, frozen_weight(base, x, layer.keep_cast_weight), base.bias,
                                             is_transposed(base), layer.indices, layer._input_source(x), layer.delta,
                                             *(m.delta for m in members))
        version = x._version
        self._pending = {id(m): (weakref.ref(x), version, _delta_key(m, mode), share)     # members share its mode
                         for m, share in zip(members, outputs[1:])}
        return outputs[0]

    def _miss(self) -> None:
        self._pending, self._misses = {}, self._misses + 1
        self.shared_input = self._misses < self.MISSES_TO_STOP


def _delta_key(layer, mode: str | None) -> tuple:
    """Which delta, in which state, with its rows written where (``mode``, `rows_mode`: the weight, the cast, or the
    usual update): a share (or an output) computed from it is valid only while this is unchanged."""
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


__all__ = ["GroupedRowUpdate", "GroupMemberUpdate", "RowGroup", "assign_groups"]
