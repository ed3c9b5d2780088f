"""The ops the least-squares refit fits, as declared by their handlers, and the norm statistics a merge
resets.

A :class:`LinearMap` is an op that computes y = W x (+ b) over its input's unit dimension: a Linear
(:class:`DenseMap`, rows over every leading dimension) or a convolution (:class:`ConvMap`, rows over
output positions, each row the unfolded input patch). It says how its weight reads as a matrix (m_out, P)
with the bias as a last column, how to pick samples of its output, and how to turn the input at those
samples into design rows. The refit (:mod:`pleas.refit`) does the rest without knowing the op.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LinearMap:
    """An op y = W x + b. ``weight``/``bias`` are state-dict keys; ``in_node``/``out_node`` the captured
    nodes of its input and output activations, whose dimensions ``in_dim``/``out_dim`` hold its input
    and output units; ``transposed`` when the weight is stored (in, out) (Hugging Face ``Conv1D``)."""

    name: str
    weight: str
    bias: str | None
    in_node: str
    out_node: str
    in_dim: int = -1
    out_dim: int = -1
    transposed: bool = False

    kind = "dense"

    # --- the weight as a matrix ------------------------------------------------------------------
    def matrix(self, params: dict, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """(m_out, P) in ``dtype`` (float64 by default): the weight as rows of output units (a conv's input
        channels x taps per row), the bias (if any) as the last column."""
        w = params[self.weight].detach().to(dtype)
        w = w.T if self.transposed else w
        w = w.reshape(w.shape[0], -1)
        if self.bias is None:
            return w
        return torch.cat([w, params[self.bias].detach().to(dtype)[:, None]], 1)

    def set_matrix(self, params: dict, w: torch.Tensor) -> None:
        """Write the (m_out, P) matrix ``w`` back into the weight and bias tensors, in place."""
        weight = params[self.weight]
        with torch.no_grad():  # copy_ casts and follows strides itself: no temporary of the weight's size
            if self.transposed:
                weight.copy_(w[:, : weight.shape[0]].T)
            elif weight.is_contiguous():
                weight.view(weight.shape[0], -1).copy_(w[:, : weight[0].numel()])
            else:
                weight.copy_(w[:, : weight[0].numel()].reshape(weight.shape))
            if self.bias is not None:
                params[self.bias].copy_(w[:, -1])

    def columns(self, params: dict) -> int:
        """P: the matrix's columns (bias included)."""
        w = params[self.weight]
        inputs = w.shape[0] if self.transposed else math.prod(w.shape[1:])
        return inputs + (self.bias is not None)

    def outputs(self, params: dict) -> int:
        w = params[self.weight]
        return w.shape[1] if self.transposed else w.shape[0]

    def taps(self, params: dict) -> int:
        """Columns per input unit (a conv's kernel positions; 1 for a dense map)."""
        return 1

    # --- samples ---------------------------------------------------------------------------------
    def pick(self, out_shape: tuple, limit: int, gen: torch.Generator):
        """Seeded random samples of the output (at most ``limit``): rows over every leading dimension."""
        n = math.prod(out_shape) // out_shape[self.out_dim]
        return torch.randperm(n, generator=gen)[:limit] if n > limit else torch.arange(n)

    def images(self, out_shape: tuple, pick, batch: int) -> torch.Tensor:
        """Which of the batch's ``batch`` inputs each picked sample comes from (rows are laid out input by
        input, also where a graph flattens the batch and the tokens into one dimension)."""
        per_input = math.prod(out_shape) // out_shape[self.out_dim] // max(batch, 1)
        return pick // max(per_input, 1)

    def output_rows(self, y: torch.Tensor, pick) -> torch.Tensor:
        """The output at the picked samples: (samples, units)."""
        y = y.movedim(self.out_dim, -1)
        return y.reshape(-1, y.shape[-1])[pick]

    def input_rows(self, x: torch.Tensor, pick) -> torch.Tensor:
        """The input units at the picked samples: (samples, P - bias) (a conv: its unfolded patches)."""
        x = x.movedim(self.in_dim, -1)
        return x.reshape(-1, x.shape[-1])[pick]

    def row_blocks(self, in_shape: tuple, pick, bias: bool) -> list | None:
        """(rows, columns) pairs such that each row is zero outside its block's columns, or None."""
        return None

    def reachable_columns(self, in_shape: tuple, bias: bool) -> torch.Tensor | None:
        """The columns some output position reads inside the input (None: all of them)."""
        return None


@dataclass
class ConvMap(LinearMap):
    """A dense convolution (groups=1, zero padding) over channel dimension 1, as a linear map on unfolded
    patches. Conv1d is handled as a Conv2d of height 1. Geometry: (height, width) pairs."""

    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    in_dim: int = 1
    out_dim: int = 1

    kind = "conv"

    def taps(self, params: dict) -> int:
        return self.kernel[0] * self.kernel[1]

    def pick(self, out_shape: tuple, limit: int, gen: torch.Generator):
        """Seeded random output positions (batch, row, col)."""
        shape = (out_shape[0], out_shape[1], 1, out_shape[2]) if len(out_shape) == 3 else out_shape
        n, _, ho, wo = shape
        total = n * ho * wo
        flat = torch.randperm(total, generator=gen)[:limit] if total > limit else torch.arange(total)
        rest = flat % (ho * wo)
        return flat // (ho * wo), rest // wo, rest % wo

    def images(self, out_shape: tuple, pick, batch: int) -> torch.Tensor:
        return pick[0]

    def output_rows(self, y: torch.Tensor, pick) -> torch.Tensor:
        y = y.unsqueeze(2) if y.dim() == 3 else y
        return y[pick[0], :, pick[1], pick[2]]

    def patches(self, x: torch.Tensor, pick) -> torch.Tensor:
        """The input patches (samples, C, kh, kw) read at output positions ``pick``."""
        x = x.unsqueeze(2) if x.dim() == 3 else x
        b, oy, ox = pick
        xp = F.pad(x, (self.padding[1], self.padding[1], self.padding[0], self.padding[0]))
        rows = oy[:, None] * self.stride[0] + torch.arange(self.kernel[0])[None, :] * self.dilation[0]
        cols = ox[:, None] * self.stride[1] + torch.arange(self.kernel[1])[None, :] * self.dilation[1]
        return xp[b[:, None, None], :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)

    def input_rows(self, x: torch.Tensor, pick) -> torch.Tensor:
        return self.patches(x, pick).flatten(1)

    def row_blocks(self, in_shape: tuple, pick, bias: bool) -> list | None:
        """Patch rows grouped by which kernel taps fall inside the input (the others read zero padding):
        (rows, columns) pairs over the flattened (C, kh, kw) [+ bias] columns, or None when every row
        sees every tap. On small maps most rows see few taps, and each block's product is far smaller."""
        if self.padding[0] == 0 and self.padding[1] == 0:
            return None
        c = in_shape[1]
        h, w = (1, in_shape[-1]) if len(in_shape) == 3 else tuple(in_shape[-2:])
        _, oy, ox = pick
        iy = oy[:, None] * self.stride[0] + torch.arange(self.kernel[0])[None, :] * self.dilation[0] - self.padding[0]
        ix = ox[:, None] * self.stride[1] + torch.arange(self.kernel[1])[None, :] * self.dilation[1] - self.padding[1]
        valid = ((iy >= 0) & (iy < h))[:, :, None] & ((ix >= 0) & (ix < w))[:, None, :]  # (samples, kh, kw)
        keys = valid.flatten(1)
        if bool(keys.all()):
            return None
        taps = self.kernel[0] * self.kernel[1]
        if taps < 63:  # each row's pattern as one integer, first tap most significant: sorts as the rows do
            codes = (keys.long() << torch.arange(taps - 1, -1, -1)).sum(1)
            unique, inverse = torch.unique(codes, return_inverse=True)
            first = torch.empty(len(unique), dtype=torch.long).scatter_(0, inverse, torch.arange(len(codes)))
            patterns = keys[first]
        else:
            patterns, inverse = torch.unique(keys, dim=0, return_inverse=True)
        blocks = []
        for i, pattern in enumerate(patterns):
            cols = (torch.arange(c)[:, None] * taps + pattern.nonzero().squeeze(1)[None, :]).reshape(-1)
            if bias:
                cols = torch.cat([cols, torch.tensor([c * taps])])
            blocks.append(((inverse == i).nonzero().squeeze(1), cols))
        return blocks

    def reachable_columns(self, in_shape: tuple, bias: bool) -> torch.Tensor | None:
        """Channel x tap [+ bias] columns whose tap reads inside an input of ``in_shape`` at some output
        position, or None when every one does."""
        size = (1, in_shape[-1]) if len(in_shape) == 3 else tuple(in_shape[-2:])
        ok = []
        for d in range(2):
            out = (size[d] + 2 * self.padding[d] - self.dilation[d] * (self.kernel[d] - 1) - 1) // self.stride[d] + 1
            pos = torch.arange(out)[:, None] * self.stride[d] + torch.arange(self.kernel[d])[None, :] * self.dilation[d] \
                - self.padding[d]
            ok.append(((pos >= 0) & (pos < size[d])).any(0))
        taps = (ok[0][:, None] & ok[1][None, :]).flatten().nonzero().squeeze(1)
        if len(taps) == self.kernel[0] * self.kernel[1]:
            return None
        c = in_shape[1]
        cols = (torch.arange(c)[:, None] * (self.kernel[0] * self.kernel[1]) + taps[None, :]).reshape(-1)
        return torch.cat([cols, torch.tensor([c * self.kernel[0] * self.kernel[1]])]) if bias else cols


@dataclass
class NormStats:
    """Running statistics that describe the distribution of an op's input (BatchNorm): after a merge they
    are recomputed from the merged model's own activations at ``in_node`` (mean and unbiased variance of
    each unit on dimension ``dim``). ``weight``/``bias`` are the affine parameters (None if absent) and
    ``eps`` the variance offset, for folding the norm into the map before it."""

    name: str
    in_node: str
    node: str
    mean: str
    var: str
    weight: str | None = None
    bias: str | None = None
    eps: float = 1e-5
    dim: int = 1
