"""Fields and validation shared by every method's config dataclass.

Configs are plain mutable dataclasses with Hydra-safe field types (``Any`` where a field is a list *or* a
string), validated in ``__post_init__`` so that a bad value fails where it is written, naming the value and
the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from lightning_adapters.errors import AdapterConfigError, AdapterTypeError

_DTYPES = ("float32", "float16", "bfloat16", "float64")
# PEFT's spelling of fields that have another name here.
_PEFT_NAMES = {"lora_alpha": "alpha", "lora_dropout": "dropout", "init_lora_weights": "init_weights"}


def _plain_number(value: Any) -> Any:
    """A numpy integer, float or bool scalar as the Python value it holds (``np.int64(8)`` -> ``8``); else ``value``.

    PEFT takes them; refusing ``r=np.int64(8)`` as "must be an integer" read as nonsense, and a numpy scalar left in a
    config would not serialise to adapter_config.json.
    """
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        item = value.item()
        if isinstance(item, (bool, int, float)):
            return item
    return value


def _unknown_field(name: str, known: set[str]) -> str:
    """Python's message for an unknown keyword, plus the field meant when ``name`` is PEFT's spelling of one of
    ours or a typo of one."""
    message = f"unexpected keyword argument {name!r}"
    if _PEFT_NAMES.get(name) in known:
        return f"{message}; PEFT's {name} is {_PEFT_NAMES[name]!r} here"
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.85)
    return f"{message}; did you mean {close[0]!r}?" if close else message


@dataclass
class AdapterConfig:
    """Fields every method shares.

    Attributes:
        target_modules: Which modules to adapt: a list of name suffixes (``"q_proj"`` matches
            ``layers.0.self_attn.q_proj``), a regex string that must match the full module name, or
            ``"all-linear"`` (every Linear/Conv1D except a transformers model's output head). ``None`` uses the
            method's per-architecture default (``q_proj``/``v_proj`` on Llama, ``query``/``value`` on Bert, ...).
        exclude_modules: Modules never adapted, in the same forms as ``target_modules``.
        modules_to_save: Name suffixes of modules trained in full (e.g. a new classification head); their
            tensors are part of the adapter state. Matched as PEFT matches them, as plain string suffixes
            (``"c2"`` also selects ``"fc2"``), where ``target_modules`` entries match at a dot. With
            ``AdapterCallback(module=...)`` they may also name modules of the LightningModule beside that sub-module.
        adapter_dtype: Dtype of the adapter tensors (``"float32"``, ``"bfloat16"``, ...). ``None`` (default)
            means: fp32 when the base layer is half precision, else the base dtype (PEFT's behaviour).
        layers_to_transform: Adapt only the modules of these layer indices (an int or a list of ints), as PEFT's
            option: a module matched by a ``target_modules`` suffix is kept when the first number in its name
            after ``layers_pattern`` (by default: after its second name segment, e.g. ``model.layers.3.q_proj``) is
            one of them. A module named in full in ``target_modules`` is kept whatever its index. Not with a regex
            or ``"all-linear"`` ``target_modules`` (PEFT refuses that too).
        layers_pattern: The name(s) of the layer list, e.g. ``"layers"`` or ``["h", "layers"]``; only with
            ``layers_to_transform``.
    """

    target_modules: Any = None
    exclude_modules: Any = None
    modules_to_save: list[str] | None = None
    adapter_dtype: str | None = None
    layers_to_transform: Any = None
    layers_pattern: Any = None

    def __new__(cls, *args: Any, **kwargs: Any) -> AdapterConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in kwargs if k not in known]
        if unknown:
            raise AdapterTypeError(f"{cls.__name__}: " + "; ".join(_unknown_field(k, known) for k in unknown))
        return super().__new__(cls)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # numpy scalars (a sweep's np.arange grid) as the Python numbers they hold
            value = getattr(self, f.name)
            if isinstance(value, dict):
                setattr(self, f.name, {k: _plain_number(v) for k, v in value.items()})
            else:
                setattr(self, f.name, _plain_number(value))
        self.target_modules = _check_selector(self.target_modules, "target_modules", allow_all_linear=True)
        self.exclude_modules = _check_selector(self.exclude_modules, "exclude_modules", allow_all_linear=False)
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str) or not all(isinstance(m, str) for m in self.modules_to_save):
                raise AdapterConfigError(
                    f"modules_to_save must be a list of module name suffixes, got {self.modules_to_save!r}; "
                    "e.g. modules_to_save=['classifier']"
                )
            self.modules_to_save = list(self.modules_to_save)
        if self.adapter_dtype is not None and self.adapter_dtype not in _DTYPES:
            raise AdapterConfigError(f"adapter_dtype {self.adapter_dtype!r} is not one of {_DTYPES} (or None)")
        self._check_layer_selection()

    def _check_layer_selection(self) -> None:
        ltt, pattern = self.layers_to_transform, self.layers_pattern
        if ltt is not None:
            items = [ltt] if isinstance(ltt, int) and not isinstance(ltt, bool) else ltt
            if isinstance(items, (str, bytes)) or not hasattr(items, "__iter__"):
                items = None
            else:
                items = list(items)
            if items is None or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items):
                raise AdapterConfigError(
                    f"layers_to_transform must be a layer index >= 0 or a list of them, got {ltt!r}; e.g. [0, 1]"
                )
            self.layers_to_transform = ltt if isinstance(ltt, int) else items
            if isinstance(self.target_modules, str):
                raise AdapterConfigError(
                    f"layers_to_transform={ltt!r} needs target_modules as a list of name suffixes, got "
                    f"{self.target_modules!r}; list the module names (e.g. ['q_proj', 'v_proj']) or select the "
                    "layers in the regex itself"
                )
        if pattern is not None:
            items = [pattern] if isinstance(pattern, str) else pattern
            ok = hasattr(items, "__iter__") and all(isinstance(p, str) for p in items)
            if not ok:
                raise AdapterConfigError(
                    f"layers_pattern must be a string or a list of strings, got {pattern!r}; e.g. 'layers'"
                )
            for p in items:
                check_regex(p, rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", "layers_pattern")
            self.layers_pattern = pattern if isinstance(pattern, str) else list(items)
            if items and ltt is None:
                raise AdapterConfigError(
                    f"layers_pattern={pattern!r} is only used with layers_to_transform; set layers_to_transform "
                    "(e.g. [0, 1]) or drop layers_pattern"
                )

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # help(LoRAConfig) and LightningCLI's --help document the shared fields too, not only the method's own.
        cls.__doc__ = _with_shared_fields(cls.__doc__)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-safe dict of the fields (lists, not tuples or ListConfig)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


# An ``Attributes:`` entry of a class docstring: "        name: text" and its deeper-indented continuation lines.
_ENTRY = re.compile(r"^ {8}(\w+): .*(?:\n {12}.*)*", re.M)


def _with_shared_fields(doc: str | None) -> str | None:
    """``doc`` with ``AdapterConfig``'s attribute entries appended to its ``Attributes:`` section (its last one),
    except those it documents itself."""
    if doc is None:
        return None
    own = {m.group(1) for m in _ENTRY.finditer(doc)}
    shared = [m.group(0) for m in _ENTRY.finditer(AdapterConfig.__doc__ or "") if m.group(1) not in own]
    if not shared:
        return doc
    header = "" if "\n    Attributes:\n" in doc else "\n\n    Attributes:"
    return doc.rstrip() + header + "\n" + "\n".join(shared) + "\n    "


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple, set)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _check_selector(value: Any, name: str, *, allow_all_linear: bool) -> Any:
    if value is None or isinstance(value, str):
        if isinstance(value, str) and value.lower() == "all-linear":
            if not allow_all_linear:
                raise AdapterConfigError(f"{name}='all-linear' is only meaningful for target_modules")
            return "all-linear"
        if isinstance(value, str):
            check_regex(value, value, name)
        return value
    try:
        items = list(value)
    except TypeError:
        raise AdapterConfigError(
            f"{name} must be a list of module name suffixes, a regex string or 'all-linear', got {value!r}"
        ) from None
    if not items or not all(isinstance(v, str) and v for v in items):
        raise AdapterConfigError(
            f"{name} must be a non-empty list of non-empty strings, got {value!r}; e.g. ['q_proj', 'v_proj']"
        )
    return items


def check_regex(key: str, pattern: str, where: str) -> None:
    """Raise unless ``pattern`` (the form ``key`` is matched in) compiles as a regular expression.

    Done when the config is built, so a typo fails there and not deep inside ``inject`` as a bare ``re.error``.
    """
    try:
        re.compile(pattern)
    except re.error as err:
        raise AdapterConfigError(
            f"{where}: {key!r} is not a valid regular expression ({err}); escape special characters "
            f"(re.escape) or, for target_modules/exclude_modules, give a list of module name suffixes instead"
        ) from None


def check_positive_int(value: Any, name: str, method: str, *, allow_zero: bool = False) -> None:
    """Raise unless ``value`` is an int > 0 (or >= 0)."""
    ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise AdapterConfigError(f"{method}: {name} must be an integer {bound}, got {value!r}")


def check_positive_float(value: Any, name: str, method: str, *, allow_zero: bool = False) -> None:
    """Raise unless ``value`` is a finite number > 0 (or >= 0)."""
    ok = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value >= 0 if allow_zero else value > 0)
    )
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise AdapterConfigError(f"{method}: {name} must be a finite number {bound}, got {value!r}")


def check_probability(value: Any, name: str, method: str) -> None:
    """Raise unless ``0 <= value < 1``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value < 1.0
    if not ok:
        raise AdapterConfigError(f"{method}: {name} must be in [0, 1), got {value!r}")


def check_choice(value: Any, name: str, method: str, choices: tuple) -> None:
    """Raise unless ``value`` is one of ``choices`` (``True`` is not ``1`` here)."""
    if not any(value is c or (type(value) is type(c) and value == c) for c in choices):
        raise AdapterConfigError(f"{method}: {name} must be one of {list(choices)}, got {value!r}")


def peft_bias(d: dict[str, Any], only: str) -> Any:
    """PEFT's ``bias`` field in our spelling: PEFT treats every ``"<name>_only"`` alike, as the method's ``only``."""
    value = d.get("bias", "none")
    return only if isinstance(value, str) and value.endswith("_only") else value


def peft_layer_selection(d: dict[str, Any]) -> dict[str, Any]:
    """PEFT's ``layers_to_transform`` / ``layers_pattern`` as config kwargs (PEFT reads empty values as unset, and
    a ``layers_pattern`` without layer indices selects nothing there: PEFT adapts every layer)."""
    ltt, pattern = d.get("layers_to_transform"), d.get("layers_pattern")
    ltt = None if ltt is None or ltt == [] else ltt
    return {
        "layers_to_transform": ltt,
        "layers_pattern": None if ltt is None or pattern in (None, "", []) else pattern,
    }


def pattern_value(pattern: dict[str, Any], module_name: str, default: Any) -> Any:
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: the value of the first key matching the end of the module
    name (``(.*\\.)?(key)$``), else ``default``."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def pattern_dict(value: Any, name: str, method: str, *, regex_keys: bool = True) -> dict:
    """Validate a ``{module regex: value}`` override dict (``rank_pattern``, ``alpha_pattern``).

    With ``regex_keys`` every key must be a string that compiles in the form it is matched in
    (``(.*\\.)?(key)$``, see ``pattern_value``); AdaLoRA's rank masks are keyed by exact names.
    """
    if value is None:
        return {}
    if not isinstance(value, dict) and not hasattr(value, "items"):
        raise AdapterConfigError(f"{method}: {name} must be a dict of {{module regex: value}}, got {value!r}")
    out = dict(value.items())
    for key in out:
        if not isinstance(key, str) or not key:
            raise AdapterConfigError(
                f"{method}: {name} keys must be non-empty module name patterns (strings), got {key!r}"
            )
        if regex_keys:
            check_regex(key, key, f"{method}: {name} key")
            check_regex(key, rf"(.*\.)?({key})$", f"{method}: {name} key")
    return out


@dataclass
class LowRankConfig(AdapterConfig):
    """The rank and scaling fields of the low-rank methods (LoRA, LoHa, LoKr), validated once for all of them.

    A subclass sets ``method_name`` (the name its errors start with) and documents these fields in its own words.

    Attributes:
        r: Rank of the update.
        alpha: Scaling numerator.
        rank_pattern: ``{module regex: r}`` per-module ranks: the first key that matches the end of a module's name
            (PEFT's rule) gives that module's rank.
        alpha_pattern: ``{module regex: alpha}`` per-module alphas, matched the same way.
    """

    method_name: ClassVar[str] = "low-rank"

    r: int = 8
    alpha: float = 8.0
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self.r, "r", self.method_name)
        check_positive_float(self.alpha, "alpha", self.method_name)
        self.rank_pattern = pattern_dict(self.rank_pattern, "rank_pattern", self.method_name)
        self.alpha_pattern = pattern_dict(self.alpha_pattern, "alpha_pattern", self.method_name)
        for k, v in self.rank_pattern.items():
            check_positive_int(v, f"rank_pattern[{k!r}]", self.method_name)
        for k, v in self.alpha_pattern.items():
            check_positive_float(v, f"alpha_pattern[{k!r}]", self.method_name)

    def rank_for(self, module_name: str) -> int:
        """The rank of the module called ``module_name``: its ``rank_pattern`` entry, else ``r``."""
        return int(pattern_value(self.rank_pattern, module_name, self.r))

    def alpha_for(self, module_name: str) -> float:
        """The alpha of the module called ``module_name``: its ``alpha_pattern`` entry, else ``alpha``."""
        return float(pattern_value(self.alpha_pattern, module_name, self.alpha))


__all__ = [
    "AdapterConfig",
    "LowRankConfig",
    "check_choice",
    "check_positive_float",
    "check_positive_int",
    "check_probability",
    "check_regex",
    "pattern_dict",
    "pattern_value",
    "peft_bias",
    "peft_layer_selection",
]
