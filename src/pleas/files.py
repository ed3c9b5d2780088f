"""Writing output files safely: all of a command's files or none, never a partial file, never an input.

Every file is first written to a temporary file in its own directory and moved into place only when all
of them are complete (:func:`write_atomically`); :func:`check_outputs` refuses, before any work is done,
output paths that would overwrite an input or each other, or that cannot be written.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

from .errors import MergeInputError


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomically(contents: dict[Path, bytes]) -> None:
    """Write every file to a temporary file in its own directory, then move them all into place.

    On any failure before the moves, no target file is created or changed and the temporary files are
    removed."""
    temps: dict[Path, str] = {}
    try:
        for target, payload in contents.items():
            target = Path(target)
            if not target.parent.is_dir():
                raise MergeInputError(f"cannot write {str(target)!r}: directory {str(target.parent)!r} does not exist")
            try:
                fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
            except OSError as exc:
                raise MergeInputError(f"cannot write {str(target)!r}: {exc.strerror or exc}") from exc
            temps[target] = tmp
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual permissions
            with os.fdopen(fd, "wb") as fh:
                fh.write(payload)
                fh.flush()
                os.fsync(fh.fileno())
        for target, tmp in temps.items():
            os.replace(tmp, target)
    except BaseException:
        for tmp in temps.values():
            if os.path.exists(tmp):
                os.remove(tmp)
        raise


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    write_atomically({Path(path): text.encode("utf-8")})


def check_outputs(outputs: dict[str, str | os.PathLike | None], inputs: list[str | os.PathLike]) -> None:
    """Refuse output paths (``{flag: path}``; None = not asked for) that are a directory, sit in a missing
    directory, are one of the ``inputs``, or are the same file as another output. Called before any work,
    so a bad path costs nothing and writes nothing."""
    asked = {flag: Path(p) for flag, p in outputs.items() if p is not None}
    sources = [Path(p) for p in inputs if p is not None]
    for flag, out in asked.items():
        if out.is_dir():
            raise MergeInputError(f"{flag} {str(out)!r} is a directory; give a file path")
        if not out.parent.is_dir():
            raise MergeInputError(f"{flag} {str(out)!r}: directory {str(out.parent)!r} does not exist")
        for src in sources:
            if out.resolve() == src.resolve() or (src.exists() and out.exists() and os.path.samefile(out, src)):
                raise MergeInputError(f"{flag} {str(out)!r} is an input file; pleas never overwrites its inputs")
    seen: dict[Path, str] = {}
    for flag, out in asked.items():
        key = out.resolve()
        if key in seen:
            raise MergeInputError(f"{seen[key]} and {flag} are the same file {str(out)!r}; give different paths")
        seen[key] = flag


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` to write a temporary file next to ``path``, then move it onto ``path``.

    Readers see either no file or the complete one. The temporary file is removed if ``write`` fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path
