"""``save_pretrained`` on a pruned transformers model writes the exported form.

``model.save_pretrained(dir)`` on a model ecospa has pruned would write the pruned tensors next
to the dense config: a folder that looks loadable and is not. The executor calls :func:`guard`
after every prune; it puts a :class:`GuardedSave` on each transformers model in the pruned
model (an instance attribute, so the class and other instances are untouched; copied along with
``copy.deepcopy``). Called, it:

- exports (``ecospa.export``): the folder loads with ``from_pretrained`` without ecospa; a
  padded export warns (EcospaWarning) with the size and the way out;
- passes through to transformers when ``state_dict=`` is passed (even None, as
  ``transformers.Trainer`` passes it): that is a trainer saving its training state (its
  checkpoints, which ecospa's callback resumes), and warns
  once that such a folder needs ecospa to load (``ecospa.export`` to deploy);
- passes through when the model holds no removals any more.
"""
from __future__ import annotations

import sys
import warnings

import torch.nn as nn

from ecospa.ir.record import param_records
from ecospa.errors import EcospaWarning

__all__ = ["guard", "GuardedSave"]

ATTR = "save_pretrained"


class GuardedSave:
    """The ``save_pretrained`` of one pruned transformers model (see the module docstring)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.warned = False

    def _plain(self, *args, **kwargs):
        return type(self.model).save_pretrained(self.model, *args, **kwargs)

    def __call__(self, save_directory, *args, **kwargs):
        model = self.model
        if not param_records(model):
            return self._plain(save_directory, *args, **kwargs)
        if args or "state_dict" in kwargs:  # the Trainer passes it always, None included
            if not self.warned:
                self.warned = True
                warnings.warn(f"{type(model).__name__}.save_pretrained(state_dict=...) on a model pruned by ecospa "
                              "writes its pruned tensors with the dense config: a training checkpoint that only "
                              "ecospa loads (the Trainer callback resumes it). To deploy, use "
                              "ecospa.export(model, directory)", EcospaWarning, stacklevel=2)
            return self._plain(save_directory, *args, **kwargs)
        from ecospa.export.write import export

        report = export(model, save_directory, save_kwargs=kwargs)
        if report.params > report.pruned_params:
            warnings.warn(f"save_pretrained wrote the exported form of the pruned {type(model).__name__}: "
                          f"{report.summary()}. {report.hint}", EcospaWarning, stacklevel=2)
        return None


def guard(model: nn.Module) -> None:
    """Put a :class:`GuardedSave` on every transformers model in ``model`` that has none."""
    tf = sys.modules.get("transformers")
    if tf is None:
        return
    for mod in model.modules():
        if isinstance(mod, tf.PreTrainedModel) and not isinstance(mod.__dict__.get(ATTR), GuardedSave):
            mod.__dict__[ATTR] = GuardedSave(mod)
