"""Hugging Face models at new widths: their classes build every layer from one config, so a rewritten
model is the same class with the config set to the new widths.

Two constraints follow, both stated here and applied when a merge starts (:func:`config_ties`): every
layer has the same widths (the groups that differ only in their layer index are tied), and the hidden
size stays a whole number of heads (GPT-2 and BERT make it the attention width, Llama's config checks
it), so the attention heads are tied to the residual stream. A head keeps its size; a widened
model has more heads.
"""
from __future__ import annotations

import copy
import re

import torch
from torch import nn

from ..errors import MergeInputError

#: model_type -> how the config's widths are read off a state dict.
FAMILIES: dict[str, str] = {"gpt2": "gpt2", "llama": "llama", "mistral": "llama", "qwen2": "llama",
                            "bert": "bert", "roberta": "bert"}
#: Families whose config requires the hidden size to be a whole number of heads (GPT-2 and BERT make it
#: the attention width; Llama's config checks it): their heads keep their proportion to the hidden size.
HEADS_DIVIDE_HIDDEN = ("gpt2", "bert", "llama")


def is_hf(model: nn.Module) -> bool:
    """Whether ``model`` is a Hugging Face ``PreTrainedModel`` (rebuilt from its config)."""
    return hasattr(model, "config") and hasattr(model, "save_pretrained") and hasattr(model.config, "model_type")


def family(model: nn.Module) -> str:
    kind = FAMILIES.get(getattr(model.config, "model_type", ""))
    if kind is None:
        raise MergeInputError(
            f"pleas cannot rebuild {type(model).__name__} (model_type {model.config.model_type!r}) at other widths; "
            f"supported model types: {sorted(FAMILIES)}; merge at budget 1 or add a family to pleas.rewrite.hf")
    return kind


def _layer_key(name: str) -> str:
    return re.sub(r"\.\d+(?=\.|$)", ".*", name)


def config_ties(model: nn.Module, spec) -> list[list[str]]:
    """Groups whose widths the model's config ties: the same group in every layer, and (GPT-2, BERT) the
    attention heads with the hidden size."""
    by_key: dict[str, list[str]] = {}
    for g in spec:
        by_key.setdefault(_layer_key(g.name), []).append(g.name)
    ties = [names for names in by_key.values() if len(names) > 1]
    kind = FAMILIES.get(getattr(model.config, "model_type", ""))
    if kind in HEADS_DIVIDE_HIDDEN:
        heads = [g.name for g in spec if any(re.search(r"(attn\.c_attn|attention\.self\.query|self_attn\.q_proj)\.weight$",
                                                       m.param) for m in g.members)]
        hidden = [g.name for g in spec if any(re.search(r"(wte|word_embeddings|embed_tokens)\.weight$|^lm_head\.weight$",
                                                        m.param) for m in g.members)]
        if heads:
            ties.append(heads + hidden)
    return ties


def _one(values: set[int], what: str) -> int:
    if len(values) != 1:
        raise MergeInputError(f"the merged model needs one {what} for every layer, got {sorted(values)}; its class "
                              "builds every layer from one config value")
    return values.pop()


def _widths(kind: str, old, state: dict[str, torch.Tensor]) -> dict[str, int]:
    def dims(pattern: str, axis: int) -> set[int]:
        return {int(t.shape[axis]) for k, t in state.items() if re.search(pattern, k)}

    if kind == "gpt2":
        head = old.n_embd // old.n_head
        hidden = _one(dims(r"wte\.weight$", 1), "hidden size")
        attention = _one(dims(r"attn\.c_attn\.weight$", 1), "attention width") // 3
        if attention != hidden:
            raise MergeInputError(f"GPT-2's attention width is its hidden size; got {attention} and {hidden}")
        return {"n_embd": hidden, "n_head": hidden // head, "n_inner": _one(dims(r"mlp\.c_fc\.weight$", 1), "MLP width")}
    if kind == "llama":
        head = getattr(old, "head_dim", None) or old.hidden_size // old.num_attention_heads
        return {"hidden_size": _one(dims(r"embed_tokens\.weight$", 1), "hidden size"),
                "intermediate_size": _one(dims(r"mlp\.gate_proj\.weight$", 0), "MLP width"),
                "num_attention_heads": _one(dims(r"self_attn\.q_proj\.weight$", 0), "query width") // head,
                "num_key_value_heads": _one(dims(r"self_attn\.k_proj\.weight$", 0), "key width") // head,
                "head_dim": head}
    head = old.hidden_size // old.num_attention_heads  # bert
    hidden = _one(dims(r"word_embeddings\.weight$", 1), "hidden size")
    attention = _one(dims(r"attention\.self\.query\.weight$", 0), "attention width")
    if attention != hidden:
        raise MergeInputError(f"BERT's attention width is its hidden size; got {attention} and {hidden}")
    return {"hidden_size": hidden, "num_attention_heads": hidden // head,
            "intermediate_size": _one(dims(r"intermediate\.dense\.weight$", 0), "MLP width")}


def rebuild(template: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """``template``'s class built from its config with the widths of ``state``, holding ``state``."""
    config = copy.deepcopy(template.config)
    for key, value in _widths(family(template), template.config, state).items():
        setattr(config, key, value)
    dtype = next(iter(state.values())).dtype
    model = type(template)(config).to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if unexpected or [k for k in missing if k not in tied]:
        raise MergeInputError(f"the merged tensors do not fit {type(template).__name__} at widths "
                              f"{_widths(family(template), template.config, state)}: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    return model.eval()
