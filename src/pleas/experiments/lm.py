"""Byte-level language models for the transformer benchmarks: two Hugging Face families with tiny
configs, trained on one text domain each, cached, and measured in bits per byte.

* :data:`LM_CONFIGS`, :func:`build_lm`: a GPT-2-style (``GPT2LMHeadModel``) and a Llama-style
  (``LlamaForCausalLM``: RoPE, RMSNorm, SwiGLU, grouped-query attention) model, 4 layers, 128 wide,
  vocabulary 256 (raw bytes, :func:`pleas.datasets.byte_corpus`).
* :func:`train_lm`: next-byte prediction with AdamW on random windows of one text, deterministic given
  the seed and the thread count.
* :class:`LMRecipe`, :func:`train_lm_source`, :func:`lm_pair`: model A trained on "code" (seed 0) and
  model B on "prose" (seed 1), each trained once and cached as safetensors with its config
  (:func:`pleas.experiments.train.cached_model`).
* :func:`bits_per_byte`, :func:`logit_average_bits_per_byte`, :func:`mixture_bits_per_byte`: held-out
  bits per byte of one model, of the average of two models' logits, and of the average of their
  next-byte probabilities.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..datasets import BYTE_DOMAINS, BYTE_VOCAB, byte_corpus, corpus_digest, random_windows, spaced_windows
from . import train

#: The model families and their configs (keyword arguments of the Hugging Face config class).
#: Dropout is off in GPT-2 (its default is 0.1) so that training and evaluation compute the same
#: function and the models stay deterministic functions of their weights. ``use_cache=False``: the
#: forward returns no key/value cache (nothing here generates). Token 0 (NUL, the document separator
#: of the byte corpora) is the begin/end-of-text token.
LM_CONFIGS: dict[str, dict[str, Any]] = {
    "gpt2": dict(vocab_size=BYTE_VOCAB, n_positions=256, n_embd=128, n_layer=4, n_head=4, n_inner=512,
                 activation_function="gelu_pytorch_tanh", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                 tie_word_embeddings=True, use_cache=False, bos_token_id=0, eos_token_id=0),
    # intermediate 344: about 8/3 x 128 (SwiGLU's usual ratio, which keeps the MLP near 4x's parameter
    # count), rounded up to a multiple of 8. Untied output head, as in Llama.
    "llama": dict(vocab_size=BYTE_VOCAB, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                  hidden_act="silu", rms_norm_eps=1e-6, rope_theta=10000.0, attention_bias=False,
                  mlp_bias=False, tie_word_embeddings=False, use_cache=False, bos_token_id=0, eos_token_id=0),
}
FAMILIES = tuple(LM_CONFIGS)

#: The LM pair: (name, domain, seed) of model A and model B.
LM_PAIR = (("A", "code", 0), ("B", "prose", 1))
#: Training recipe of the pair (see :class:`LMRecipe`). Steps are per family so that each model trains in
#: about 7 minutes on 2 shared CPU cores (a GPT-2 step takes about 0.9 s here, a Llama step 0.6 s).
LM_STEPS = {"gpt2": 500, "llama": 650}
LM_BATCH = 16
LM_LENGTH = 128
LM_LR = 3e-3
LM_WEIGHT_DECAY = 0.1
LM_WARMUP = 25
#: AdamW betas, gradient-norm clip, and the final learning rate of the cosine as a fraction of the peak.
LM_BETAS = (0.9, 0.95)
LM_GRAD_CLIP = 1.0
LM_MIN_LR_FRACTION = 0.1

#: Held-out evaluation: windows per domain and bytes per window (each window predicts its bytes 2..T
#: from the bytes before them).
EVAL_WINDOWS = 256
EVAL_LENGTH = 128


def _check_family(family: str) -> None:
    if family not in LM_CONFIGS:
        raise ValueError(f"unknown LM family {family!r}; allowed are {', '.join(map(repr, FAMILIES))}")


def lm_config(family: str):
    """The Hugging Face config of ``family`` ("gpt2": ``GPT2Config``, "llama": ``LlamaConfig``)."""
    _check_family(family)
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the byte-level LMs need transformers: pip install 'pleas[transformers]'") from err
    config_class = transformers.GPT2Config if family == "gpt2" else transformers.LlamaConfig
    return config_class(**LM_CONFIGS[family])


def build_lm(family: str, seed: int | None = None) -> nn.Module:
    """An untrained ``GPT2LMHeadModel`` ("gpt2") or ``LlamaForCausalLM`` ("llama") with the config of
    :data:`LM_CONFIGS`, in eval mode. With ``seed``, the initial weights depend only on it (the
    global torch RNG is left as it was)."""
    import transformers

    config = lm_config(family)
    model_class = transformers.GPT2LMHeadModel if family == "gpt2" else transformers.LlamaForCausalLM
    if seed is None:
        return model_class(config).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_class(config).eval()


def lm_logits(model: nn.Module, ids: Tensor) -> Tensor:
    """Next-token logits (N, T, vocab) of ``model`` on token ids (N, T): its output's ``.logits``
    (Hugging Face models) or the output itself when that is a tensor."""
    out = model(ids)
    logits = getattr(out, "logits", out)
    if not isinstance(logits, Tensor):
        raise TypeError(f"the model returned a {type(out).__name__}; expected a tensor of logits (N, T, vocab) "
                        "or an output with a .logits tensor")
    if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(ids.shape):
        raise ValueError(f"the model's logits have shape {tuple(logits.shape)}; expected (N, T, vocab) with "
                         f"(N, T) = {tuple(ids.shape)}")
    return logits


def next_token_nll(log_probs: Tensor, ids: Tensor) -> Tensor:
    """Per-position negative log-likelihood in nats (N, T - 1) of ``ids[:, 1:]`` under
    ``log_probs[:, :-1]`` (log-probabilities (N, T, vocab) of the next token at each position)."""
    return -log_probs[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)


def train_lm(
    model: nn.Module,
    text: Tensor,
    *,
    seed: int,
    steps: int,
    batch_size: int = LM_BATCH,
    length: int = LM_LENGTH,
    lr: float = LM_LR,
    weight_decay: float = LM_WEIGHT_DECAY,
    warmup: int = LM_WARMUP,
    progress: bool = True,
) -> list[float]:
    """Train ``model`` in place for next-token prediction on ``text``; returns the training loss of
    every step (mean nats per predicted token) and leaves the model in eval mode.

    Each step draws ``batch_size`` windows of ``length`` tokens at random offsets of ``text`` (1-D
    token ids) from a generator seeded with ``seed`` and minimises the mean cross-entropy of tokens
    2..length given the tokens before them (:func:`lm_logits`). AdamW (betas :data:`LM_BETAS`; weight
    decay ``weight_decay`` on matrices and embeddings only, not on biases and norm gains), gradient
    norm clipped to :data:`LM_GRAD_CLIP`, learning rate warmed up linearly over ``warmup`` steps to
    ``lr`` and then cosine-decayed to ``LM_MIN_LR_FRACTION * lr`` at the last step. Randomness inside
    the model (if any) comes from ``seed`` too; the global torch RNG is left as it was. Deterministic
    given ``seed``, the initial weights and the number of torch threads.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    if length < 2:
        raise ValueError(f"length must be at least 2 (one token to read, one to predict), got {length!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    # Decaying 1-D parameters (biases, norm gains) pulls the norms toward zero for no benefit; the usual
    # GPT-2/Llama training recipes decay only the matrices (embeddings included).
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr, betas=LM_BETAS)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress_ = (step - warmup) / max(1, steps - 1 - warmup)
        return LM_MIN_LR_FRACTION + (1 - LM_MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress_)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.train()
        bar = tqdm(total=steps, desc="train lm", leave=False, disable=not progress)
        try:
            for _ in range(steps):
                ids = random_windows(text, batch_size, length, generator)
                log_probs = F.log_softmax(lm_logits(model, ids).float(), dim=-1)
                loss = next_token_nll(log_probs, ids).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, LM_GRAD_CLIP)
                opt.step()
                sched.step()
                losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        finally:
            bar.close()
            model.eval()
    return losses


@dataclass(frozen=True)
class LMRecipe:
    """How one byte-level LM is trained: ``family`` (a key of :data:`LM_CONFIGS`), the ``domain`` of
    its training text (:data:`pleas.datasets.BYTE_DOMAINS`), ``seed`` (initialisation and data order)
    and the arguments of :func:`train_lm`."""

    family: str
    domain: str
    seed: int
    steps: int | None = None  # None: LM_STEPS[family]
    batch_size: int = LM_BATCH
    length: int = LM_LENGTH
    lr: float = LM_LR
    weight_decay: float = LM_WEIGHT_DECAY
    warmup: int = LM_WARMUP

    def __post_init__(self) -> None:
        _check_family(self.family)
        if self.steps is None:
            object.__setattr__(self, "steps", LM_STEPS[self.family])
        if self.domain not in BYTE_DOMAINS:
            raise ValueError(f"unknown byte domain {self.domain!r}; allowed are {', '.join(map(repr, BYTE_DOMAINS))}")

    def cache_key(self) -> dict:
        """The key of the cached weights: the recipe, the model config, the fixed optimiser settings and
        the digest of the training text (which differs between Python versions' standard libraries)."""
        return {"kind": "byte-lm", **asdict(self), "config": LM_CONFIGS[self.family],
                "betas": list(LM_BETAS), "grad_clip": LM_GRAD_CLIP, "min_lr_fraction": LM_MIN_LR_FRACTION,
                "data": corpus_digest(self.domain, "train")}

    def describe(self) -> str:
        """E.g. ``gpt2 on code, seed 0, 500 steps of 16 x 128 bytes, lr 0.003``."""
        return (f"{self.family} on {self.domain}, seed {self.seed}, {self.steps} steps of "
                f"{self.batch_size} x {self.length} bytes, lr {self.lr:g}")


@dataclass
class LMSource:
    """A trained LM with its recipe. ``train_seconds`` is 0 and ``losses`` empty when the weights came
    from the cache."""

    model: nn.Module
    recipe: LMRecipe
    train_seconds: float
    losses: list[float]


def train_lm_source(recipe: LMRecipe, *, name: str = "", progress: bool = False,
                    log: Callable[[str], None] | None = None) -> LMSource:
    """Train the LM of ``recipe`` on its domain's training split (or load it from the cache:
    ``<cache>/models/<hash of recipe.cache_key()>.safetensors``, whose header also holds the config as
    JSON under "config"). ``log`` hears about training that is about to happen."""
    key = recipe.cache_key()
    if log is not None and not train.model_path(key).exists():
        log(f"training LM {name + ' ' if name else ''}({recipe.describe()}); cached for later runs")
    losses: list[float] = []
    start = time.perf_counter()

    def fit(model: nn.Module) -> None:
        losses.extend(train_lm(model, byte_corpus(recipe.domain, "train"), seed=recipe.seed, steps=recipe.steps,
                               batch_size=recipe.batch_size, length=recipe.length, lr=recipe.lr,
                               weight_decay=recipe.weight_decay, warmup=recipe.warmup, progress=progress))

    config_json = json.dumps(LM_CONFIGS[recipe.family], sort_keys=True)
    model = train.cached_model(key, lambda: build_lm(recipe.family, recipe.seed), fit,
                               metadata={"config": config_json, "family": recipe.family})
    return LMSource(model, recipe, time.perf_counter() - start if losses else 0.0, losses)


def lm_pair(family: str, *, seeds: tuple[int, int] | None = None, progress: bool = False,
            log: Callable[[str], None] | None = None, **recipe: Any) -> tuple[LMSource, LMSource]:
    """Models A (trained on "code", seed 0) and B ("prose", seed 1) of ``family`` (:data:`LM_PAIR`),
    trained on first use and cached. ``seeds`` replaces the two seeds; ``recipe`` overrides fields of
    :class:`LMRecipe` (steps, batch_size, ...) for both."""
    pair = LM_PAIR if seeds is None else tuple((n, d, s) for (n, d, _), s in zip(LM_PAIR, seeds))
    return tuple(  # type: ignore[return-value]
        train_lm_source(LMRecipe(family, domain, seed, **recipe), name=name, progress=progress, log=log)
        for name, domain, seed in pair
    )


# ------------------------------------------------------------------------------------ evaluation


def heldout_windows(domain: str, count: int = EVAL_WINDOWS, length: int = EVAL_LENGTH) -> Tensor:
    """The evaluation windows of ``domain``: ``count`` evenly spaced windows of ``length`` bytes of its
    held-out text (:func:`pleas.datasets.spaced_windows`), int64 (count, length)."""
    return spaced_windows(byte_corpus(domain, "heldout"), count, length)


@torch.no_grad()
def _bits_per_byte(log_probs: Callable[[Tensor], Tensor], models: tuple[nn.Module, ...], domain: str,
                   count: int, length: int, batch_size: int) -> float:
    """Mean over the held-out windows' predicted bytes of -log2 p(byte | bytes before it), with
    ``log_probs(ids)`` giving log-probabilities (N, T, vocab); ``models`` are put in eval mode meanwhile."""
    ids = heldout_windows(domain, count, length)
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        total = sum(next_token_nll(log_probs(ids[i : i + batch_size]).double(), ids[i : i + batch_size]).sum().item()
                    for i in range(0, len(ids), batch_size))
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    return total / (len(ids) * (length - 1)) / math.log(2)


def bits_per_byte(model: nn.Module, domain: str, *, count: int = EVAL_WINDOWS, length: int = EVAL_LENGTH,
                  batch_size: int = 64) -> float:
    """Bits per byte of ``model`` on ``domain``'s held-out text: the mean next-byte cross-entropy
    (nats) over :func:`heldout_windows` (``count`` windows of ``length`` bytes, each predicting bytes
    2..length; 256 x 127 predictions by default), divided by ln 2. ``model`` maps ids (N, T) to logits
    (N, T, 256) or to an output with ``.logits`` (:func:`lm_logits`); it is evaluated in eval mode."""
    return _bits_per_byte(lambda ids: F.log_softmax(lm_logits(model, ids).double(), -1), (model,), domain,
                          count, length, batch_size)


def logit_average_bits_per_byte(model_a: nn.Module, model_b: nn.Module, domain: str, *, count: int = EVAL_WINDOWS,
                                length: int = EVAL_LENGTH, batch_size: int = 64) -> float:
    """Bits per byte (as :func:`bits_per_byte`) of the logit-average ensemble: next-byte distribution
    softmax((logits_a + logits_b) / 2)."""
    return _bits_per_byte(
        lambda ids: F.log_softmax((lm_logits(model_a, ids).double() + lm_logits(model_b, ids).double()) / 2, -1),
        (model_a, model_b), domain, count, length, batch_size)


def mixture_bits_per_byte(model_a: nn.Module, model_b: nn.Module, domain: str, *, count: int = EVAL_WINDOWS,
                          length: int = EVAL_LENGTH, batch_size: int = 64) -> float:
    """Bits per byte (as :func:`bits_per_byte`) of the equal-weight mixture: next-byte probabilities
    (p_a + p_b) / 2 of the two models' softmax distributions."""

    def log_probs(ids: Tensor) -> Tensor:
        la = F.log_softmax(lm_logits(model_a, ids).double(), -1)
        lb = F.log_softmax(lm_logits(model_b, ids).double(), -1)
        return torch.logaddexp(la, lb) - math.log(2)

    return _bits_per_byte(log_probs, (model_a, model_b), domain, count, length, batch_size)
