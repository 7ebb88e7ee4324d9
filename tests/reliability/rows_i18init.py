"""Bad-input rows of issue 18 (LoRA initialisations and LoRA+): refused inits named, ranks and layers that do not
fit an init, LoRA+ arguments.

``rows(Row)`` builds them with ``test_bad_inputs.Row`` (passed in, so this module never imports the test module).
"""

from __future__ import annotations

from typing import Any

import lightning_adapters as la
from tests.helpers import SmallCNN, tiny_gpt2


def _cfg(**kw: Any):
    return lambda m, p: la.LoRAConfig(**kw)


def _inject(**kw: Any):
    return lambda m, p: la.inject(m, la.LoRAConfig(**kw))


def rows(Row: type) -> list:  # noqa: N803 - the Row class of test_bad_inputs
    """The rows, as ``Row`` instances."""
    return [
        Row("lora-init-mica", None, _cfg(init_weights="mica"), la.AdapterConfigError, r"'mica'.*MiCA"),
        Row("lora-init-lora-ga", None, _cfg(init_weights="lora_ga"), la.AdapterConfigError, r"'lora_ga'"),
        Row(
            "lora-corda-method-unknown",
            None,
            _cfg(init_weights="corda", corda_method="pca"),
            la.AdapterConfigError,
            r"corda_method must be one of \['ipm', 'kpm'\], got 'pca'",
        ),
        Row(
            "lora-initialize-from-data-no-corda-layer",
            lambda: la.inject(tiny_gpt2(), la.LoRAConfig(r=2, target_modules=["c_attn"])),
            lambda m, p: la.initialize_from_data(m, []),
            la.AdapterConfigError,
            r"no LoRA layer with a data-driven init.*init_weights='corda'",
        ),
        Row(
            "lora-loraplus-ratio-not-positive",
            tiny_gpt2,
            lambda m, p: la.loraplus_param_groups(m, lr=1e-3, loraplus_lr_ratio=-2),
            la.AdapterConfigError,
            r"loraplus_lr_ratio must be a positive number, got -2",
        ),
        Row(
            "lora-init-pissa-niter-bad",
            None,
            _cfg(init_weights="pissa_niter_"),
            la.AdapterConfigError,
            r"pissa_niter_<K>', got 'pissa_niter_'",
        ),
        Row(
            "lora-init-orthogonal-odd-rank",
            None,
            _cfg(r=4, init_weights="orthogonal", rank_pattern={"v_proj": 3}),
            la.AdapterConfigError,
            r"even ranks.*rank_pattern\['v_proj'\]",
        ),
        Row(
            "lora-init-pissa-on-conv",
            SmallCNN,
            _inject(r=4, target_modules=["fc", "conv1"], init_weights="pissa"),
            la.AdapterConfigError,
            r"init_weights='pissa'.*'conv1'.*exclude_modules",
        ),
        Row(
            "lora-init-olora-on-conv1d",
            tiny_gpt2,
            _inject(r=4, target_modules=["c_attn"], init_weights="olora"),
            la.AdapterConfigError,
            r"'olora'.*Conv1D.*'pissa'",
        ),
    ]
