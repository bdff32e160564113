"""Writing files safely: atomic replacement, and safetensors files whose bytes depend only on their contents.

:func:`atomic_write` writes beside the target and renames, so a reader (or a kill) never sees half a file.
Checkpoints, training state and merged models are written through it. It imports nothing of lorakit.

``safetensors`` writes the header's ``__metadata__`` from a Rust ``HashMap``, whose order changes from process
to process (and from call to call): the same adapter saved twice gave different checksums. :func:`save_tensors`
writes the same tensors through ``safetensors`` and then puts the header in a fixed order: ``__metadata__``
first with its keys sorted, then the tensors in the order ``safetensors`` gives them (by dtype, then name).
The tensor bytes and their offsets are the library's own, so any safetensors reader loads the file.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path

from safetensors.torch import save
from torch import Tensor

_HEADER_LENGTH = 8  # little-endian u64: the JSON header's length in bytes, padding included
_ALIGN = 8  # safetensors pads the header with spaces so that the tensor data starts 8-byte aligned


def save_tensors(tensors: dict[str, Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file(tensors, path, metadata)`` with a header in a fixed order: the same tensors
    and metadata always give the same bytes. Any JSON inside a metadata value is the caller's to write sorted
    (``json.dumps(..., sort_keys=True)``)."""
    data = memoryview(save(tensors, metadata=metadata))
    n = int.from_bytes(data[:_HEADER_LENGTH], "little")
    header = json.loads(bytes(data[_HEADER_LENGTH:_HEADER_LENGTH + n]))
    if "__metadata__" in header:
        header = {"__metadata__": dict(sorted(header.pop("__metadata__").items())), **header}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % _ALIGN)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(_HEADER_LENGTH, "little"))
        f.write(text)
        f.write(data[_HEADER_LENGTH + n:])


def atomic_write(target: Path, write: Callable[[str], object]) -> None:
    """Write ``target`` by ``write(tmp)`` on a temp file beside it, fsync and rename: a reader (or a kill) sees
    the old file or the new one, never a truncated one. The file gets the permissions any new file gets
    (0666 less the umask), not a private temp file's 0600."""
    tmp = temp_name(target)
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        mode = os.stat(tmp).st_mode & 0o777  # 0666 less the umask, read without changing the process's umask
        write(tmp)
        os.chmod(tmp, mode)  # ``write`` may have replaced the file (safetensors does, with 0600)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def temp_name(target: Path) -> str:
    """A fresh hidden name beside ``target`` for its temp file or directory."""
    return str(target.parent / f".{target.name}.{secrets.token_hex(6)}.tmp")
