"""Exception types raised by lightning_adapters.

Every error the library raises on bad input derives from ``AdapterError`` and from the builtin type a user
would expect (``ValueError`` or ``TypeError``), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class AdapterError(Exception):
    """Base class of every error raised by lightning_adapters on bad input."""


class AdapterConfigError(AdapterError, ValueError):
    """A config field has an invalid value, or does not fit the layer it targets."""


class TargetError(AdapterError, ValueError):
    """``target_modules`` matched nothing, or matched a layer type the method cannot adapt."""


class UnsupportedLayerError(AdapterError, TypeError):
    """A targeted module has a type the method does not support."""


class AdapterStateError(AdapterError, ValueError):
    """An adapter state dict, PEFT directory or checkpoint does not fit the model."""


class NotMergeableError(AdapterError, TypeError):
    """The method has no weight-space form, so it cannot be merged into the base."""


class AdapterTypeError(AdapterError, TypeError):
    """An argument has the wrong type: not an ``nn.Module``, not an adapter config, not a tensor."""


class MergeError(AdapterError, ValueError):
    """A merge would write non-finite weights into the base, or could not be undone; nothing was changed."""
