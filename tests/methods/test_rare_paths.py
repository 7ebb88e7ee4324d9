"""Paths of the methods that the fast suite reached rarely or never (survivors of the seed-23 mutation sample,
docs/MUTATION.md): LoRA's ``lora_bias`` on every layer kind through both forwards, AdaLoRA's scores and export under
``torch.distributed`` (rank 0's broadcast, sharded DTensor factors) and Llama-Adapter's description of itself.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_adapters as la
from lightning_adapters.methods import adalora
from lightning_adapters.methods.adalora import AdaLoRALayer
from lightning_adapters.methods.llama_adapter import AdaptionPrompt
from lightning_adapters.methods.lora import LoRALayer
from tests.helpers import Wrap, tiny_gpt2, tiny_llama

# (base layer, input shape, functional form of the base): conv kinds go through their own branch of the forwards.
KINDS = {
    "linear": (lambda: nn.Linear(6, 5), (3, 2, 6), lambda x, w, b: F.linear(x, w, b)),
    "conv1d": (lambda: nn.Conv1d(4, 5, 3, padding=1), (2, 4, 7), lambda x, w, b: F.conv1d(x, w, b, padding=1)),
    "conv2d": (lambda: nn.Conv2d(4, 5, 3, padding=1), (2, 4, 5, 6), lambda x, w, b: F.conv2d(x, w, b, padding=1)),
}


@pytest.mark.parametrize("scale", [1.0, 0.5], ids=["adapted-forward", "scaled-delta-output"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_lora_bias_is_the_merged_formula_in_values_and_gradients(kind, scale):
    """With ``lora_bias`` the adapter adds ``s·(B·A·x + b_B)``: the base with ``W + s·B∘A`` and ``b + s·b_B``
    (what ``merge`` folds). ``s = scale·alpha/r`` with alpha/r = 1.5; ``set_scale(0.5)`` runs the base plus the
    scaled ``delta_output`` (a separate code path per layer kind). Truth: the functional base op on the merged
    weight and bias, in float64, and its autograd gradients for ``A``, ``B``, ``b_B`` and the input."""
    make, shape, op = KINDS[kind]
    torch.manual_seed(0)
    model = Wrap(make()).double()
    la.inject(model, la.LoRAConfig(r=2, alpha=3.0, lora_bias=True, target_modules=["layer"]))
    layer = model.layer.adapter["default"]
    assert isinstance(layer, LoRALayer)
    with torch.no_grad():
        for p in (layer.lora_A, layer.lora_B, layer.lora_B_bias):
            p.copy_(torch.randn(p.shape, dtype=p.dtype))  # B and b_B start at 0
    if scale != 1.0:
        la.set_scale(model, "default", scale)
    s = scale * 1.5
    w, b = model.layer.weight.detach(), model.layer.bias.detach()
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    y = model(x)
    g = torch.randn(y.shape, dtype=torch.float64)
    got = torch.autograd.grad((y * g).sum(), (x, layer.lora_A, layer.lora_B, layer.lora_B_bias))

    A, B, bB = (t.detach().clone().requires_grad_(True) for t in (layer.lora_A, layer.lora_B, layer.lora_B_bias))
    xr = x.detach().clone().requires_grad_(True)
    # A (r, in, *k) and B (out, r, 1...) of a conv: their product is a conv kernel (out, in, *k).
    delta = torch.einsum("or,ri...->oi...", B.reshape(B.shape[0], B.shape[1]), A)
    want_y = op(xr, w + s * delta, b + s * bB)
    want = torch.autograd.grad((want_y * g).sum(), (xr, A, B, bB))
    torch.testing.assert_close(y.detach(), want_y.detach())
    for name, a, e in zip(("x", "lora_A", "lora_B", "lora_B_bias"), got, want):
        torch.testing.assert_close(a, e, msg=name)


def _adalora_model() -> nn.Module:
    torch.manual_seed(0)
    model = Wrap(nn.Linear(6, 5))
    la.inject(model, la.AdaLoRAConfig(init_r=4, target_r=2, total_step=10, target_modules=["layer"]))
    return model


def test_adalora_scores_are_rank_zeros_under_a_process_group(monkeypatch):
    """Under ``torch.distributed`` every rank takes rank 0's triplet scores (one broadcast of all layers' scores,
    concatenated): on rank 0 they come back unchanged, name by name and shape by shape; on another rank each
    layer's slice of the broadcast vector. The group is simulated (world size 2, the broadcast writes rank 0's
    vector), so the test needs no second process."""
    import torch.distributed as dist

    scores = {"b": torch.tensor([3.0, 1.0, 2.0]), "a": torch.tensor([[5.0], [4.0]]), "c": torch.tensor([6.0])}
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "broadcast", lambda tensor, src: None)  # rank 0: its own values stay
    out = adalora._broadcast_from_rank0(scores)
    assert list(out) == list(scores)
    for name, value in scores.items():
        assert torch.equal(out[name], value), name

    rank0 = torch.arange(6.0) + 10  # what rank 0 sends: its scores in the same order

    def receive(tensor, src):
        assert src == 0 and tensor.shape == rank0.shape
        tensor.copy_(rank0)

    monkeypatch.setattr(dist, "broadcast", receive)
    out = adalora._broadcast_from_rank0(scores)
    assert torch.equal(out["b"], torch.tensor([10.0, 11.0, 12.0]))
    assert torch.equal(out["a"], torch.tensor([[13.0], [14.0]]))
    assert torch.equal(out["c"], torch.tensor([15.0]))


def test_adalora_export_of_sharded_factors_is_the_full_plain_tensors(tmp_path):
    """Under FSDP2 the factors are DTensors (each rank a shard of rows): the export (PEFT's layout) gathers the
    full factors into plain tensors. Truth: the unsharded factors of the same layer, sliced to the exported ranks.
    A one-rank gloo group shards them for real (``Shard(0)`` of one rank holds every row, still a DTensor)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    model = _adalora_model()
    layer = model.layer.adapter["default"]
    assert isinstance(layer, AdaLoRALayer)
    with torch.no_grad():
        layer.lora_E.copy_(torch.tensor([[1.0], [0.0], [2.0], [0.5]]))
    layer.rank_mask.copy_(torch.tensor([True, False, True, False]))  # rank 1 pruned (E = 0), rank 3 regrown
    want = {k: v.clone() for k, v in layer.peft_state().items()}
    assert [v.shape[0] for k, v in want.items() if k != "lora_B"] == [3, 3]
    if dist.is_initialized():
        pytest.skip("a process group is already set up in this process")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        for name in ("lora_A", "lora_B", "lora_E"):
            p = getattr(layer, name)
            setattr(layer, name, nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)])))
        assert isinstance(layer.lora_E, DTensor)
        got = layer.peft_state()
    finally:
        dist.destroy_process_group()
    assert sorted(got) == sorted(want)
    for name, value in got.items():
        assert type(value) is torch.Tensor, name
        assert torch.equal(value, want[name]), name


def test_llama_adapter_prompt_describes_its_length_heads_and_head_dim():
    """``repr`` of the prompt module names the flavour, the prompt length and the attention's shape (GQA: 4 query
    heads on 2 key/value heads of 16 dims, tiny_llama's config)."""
    model = tiny_llama()
    la.inject(model, la.LlamaAdapterConfig(adapter_len=3, adapter_layers=1))
    prompts = [m for m in model.modules() if isinstance(m, AdaptionPrompt)]
    assert len(prompts) == 1
    text = repr(prompts[0])
    assert "adapter_len=3, heads=4/2 kv, head_dim=16" in text, text


def test_llama_adapter_prompt_is_made_on_the_attentions_device():
    """A model built on the meta device (a sharded run materialises it later) gets its prompt and gate on the meta
    device too, as every other adapter tensor; one made on the CPU would be left behind by the materialisation."""
    with torch.device("meta"):
        model = tiny_llama()
    la.inject(model, la.LlamaAdapterConfig(adapter_len=3, adapter_layers=1))
    (prompt,) = [m for m in model.modules() if isinstance(m, AdaptionPrompt)]
    assert prompt.adaption_prompt.device.type == "meta"
    assert prompt.adaption_gate.device.type == "meta"


LOKR_FORMS = {
    # (base, config kwargs, the factor forms repr names, the parameters that hold them)
    "full-w1-factored-w2": (lambda: nn.Linear(64, 48), {}, "w1, w2_a·w2_b", {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
    "both-factored": (
        lambda: nn.Linear(64, 48),
        {"decompose_both": True},
        "w1_a·w1_b, w2_a·w2_b",
        {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"},
    ),
    "full-w2": (lambda: nn.Linear(8, 6), {"r": 64}, "w1, w2,", {"lokr_w1", "lokr_w2"}),
    "conv-factored": (lambda: nn.Conv2d(16, 32, 3), {}, "w1, w2_a·w2_b", {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
    "conv-tucker": (
        lambda: nn.Conv2d(16, 32, 3),
        {"use_effective_conv2d": True},
        "w1, tucker w2",
        {"lokr_w1", "lokr_t2", "lokr_w2_a", "lokr_w2_b"},
    ),
}


@pytest.mark.parametrize("form", sorted(LOKR_FORMS))
def test_lokr_layer_names_the_factor_forms_it_holds(form):
    """``repr`` of a LoKr layer says how each Kronecker factor is stored (full, a product of two, or CP/Tucker with
    a core): truth is the set of parameters the layer holds for that config."""
    make, kwargs, text, params = LOKR_FORMS[form]
    model = Wrap(make())
    la.inject(model, la.LoKrConfig(**{"r": 2, **kwargs}, target_modules=["layer"]))
    layer = model.layer.adapter["default"]
    assert {n for n, _ in layer.named_parameters()} == params
    assert text in repr(layer), repr(layer)


BAD_TOKEN_INDICES = {
    "duplicate": [1, 1],
    "negative": [3, -1],
    "bool": [True, 2],
    "float": [1.0],
    "empty": [],
    "not-a-list": 5,
    "dict-empty-ids": {"embed": []},
    "dict-duplicate": {"embed": [2, 2]},
    "dict-empty-name": {"": [2]},
    "dict-empty": {},
}


@pytest.mark.parametrize("value", list(BAD_TOKEN_INDICES.values()), ids=list(BAD_TOKEN_INDICES))
def test_trainable_token_indices_that_are_not_distinct_ids_are_refused(value):
    """Every way a ``trainable_token_indices`` value can fail to be a non-empty list of distinct ids >= 0 (alone or
    per module) is refused when the config is made, each check on its own (one wrong condition lets one through)."""
    with pytest.raises(la.AdapterConfigError, match="trainable_token_indices="):
        la.LoRAConfig(trainable_token_indices=value)


@pytest.mark.parametrize(
    "value, kept",
    [([0, 7], [0, 7]), ((3,), [3]), ({"embed": [4, 1]}, {"embed": [4, 1]})],
    ids=["list", "tuple", "dict"],
)
def test_trainable_token_indices_in_every_accepted_form_are_kept(value, kept):
    """The accepted forms are kept (a tuple as the list PEFT's JSON holds)."""
    assert la.LoRAConfig(trainable_token_indices=value).trainable_token_indices == kept


def test_llama_adapter_eject_removes_only_its_own_hooks():
    """Ejecting Llama-Adapter removes the hooks it put on the attention modules and leaves those of other code (a
    plain function, without ``__self__``) registered and firing; the model computes its original output again."""
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
    seen = []

    def record(module, args, output):
        seen.append(module)

    attns = [layer.self_attn for layer in model.model.layers]
    for attn in attns:
        attn.register_forward_hook(record)
    before = [(len(a._forward_pre_hooks), len(a._forward_hooks)) for a in attns]
    la.inject(model, la.LlamaAdapterConfig(adapter_len=3, adapter_layers=2))
    assert [(len(a._forward_pre_hooks), len(a._forward_hooks)) for a in attns] != before
    la.eject(model)
    assert [(len(a._forward_pre_hooks), len(a._forward_hooks)) for a in attns] == before
    seen.clear()
    with torch.no_grad():
        got = model(ids).logits
    assert seen == attns
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("rescale", [False, True])
def test_lycoris_rank_dropout_multipliers_are_drawn_on_the_cpu_and_put_on_the_layer_s_device(rescale):
    """The keep-mask is drawn from the CPU generator (PEFT's draws) and handed over on the device asked for (the
    meta device stands in for an accelerator); the CPU draw is the same mask."""
    from lightning_adapters.methods._lycoris import rank_dropout_multipliers

    torch.manual_seed(0)
    on_cpu = rank_dropout_multipliers(16, 0.5, rescale, torch.float32, torch.device("cpu"))
    torch.manual_seed(0)
    on_meta = rank_dropout_multipliers(16, 0.5, rescale, torch.float32, torch.device("meta"))
    assert on_cpu.device.type == "cpu" and on_meta.device.type == "meta" and on_meta.shape == (16,)
    torch.manual_seed(0)
    keep = (torch.rand(16) > 0.5).float()
    assert torch.equal(on_cpu, keep / keep.mean() if rescale else keep)


def test_llama_adapter_refuses_a_gpt2_attention_whose_c_attn_is_not_q_k_v_of_the_hidden_size():
    """GPT-2's ``c_attn`` must map hidden -> 3·hidden, and the hidden size must split into heads of ``head_dim``:
    either alone is refused, naming the attention and the shapes."""
    from transformers.pytorch_utils import Conv1D

    from lightning_adapters.methods.llama_adapter import _shape_of

    attn = tiny_gpt2().transformer.h[0].attn
    assert _shape_of("h.0.attn", attn, "gpt2") == (64, 4, 4, 16)
    attn.c_attn = Conv1D(2 * 64, 64)  # hidden -> 2·hidden, heads still divide hidden
    with pytest.raises(la.UnsupportedLayerError, match=r"'h.0.attn' .*c_attn maps 64 -> 128, expected 64 -> 192"):
        _shape_of("h.0.attn", attn, "gpt2")
    attn.c_attn, attn.head_dim = Conv1D(3 * 64, 64), 12  # q, k, v of the hidden size, heads do not divide it
    with pytest.raises(la.UnsupportedLayerError, match=r"c_attn maps 64 -> 192"):
        _shape_of("h.0.attn", attn, "gpt2")


def test_trainable_token_indices_out_of_an_embedding_s_range_are_refused_naming_them():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    with pytest.raises(la.AdapterConfigError, match=r"trainable_token_indices \[10, 12\] are out of range for '0'"):
        la.inject(model, la.LoRAConfig(r=2, target_modules=["1"], trainable_token_indices={"0": [3, 10, 12]}))
    assert type(model[0]) is nn.Embedding and type(model[1]) is nn.Linear


def test_adalora_delta_output_drops_its_input_while_training_only():
    """The term ``delta_output`` hands a scaled adapter (``set_scale``) is ``B (A ⊙ E) dropout(x) · α / (ranknum +
    ε)``: the same draw of dropout as ``F.dropout`` from the same seed in training, none in eval."""
    model = Wrap(nn.Linear(6, 5))
    la.inject(model, la.AdaLoRAConfig(init_r=3, target_r=2, total_step=10, dropout=0.5, target_modules=["layer"]))
    layer = model.layer.adapter["default"]
    with torch.no_grad():
        for p in (layer.lora_A, layer.lora_B, layer.lora_E):
            p.copy_(torch.randn(p.shape))
    x = torch.randn(4, 6)
    factor = layer.alpha / (layer.ranknum + adalora.RANKNUM_EPS)

    def formula(xd: torch.Tensor) -> torch.Tensor:
        return xd @ (layer.lora_A * layer.lora_E).T @ layer.lora_B.T * factor

    model.train()
    torch.manual_seed(3)
    got = layer.delta_output(model.layer, x)
    torch.manual_seed(3)
    want = formula(F.dropout(x, 0.5, True))
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, formula(x))
    model.eval()
    torch.testing.assert_close(layer.delta_output(model.layer, x), formula(x))


def test_lora_data_statistics_are_summed_over_ranks_name_by_name(monkeypatch):
    """The data-driven inits (EVA, CorDA) sum each layer's covariance and call count over ranks: one all-reduce
    per layer, in sorted name order on every rank, the count packed with the matrix. The group is simulated (two
    ranks holding the same statistics), so the test needs no second process."""
    import torch.distributed as dist

    from lightning_adapters.methods.lora_data import _reduce

    stats = {"b": [torch.tensor([[1.0, 2.0], [3.0, 4.0]]), 3], "a": [torch.tensor([0.5, 1.5]), 2]}
    seen: list[int] = []

    def two_ranks(tensor):
        seen.append(tensor.numel())
        tensor.mul_(2)

    monkeypatch.setattr(dist, "all_reduce", two_ranks)
    _reduce(stats, all_reduce=False)
    assert seen == [] and stats["b"][1] == 3
    _reduce(stats, all_reduce=True)
    assert seen == [3, 5]  # "a" (2 values + the count), then "b" (4 + 1)
    assert torch.equal(stats["a"][0], torch.tensor([1.0, 3.0])) and stats["a"][1] == 4
    assert torch.equal(stats["b"][0], torch.tensor([[2.0, 4.0], [6.0, 8.0]])) and stats["b"][1] == 6


def test_merging_lora_on_a_meta_multihead_attention_names_its_packed_weight():
    """The base weights of LoRA on ``nn.MultiheadAttention`` go by their parameter names (``in_proj_weight``,
    ``out_proj.weight``): a merge of a model never materialised names the first of them."""
    with torch.device("meta"):
        model = nn.Sequential(nn.MultiheadAttention(8, 2, batch_first=True))
    la.inject(model, la.LoRAConfig(r=2, target_modules=["0"]))
    with pytest.raises(la.AdapterStateError, match=r"merge: 0\.in_proj_weight is on the meta device"):
        la.merge(model)


def test_adalora_masks_sharded_singular_values_in_place(tmp_path):
    """Under FSDP2 ``lora_E`` is a DTensor: the rank mask is laid out as it is and zeroes the pruned ranks' singular
    values in place. A one-rank gloo group shards it for real, as in the export test above."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    model = _adalora_model()
    layer = model.layer.adapter["default"]
    values = torch.tensor([[1.0], [3.0], [2.0], [0.5]])
    keep = torch.tensor([True, False, True, False])
    if dist.is_initialized():
        pytest.skip("a process group is already set up in this process")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        layer.lora_E = nn.Parameter(distribute_tensor(values.clone(), mesh, [Shard(0)]))
        layer.apply_mask(keep)
        assert isinstance(layer.lora_E, DTensor)
        got = layer.lora_E.full_tensor()
    finally:
        dist.destroy_process_group()
    assert torch.equal(got, torch.tensor([[1.0], [0.0], [2.0], [0.0]]))
    assert layer.rank_mask.tolist() == keep.tolist() and layer.kept_rank == 2


def test_eva_components_rewrite_only_the_record_of_their_own_adapter():
    """EVA's ranks are applied to one adapter: its record loses the layers that got no component and gets the
    rank pattern of the rest; another adapter on the same modules keeps its record as it was."""
    from lightning_adapters.core.inject import adapted_modules, find_records
    from lightning_adapters.methods.lora_eva import apply_components

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6))
    for name in ("a", "e"):
        la.inject(model, la.LoRAConfig(r=2, target_modules=["0", "1"]), name=name)
    before = {rec.name: (list(rec.targets), dict(rec.resolved_peft_fields)) for _, _, rec in find_records(model)}
    layers = {n: (base, layer) for n, base, layer in adapted_modules(model, ["e"])}
    apply_components(model, layers, {"0": torch.zeros(0, 6), "1": torch.randn(1, 6)}, adjust=False, adapter="e")
    records = {rec.name: rec for _, _, rec in find_records(model)}
    assert (records["a"].targets, records["a"].resolved_peft_fields) == before["a"]
    assert records["e"].targets == ["1"] and records["e"].resolved_peft_fields["rank_pattern"] == {"1": 1}
    assert list(model[0].adapter) == ["a"] and list(model[1].adapter) == ["a", "e"]


@pytest.mark.parametrize("where", ["multihead-attention", "target-parameters"])
def test_convert_to_lora_of_lora_on_attention_or_parameters_is_refused_naming_them(where, tmp_path):
    """LoRA on ``nn.MultiheadAttention`` or on ``target_parameters`` never has a residual init (PiSSA and the like
    are refused there), so ``convert_to_lora`` has nothing to convert: refused by name before anything is written
    (it raised ``AttributeError`` from deep inside the conversion)."""

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.p = nn.Linear(8, 8)

    model = Model()
    if where == "multihead-attention":
        config, named = la.LoRAConfig(r=2, target_modules=["fc", "attn"]), "attn"
    else:
        config, named = la.LoRAConfig(r=2, target_modules=["fc"], target_parameters=["p.weight"]), "p"
    la.inject(model, config)
    with pytest.raises(la.AdapterConfigError, match=rf"convert_to_lora=True\): \['{named}'\] hold LoRA on"):
        la.save_peft(model, tmp_path / "out", convert_to_lora=True)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_lokr_delta_output_drops_output_rows_while_training():
    """LoKr's rank dropout on the term ``delta_output`` hands a scaled adapter: the eval term times the mask
    ``rank_dropout_multipliers`` draws from the same seed (one multiplier per output feature)."""
    from lightning_adapters.methods._lycoris import rank_dropout_multipliers

    model = Wrap(nn.Linear(6, 8))
    la.inject(model, la.LoKrConfig(r=2, rank_dropout=0.5, target_modules=["layer"]))
    layer = model.layer.adapter["default"]
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape))
    x = torch.randn(3, 6)
    model.eval()
    term = layer.delta_output(model.layer, x)
    model.train()
    torch.manual_seed(5)
    got = layer.delta_output(model.layer, x)
    torch.manual_seed(5)
    torch.rand(1)  # PEFT's module-dropout draw comes first, also at module_dropout=0
    mask = rank_dropout_multipliers(8, 0.5, layer.rank_dropout_scale, torch.float32, torch.device("cpu"))
    torch.testing.assert_close(got, term * mask)


def test_a_safe_merge_of_a_non_finite_lora_bias_names_the_merged_bias():
    model = Wrap(nn.Linear(6, 5))
    la.inject(model, la.LoRAConfig(r=2, lora_bias=True, target_modules=["layer"]))
    layer = model.layer.adapter["default"]
    with torch.no_grad():
        layer.lora_B_bias.fill_(float("inf"))
    before = model.layer.bias.detach().clone()
    with pytest.raises(la.MergeError, match=r"^merge of 'layer' refused: merged bias has 5 non-finite values"):
        la.merge(model, safe=True)
    assert torch.equal(model.layer.bias, before)


def test_lokr_factors_are_made_on_the_base_s_device():
    """A model built on the meta device (as Lightning's empty init builds it) gets its LoKr factors on meta too."""
    with torch.device("meta"):
        model = Wrap(nn.Linear(16, 16))
    la.inject(model, la.LoKrConfig(r=2, target_modules=["layer"]))
    params = dict(model.layer.adapter["default"].named_parameters())
    assert params and all(p.is_meta for p in params.values()), {n: p.device for n, p in params.items()}


@pytest.mark.parametrize("peft_type", ["OFT", "BOFT"])
def test_oft_family_files_say_fan_in_fan_out_false_as_peft_writes_them(peft_type):
    """The layers are in ``nn.Linear``'s layout; PEFT warns when a file's ``fan_in_fan_out`` says otherwise."""
    from lightning_adapters.registry import get_method_by_peft_type

    config = (
        la.OFTConfig(oft_block_size=4, target_modules=["q"])
        if peft_type == "OFT"
        else la.BOFTConfig(boft_block_size=4, target_modules=["q"])
    )
    fields = get_method_by_peft_type(peft_type).config_to_peft(config)
    assert fields["fan_in_fan_out"] is False
