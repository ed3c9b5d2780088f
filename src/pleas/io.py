"""Files in and out of a merge: source checkpoints, calibration data, and the merged model.

* :func:`load_checkpoint` reads a state dict from a ``.safetensors`` file or a torch file (read with
  ``torch.load(..., weights_only=True)``: tensors and plain containers only, never pickled code).
* :func:`load_model` builds an architecture with :func:`pleas.create_model` and loads a checkpoint into it.
* :func:`load_calibration` gives calibration inputs from a packaged dataset name or a ``.npy``/``.pt`` file.
* :func:`save_merged` writes a :class:`pleas.MergeResult` as safetensors (+ a JSON report), atomically.
* :func:`load_merged` rebuilds the merged model from that file and a template of the source architecture.

Every failure the caller can fix raises :class:`pleas.MergeInputError` naming the file and what is accepted.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .errors import MergeInputError, PleasError
from .files import write_atomically

if TYPE_CHECKING:
    from .result import MergeResult

#: What :func:`load_checkpoint` accepts, for error messages.
CHECKPOINT_FORMATS = (
    "a .safetensors file, or a torch file (torch.save) holding a state dict or a dict with a "
    "'state_dict' or 'model' entry holding one (read with weights_only=True)"
)
#: What :func:`load_calibration` accepts, for error messages.
CALIBRATION_FORMATS = (
    "a packaged dataset name ('mnist', 'digits', 'mnist1d', optionally with a resolution like 'digits:16'), "
    "a .npy / .pt file holding an array (N, ...) (integer arrays: token ids), or a .txt file of text"
)
#: Key of the safetensors metadata entry written by :func:`save_merged`.
METADATA_KEY = "pleas"
#: Format tag stored in that entry.
MERGED_FORMAT = "pleas.merged/1"

_SAFETENSORS_SUFFIXES = (".safetensors",)
_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


# ------------------------------------------------------------------------------------- checkpoints


def _check_readable(path: Path, what: str, accepted: str) -> None:
    if not path.exists():
        raise MergeInputError(f"{what} {str(path)!r} does not exist; expected {accepted}")
    if path.is_dir():
        raise MergeInputError(f"{what} {str(path)!r} is a directory; expected {accepted}")
    if not os.access(path, os.R_OK):
        raise MergeInputError(f"{what} {str(path)!r} is not readable (permission denied)")


def _looks_like_safetensors(path: Path) -> bool:
    """A safetensors file starts with an 8-byte little-endian header length, then a JSON object."""
    with open(path, "rb") as fh:
        head = fh.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _read_safetensors(path: Path, what: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            metadata = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise MergeInputError(f"{what} {str(path)!r} is not a valid safetensors file ({exc})") from exc
    return tensors, metadata


def _as_state_dict(obj: Any) -> dict[str, Tensor] | None:
    """``obj`` if it is a non-empty dict of str -> Tensor, else None."""
    if isinstance(obj, dict) and obj and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        return dict(obj)
    return None


def load_checkpoint(path: str | os.PathLike) -> dict[str, Tensor]:
    """The state dict stored in ``path``, on the CPU.

    Accepted: a ``.safetensors`` file; or a torch file (``torch.save``) holding a state dict (str ->
    Tensor), or a dict with a ``"state_dict"`` or ``"model"`` entry holding one (e.g. a training
    checkpoint). Torch files are read with ``weights_only=True``: pickled modules or other objects are
    refused. The format is recognised from the file's contents, not its name.

    Raises:
        MergeInputError: the file is missing, unreadable, corrupt, or holds no state dict.
    """
    path = Path(path)
    _check_readable(path, "checkpoint", CHECKPOINT_FORMATS)
    if _looks_like_safetensors(path):
        state, _ = _read_safetensors(path, "checkpoint")
        if not state:
            raise MergeInputError(f"checkpoint {str(path)!r} holds no tensors; expected {CHECKPOINT_FORMATS}")
        return state
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError (bad zip), EOFError, ...
        raise MergeInputError(
            f"checkpoint {str(path)!r} could not be read as safetensors or as a torch file with weights_only=True "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); expected {CHECKPOINT_FORMATS}"
        ) from exc
    state = _as_state_dict(obj)
    if state is None and isinstance(obj, dict):
        for key in ("state_dict", "model"):
            state = _as_state_dict(obj.get(key))
            if state is not None:
                break
    if state is None:
        found = f"a dict with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise MergeInputError(f"checkpoint {str(path)!r} holds {found}, not a state dict; expected {CHECKPOINT_FORMATS}")
    return state


def _create(arch: str, kwargs: dict[str, Any]) -> nn.Module:
    from .factory import create_model

    try:
        return create_model(arch, **kwargs)
    except PleasError:
        raise
    except (TypeError, ValueError) as exc:
        raise MergeInputError(f"cannot build architecture {arch!r} with kwargs {kwargs}: {exc}") from exc


def load_model(arch: str, kwargs: dict[str, Any] | None, path: str | os.PathLike) -> nn.Module:
    """Build ``arch`` (see :func:`pleas.create_model`) with ``kwargs`` and load the checkpoint ``path``
    into it strictly (every tensor present, same shapes). Returns the model in eval mode.

    Raises:
        MergeInputError: the architecture cannot be built, the file cannot be read, or the checkpoint
            does not fit the architecture (the message lists missing, unexpected and mis-shaped tensors).
    """
    kwargs = dict(kwargs or {})
    state = load_checkpoint(path)
    model = _create(arch, kwargs)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(t.shape)}"
        for k, t in expected.items()
        if k in state and tuple(state[k].shape) != tuple(t.shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if shapes:
            parts.append(f"{len(shapes)} with other shapes (e.g. {shapes[:2]})")
        raise MergeInputError(
            f"checkpoint {str(path)!r} does not fit architecture {arch!r} with kwargs {kwargs}: tensors "
            + "; ".join(parts)
            + "; pass the architecture and --kwargs the checkpoint was trained with"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # e.g. a dtype that cannot be copied
        raise MergeInputError(f"checkpoint {str(path)!r} cannot be loaded into {arch!r}: {exc}") from exc
    return model.eval()


# ------------------------------------------------------------------------------------- calibration


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MergeInputError(f"{name}={value!r}; allowed: a positive integer")
    return value


def _tensor_from_file(path: Path) -> Tensor:
    suffix = path.suffix.lower()
    if suffix == ".npy":
        import numpy as np

        try:
            array = np.load(str(path), allow_pickle=False)
        except Exception as exc:
            raise MergeInputError(f"calibration file {str(path)!r} is not a valid .npy array ({exc})") from exc
        if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
            raise MergeInputError(
                f"calibration file {str(path)!r} holds an array of dtype {array.dtype}; allowed: numbers (float or int)"
            )
        return torch.from_numpy(np.ascontiguousarray(array))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise MergeInputError(
            f"calibration file {str(path)!r} could not be read as a torch file with weights_only=True "
            f"({type(exc).__name__}); expected a tensor (N, ...) saved with torch.save"
        ) from exc
    if isinstance(obj, (tuple, list)) and obj and isinstance(obj[0], Tensor):
        obj = obj[0]  # (inputs, labels)
    elif isinstance(obj, dict) and isinstance(obj.get("x"), Tensor):
        obj = obj["x"]
    if not isinstance(obj, Tensor):
        raise MergeInputError(
            f"calibration file {str(path)!r} holds a {type(obj).__name__}; expected a tensor (N, ...), "
            "an (inputs, labels) pair, or a dict with an 'x' tensor"
        )
    if obj.dtype.is_complex or obj.dtype == torch.bool:
        raise MergeInputError(f"calibration file {str(path)!r} holds a {obj.dtype} tensor; allowed: float or int")
    return obj


def _is_dataset_name(text: str) -> bool:
    from . import datasets as data

    return text.partition(":")[0] in data.known_datasets()


def _tensor_from_dataset(spec: str, *, split: str, seed: int) -> Tensor:
    from . import datasets as data

    name, sep, res_text = spec.partition(":")
    resolution = None
    if sep:
        try:
            resolution = int(res_text)
        except ValueError:
            resolution = -1
        if resolution < 1:
            raise MergeInputError(
                f"calibration data {spec!r}: resolution {res_text!r} is not a positive integer; "
                "write e.g. 'digits:16'"
            )
    if name not in data.known_datasets():
        raise MergeInputError(
            f"unknown calibration data {spec!r}: not a file ending in .npy or .pt, nor a packaged dataset; "
            f"expected {CALIBRATION_FORMATS}"
        )
    try:
        return data.load(name, split=split, resolution=resolution, seed=seed).x
    except ImportError as exc:
        raise MergeInputError(
            f"calibration dataset {name!r} needs an optional package ({exc}); install it with pip install 'pleas[data]'"
        ) from exc
    except ValueError as exc:
        raise MergeInputError(f"calibration data {spec!r}: {exc}") from exc


def load_calibration(
    spec: str | os.PathLike, samples: int | None = None, *, seed: int = 0, split: str = "train",
    tokenizer: Any = None, seq_len: int = 128,
) -> Tensor:
    """Calibration inputs as a tensor (N, ...): float32 for numbers, int64 for integer ids.

    Args:
        spec: a packaged dataset name ``"mnist"``, ``"digits"`` or ``"mnist1d"``, optionally with a
            resolution ``"name:R"`` (images resized to R x R, e.g. ``"digits:16"``), loaded with
            :func:`pleas.datasets.load` (``split`` of it; inputs only); or a path to a ``.npy``
            file or a ``.pt`` file (a tensor, an ``(inputs, labels)`` pair, or a dict with an ``"x"``
            tensor; read with ``weights_only=True``; integer arrays are token ids), or a ``.txt`` file of
            text, cut into windows of ``seq_len`` tokens (``tokenizer``: a Hugging Face tokenizer or any
            callable from text to ids; None: the text's UTF-8 bytes, for byte-level models).
        samples: if given, at most this many samples, chosen at random (seeded by ``seed``); all of
            them if there are fewer.
        seed: seeds the subset choice (and the packaged datasets' train/test split).

    Raises:
        MergeInputError: unknown name, unreadable or unsupported file, empty or non-finite data.
    """
    if samples is not None:
        samples = _positive_int(samples, "samples")
    text = os.fspath(spec)
    path = Path(text)
    if path.suffix.lower() in (".npy", ".pt", ".pth"):
        _check_readable(path, "calibration file", CALIBRATION_FORMATS)
        x, label = _tensor_from_file(path), f"calibration file {text!r}"
    elif path.suffix.lower() == ".txt":
        _check_readable(path, "calibration text", CALIBRATION_FORMATS)
        x, label = text_windows(path, tokenizer, seq_len, samples, seed), f"calibration text {text!r}"
    elif path.exists() and not _is_dataset_name(text):
        raise MergeInputError(f"calibration file {text!r} has an unsupported type; expected {CALIBRATION_FORMATS}")
    else:
        x, label = _tensor_from_dataset(text, split=split, seed=seed), f"calibration data {text!r}"
    if x.dim() < 2:
        raise MergeInputError(f"{label} has shape {tuple(x.shape)}; expected (N, ...) with at least 2 dimensions")
    if x.shape[0] == 0 or x.numel() == 0:
        raise MergeInputError(f"{label} is empty (shape {tuple(x.shape)}); it must hold at least one sample")
    if x.dtype.is_floating_point:
        x = x.to(torch.float32)
        if not torch.isfinite(x).all():
            raise MergeInputError(f"{label} contains NaN or infinite values")
    else:
        x = x.long()  # token ids: never cast to float
    if samples is not None and samples < x.shape[0]:
        order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
        x = x[order[:samples].sort().values]
    return x.contiguous()


def text_windows(path: Path, tokenizer: Any, seq_len: int, samples: int | None, seed: int) -> Tensor:
    """Token ids (N, seq_len) cut from a text file: the whole text tokenised (``tokenizer``, a Hugging
    Face tokenizer or a callable returning ids; None: UTF-8 bytes), split into consecutive windows."""
    seq_len = _positive_int(seq_len, "seq_len")
    text = path.read_text(encoding="utf-8", errors="replace")
    if tokenizer is None:
        ids = list(text.encode("utf-8"))
    else:
        out = tokenizer(text)
        ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
    windows = len(ids) // seq_len
    if windows == 0:
        raise MergeInputError(f"calibration text {str(path)!r} holds {len(ids)} tokens, fewer than one window of "
                              f"{seq_len}; give more text or a smaller --seq-len")
    return torch.tensor(ids[: windows * seq_len], dtype=torch.long).view(windows, seq_len)


# ------------------------------------------------------------------------------------ Hugging Face directories


def is_pretrained_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a Hugging Face model directory (a config.json beside the weights)."""
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def load_pretrained(path: str | os.PathLike) -> nn.Module:
    """The model saved in a Hugging Face directory (config.json + safetensors, sharded or not), built as
    the class its config names, from local files only; in eval mode."""
    try:
        import transformers
    except ImportError as exc:
        raise MergeInputError(f"{str(path)!r} is a Hugging Face model directory; reading it needs transformers "
                              "(pip install 'pleas[transformers]')") from exc
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    names = getattr(config, "architectures", None) or []
    cls = next((getattr(transformers, n) for n in names if hasattr(transformers, n)), None)
    if cls is None:
        raise MergeInputError(f"{str(path)!r}: config.json names no model class transformers knows ({names})")
    try:
        return cls.from_pretrained(path, local_files_only=True).eval()
    except (OSError, ValueError) as exc:
        raise MergeInputError(f"{str(path)!r} could not be loaded as {cls.__name__}: {exc}") from exc


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer saved beside a Hugging Face model, or None (byte-level models keep none)."""
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "vocab.txt")
    if not any((Path(path) / name).is_file() for name in names):
        return None
    try:
        import transformers

        return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (ImportError, OSError, ValueError, KeyError, TypeError):
        return None


def save_pretrained_atomically(model: nn.Module, path: str | os.PathLike, extra: dict[str, bytes]) -> None:
    """``model.save_pretrained`` into a new directory ``path`` (with ``extra`` files beside), written
    under a temporary name and renamed into place: no partial directory is left on failure."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise MergeInputError(f"{str(path)!r} exists; give a new directory for the merged model")
    if not path.parent.is_dir():
        raise MergeInputError(f"cannot write {str(path)!r}: directory {str(path.parent)!r} does not exist")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        model.save_pretrained(tmp)
        for name, payload in extra.items():
            (tmp / name).write_bytes(payload)
        if path.exists():
            path.rmdir()
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ------------------------------------------------------------------------------------ merged models


def _json(value: Any) -> Any:
    """``value`` made JSON-safe (unknown objects become their repr), deterministically."""
    return json.loads(json.dumps(value, sort_keys=True, default=repr))


def merged_metadata(result: "MergeResult", info: dict[str, Any] | None = None) -> dict[str, Any]:
    """The description :func:`save_merged` stores next to the tensors (see :func:`load_merged`)."""
    from .version import __version__
    from .rewrite.heads import SeparateHeads

    report = result.report or {}
    heads = report.get("heads", "separate" if isinstance(result.model, SeparateHeads) else "shared")
    meta: dict[str, Any] = {
        "format": MERGED_FORMAT,
        "pleas_version": __version__,
        "method": report.get("method"),
        "options": report.get("options", {}),
        "budget": report.get("budget"),
        "heads": heads,
        "matching": report.get("matching"),
        "seed": report.get("seed"),
        "widths": dict(result.widths),
        "merge_counts": dict(result.merge_counts),
        "relative_dense": (report.get("size") or {}).get("relative_dense"),
    }
    if heads == "separate":
        sizes = getattr(result.model, "sizes", None)
        if sizes is None:
            raise MergeInputError("heads='separate' but the merged model has no head sizes (expected SeparateHeads)")
        meta["head_sizes"] = [int(s) for s in sizes]
    if info:
        meta["info"] = info
    return _json(meta)


def merged_files(
    result: "MergeResult",
    path: str | os.PathLike,
    report_path: str | os.PathLike | None = None,
    *,
    info: dict[str, Any] | None = None,
) -> dict[Path, bytes]:
    """The bytes :func:`save_merged` writes, per file: ``result.model``'s state dict as safetensors at
    ``path`` and, if given, ``result.report`` as JSON at ``report_path``."""
    from safetensors.torch import save as safetensors_bytes

    path = Path(path)
    report_path = Path(report_path) if report_path is not None else None
    if report_path is not None and report_path.resolve() == path.resolve():
        raise MergeInputError(f"the report path and the model path are the same file {str(path)!r}; use two paths")
    for target in (path, report_path):
        if target is not None and target.is_dir():
            raise MergeInputError(f"cannot write {str(target)!r}: it is a directory")
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in result.model.state_dict().items()}
    meta = merged_metadata(result, info)
    contents = {path: safetensors_bytes(state, metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})}
    if report_path is not None:
        contents[report_path] = report_bytes(result, info)
    return contents


def report_bytes(result: "MergeResult", info: dict[str, Any] | None = None) -> bytes:
    """``result.report`` (with ``info``) as the JSON pleas writes."""
    report = dict(result.report or {})
    if info:
        report["info"] = info
    return (json.dumps(_json(report), indent=2, sort_keys=True) + "\n").encode("utf-8")


def save_merged(
    result: "MergeResult",
    path: str | os.PathLike,
    report_path: str | os.PathLike | None = None,
    *,
    info: dict[str, Any] | None = None,
) -> None:
    """Write ``result.model``'s state dict to ``path`` as safetensors and, if given, ``result.report``
    as JSON to ``report_path``.

    The safetensors metadata entry ``"pleas"`` holds a JSON string (method, options, budget, heads and
    head sizes, merged widths, merge counts, and ``info`` if given) from which :func:`load_merged`
    rebuilds the model. The bytes depend only on the merged tensors and that description (no times,
    no paths), so equal merges give identical files. Both files are written to temporary files in
    their directories and moved into place: a failure leaves no partial file and changes no existing one.
    """
    write_atomically(merged_files(result, path, report_path, info=info))


def read_merged_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The description :func:`save_merged` stored in ``path`` (method, budget, heads, widths, ...)."""
    path = Path(path)
    accepted = "a .safetensors file written by pleas.io.save_merged (pleas merge --out)"
    _check_readable(path, "merged model file", accepted)
    _, metadata = _read_safetensors(path, "merged model file")
    return _parse_metadata(path, metadata)


def _parse_metadata(path: Path, metadata: dict[str, str]) -> dict[str, Any]:
    if METADATA_KEY not in metadata:
        raise MergeInputError(
            f"{str(path)!r} has no {METADATA_KEY!r} metadata, so it was not written by pleas.io.save_merged; "
            "load plain checkpoints with pleas.io.load_checkpoint"
        )
    try:
        meta = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise MergeInputError(f"{str(path)!r}: the {METADATA_KEY!r} metadata is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != MERGED_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise MergeInputError(f"{str(path)!r}: metadata format {found!r} is not supported; expected {MERGED_FORMAT!r}")
    return meta


def load_merged(template_model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Rebuild the merged model saved by :func:`save_merged`, in eval mode.

    ``template_model`` is any instance of the source architecture (its weights are not used and it is
    not modified): :func:`pleas.build_model` copies it and resizes its modules to the saved tensors'
    shapes. If the merge had separate heads, the result is wrapped in :class:`pleas.heads.SeparateHeads`
    with the saved head sizes, so its forward returns one output per source model.

    Raises:
        MergeInputError: the file is missing or corrupt, was not written by :func:`save_merged`, or its
            tensors do not fit the template's architecture.
    """
    from .errors import SpecError
    from .rewrite.heads import SeparateHeads
    from .rewrite.rebuild import build_model

    path = Path(path)
    accepted = "a .safetensors file written by pleas.io.save_merged (pleas merge --out)"
    _check_readable(path, "merged model file", accepted)
    state, metadata = _read_safetensors(path, "merged model file")
    meta = _parse_metadata(path, metadata)
    heads = meta.get("heads")
    if heads == "separate":
        sizes = meta.get("head_sizes")
        if not isinstance(sizes, list) or not all(isinstance(s, int) and s > 0 for s in sizes):
            raise MergeInputError(f"{str(path)!r}: heads are separate but the metadata has no valid 'head_sizes'")
        outside = [k for k in state if not k.startswith("model.")]
        if outside:
            raise MergeInputError(f"{str(path)!r}: separate-heads file has tensors outside 'model.': {outside[:3]}")
        state = {k[len("model."):]: v for k, v in state.items()}
    elif heads != "shared":
        raise MergeInputError(f"{str(path)!r}: metadata heads={heads!r}; allowed: 'shared', 'separate'")
    try:
        model = build_model(template_model, state)
    except SpecError as exc:
        raise MergeInputError(
            f"{str(path)!r} does not fit the template {type(template_model).__name__}: {exc}; "
            "pass a model of the architecture the merged models had"
        ) from exc
    if heads == "separate":
        model = SeparateHeads(model, meta["head_sizes"])
    return model.eval()
