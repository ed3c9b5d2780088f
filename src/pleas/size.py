"""Exact size accounting of a rewritten model from its group widths (no model is built)."""
from __future__ import annotations

import math

import torch

from .plans import unit_owners
from .spec import PermutationSpec
from .transform import GroupMap


def param_shape(spec: PermutationSpec, name: str, shape: tuple[int, ...], widths: dict[str, int]) -> tuple[int, ...]:
    """The shape tensor ``name`` takes when every group g has ``widths[g]`` units (others unchanged)."""
    new = list(shape)
    for g, m in spec.members_of(name):
        if g.name in widths:
            new[m.axis] += (widths[g.name] - g.width) * m.repeat
    return tuple(new)


def model_param_count(model: torch.nn.Module) -> int:
    """The same count on a built model: floating-point entries of its state dict."""
    return sum(t.numel() for t in model.state_dict().values() if t.dtype.is_floating_point)


def zero_block_count(
    spec: PermutationSpec, state_dict: dict[str, torch.Tensor], maps: dict[str, GroupMap], n_models: int
) -> dict[str, int]:
    """Entries of the merged model that are zero by construction, per tensor: in a weight whose output
    and input axes are both grouped, entry (i, j) where no model owns both output unit i and input unit
    j (an A-only row reading a B-only column), times the other axes (kernel, repeat). ALGORITHM.md:
    effective cost = m_o x m_i - 2 (d_o - k_o)(d_i - k_i) per layer for two models. Read off the maps,
    so exact for any layout (ZipIt!'s too), unlike :class:`SizeModel`'s effective metrics."""
    widths = {name: gm.width for name, gm in maps.items()}
    zeros = {}
    for key, t in state_dict.items():
        members = [(g, m) for g, m in spec.members_of(key) if g.name in maps]
        outs = [(g, m) for g, m in members if m.axis == 0]
        ins = [(g, m) for g, m in members if m.axis == 1]
        if not outs or not ins or t.dim() < 2:
            continue
        shape = param_shape(spec, key, tuple(t.shape), widths)
        own_out = unit_owners(outs, shape[0], maps, n_models, side="out").double()
        own_in = unit_owners(ins, shape[1], maps, n_models, side="in").double()
        shared = (own_out.T @ own_in) > 0  # (m_out, m_in): some model owns both
        zeros[key] = int((~shared).sum()) * math.prod(shape[2:])
    return zeros


METRICS = ("params", "flops", "effective_params", "effective_flops")


class SizeModel:
    """Exact size of a rewritten model as a function of its group widths, without building it.

    ``params``: floating-point entries of the state dict (the dense model actually returned).
    ``flops``: multiply-adds of its Linear and Conv layers per sample, for the traced input shape.
    ``effective_params``, ``effective_flops``: the same without the zero blocks (ALGORITHM.md section 3:
    a layer costs m_o x m_i - 2 (d_o - k_o)(d_i - k_i)), the paper's way of counting. A group of width
    d at width w is taken to hold k = d - (w - d) / (n - 1) merged units and (w - d) / (n - 1) units of
    each of the ``n_models`` sources alone (PLeaS's and Git Re-Basin's layout); rows of one source never
    read the columns of another. All ``n_models`` apart (the ensemble) is exactly n x one model.
    ``extra_widths`` fixes the widths of groups that are not chosen (e.g. separate heads).
    """

    def __init__(self, spec: PermutationSpec, state_dict: dict[str, torch.Tensor],
                 extra_widths: dict[str, int] | None = None, n_models: int = 2):
        self.spec = spec
        self.shapes = {k: tuple(t.shape) for k, t in state_dict.items() if t.dtype.is_floating_point}
        self.extra = dict(extra_widths or {})
        self.n = n_models
        self.touching: dict[str, list[str]] = {}
        # Per tensor, the groups on its axes as (group, axis, repeat, width): allocators call change() a lot.
        self._members: dict[str, list[tuple[str, int, int, int]]] = {}
        for key in self.shapes:
            self._members[key] = [(g.name, m.axis, m.repeat, g.width) for g, m in spec.members_of(key)]
            for g, _ in spec.members_of(key):
                self.touching.setdefault(g.name, []).append(key)

    def _cost(self, metric: str, key: str, widths: dict[str, int]) -> int:
        shape = list(self.shapes[key])
        alone = [0, 0]  # entries of axes 0 and 1 that belong to one given source alone
        for name, axis, repeat, d in self._members[key]:
            w = widths[name] if name in widths else self.extra.get(name, d)
            shape[axis] += (w - d) * repeat
            if axis < 2:
                alone[axis] += (w - d) // max(self.n - 1, 1) * repeat
        numel = math.prod(shape)
        if metric.startswith("effective_") and len(shape) >= 2:
            numel -= self.n * (self.n - 1) * alone[0] * alone[1] * math.prod(shape[2:])
        if metric.endswith("params"):
            return numel
        return numel * self.spec.positions.get(key, 0)

    def measure(self, metric: str, widths: dict[str, int]) -> int:
        if metric not in METRICS:
            raise ValueError(f"budget_metric={metric!r}; allowed: {METRICS}")
        return sum(self._cost(metric, key, widths) for key in self.shapes)

    def change(self, metric: str, widths: dict[str, int], group: str, width: int) -> int:
        """measure(widths with group at ``width``) - measure(widths), touching only that group's tensors."""
        new = {**widths, group: width}
        keys = dict.fromkeys(self.touching.get(group, []))
        return sum(self._cost(metric, k, new) - self._cost(metric, k, widths) for k in keys)
