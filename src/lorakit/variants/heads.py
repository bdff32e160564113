"""An adapter's own classification head (a ``modules_to_save`` copy): its class names and its number of classes.

A head's row ``i`` means nothing without the name of class ``i``: the names (the model's ``config.id2label``)
travel in the checkpoint's metadata under ``"id2label"``. Adapters of 2 and 3 classes and a regression head (1)
share a base: a loaded head copy takes the number of rows its checkpoint gives it. Joins core's tables
(``EXPORT_METADATA``, ``METADATA``, ``FIT_NEW``) through :func:`register`.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..core.checkpoint import PREFIX
from ..core.tables import EXPORT_METADATA, FIT_NEW, METADATA


def class_names(model: nn.Module) -> list[str] | None:
    """A classifier's class names in class order (``config.id2label``); None for transformers' ``LABEL_<i>``.

    They travel with the adapter: a head's row ``i`` means nothing without the name of class ``i``.
    """
    id2label = getattr(getattr(model, "config", None), "id2label", None)
    if not id2label or all(str(v) == f"LABEL_{k}" for k, v in id2label.items()):
        return None
    return [str(id2label[k]) for k in sorted(id2label, key=int)]


def export_names(model: nn.Module, held: list) -> dict:
    """Core's ``EXPORT_METADATA`` entry: ``{"id2label": {"0": name, ...}}`` when the model has class names."""
    names = class_names(model)
    return {"id2label": {str(i): name for i, name in enumerate(names)}} if names else {}


def _check_names(value: object) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and k.isdigit() and isinstance(x, str)
                                           for k, x in value.items())


def fit_heads(model: nn.Module, planned: list, copies: dict[str, nn.Module], tensors: dict[str, Tensor]) -> None:
    """Core's ``FIT_NEW`` entry. An adapter's own classification head may have its own number of classes: in its ``modules_to_save``
    copies (new, not attached yet), a ``Linear`` with the model's ``num_labels`` outputs takes the number of
    rows the file gives it (same inputs), so adapters of 2 and 3 classes and a regression head (1) share a base.
    Any other shape difference is left for the shape check to refuse."""
    classes = getattr(getattr(model, "config", None), "num_labels", None)
    for path, copy in copies.items():
        for sub_name, sub in copy.named_modules():
            if not isinstance(sub, nn.Linear) or sub.out_features != classes:
                continue
            found = tensors.get(f"{PREFIX}{path}{'.' if sub_name else ''}{sub_name}.weight")
            if found is None or found.dim() != 2 or found.shape[1] != sub.in_features or found.shape[0] == classes:
                continue
            rows = found.shape[0]
            sub.weight = nn.Parameter(sub.weight.new_empty(rows, sub.in_features), sub.weight.requires_grad)
            if sub.bias is not None:
                sub.bias = nn.Parameter(sub.bias.new_empty(rows), sub.bias.requires_grad)
            sub.out_features = rows


def register() -> None:
    """Record class names with adapters and size loaded heads; calling it again changes nothing."""
    METADATA["id2label"] = _check_names
    for table, entry in ((EXPORT_METADATA, export_names), (FIT_NEW, fit_heads)):
        if entry not in table:
            table.append(entry)
