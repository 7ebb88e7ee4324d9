"""One report of how a set of tensors differs from what a model expects: missing, unexpected and mis-shaped keys.

Every loader builds it the same way (``load_adapter_state_dict``, ``load_peft``, the Lightning checkpoint checks) and
words it the same way, so an error reads alike wherever a file, a checkpoint or a state dict does not fit.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

Shape = tuple[int, ...]


def shape_of(value: torch.Tensor | Sequence[int]) -> Shape:
    """A tensor's shape, or a recorded shape (a list from JSON metadata), as a tuple."""
    return tuple(value.shape) if isinstance(value, torch.Tensor) else tuple(int(d) for d in value)


def key_list(keys: Iterable[str], limit: int = 8) -> str:
    """``['a', 'b'] and 3 more``: the first ``limit`` keys in sorted order, and how many were left out."""
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{keys[:limit]}{more}"


@dataclass
class StateReport:
    """How ``given`` tensors differ from the ``expected`` ones, by key.

    Attributes:
        missing: Expected keys ``given`` lacks, sorted.
        unexpected: Keys of ``given`` that are not expected, sorted.
        misshaped: ``{key: (given shape, expected shape)}`` for keys in both whose shapes differ, in key order.
    """

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    misshaped: dict[str, tuple[Shape, Shape]] = field(default_factory=dict)

    @classmethod
    def compare(
        cls,
        given: Mapping[str, torch.Tensor | Sequence[int]],
        expected: Mapping[str, torch.Tensor | Sequence[int]],
        *,
        allowed: Iterable[str] = (),
    ) -> StateReport:
        """Compare two ``{key: tensor or shape}`` mappings.

        Args:
            given: What was read (a file's tensors, a checkpoint's shapes).
            expected: What the model needs.
            allowed: Keys of ``given`` that are not expected but not wrong either (they are not reported).
        """
        allowed = set(allowed)
        misshaped = {}
        for key in sorted(set(given) & set(expected)):
            have, want = shape_of(given[key]), shape_of(expected[key])
            if have != want:
                misshaped[key] = (have, want)
        return cls(
            missing=sorted(set(expected) - set(given)),
            unexpected=sorted(set(given) - set(expected) - allowed),
            misshaped=misshaped,
        )

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.misshaped)

    def describe(self, given: str = "given", expected: str = "model", limit: int = 8) -> str:
        """``missing keys [...]; unexpected keys [...]; mis-shaped k: <given> (..), <expected> (..)``, the parts
        that apply, each list cut after ``limit`` entries."""
        parts = []
        if self.missing:
            parts.append(f"missing keys {key_list(self.missing, limit)}")
        if self.unexpected:
            parts.append(f"unexpected keys {key_list(self.unexpected, limit)}")
        if self.misshaped:
            shown = [f"{k}: {given} {g}, {expected} {e}" for k, (g, e) in list(self.misshaped.items())[:limit]]
            more = len(self.misshaped) - limit
            parts.append("mis-shaped " + ", ".join(shown) + (f" and {more} more" if more > 0 else ""))
        return "; ".join(parts)
