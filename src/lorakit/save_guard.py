"""``save_pretrained`` on a model that holds lorakit adapters refuses instead of writing a wrong checkpoint.

transformers' ``model.save_pretrained`` would write lorakit's wrapped names (``query.base_layer.weight``,
``classifier.copies.default.weight``); ``from_pretrained`` then reads them as a model whose adapted layers
and head are missing and freshly initialised, with only a load report. :func:`guard_save_pretrained`
(run when an adapter is attached: :func:`register` puts it in :data:`lorakit.core.tables.ON_ATTACH`) puts a
:class:`SavePretrainedGuard` on the instance: while lorakit layers are there it raises, naming what to do
instead; once they are gone (``unload``, or the last adapter deleted) it calls the class's own
``save_pretrained``. Nothing here imports transformers.
"""

from __future__ import annotations

from torch import nn

from .core.layers import LoraLayer
from .core.saved import SavedModule
from .core.tables import ON_ATTACH

ATTR = "save_pretrained"


class SavePretrainedGuard:
    """Stands in for ``model.save_pretrained`` (an instance attribute; picklable and deep-copyable)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, *args, **kwargs):
        model = self.model
        if any(isinstance(m, (LoraLayer, SavedModule)) for m in model.modules()):
            raise RuntimeError(
                f"{type(model).__name__}.save_pretrained would write lorakit's wrapped layers, which from_pretrained "
                "reads as a different model: use lorakit.save_adapter(model, dir) for the adapter, or "
                "lorakit.unload(model, merge=True) first for a plain model; with transformers' Trainer use "
                "lorakit.integrations.LoraTrainer"
            )
        return getattr(type(model), ATTR)(model, *args, **kwargs)


def guard_save_pretrained(model: nn.Module) -> None:
    """Put the guard on ``model`` if its class has a ``save_pretrained`` (transformers and the like)."""
    if callable(getattr(type(model), ATTR, None)) and not isinstance(model.__dict__.get(ATTR), SavePretrainedGuard):
        model.__dict__[ATTR] = SavePretrainedGuard(model)


def register() -> None:
    """Guard every model an adapter is attached to; calling it again changes nothing."""
    if guard_save_pretrained not in ON_ATTACH:
        ON_ATTACH.append(guard_save_pretrained)
