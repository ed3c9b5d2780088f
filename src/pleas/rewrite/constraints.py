"""Widths a model's code ties together beyond what its graph shows, and the size attributes of the
attention modules that must follow new widths.

- Hugging Face models build every layer from one config (:func:`pleas.rewrite.hf.config_ties`).
- ``nn.MultiheadAttention`` projects its input to the attention width with one square matrix: its heads
  keep their proportion to the residual stream they read. (timm's ``Attention`` keeps its own attention
  width, ``attn_dim``, and needs only its size attributes updated.)
"""
from __future__ import annotations

from torch import nn

from ..ops.registry import register_resizer
from . import hf


def _group_with(spec, param: str, axis: int) -> str | None:
    for g, m in spec.members_of(param):
        if m.axis == axis:
            return g.name
    return None


def _attention_modules(model: nn.Module):
    """(path, qkv weight, output projection weight) of every attention module whose heads must keep their
    proportion to the stream it reads."""
    for path, module in model.named_modules():
        prefix = f"{path}." if path else ""
        if isinstance(module, nn.MultiheadAttention) and module._qkv_same_embed_dim:
            yield path, f"{prefix}in_proj_weight", f"{prefix}out_proj.weight"


def width_ties(model: nn.Module, spec) -> list[list[str]]:
    """Lists of groups whose widths the model's code ties (they must keep their proportions)."""
    ties = hf.config_ties(model, spec) if hf.is_hf(model) else []
    for _, qkv, proj in _attention_modules(model):
        heads, stream = _group_with(spec, qkv, 0), _group_with(spec, proj, 0)
        if heads and stream:
            ties.append([heads, stream])
    return ties


def _resize_multihead(m: nn.MultiheadAttention) -> None:
    embed = m.out_proj.weight.shape[0]
    m.embed_dim = m.kdim = m.vdim = embed
    m.num_heads = embed // m.head_dim
    m.out_proj.in_features = m.out_proj.out_features = embed


def _resize_timm_attention(m: nn.Module) -> None:
    m.num_heads = m.qkv.weight.shape[0] // (3 * m.head_dim)
    m.attn_dim = m.num_heads * m.head_dim


def _resize_torchvision_vit(m: nn.Module) -> None:
    m.hidden_dim = m.conv_proj.weight.shape[0]


def _resize_timm_vit(m: nn.Module) -> None:
    width = m.patch_embed.proj.weight.shape[0]
    m.embed_dim = m.num_features = width
    if hasattr(m, "head_hidden_size"):
        m.head_hidden_size = width


def _register() -> None:
    register_resizer(nn.MultiheadAttention, _resize_multihead)
    try:
        from torchvision.models.vision_transformer import VisionTransformer as TorchvisionViT
    except ImportError:
        TorchvisionViT = None
    if TorchvisionViT is not None:
        register_resizer(TorchvisionViT, _resize_torchvision_vit)
    try:
        from timm.layers import Attention as TimmAttention
        from timm.models.vision_transformer import VisionTransformer as TimmViT
    except ImportError:
        return
    register_resizer(TimmAttention, _resize_timm_attention)
    register_resizer(TimmViT, _resize_timm_vit)


_register()
