"""Exact size accounting of a rewritten model from its group widths (no model is built)."""
from __future__ import annotations

import math

import torch

from ..groups.spec import PermutationSpec
from ..rewrite import views
from ..rewrite.maps import GroupMap, unit_owners

METRICS = ("params", "flops", "effective_params", "effective_flops")


def _role_axes(members) -> tuple[int | None, int | None]:
    """The axis of a tensor that produces units (out) and the one that reads them (in), if any."""
    out = next((m.axis for _, m in members if m.role == "out"), None)
    inn = next((m.axis for _, m in members if m.role == "in" and m.axis != out), None)
    return out, inn


def param_shape(spec: PermutationSpec, name: str, shape: tuple[int, ...], widths: dict[str, int]) -> tuple[int, ...]:
    """The (dense) shape tensor ``name`` takes when every group g has ``widths[g]`` units (others unchanged)."""
    new = list(views.dense_shape(spec, name, shape))
    for g, m in spec.members_of(name):
        if g.name in widths:
            new[m.axis] += (widths[g.name] - g.width) * m.copies
    return tuple(new)


def model_param_count(model: torch.nn.Module) -> int:
    """The same count on a built model: floating-point entries of its state dict (tied tensors once)."""
    seen, total = set(), 0
    for t in model.state_dict(keep_vars=True).values():
        if t.dtype.is_floating_point and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel()
    return total


def zero_block_count(spec: PermutationSpec, state_dict: dict[str, torch.Tensor], maps: dict[str, GroupMap],
                     n_models: int, target: PermutationSpec) -> dict[str, int]:
    """Entries of the merged model that are zero by construction, per tensor: in a weight whose output
    and input axes are both grouped, entry (i, j) where no model owns both output unit i and input unit
    j (an A-only row reading a B-only column), times the other axes (kernel taps). docs/algorithm.md: effective
    cost = m_o x m_i - 2 (d_o - k_o)(d_i - k_i) per layer for two models. Read off the maps, so exact for
    any layout (ZipIt!'s too). ``target`` is the spec at the merged widths."""
    zeros = {}
    for key, t in state_dict.items():
        if key in spec.aliases:
            continue
        members = [(g, m) for g, m in target.members_of(key) if g.name in maps]
        out_axis, in_axis = _role_axes(members)
        if out_axis is None or in_axis is None or t.dim() < 2:
            continue
        widths = {name: gm.width for name, gm in maps.items()}
        shape = param_shape(spec, key, tuple(t.shape), widths)
        own_out = unit_owners([(g, m) for g, m in members if m.axis == out_axis], shape[out_axis], maps, n_models,
                              side="out").double()
        own_in = unit_owners([(g, m) for g, m in members if m.axis == in_axis], shape[in_axis], maps, n_models,
                             side="in").double()
        rest = math.prod(shape) // (shape[out_axis] * shape[in_axis])
        zeros[key] = _unshared(own_out, own_in) * rest // (spec.views[key][1] if key in spec.views else 1)
    return zeros


def _unshared(own_out: torch.Tensor, own_in: torch.Tensor) -> int:
    """Pairs (output unit i, input unit j) that no model owns both of, for owner masks (n, m_out) and
    (n, m_in): counted over the few distinct ownership patterns, never as an (m_out, m_in) matrix."""
    rows, row_counts = torch.unique(own_out.T, dim=0, return_counts=True)
    cols, col_counts = torch.unique(own_in.T, dim=0, return_counts=True)
    apart = (rows @ cols.T) == 0  # (patterns, patterns): no model owns both
    return int((row_counts.double()[:, None] * col_counts.double()[None, :])[apart].sum())


class SizeModel:
    """Exact size of a rewritten model as a function of its group widths, without building it.

    ``params``: floating-point entries of the state dict (the dense model actually returned; tied tensors
    once). ``flops``: multiply-adds of its linear maps per sample, for the captured input shape.
    ``effective_params``, ``effective_flops``: the same without the zero blocks (docs/algorithm.md section 3:
    a layer costs m_o x m_i - 2 (d_o - k_o)(d_i - k_i)), the paper's way of counting. A group of width
    d at width w is taken to hold k = d - (w - d) / (n - 1) merged units and (w - d) / (n - 1) units of
    each of the ``n_models`` sources alone (PLeaS's and Git Re-Basin's layout); rows of one source never
    read the columns of another. All ``n_models`` apart (the ensemble) is exactly n x one model.
    ``extra_widths`` fixes the widths of groups that are not chosen (e.g. separate heads).
    """

    def __init__(self, spec: PermutationSpec, state_dict: dict[str, torch.Tensor],
                 extra_widths: dict[str, int] | None = None, n_models: int = 2):
        self.spec = spec
        self.shapes = {k: views.dense_shape(spec, k, tuple(t.shape)) for k, t in state_dict.items()
                       if t.dtype.is_floating_point and k not in spec.aliases}
        self.divisor = {k: spec.views[k][1] if k in spec.views else 1 for k in self.shapes}
        self.extra = dict(extra_widths or {})
        self.n = n_models
        self.touching: dict[str, list[str]] = {}
        # Per tensor, the groups on its axes as (group, axis, copies, width, role): allocators call change() a lot.
        self._members: dict[str, list[tuple[str, int, int, int]]] = {}
        self._axes: dict[str, tuple[int | None, int | None]] = {}
        for key in self.shapes:
            members = spec.members_of(key)
            self._members[key] = [(g.name, m.axis, m.copies, g.width) for g, m in members]
            self._axes[key] = _role_axes(members)
            for g, _ in members:
                self.touching.setdefault(g.name, []).append(key)

    def _cost(self, metric: str, key: str, widths: dict[str, int]) -> int:
        shape = list(self.shapes[key])
        out_axis, in_axis = self._axes[key]
        alone = {out_axis: 0, in_axis: 0}  # entries of the out and in axes that belong to one given source alone
        for name, axis, copies, d in self._members[key]:
            w = widths[name] if name in widths else self.extra.get(name, d)
            shape[axis] += (w - d) * copies
            if axis in alone:
                alone[axis] += (w - d) // max(self.n - 1, 1) * copies
        numel = math.prod(shape)
        if metric.startswith("effective_") and len(shape) >= 2 and out_axis is not None and in_axis is not None:
            rest = numel // (shape[out_axis] * shape[in_axis]) if shape[out_axis] * shape[in_axis] else 0
            numel -= self.n * (self.n - 1) * alone[out_axis] * alone[in_axis] * rest
        numel //= self.divisor[key]
        if metric.endswith("params"):
            return numel
        return numel * self.spec.positions.get(key, 0)

    def measure(self, metric: str, widths: dict[str, int]) -> int:
        if metric not in METRICS:
            raise ValueError(f"budget_metric={metric!r}; allowed: {METRICS}")
        return sum(self._cost(metric, key, widths) for key in self.shapes)

    def change(self, metric: str, widths: dict[str, int], group: str | dict, width: int | None = None) -> int:
        """measure(widths with ``group`` at ``width``) - measure(widths), touching only that group's tensors.
        ``group`` may also be a dict {group: width} of several groups changed together (a tie)."""
        update = group if isinstance(group, dict) else {group: width}
        new = {**widths, **update}
        keys = dict.fromkeys(k for name in update for k in self.touching.get(name, []))
        return sum(self._cost(metric, k, new) - self._cost(metric, k, widths) for k in keys)
