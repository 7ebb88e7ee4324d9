"""Data-driven LoRA initialisation: CorDA (Yang et al. 2024, "CorDA: Context-Oriented Decomposition Adaptation").

CorDA orients the adapter by the covariance of each layer's inputs. Over a few batches every call of a targeted
layer adds ``Xᵀ X`` of its input rows ``X (N, in)``, each call scaled by ``1 / |max X|``; ``C`` is the mean over
calls. With a damping ``λ·mean(diag C)·I`` (``λ`` from 0.01, doubled until ``(C+λ..)⁻¹`` inverts to within 0.05)::

    W C = U S Vᵀ,      V' = C⁻¹ V                      (out, k), (k,), (in, k)
    "ipm" keeps the r largest triplets (the task's principal directions), "kpm" the r smallest (keeps knowledge)
    A = sqrt(S_r/s) · V'_rᵀ,   B = U_r · sqrt(S_r/s),   W_res = W − s·B·A

so ``W_res + s·B·A = W`` at the start, as for PiSSA. Equal to PEFT's ``preprocess_corda`` followed by
``init_lora_weights="corda"`` on the same inputs.

``initialize_from_data`` runs the model on the batches, collects the statistics (summed over ranks when
``torch.distributed`` is initialised, so every rank gets the same init) and re-initialises every CorDA layer.
EVA layers (``init_weights="eva"``, maths in ``lora_eva``) are initialised by the same call, from the same
batches cycled until their components converge.
In a Lightning fit ``AdapterCallback``/``AdapterMixin`` call it on the first ``init_batches`` train batches
right after injection, before the optimizer exists (``lightning_adapters.lightning.data_init``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lightning_adapters.core.inject import adapter_layers, disabled, find_records
from lightning_adapters.errors import AdapterConfigError, AdapterStateError
from lightning_adapters.methods import lora_eva
from lightning_adapters.methods._common import weight_as_out_in
from lightning_adapters.methods.lora_init import DATA_INITS

CORDA_METHODS = ("ipm", "kpm")


def corda_factors(
    weight: torch.Tensor, covariance: torch.Tensor, r: int, scale: float, method: str = "ipm"
) -> tuple[torch.Tensor, torch.Tensor]:
    """CorDA's ``(A (r, in), B (out, r))`` for ``W (out, in)`` and the input covariance ``C (in, in)`` (float32)."""
    w, c = weight.float(), covariance.float()
    eye = torch.eye(c.shape[0], device=c.device)
    damp = 0.01
    while True:
        fixed = c + torch.diag(torch.ones(c.shape[0], device=c.device) * torch.mean(torch.diag(c)) * damp)
        inv = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inv, eye).item() < 0.05:
            break
        damp *= 2
    u, s, vh = torch.linalg.svd(w @ fixed, full_matrices=False)  # (out, k), (k,), (k, in)
    v = (vh @ inv).t()  # (in, k)
    keep = slice(None, r) if method == "ipm" else slice(-r, None)
    u, s, v = u[:, keep], s[keep] / scale, v[:, keep]
    root = s.sqrt()
    return (v.t() * root.view(-1, 1)).contiguous(), (u * root).contiguous()  # (r, in), (out, r)


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Run ``model`` on one batch: ``model(**batch)`` for a mapping, ``model(batch[0])`` for a tuple or list
    (``(inputs, targets)``), else ``model(batch)``."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return type(batch)({k: _to_device(v, device) for k, v in batch.items()})
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def data_init_groups(model: nn.Module) -> dict[str, dict[str, tuple[nn.Module, nn.Module]]]:
    """``{adapter name: {module name: (base, layer)}}`` of the LoRA layers whose ``init_weights`` needs data."""
    out: dict[str, dict[str, tuple[nn.Module, nn.Module]]] = {}
    for module_name, adapter, base, layer in adapter_layers(model):
        if getattr(layer, "init_mode", None) in DATA_INITS and layer.kind in ("linear", "conv1d_t"):
            out.setdefault(adapter, {})[module_name] = (base, layer)
    return out


@torch.no_grad()
def initialize_from_data(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    all_reduce: bool | None = None,
) -> nn.Module:
    """Initialise the data-driven LoRA layers of ``model`` (``init_weights="corda"`` or ``"eva"``) from ``batches``.

    Call it after ``inject`` and before building the optimizer (a Lightning fit does it itself). CorDA layers
    already initialised are re-initialised from the original weight; EVA runs once per injection (it may change
    ranks and remove adapters). The adapters are switched off while the batches run: the statistics are those of
    the base model's layer inputs (a CorDA layer initialised before holds its original weight meanwhile).

    Args:
        model: A model injected with ``LoRAConfig(init_weights="corda" | "eva", ...)``.
        batches: The batches to read (e.g. the first few of the train dataloader); moved to the model's device.
            EVA cycles them until its components converge (``eva_tau``).
        forward_fn: ``(model, batch) -> Any`` running the model (default ``default_forward``).
        all_reduce: Combine the statistics of all ``torch.distributed`` ranks (default: when it is initialised;
            CorDA sums the covariances, EVA gathers every layer's input rows); every rank must then call this
            function, and every rank gets the same init.

    Returns:
        ``model``.

    Raises:
        AdapterConfigError: No layer of ``model`` has a data-driven init, the adapters are merged, or EVA already
            ran on this injection.
        AdapterStateError: A layer never ran on ``batches``, its inputs are not finite, or EVA did not converge.
    """
    groups = data_init_groups(model)
    if not groups:
        raise AdapterConfigError(
            "initialize_from_data: the model has no LoRA layer with a data-driven init; inject "
            "LoRAConfig(init_weights='corda' | 'eva', ...) first"
        )
    if any(layer.merged for group in groups.values() for _, layer in group.values()):
        raise AdapterConfigError("initialize_from_data: the adapters are merged; call unmerge(model) first")
    # One init mode per adapter (one config). EVA runs once per adapter; CorDA adapters are initialised again.
    eva = {a: g for a, g in groups.items() if _mode(g) == "eva" and any(lay.needs_data for _, lay in g.values())}
    corda = {a: g for a, g in groups.items() if _mode(g) != "eva"}
    if not eva and not corda:
        done = [name for g in groups.values() for name in g]
        raise AdapterConfigError(
            f"initialize_from_data: EVA already initialised {done[:3]} (it may have changed their ranks); to run it "
            "again, eject the adapters and inject the config again"
        )
    if all_reduce is None:
        import torch.distributed as dist

        all_reduce = dist.is_available() and dist.is_initialized()
    batches = list(batches)
    device = next(iter(next(iter(groups.values())).values()))[0].weight.device
    run = forward_fn or default_forward
    # CorDA's statistics are the module's input covariance, the same for every adapter on it: collected once.
    corda_modules = {name: pair for g in corda.values() for name, pair in g.items()}
    training = model.training
    model.eval()
    comps = {}
    try:
        with disabled(model):  # the base model's layer inputs (PEFT hooks the model before or without adapters)
            for adapter, group in eva.items():
                comps[adapter] = lora_eva.eva_components(
                    model,
                    group,
                    batches,
                    run,
                    _config_of(model, adapter),
                    gather=all_reduce,
                    prepare=lambda b: _to_device(b, device),
                )
            if corda_modules:
                with _original_bases(corda_modules):
                    stats = _covariances(model, corda_modules, batches, run, device)
    finally:
        model.train(training)
    for adapter, group in eva.items():
        adjust = _config_of(model, adapter).eva_adjust_scaling_factors
        lora_eva.apply_components(model, group, comps[adapter], adjust, adapter)
    if corda_modules:
        _reduce(stats, all_reduce)
        for group in corda.values():
            _apply_corda(group, stats)
    return model


def _mode(group: dict[str, tuple[nn.Module, nn.Module]]) -> str:
    return next(iter(group.values()))[1].init_mode


def _config_of(model: nn.Module, adapter: str) -> Any:
    """The config of the injection named ``adapter`` (its EVA options)."""
    for _, _, rec in find_records(model):
        if rec.name == adapter:
            return rec.config
    raise AdapterConfigError(f"initialize_from_data: adapter {adapter!r} belongs to no injection of this model")


def _covariances(
    model: nn.Module,
    layers: dict[str, tuple[nn.Module, nn.Module]],
    batches: list[Any],
    run: Callable[[nn.Module, Any], Any],
    device: torch.device,
) -> dict[str, list]:
    """CorDA's ``[Σ Xᵀ X (in, in), calls]`` per layer over ``batches``."""
    stats = {
        name: [torch.zeros(layer.in_features, layer.in_features, device=base.weight.device), 0]
        for name, (base, layer) in layers.items()
    }

    def collect(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # (N, in)
            x = x / x.max().abs()
            if not torch.isfinite(x).all():
                raise AdapterStateError(f"initialize_from_data: the inputs of {name!r} are not finite")
            entry = stats[name]
            entry[0] = entry[0] + (x.t() @ x).to(entry[0].device)  # (in, N) @ (N, in)
            entry[1] += 1

        return hook

    handles = [base.register_forward_hook(collect(name)) for name, (base, _) in layers.items()]
    try:
        for batch in batches:
            run(model, _to_device(batch, device))
    finally:
        for h in handles:
            h.remove()
    return stats


@contextmanager
def _original_bases(layers: dict[str, tuple[nn.Module, nn.Module]]) -> Iterator[None]:
    """The bases of layers CorDA already initialised hold ``W`` again while the statistics run, so a layer fed by
    another one sees the inputs of the original model, not of ``W_res``; their ``W_res`` is put back bit for bit."""
    from lightning_adapters.methods.lora_init import lora_delta

    saved = []
    try:
        with torch.no_grad():
            for base, layer in layers.values():
                if layer.residual_applied:
                    saved.append((base, base.weight.detach().clone()))
                    layer._add_to_base(base, lora_delta(layer.init_A, layer.init_B, layer.scale))
        yield
    finally:
        with torch.no_grad():
            for base, weight in saved:
                base.weight.copy_(weight)


def _apply_corda(layers: dict[str, tuple[nn.Module, nn.Module]], stats: dict[str, list]) -> None:
    for name, (base, layer) in layers.items():
        total, count = stats[name]
        if count == 0:
            raise AdapterStateError(
                f"initialize_from_data: {name!r} never ran on the batches given; pass batches that reach it "
                "(or a forward_fn that calls the model the way training does)"
            )
        weight = _original_weight(base, layer)
        A, B = corda_factors(weight, (total / count).to(weight.device), layer.r, layer.scale, layer.corda_method)
        layer.lora_A.copy_(A)
        layer.lora_B.copy_(B)
        layer.set_residual(base, A, B)
        layer.needs_data = False


def _original_weight(base: nn.Module, layer: nn.Module) -> torch.Tensor:
    """``W (out, in)`` as before any residual init (``W_res + s·B0·A0``), float32."""
    from lightning_adapters.methods.lora_init import lora_delta

    w = weight_as_out_in(base).float()
    if layer.residual_applied:
        w = w + lora_delta(layer.init_A, layer.init_B, layer.scale).to(w.device)
    return w


def _reduce(stats: dict[str, list], all_reduce: bool) -> None:
    """Sum covariances and call counts over ranks (names sorted, so every rank reduces in the same order)."""
    import torch.distributed as dist

    if not all_reduce:
        return
    for name in sorted(stats):
        total, count = stats[name]
        packed = torch.cat([total.reshape(-1), torch.tensor([float(count)], device=total.device)])
        dist.all_reduce(packed)
        stats[name] = [packed[:-1].reshape(total.shape), int(round(packed[-1].item()))]
