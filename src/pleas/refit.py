"""The PLeaS least-squares refit (ALGORITHM.md section 4), closed form from streamed float64 statistics.

Every Linear and dense Conv layer of the merged model is refitted so that it maps the *permuted
ensemble input* X~ to the *permuted ensemble output* Y~, both computed from the source models'
activations on the calibration data (teacher forcing):

    W = argmin_W ||X~ W^T - Y~||^2 + lambda ||W - W_0||^2     subject to the zero blocks,

with a conv seen as a linear map on unfolded patches and the bias as a constant input column. The
constraint splits the problem by output rows: a row owned by a set of models may only read input
columns that one of those models owns (A-only rows never read B-only inputs). Each row pattern is an
ordinary ridge regression solved from G = X~^T X~ and C = X~^T Y~, which are sums over samples and so
stream over batches. lambda = ridge * trace(G) / columns, relative to the data's own scale, pulls
under-determined layers toward the partial-merge initialisation W_0 rather than toward zero.
"""
from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .graph import trace_graph
from .spec import Group, Member, PermutationSpec
from .stats import tapped
from .transform import GroupMap, combine_activations


@dataclass
class Layer:
    """One refittable layer: where it sits in the traced source graph and how its axes are grouped."""

    name: str  # module path
    module: nn.Module  # the source model's module (for kernel size, stride, ...)
    in_node: str
    out_node: str
    in_members: list[tuple[Group, Member]]
    out_members: list[tuple[Group, Member]]

    @property
    def is_conv(self) -> bool:
        return isinstance(self.module, (nn.Conv1d, nn.Conv2d))

    @property
    def unit_dim(self) -> int:
        return 1 if self.is_conv else -1


@dataclass
class LayerStats:
    """Streamed sums for one layer: G (P, P), C (P, m_out), sum of squared targets, sample count."""

    gram: torch.Tensor
    cross: torch.Tensor
    target_sq: float = 0.0
    count: int = 0

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add one batch of rows. The batch's products run in float32 (a few thousand rows at most);
        the running sums are float64, so round-off does not grow with the dataset."""
        self.gram += (x.T @ x).double()
        self.cross += (x.T @ y).double()
        self.target_sq += float((y.double() ** 2).sum())
        self.count += x.shape[0]

    def error(self, w: torch.Tensor) -> float:
        """||X W^T - Y||^2 / ||Y||^2 for a flattened weight w (m_out, P), from the sums alone."""
        quad = (w @ self.gram * w).sum() - 2 * (w * self.cross.T).sum() + self.target_sq
        return float(quad.clamp_min(0)) / max(self.target_sq, 1e-30)


@dataclass
class RefitOptions:
    ridge: float = 1e-3
    mask: bool = True
    oversample: int = 8
    min_rows: int = 4096
    method: str = "exact"  # or "adam"
    adam_steps: int = 300
    adam_lr: float = 1e-3
    seed: int = 0
    max_gram_bytes: int = 4 << 30
    progress: bool = True


@dataclass
class RefitReport:
    layers: list[dict] = field(default_factory=list)


def find_layers(source: nn.Module, spec: PermutationSpec) -> list[Layer]:
    """The Linear and dense Conv1d/Conv2d modules of ``source`` (each called once), in graph order."""
    gm = trace_graph(source)
    calls: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    layers = []
    modules = dict(source.named_modules())
    for target, nodes in calls.items():
        module = modules[target]
        if len(nodes) != 1 or not _refittable(module):
            continue
        node = nodes[0]
        weight = f"{target}.weight"
        members = spec.members_of(weight)
        layers.append(
            Layer(
                target,
                module,
                node.args[0].name,
                node.name,
                [(g, m) for g, m in members if m.axis == 1],
                [(g, m) for g, m in members if m.axis == 0],
            )
        )
    return layers


def _refittable(m: nn.Module) -> bool:
    if isinstance(m, nn.Linear):
        return True
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        return m.groups == 1 and m.padding_mode == "zeros" and isinstance(m.padding, tuple)
    return False


def refit(
    sources: list[nn.Module],
    merged: nn.Module,
    spec: PermutationSpec,
    maps: dict[str, GroupMap],
    batches,
    options: RefitOptions | None = None,
) -> RefitReport:
    """Refit every layer of ``merged`` (built from ``sources`` with ``maps`` over ``spec``) in place."""
    options = options or RefitOptions()
    layers = find_layers(sources[0], spec)
    params = dict(merged.named_parameters())
    report = RefitReport()
    n_batches = max(len(batches), 1) if hasattr(batches, "__len__") else 1
    for chunk in _chunks(layers, params, options.max_gram_bytes):
        stats = _collect(sources, chunk, maps, batches, n_batches, params, options)
        for layer in chunk:
            report.layers.append(_solve_into(layer, stats[layer.name], params, maps, len(sources), options))
    return report


def _weight_columns(layer: Layer, params: dict) -> int:
    w = params[f"{layer.name}.weight"]
    return math.prod(w.shape[1:]) + (1 if f"{layer.name}.bias" in params else 0)


def _chunks(layers: list[Layer], params: dict, limit: int):
    """Split layers into passes whose Gram matrices fit in ``limit`` bytes (one layer at least)."""
    chunk, used = [], 0
    for layer in layers:
        p = _weight_columns(layer, params)
        size = 8 * p * p
        if chunk and used + size > limit:
            yield chunk
            chunk, used = [], 0
        chunk.append(layer)
        used += size
    if chunk:
        yield chunk


def _collect(sources, layers, maps, batches, n_batches, params, options) -> dict[str, LayerStats]:
    nodes = sorted({n for layer in layers for n in (layer.in_node, layer.out_node)})
    stats: dict[str, LayerStats] = {}
    for layer in layers:
        p = _weight_columns(layer, params)
        m_out = params[f"{layer.name}.weight"].shape[0]
        stats[layer.name] = LayerStats(torch.zeros(p, p, dtype=torch.float64), torch.zeros(p, m_out, dtype=torch.float64))
    gen = torch.Generator().manual_seed(options.seed)
    with ExitStack() as stack, torch.no_grad():
        runs = [stack.enter_context(tapped(m, nodes)) for m in sources]
        for x in tqdm(batches, desc="least-squares statistics", disable=not options.progress, leave=False):
            taps = [run(x)[1] for run in runs]
            for layer in layers:
                st = stats[layer.name]
                rows = max(options.oversample * st.gram.shape[0], options.min_rows)
                xr, yr = _rows(layer, [t[layer.in_node] for t in taps], [t[layer.out_node] for t in taps],
                               maps, math.ceil(rows / n_batches), gen, bias=f"{layer.name}.bias" in params)
                st.update(xr, yr)
    return stats


def _rows(layer: Layer, xs: list, ys: list, maps, limit: int, gen: torch.Generator, *, bias: bool):
    """Design rows (samples, P) and targets (samples, m_out) of the permuted ensemble, float32, at
    most ``limit`` seeded random samples. Samples are picked first and combined after (the merge is
    linear along the units), so the full activations are never converted."""
    if layer.is_conv:
        xs = [x.unsqueeze(2) if x.dim() == 3 else x for x in xs]  # Conv1d as a Conv2d of height 1
        ys = [y.unsqueeze(2) if y.dim() == 3 else y for y in ys]
        pick = _positions(ys[0].shape, limit, gen)
        xr = [_patches(layer.module, x, pick) for x in xs]  # (P, C, kh, kw)
        yr = [y[pick[0], :, pick[1], pick[2]] for y in ys]  # (P, m_out)
        x = combine_activations(xr, 1, layer.in_members, maps).flatten(1)
    else:
        flat = [x.reshape(-1, x.shape[-1]) for x in xs]
        idx = torch.randperm(flat[0].shape[0], generator=gen)[:limit] if flat[0].shape[0] > limit else None
        xr = [f if idx is None else f[idx] for f in flat]
        yr = [y.reshape(-1, y.shape[-1]) for y in ys]
        yr = [f if idx is None else f[idx] for f in yr]
        x = combine_activations(xr, -1, layer.in_members, maps)
    y = combine_activations(yr, -1, layer.out_members, maps)
    if bias:
        x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
    return x.float(), y.float()


def _positions(out_shape: tuple, limit: int, gen: torch.Generator):
    """Seeded random output positions (batch, row, col) of a conv output of shape (N, C, H, W)."""
    n, _, ho, wo = out_shape
    total = n * ho * wo
    pick = torch.randperm(total, generator=gen)[:limit] if total > limit else torch.arange(total)
    rest = pick % (ho * wo)
    return pick // (ho * wo), rest // wo, rest % wo


def _patches(conv: nn.Module, x: torch.Tensor, pick) -> torch.Tensor:
    """The input patches (P, C, kh, kw) that ``conv`` reads at output positions ``pick``."""
    if conv.weight.dim() == 3:
        kernel, stride, pad, dil = (1, *conv.kernel_size), (1, *conv.stride), (0, *conv.padding), (1, *conv.dilation)
    else:
        kernel, stride, pad, dil = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    b, oy, ox = pick
    xp = F.pad(x, (pad[1], pad[1], pad[0], pad[0]))
    rows = oy[:, None] * stride[0] + torch.arange(kernel[0])[None, :] * dil[0]  # (P, kh)
    cols = ox[:, None] * stride[1] + torch.arange(kernel[1])[None, :] * dil[1]  # (P, kw)
    return xp[b[:, None, None], :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def _owners(members: list[tuple[Group, Member]], size: int, maps: dict[str, GroupMap], n: int, *, side: str):
    """(n, size) booleans: which source models own each unit of an axis laid out like ``members``.

    Entries outside every group (network inputs, shared outputs) belong to every model.
    """
    owners = torch.ones(n, size, dtype=torch.bool)
    for g, m in members:
        if g.name not in maps:
            continue
        gm = maps[g.name]
        d = g.width
        mat = gm.merge if side == "out" else gm.unmerge.T  # (m, n*d)
        own = torch.stack([mat[:, k * d : (k + 1) * d].abs().sum(1) > 0 for k in range(n)])  # (n, m)
        own = own.repeat_interleave(m.repeat, dim=1)
        owners[:, m.offset : m.offset + own.shape[1]] = own
    return owners


def _solve_into(layer: Layer, st: LayerStats, params: dict, maps, n: int, opt: RefitOptions) -> dict:
    weight = params[f"{layer.name}.weight"]
    bias = params.get(f"{layer.name}.bias")
    m_out = weight.shape[0]
    w0 = weight.detach().double().reshape(m_out, -1)
    kernel = math.prod(weight.shape[2:]) if weight.dim() > 2 else 1
    if bias is not None:
        w0 = torch.cat([w0, bias.detach().double()[:, None]], 1)
    p = w0.shape[1]
    own_out = _owners(layer.out_members, m_out, maps, n, side="out")
    n_in = weight.shape[1]
    own_in = _owners(layer.in_members, n_in, maps, n, side="in").repeat_interleave(kernel, dim=1)
    if bias is not None:
        own_in = torch.cat([own_in, torch.ones(n, 1, dtype=torch.bool)], 1)
    before = st.error(w0)
    lam = opt.ridge * float(st.gram.diagonal().mean())
    w = w0.clone()
    patterns = {} if opt.mask else {None: torch.arange(m_out)}
    if opt.mask:
        for i, key in enumerate(map(tuple, own_out.T.tolist())):
            patterns.setdefault(key, []).append(i)
    for key, rows in patterns.items():
        rows = torch.as_tensor(rows)
        if key is None:
            cols = torch.arange(p)
        else:
            allowed = (torch.tensor(key)[:, None] & own_in).any(0)
            cols = allowed.nonzero().squeeze(1)
        w[rows] = 0.0
        w[rows[:, None], cols] = _ridge_solve(st, rows, cols, w0, lam, opt)
    after = st.error(w)
    with torch.no_grad():
        weight.copy_(w[:, : weight[0].numel()].reshape(weight.shape).to(weight.dtype))
        if bias is not None:
            bias.copy_(w[:, -1].to(bias.dtype))
    return {"layer": layer.name, "rows": st.count, "columns": p, "error_before": before, "error_after": after}


def _ridge_solve(st: LayerStats, rows, cols, w0, lam: float, opt: RefitOptions) -> torch.Tensor:
    """min_W ||X_J W^T - Y_rows||^2 + lam ||W - W0||^2 over the allowed columns J: (G_JJ + lam I) W^T =
    C_J,rows + lam W0^T. Cholesky in float64; Adam on the same objective when ``opt.method == 'adam'``."""
    g = st.gram[cols[:, None], cols]
    c = st.cross[cols[:, None], rows]
    start = w0[rows[:, None], cols]
    if opt.method == "adam":
        return _adam(g, c, start, lam, opt)
    a = g + lam * torch.eye(len(cols), dtype=g.dtype)
    rhs = c + lam * start.T
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, chol).T
    return torch.linalg.lstsq(a, rhs).solution.T


def _adam(g, c, start, lam: float, opt: RefitOptions) -> torch.Tensor:
    """Adam steps from W_0 on the same objective, written with G and C: grad = 2 (W G - C^T + lam (W - W0)).
    Stopping early regularises like the reference implementation's refit."""
    w = start.clone().requires_grad_(True)
    adam = torch.optim.Adam([w], lr=opt.adam_lr)
    scale = 1.0 / max(float(g.diagonal().mean()), 1e-30)
    for _ in range(opt.adam_steps):
        adam.zero_grad()
        grad = 2 * (w.detach() @ g - c.T + lam * (w.detach() - start)) * scale
        w.grad = grad
        adam.step()
    return w.detach()
