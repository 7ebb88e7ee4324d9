"""Data-driven LoRA initialisation: EVA (Paischer et al. 2024, "One Initialization to Rule them All: Fine-tuning
via Explained Variance Adaptation").

EVA points ``A`` at the directions along which a layer's inputs vary most, and gives the rank budget to the
layers whose inputs need it. The inputs ``X (N, in)`` of every targeted Linear / Conv1D layer feed an
incremental PCA, one batch at a time (Ross et al. 2008, as scikit-learn's ``IncrementalPCA``; each step a
seeded randomised SVD of ``[diag(S)·Vᵀ ; X − mean(X) ; mean correction]``)::

    k = round(rho · r)                  components computed per layer (its maximum rank)
    A = V_kᵀ (k', in),  B = 0 (out, k') the top-k' right singular vectors (whiten: rows divided by sqrt(S))

so the layer is the base at init. The rank budget ``Σ r`` over the layers goes to the components with the
largest explained-variance ratios ``S² / Σ var`` over all layers, so a layer ends with a rank ``k'`` between 0
(its adapter is removed) and ``k``; with ``adjust_scaling_factors`` its alpha becomes ``alpha · k' / r``, which
keeps the scale ``alpha / r``. Convergence: after every batch the components are compared with the previous
step's by cosine similarity; a layer stops once its first ``k'`` components all reach ``tau``, and the batches
are cycled until every layer has stopped. Layers that receive the same inputs (``q_proj``, ``k_proj``,
``v_proj``) share one PCA. Layers EVA cannot read (Embedding, convolutions) get the default init.

Rows: for a batch that is a mapping with ``input_ids``/``attention_mask``, the token positions the attention
mask keeps (and, with ``use_label_mask``, whose ``labels`` are not ``label_mask_value``); otherwise every row of
the input flattened to ``(N, in)``. On DDP every layer gathers the rows of all ranks (in rank order), so every
rank computes the same init: the one a single process gets from batches that concatenate the ranks' batches.

Equal to PEFT's ``initialize_lora_eva_weights`` on the same model, batches and config (same seeded randomised
SVD, same rank distribution, same saved ``rank_pattern``/``alpha_pattern``), with one difference: PEFT whitens
a shared PCA in place once per layer reading it, so with ``whiten=True`` the ``n`` layers sharing inputs all get
``V_kᵀ / S^(n/2)``; here every layer gets ``V_kᵀ / sqrt(S)``.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_adapters.errors import AdapterConfigError, AdapterStateError

#: Seed of the randomised SVD of every incremental PCA step (PEFT's ``lowrank_seed``), the global RNG untouched.
EVA_SVD_SEED = 42
#: Subspace iterations of that randomised SVD.
EVA_SVD_NITER = 4
#: Forward passes after which EVA gives up when some layer's components still move (``tau`` too close to 1).
EVA_MAX_STEPS = 2000


# ------------------------------------------------------------------------------------------------------------
# Config


def check_options(config: Any) -> None:
    """Validate a ``LoRAConfig``'s ``eva_*`` fields (PEFT's ``EvaConfig``), naming the bad value and the fix."""
    from lightning_adapters.config import check_choice

    rho, tau = config.eva_rho, config.eva_tau
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not rho >= 1.0 or rho == float("inf"):
        raise AdapterConfigError(
            f"lora: eva_rho must be a finite number >= 1 (a layer may get up to round(eva_rho * r) ranks), got "
            f"{rho!r}; use 1 to keep every layer's rank, 2 (default) to allow doubling it"
        )
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 <= tau <= 1.0:
        raise AdapterConfigError(
            f"lora: eva_tau must be a cosine similarity in [0, 1], got {tau!r}; use 0.99 (PEFT's default)"
        )
    for name in ("eva_use_label_mask", "eva_whiten", "eva_adjust_scaling_factors"):
        check_choice(getattr(config, name), name, "lora", (False, True))
    value = config.eva_label_mask_value
    if isinstance(value, bool) or not isinstance(value, int):
        raise AdapterConfigError(f"lora: eva_label_mask_value must be an int label such as -100, got {value!r}")


def peft_eva_config(config: Any) -> dict[str, Any]:
    """PEFT's ``eva_config`` dict for a ``LoRAConfig``."""
    return {
        "rho": float(config.eva_rho),
        "tau": float(config.eva_tau),
        "use_label_mask": config.eva_use_label_mask,
        "label_mask_value": config.eva_label_mask_value,
        "whiten": config.eva_whiten,
        "adjust_scaling_factors": config.eva_adjust_scaling_factors,
    }


# ------------------------------------------------------------------------------------------------------------
# Incremental PCA


class IncrementalPCA:
    """Principal components of a stream of row batches, updated one batch at a time.

    The running mean and variance are kept in float64; each ``update`` takes a seeded ``torch.svd_lowrank``
    (``q = 2k``) of the previous components scaled by their singular values stacked on the centred new rows and
    a mean-correction row, and fixes each component's sign so its largest entry is positive.

    Attributes:
        components: ``(k, in)`` right singular vectors, or None before the first update.
        singular_values: ``(k,)``.
        explained_variance_ratio: ``(k,)`` each component's share of the total variance.
    """

    def __init__(self, n_components: int) -> None:
        self.k = n_components
        self.n_seen: torch.Tensor | None = None  # (1,) int64
        self.mean: torch.Tensor | None = None  # (in,) float64
        self.var: torch.Tensor | None = None  # (in,) float64
        self.components: torch.Tensor | None = None
        self.singular_values: torch.Tensor | None = None
        self.explained_variance_ratio: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        """Fold the rows ``x (N, in)`` (float32, ``N >= k``) into the PCA."""
        n_new = torch.tensor([x.shape[0]], device=x.device)
        n_seen = self.n_seen if self.n_seen is not None else torch.tensor([0], device=x.device)
        mean, var, n_total = running_moments(x, self.mean, self.var, n_seen)
        if self.components is None:
            rows = (x.double() - mean).to(x.dtype)  # (N, in), centred on the running mean
        else:
            batch_mean = x.mean(dim=0)  # (in,)
            centred = x - batch_mean
            weight = torch.sqrt((n_seen.double() / n_total) * n_new)  # (1,)
            correction = weight * (self.mean - batch_mean)  # (in,): the shift between old and batch means
            # (k + N + 1, in): the old data's summary, the new rows and the mean correction, in float64
            rows = torch.cat([self.singular_values.view(-1, 1) * self.components, centred, correction[None]])
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            torch.manual_seed(EVA_SVD_SEED)
            _, s, v = torch.svd_lowrank(rows, q=2 * self.k, niter=EVA_SVD_NITER)  # (M, q), (q,), (in, q)
        vt = v.mH  # (q, in)
        peak = vt.abs().argmax(dim=1)  # (q,)
        vt = vt * torch.sign(vt[torch.arange(vt.shape[0], device=vt.device), peak]).view(-1, 1)
        ratio = s**2 / torch.sum(var * n_total)
        self.n_seen, self.mean, self.var = n_total, mean, var
        self.components = vt[: self.k]
        self.singular_values = s[: self.k]
        self.explained_variance_ratio = ratio[: self.k]


def running_moments(
    x: torch.Tensor, mean: torch.Tensor | None, var: torch.Tensor | None, n_seen: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean and (biased) variance per column of every row seen so far, after adding ``x (N, in)``.

    Chan et al.'s pairwise update in float64: ``(mean, var)`` of the ``n_seen`` earlier rows (None before any)
    combined with the new rows' sum and centred sum of squares. Returns ``(mean (in,), var (in,), n_total (1,))``.
    """
    n_new = torch.tensor([x.shape[0]], device=x.device)
    n_total = n_seen + n_new
    old_sum = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device) if mean is None else mean * n_seen
    new_sum = x.sum(dim=0, dtype=torch.float64)
    new_mean = (old_sum + new_sum) / n_total
    dev = x - new_sum / n_new  # (N, in) float64, centred on the batch mean
    drift = dev.sum(dim=0, dtype=torch.float64).square()  # rounding of the batch mean, removed below
    new_ss = dev.square().sum(dim=0, dtype=torch.float64) - drift / n_new
    if var is None:
        return new_mean, new_ss / n_total, n_total
    ratio = n_seen.double() / n_new
    total_ss = var * n_seen + new_ss + ratio / n_total * (old_sum / ratio - new_sum).square()
    return new_mean, total_ss / n_total, n_total


# ------------------------------------------------------------------------------------------------------------
# Layer inputs


def token_mask(batch: Any, use_label_mask: bool, label_mask_value: int) -> torch.Tensor | None:
    """``(B, T)`` bool mask of the token positions EVA reads from a language-modelling batch, else None.

    A mapping with ``input_ids`` or ``attention_mask``: the attention mask (all ones without one), and with
    ``use_label_mask`` only the positions whose ``labels`` are not ``label_mask_value``.
    """
    if not isinstance(batch, Mapping) or ("input_ids" not in batch and "attention_mask" not in batch):
        return None
    mask = batch.get("attention_mask")
    mask = torch.ones_like(batch["input_ids"]) if mask is None else mask
    mask = mask.bool()
    if use_label_mask and batch.get("labels") is not None:
        mask = mask & (batch["labels"] != label_mask_value)
    return mask


def layer_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The rows ``(N, in)`` of a layer input ``x (..., in)``: the masked positions when ``mask`` fits ``x``'s
    leading dimensions, else all of them."""
    if mask is not None and tuple(x.shape[:-1]) == tuple(mask.shape):
        return x[mask.to(x.device)]
    return x.reshape(-1, x.shape[-1])


def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every rank's ``rows`` concatenated in rank order (row counts may differ between ranks)."""
    import torch.distributed as dist

    world = dist.get_world_size()
    count = torch.tensor([rows.shape[0]], device=rows.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    padded = rows.new_zeros((max(sizes), *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def _digest(rows: torch.Tensor) -> str:
    """A fingerprint of a tensor's shape and bytes (to find layers that read the same inputs)."""
    data = rows.detach().contiguous().cpu()
    h = hashlib.sha1(str((tuple(data.shape), data.dtype)).encode())
    h.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------------------
# Rank distribution


def distribute_ranks(
    ratios: dict[str, torch.Tensor], site_of: dict[str, str], shared: dict[str, str], budget: int
) -> dict[str, int]:
    """Give ``budget`` ranks to the components with the largest explained-variance ratios over all layers.

    Args:
        ratios: ``{site: (k_site,) explained-variance ratios}`` of each PCA, cut to the site's maximum rank.
        site_of: ``{layer: site}`` in a fixed order (the PCA layers first, then the layers sharing their inputs).
        shared: ``{layer: site}`` of the layers reading another layer's inputs; a tie between them is resolved
            in favour of the PCA's own layer.
        budget: The total rank to give (``Σ r``).

    Returns:
        ``{layer: rank}``, 0 for a layer that gets nothing.
    """
    owners = [layer for layer, site in site_of.items() for _ in range(ratios[site].shape[0])]
    values = torch.cat([ratios[site] for site in site_of.values()])
    order = values.argsort(descending=True)[:budget]
    taken = Counter(owners[i] for i in order.tolist())
    ranks = {layer: taken.get(layer, 0) for layer in site_of}
    for layer, site in shared.items():
        if ranks[site] < ranks[layer]:
            ranks[site], ranks[layer] = ranks[layer], ranks[site]
    return ranks


# ------------------------------------------------------------------------------------------------------------
# The EVA pass


class _Site:
    """One PCA over the inputs of one layer (and of the layers that read the same inputs)."""

    def __init__(self, k: int, tau: float) -> None:
        self.pca = IncrementalPCA(k)
        self.tau = tau
        self.converged = torch.zeros(k, dtype=torch.bool)
        self.active = True

    def update(self, rows: torch.Tensor) -> None:
        if rows.shape[0] < self.pca.k:
            return  # too few rows for k components (PEFT skips the batch too)
        previous = None if self.pca.components is None else self.pca.components.clone()
        self.pca.update(rows.float())
        if previous is not None:
            sim = F.cosine_similarity(self.pca.components, previous)  # (k,) per component
            self.converged = (sim >= self.tau).cpu()


@torch.no_grad()
def eva_components(
    model: nn.Module,
    layers: dict[str, tuple[nn.Module, Any]],
    batches: list[Any],
    run: Callable[[nn.Module, Any], Any],
    options: Any,
    *,
    gather: bool,
    prepare: Callable[[Any], Any],
) -> dict[str, torch.Tensor]:
    """EVA's ``A`` of every layer: ``{name: (rank, in)}`` in float32 (``(0, in)`` for a layer that gets no rank).

    Args:
        model: The model to run (its EVA layers switched off by the caller: the PCA reads the base's inputs).
        layers: ``{name: (base module, LoRA layer)}`` in module order; each layer's ``r`` is its share of the
            budget and ``round(rho·r)`` its maximum rank.
        batches: The batches, cycled until every layer has converged.
        run: ``(model, batch)`` runs the model.
        options: The ``LoRAConfig`` (``eva_rho``, ``eva_tau``, ``eva_use_label_mask``, ``eva_label_mask_value``,
            ``eva_whiten``).
        gather: Gather every layer's rows from all ``torch.distributed`` ranks.
        prepare: Moves a batch to the model's device.

    Raises:
        AdapterConfigError: A layer's maximum rank exceeds its input width.
        AdapterStateError: No batches, a layer never ran, or the components did not converge in
            ``EVA_MAX_STEPS`` forward passes.
    """
    if not batches:
        raise AdapterStateError("initialize_from_data: EVA got no batches; pass the first batches of the train data")
    rho = float(options.eva_rho)
    if rho > 1000:  # PEFT's cap for huge rho: at most the largest parameter dimension over r
        largest = max(max(p.shape) for p in model.parameters())
        rho = min(rho, largest // options.r)
    top = {name: round(layer.r * rho) for name, (_, layer) in layers.items()}
    budget = sum(layer.r for _, layer in layers.values())
    for name, (_, layer) in layers.items():
        if top[name] > layer.in_features:
            raise AdapterConfigError(
                f"lora: EVA on {name!r} would compute round(r * eva_rho) = {top[name]} components of inputs only "
                f"{layer.in_features} wide; use eva_rho <= {layer.in_features / layer.r:g} or a smaller r there "
                f"(rank_pattern)"
            )
    mask: list[torch.Tensor | None] = [None]
    seen: dict[str, str] = {}
    sites: dict[str, _Site] = {}

    def rows_of(args: tuple) -> torch.Tensor:
        rows = layer_rows(args[0].detach(), mask[0])
        return gather_rows(rows) if gather else rows

    def fingerprint(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if name not in seen:
                seen[name] = _digest(rows_of(args))

        return hook

    def collect(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            site = sites.get(name)
            if site is not None and site.active:
                site.update(rows_of(args))

        return hook

    def forward(batch: Any) -> None:
        batch = prepare(batch)
        mask[0] = token_mask(batch, options.eva_use_label_mask, options.eva_label_mask_value)
        run(model, batch)

    # 1. One batch to find the layers that read the same inputs: they share one PCA.
    handles = [base.register_forward_hook(fingerprint(name)) for name, (base, _) in layers.items()]
    try:
        forward(batches[0])
    finally:
        for h in handles:
            h.remove()
    silent = [name for name in layers if name not in seen]
    if silent:
        raise AdapterStateError(
            f"initialize_from_data: {silent} never ran on the first batch; pass batches that reach every EVA layer "
            "(or a forward_fn that calls the model the way training does)"
        )
    groups: dict[str, list[str]] = {}
    for name in layers:
        groups.setdefault(seen[name], []).append(name)
    shared = {other: group[0] for group in groups.values() for other in group[1:]}
    for group in groups.values():
        k = max(top[n] for n in group)
        for n in group:
            top[n] = k
    site_of = {name: name for name in layers if name not in shared} | shared
    sites.update({name: _Site(top[name], float(options.eva_tau)) for name in layers if name not in shared})

    # 2. Cycle the batches until the components every layer keeps have converged.
    ranks = dict(top)
    handles = [base.register_forward_hook(collect(name)) for name, (base, _) in layers.items() if name in sites]
    done = {name: False for name in sites}
    try:
        for step, batch in enumerate(itertools.cycle(batches)):
            for name, site in sites.items():
                converged = bool(site.converged[: ranks[name]].all())
                if not done[name] and converged:
                    site.active, done[name] = False, True
                elif done[name] and not converged:
                    site.active, done[name] = True, False
            if all(done.values()):
                break
            if step >= EVA_MAX_STEPS:
                moving = sorted(name for name, d in done.items() if not d)
                raise AdapterStateError(
                    f"initialize_from_data: EVA's components of {moving} did not reach eva_tau="
                    f"{options.eva_tau} in {EVA_MAX_STEPS} forward passes; lower eva_tau (default 0.99)"
                )
            forward(batch)
            if all(site.pca.components is not None for site in sites.values()):
                ratios = {n: s.pca.explained_variance_ratio[: top[n]] for n, s in sites.items()}
                ranks = distribute_ranks(ratios, site_of, shared, budget)
    finally:
        for h in handles:
            h.remove()

    out = {}
    for name, site_name in site_of.items():
        pca = sites[site_name].pca
        u = pca.components[: ranks[name]]  # (rank, in)
        if options.eva_whiten:
            u = u / pca.singular_values[: ranks[name]].sqrt().view(-1, 1)
        out[name] = u.float()
    return {name: out[name] for name in layers}


# ------------------------------------------------------------------------------------------------------------
# Writing the result into the model


def apply_components(
    model: nn.Module,
    layers: dict[str, tuple[nn.Module, Any]],
    comps: dict[str, torch.Tensor],
    adjust: bool,
    adapter: str,
) -> None:
    """Give every layer of adapter ``adapter`` its EVA rank and ``A``; remove the layers that got rank 0.

    A layer of rank ``r`` and scaling numerator ``alpha`` that gets ``k' > 0`` components is rebuilt with rank
    ``k'``, ``lora_A`` the components, ``lora_B = 0`` and (``adjust``: ``eva_adjust_scaling_factors``) alpha
    ``alpha · k' / r``.
    Each injection record then saves, as PEFT does, ``rank_pattern``/``alpha_pattern`` with every LoRA layer whose
    rank / alpha differ from the config's ``r`` / ``alpha``, and (when a layer was removed) ``target_modules`` as
    the list of the layers still adapted.
    """
    from lightning_adapters.core.inject import adapted_modules, apply_trainability, find_records
    from lightning_adapters.core.layer import detach

    records = find_records(model)
    dropped = []
    for name, (base, layer) in layers.items():
        u = comps[name]
        rank = u.shape[0]
        if rank == 0:
            detach(base, adapter)  # only this adapter's layer: the module may hold others
            dropped.append(name)
            continue
        alpha = layer.alpha
        if rank != layer.r and adjust:
            alpha = alpha * rank / layer.r
        if rank != layer.r or alpha != layer.alpha:
            layer.set_rank(rank, alpha)
        with torch.no_grad():
            layer.lora_A.copy_(u.to(layer.lora_A))
            layer.lora_B.zero_()
        layer.needs_data = False
    for prefix, root, rec in records:
        if rec.name != adapter or not any(_inside(n, prefix) for n in layers):
            continue
        mine = {_relative(n, prefix) for n in dropped if _inside(n, prefix)}
        rec.targets = [t for t in rec.targets if t not in mine]
        ranks, alphas = {}, {}
        for name, _, layer in adapted_modules(root, [adapter]):
            if isinstance(getattr(layer, "r", None), int) and isinstance(getattr(layer, "alpha", None), float):
                if layer.r != rec.config.r:
                    ranks[name] = layer.r
                if layer.alpha != rec.config.alpha:
                    alphas[name] = layer.alpha
        # Saved as PEFT's _load_eva_state_dict rewrites them: every pattern replaced, the targets once some dropped.
        rec.resolved_peft_fields.update(rank_pattern=ranks, alpha_pattern=alphas)
        if mine:
            rec.resolved_peft_fields["target_modules"] = sorted(rec.targets)
        apply_trainability(root)


def _inside(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def _relative(name: str, prefix: str) -> str:
    return name[len(prefix) + 1 :] if prefix else name
