"""Strategy, precision and gradient-checkpointing support for adapters under Lightning.

- **FSDP1** (``FSDPStrategy``): ``adapter_auto_wrap_policy`` puts every adapter layer and every fully trainable
  module in its own unit, so the big units hold frozen parameters only (no gradient memory, no reduce-scatter of
  frozen weights) and fp32 adapters can sit next to a bf16 base (one dtype per flat parameter).
- **FSDP2** (``ModelParallelStrategy``): ``adapter_parallelize_fn`` shards adapter layers in their own units,
  then transformer blocks, then the root. When the user's ``configure_model`` does not shard, the integration
  calls it itself.
- **Checkpoints** under both are single files of full adapter tensors (never a rank's slice), which
  ``fit(ckpt_path=...)`` and ``restore_from_checkpoint`` read. Under FSDP2 only the trainable state is gathered
  (``get_model_state_dict(full_state_dict=True, ignore_frozen_params=True)``); FSDP1's state-dict hooks insist
  on every parameter, so there Lightning's full gather runs and the filter drops the base afterwards.
- **Precision**: ``bf16-true`` casts the whole module in ``strategy.setup``; the adapter dtype policy is
  re-applied right after that cast (before DDP/FSDP wrap the module and the optimizers are built), with the exact
  values the adapter held before it (a checkpoint being resumed is loaded before the cast).
- **Gradient checkpointing**: non-reentrant by default; with reentrant checkpointing and frozen input embeddings,
  the embedding output is made to require grad, or no gradient would reach the adapters.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from lightning_adapters.core.inject import adapted_modules, apply_dtype_policy, find_records
from lightning_adapters.core.layer import AdapterLayer
from lightning_adapters.core.quant import fsdp2_kept_whole
from lightning_adapters.core.state import adapter_prefixes, is_adapter_key
from lightning_adapters.errors import AdapterConfigError, AdapterStateError
from lightning_adapters.lightning.checkpoint import DEEPSPEED_ADAPTER_KEY

# ------------------------------------------------------------------------------------------------------------
# Wrapping policies


def block_types_of(model: nn.Module) -> tuple[type, ...]:
    """The repeated block classes of a transformers model (its ``_no_split_modules``), found inside ``model``."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    return tuple(
        {type(m) for m in model.modules() if type(m).__name__ in names or type(m).__mro__[1].__name__ in names}
    )


def _fully_trainable(module: nn.Module) -> bool:
    own = list(module.parameters(recurse=False))
    return bool(own) and all(p.requires_grad for p in own)


def adapter_auto_wrap_policy(block_types: Iterable[type] = ()) -> Callable[[nn.Module, bool, int], bool]:
    """An FSDP1 ``auto_wrap_policy`` that keeps frozen and trainable parameters in separate units.

    Adapter layers and modules whose own parameters are all trainable (``modules_to_save`` heads) become units;
    so do ``block_types`` (e.g. ``{LlamaDecoderLayer}``), which then hold frozen parameters only.

    Example::

        strategy = FSDPStrategy(auto_wrap_policy=la.adapter_auto_wrap_policy({LlamaDecoderLayer}))

    Args:
        block_types: Module classes to wrap as units besides the adapters (usually the transformer block).

    Returns:
        A callable ``(module, recurse, nonwrapped_numel) -> bool`` for ``FSDPStrategy(auto_wrap_policy=...)``.
    """
    blocks = tuple(block_types)

    def policy(module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
        if recurse:
            return True
        return (
            isinstance(module, AdapterLayer)
            or (bool(blocks) and isinstance(module, blocks))
            or (_fully_trainable(module))
        )

    return policy


def adapter_parallelize_fn(
    module: nn.Module,
    device_mesh: Any,
    *,
    block_types: Iterable[type] | None = None,
    mp_policy: Any = None,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Shard an injected model with FSDP2 (``fully_shard``): adapters in their own units, then blocks, then the root.

    Call it in ``configure_model`` after injection (``self.inject_adapters()`` with ``AdapterMixin``); with
    ``AdapterCallback`` and a ``configure_model`` that does not shard, the integration calls it itself.

    Example::

        def configure_model(self):
            self.inject_adapters()
            la.adapter_parallelize_fn(self.model, self.device_mesh["data_parallel"])

    Args:
        module: The injected model.
        device_mesh: The data-parallel mesh (``self.device_mesh["data_parallel"]`` under ``ModelParallelStrategy``).
        block_types: Classes sharded as units between adapters and root; default: a transformers model's
            ``_no_split_modules``, else none.
        mp_policy: Optional ``MixedPrecisionPolicy`` for every unit.
        reshard_after_forward: Passed to ``fully_shard`` for blocks and root (adapter units stay gathered).

    A quantized base (QLoRA) is sharded where its weights allow it: torchao NF4 weights are sharded through
    torchao's all-gather extension; bitsandbytes weights, and NF4 weights on a one-rank mesh, stay whole on every
    rank at their quantized size (``core.quant.fsdp2_kept_whole`` says why).

    Returns:
        ``module`` (now an ``FSDPModule``).

    Raises:
        AdapterStateError: ``module`` has no adapters (sharding first would leave them out).
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    records = find_records(module)
    if not records:
        raise AdapterStateError(
            "adapter_parallelize_fn needs an injected model: inject the adapters (la.inject or "
            "self.inject_adapters()) before sharding, so they are sharded too"
        )
    kwargs: dict[str, Any] = {"mesh": device_mesh, "reshard_after_forward": reshard_after_forward}
    kept_whole = fsdp2_kept_whole(module, device_mesh.size())
    if kept_whole:
        kwargs["ignored_params"] = kept_whole  # quantized base weights FSDP2 cannot shard (core.quant)
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    for _, _, layer in adapted_modules(module):
        # Adapters are small: keeping them gathered from forward to backward saves an all-gather per step and
        # keeps backward correct even if the caller modifies the layer's output in place.
        fully_shard(layer, **{**kwargs, "reshard_after_forward": False})
        # Layers run through adapted_forward, not __call__: FSDP must gather their parameters around that method.
        register_fsdp_forward_method(layer, "adapted_forward")
    for _, root, rec in records:
        for name in rec.modules_to_save + rec.holders:
            fully_shard(root.get_submodule(name), **kwargs)
    blocks = tuple(block_types) if block_types is not None else block_types_of(module)
    if blocks:
        for m in module.modules():
            if isinstance(m, blocks):
                fully_shard(m, **kwargs)
    fully_shard(module, **kwargs)
    return module


# ------------------------------------------------------------------------------------------------------------
# Strategy preparation (called after configure_model, before strategy.setup)


def _gather_adapter_state(strategy: Any) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # Trainable tensors and buffers only (adapter filtering follows in on_save_checkpoint), full, on rank 0.
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_model_state_dict(strategy.model, options=options)


def is_deepspeed(strategy: Any) -> bool:
    """Whether ``strategy`` is Lightning's ``DeepSpeedStrategy`` (or a subclass)."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return isinstance(strategy, DeepSpeedStrategy)


def is_zero3(strategy: Any) -> bool:
    """Whether ``strategy`` partitions the parameters themselves (DeepSpeed ZeRO stage 3)."""
    return is_deepspeed(strategy) and strategy.zero_stage_3


def gathered(strategy: Any, params: Iterable[nn.Parameter]) -> Any:
    """A context in which ``params`` are whole on every rank: ZeRO-3 gathers its partitions, elsewhere a no-op.

    Every rank must enter it (under ZeRO-3 it is a collective).
    """
    if not is_zero3(strategy):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)


def _gather_deepspeed_state(strategy: Any) -> dict[str, Any]:
    # Whole trainable tensors and buffers (ZeRO-3 partitions gathered, on every rank); the adapter filter follows
    # in on_save_checkpoint. Frozen parameters are left out: under ZeRO-3 they are empty partitions.
    module = strategy.lightning_module
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    buffers = {n for n, _ in module.named_buffers()}
    with gathered(strategy, (p for p in module.parameters() if p.requires_grad)):
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items() if k in trainable or k in buffers}


def _keep_adapter_state(save: Callable[..., None]) -> Callable[..., None]:
    # DeepSpeedStrategy leaves "state_dict" out of the client state it gives the engine (the engine saves the
    # module itself, here without the frozen base); the gathered, filtered adapter tensors go under their own key.
    def save_checkpoint(checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        save({**checkpoint, DEEPSPEED_ADAPTER_KEY: checkpoint.get("state_dict", {})}, filepath, storage_options)

    return save_checkpoint


def _prepare_deepspeed(strategy: Any, target: nn.Module) -> None:
    # Every named adapter, not only the first: the one a callback trains may be any of them.
    adalora = sorted({rec.name for _, _, rec in find_records(target) if rec.method == "adalora"})
    if adalora:
        raise AdapterConfigError(
            f"AdaLoRA under DeepSpeedStrategy is not supported (adapter(s) {', '.join(map(repr, adalora))}): its "
            "rank allocation reads every adapter parameter's gradient, which ZeRO keeps in its own partitioned "
            "buffers; train AdaLoRA with strategy ddp or fsdp2"
        )
    # The engine's own files (optimizer partitions for an exact resume) hold no frozen parameter.
    strategy.exclude_frozen_parameters = True
    strategy.lightning_module_state_dict = functools.partial(_gather_deepspeed_state, strategy)
    strategy.save_checkpoint = _keep_adapter_state(strategy.save_checkpoint)
    if is_zero3(strategy):
        import deepspeed

        # Adapted layers run their adapter from their own forward, not through the adapter module's __call__,
        # where ZeRO-3 gathers a module's partitions: make the adapter's parameters the base layer's too.
        for _, base, layer in adapted_modules(target):
            for p in layer.parameters():
                deepspeed.zero.register_external_parameter(base, p)


def prepare_strategy(trainer: Any, pl_module: nn.Module, target: nn.Module, *, merged_export: bool = False) -> None:
    """Adjust the trainer's strategy and precision plugin for adapters (idempotent).

    Args:
        trainer: The trainer.
        pl_module: The LightningModule.
        target: Its injected (sub-)module.
        merged_export: Whether a merged copy is exported at fit end (refused under FSDP).
    """
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    strategy = trainer.strategy
    _reapply_dtype_policy_after_conversion(strategy.precision_plugin)
    if strategy.__dict__.get("_la_prepared"):
        return
    if merged_export and (isinstance(strategy, (FSDPStrategy, ModelParallelStrategy)) or is_zero3(strategy)):
        raise AdapterConfigError(
            f"export_merged_dir is not supported under {type(strategy).__name__} (a merged copy needs the whole "
            "unsharded model on one rank); export the adapter with export_peft_dir and merge afterwards: "
            "la.eject(la.restore_from_checkpoint(base, ckpt_path), merge=True)"
        )
    if isinstance(strategy, ModelParallelStrategy):
        if strategy._save_distributed_checkpoint:
            strategy._save_distributed_checkpoint = False
            rank_zero_warn(
                "ModelParallelStrategy: adapter checkpoints are saved as single files of full adapter tensors "
                "(save_distributed_checkpoint=False); the frozen base is not saved",
            )
        if not any(hasattr(p, "device_mesh") for p in pl_module.parameters()):
            mesh = strategy.device_mesh
            if mesh["tensor_parallel"].size() > 1:
                raise AdapterConfigError(
                    "ModelParallelStrategy: configure_model did not shard the model, and the integration only "
                    "applies FSDP2 over the data-parallel mesh; use ModelParallelStrategy(data_parallel_size=N, "
                    "tensor_parallel_size=1) or apply your own parallelization in configure_model"
                )
            adapter_parallelize_fn(target, mesh["data_parallel"])
        # Gather the adapter only, instead of the whole model, for every checkpoint.
        strategy.lightning_module_state_dict = functools.partial(_gather_adapter_state, strategy)
    elif is_deepspeed(strategy):
        _prepare_deepspeed(strategy, target)
    elif isinstance(strategy, FSDPStrategy):
        if strategy._state_dict_type == "sharded":
            strategy._state_dict_type = "full"
            rank_zero_warn(
                "FSDPStrategy: adapter checkpoints are saved as single files of full adapter tensors "
                "(state_dict_type='full'); the frozen base is not saved",
            )
        if strategy.kwargs.get("auto_wrap_policy") is None:
            strategy.kwargs["auto_wrap_policy"] = adapter_auto_wrap_policy(block_types_of(target))
    strategy.__dict__["_la_prepared"] = True


def _reapply_dtype_policy_after_conversion(plugin: Any) -> None:
    if plugin.__dict__.get("_la_dtype_policy"):
        return
    convert = plugin.convert_module

    def convert_module(module: nn.Module) -> nn.Module:
        # Lightning restores a checkpoint before this cast: keep the adapter values it loaded, so that a tensor the
        # policy puts back in its dtype gets its exact value back, not the value rounded through the cast's dtype.
        kept = _adapter_tensors(module)
        module = convert(module)
        apply_dtype_policy(module)
        now = _adapter_tensors(module, clone=False)
        with torch.no_grad():
            for name, before in kept.items():
                after = now.get(name)
                if after is not None and after.dtype == before.dtype and after.shape == before.shape:
                    after.copy_(before)
        return module

    plugin.convert_module = convert_module
    plugin.__dict__["_la_dtype_policy"] = True


def _adapter_tensors(module: nn.Module, clone: bool = True) -> dict[str, torch.Tensor]:
    """The floating adapter parameters and buffers of ``module`` by state-dict name (plain local tensors only)."""
    prefixes = adapter_prefixes(module)
    if not prefixes:
        return {}
    out = {}
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if not is_adapter_key(name, prefixes) or not t.is_floating_point() or t.is_meta:
            continue
        if type(t.data) is not torch.Tensor:  # a DTensor shard or a quantized subclass: left to its strategy
            continue
        out[name] = t.detach().clone() if clone else t.data
    return out


# ------------------------------------------------------------------------------------------------------------
# Fit-time checks


def _optimizer_params(optimizer: Any) -> list[nn.Parameter]:
    # DeepSpeed's ZeRO optimizers keep flat partitions in param_groups; the model's own parameters are in
    # bit16_groups (stages 1 and 2) or fp16_groups (stage 3).
    for attr in ("bit16_groups", "fp16_groups"):
        groups = getattr(optimizer, attr, None)
        if groups:
            return [p for group in groups for p in group]
    return [p for group in optimizer.param_groups for p in group["params"]]


def check_optimizers(trainer: Any, pl_module: nn.Module, target: nn.Module, prefix: str) -> None:
    """Every trainable adapter parameter must be in an optimizer (frozen ones there are harmless: no gradient).

    Args:
        trainer: The trainer (its optimizers are configured).
        pl_module: The LightningModule.
        target: Its injected (sub-)module.
        prefix: ``target``'s key prefix in the LightningModule (``"model."``), to name parameters.

    Raises:
        AdapterConfigError: Naming the missing parameters and the one-line fix.
    """
    if not pl_module.automatic_optimization and not trainer.optimizers:
        return
    in_optimizer = {id(p) for opt in trainer.optimizers for p in _optimizer_params(opt)}
    missing = [prefix + n for n, p in target.named_parameters() if p.requires_grad and id(p) not in in_optimizer]
    if missing:
        shown = missing[:5] + ([f"... {len(missing) - 5} more"] if len(missing) > 5 else [])
        raise AdapterConfigError(
            f"{len(missing)} adapter parameters are in no optimizer ({shown}), so they would never train. "
            "configure_optimizers must build the optimizer from the parameters as they are when it runs (after "
            "injection), e.g. torch.optim.AdamW((p for p in self.parameters() if p.requires_grad), lr=...) "
            "(AdapterMixin: self.trainable_parameters()); do not create it in __init__"
        )


def check_gradients(trainer: Any, target: nn.Module, prefix: str) -> str | None:
    """After the first backward: adapter parameters that got no gradient (reported before DDP's own error).

    Args:
        trainer: The trainer.
        target: The injected (sub-)module.
        prefix: ``target``'s key prefix in the LightningModule, to name parameters.

    Returns:
        A warning to show once, or None when every trainable parameter got a gradient.

    Raises:
        AdapterStateError: Under DDP without ``find_unused_parameters``, which would fail at the next step.
    """
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    if isinstance(trainer.strategy, FSDPStrategy):
        return None  # FSDP1 leaves .grad unset on ranks that hold no shard of a parameter
    if is_deepspeed(trainer.strategy):
        return None  # ZeRO reduces gradients into its own partitioned buffers; .grad stays unset
    dead = [prefix + n for n, p in target.named_parameters() if p.requires_grad and p.grad is None]
    if not dead:
        return None
    message = (
        f"{len(dead)} adapter parameters got no gradient in the first backward: {dead[:8]}"
        f"{' ...' if len(dead) > 8 else ''}. Their modules do not reach the loss (e.g. an unused pooler). "
        "Add them to exclude_modules or narrow target_modules"
    )
    strategy = trainer.strategy
    if isinstance(strategy, DDPStrategy) and not strategy._ddp_kwargs.get("find_unused_parameters", False):
        raise AdapterStateError(
            message + "; DDP would otherwise fail at the next step with 'Expected to have finished reduction' "
            "(or use DDPStrategy(find_unused_parameters=True))"
        )
    return message


# ------------------------------------------------------------------------------------------------------------
# Gradient checkpointing


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Switch on non-reentrant gradient checkpointing of a transformers model.

    Raises:
        AdapterConfigError: ``model`` is not a transformers model that supports it.
    """
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        raise AdapterConfigError(
            f"gradient_checkpointing=True needs a transformers model; {type(model).__name__} has no "
            "gradient_checkpointing_enable(). Apply torch.utils.checkpoint(..., use_reentrant=False) in your model"
        )


def _reentrant_checkpointing(model: nn.Module) -> bool:
    for m in model.modules():
        if getattr(m, "gradient_checkpointing", False) is True:
            fn = getattr(m, "_gradient_checkpointing_func", None)
            keywords = fn.keywords if isinstance(fn, functools.partial) else {}
            # torch.utils.checkpoint treats an unset use_reentrant as True.
            if keywords.get("use_reentrant") is not False:
                return True
    return False


def handle_input_grads(model: nn.Module) -> bool:
    """Make frozen input embeddings' output require grad when reentrant checkpointing would otherwise stop gradients.

    Reentrant checkpointing only backpropagates into a segment whose inputs require grad; with a frozen
    embedding no input does, and the adapters inside the checkpointed blocks silently get no gradient.

    Returns:
        Whether the embedding hook was installed.
    """
    if model.__dict__.get("_la_input_grads") or not _reentrant_checkpointing(model):
        return False
    get_emb = getattr(model, "get_input_embeddings", None)
    emb = get_emb() if get_emb is not None else None
    if emb is None or any(p.requires_grad for p in emb.parameters()):
        return False
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    else:
        emb.register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
    model.__dict__["_la_input_grads"] = True
    return True
