"""safetensors files whose bytes depend only on their tensors and metadata.

``safetensors`` writes the header's ``__metadata__`` from a Rust ``HashMap``, whose order changes from process
to process (and from call to call): the same adapter saved twice gave different checksums. :func:`save_tensors`
writes the same tensors through ``safetensors`` and then puts the header in a fixed order: ``__metadata__``
first with its keys sorted, then the tensors in the order ``safetensors`` gives them (by dtype, then name).
The tensor bytes and their offsets are the library's own, so any safetensors reader loads the file.
"""

from __future__ import annotations

import json
import os

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
