"""``methods.trainable_tokens`` pinned function by function: index validation, the layer (rows, lookups and
gradients written out by hand, merge/unmerge bit for bit, PEFT state, repr) and ``token_layers`` (list and dict
forms, input-embedding discovery, every refusal, tied heads)."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_adapters as la
from lightning_adapters.errors import AdapterConfigError, MergeError, TargetError, UnsupportedLayerError
from lightning_adapters.methods import trainable_tokens as tt

# --- check_indices --------------------------------------------------------------------------------------------


def test_check_indices_accepts_the_two_forms():
    for ok in (None, [0], [3, 1, 2], (0, 5), {"emb": [0, 2]}, {"a.b": (1,), "c": [4]}):
        tt.check_indices(ok, "lora")


@pytest.mark.parametrize(
    "bad",
    [
        [],
        {},
        (),
        [1, 1],
        [-1],
        [0, -2],
        [True],
        [1.0],
        ["1"],
        3,
        "1",
        {"emb": []},
        {"": [1]},
        {1: [1]},
        {"emb": [1, 1]},
        {"emb": [0], "x": [-1]},
        {"emb": 3},
    ],
)
def test_check_indices_refuses(bad):
    with pytest.raises(AdapterConfigError) as err:
        tt.check_indices(bad, "somemethod")
    assert str(err.value) == (
        f"somemethod: trainable_token_indices={bad!r} must be a non-empty list of distinct token ids >= 0 (rows "
        "of the model's input embedding) or {module name: such a list}, e.g. [32000, 32001] or "
        "{'embed_tokens': [32000]}"
    )


# --- the layer ----------------------------------------------------------------------------------------------


def _emb(**kw) -> nn.Embedding:
    torch.manual_seed(0)
    return nn.Embedding(6, 3, **kw)


def test_layer_state_at_build():
    emb = _emb()
    layer = tt.TrainableTokensLayer(emb, [4, 1], "model.emb")
    assert layer.name == "model.emb" and layer.tied is False and layer.merged is False and layer.merge_rows is None
    assert layer.indices.dtype == torch.long and layer.indices.tolist() == [4, 1]
    assert isinstance(layer.delta, nn.Parameter) and layer.delta.requires_grad
    assert torch.equal(layer.delta.detach(), emb.weight.detach()[[4, 1]])
    assert layer.delta.data_ptr() != emb.weight.data_ptr()
    with torch.no_grad():
        layer.delta.add_(1.0)
    assert torch.equal(emb.weight.detach()[[4, 1]] + 1.0, layer.delta.detach())  # a copy, not a view
    assert dict(layer.named_buffers()).keys() == {"indices"}
    assert list(layer.state_dict()) == ["delta"]  # the indices are not saved
    assert layer.extra_repr() == "tokens=[4, 1], merged=False"
    assert layer.peft_state().keys() == {"token_adapter.trainable_tokens_delta"}
    assert tt.PEFT_SUFFIX == "token_adapter.trainable_tokens_delta"
    head = nn.Linear(3, 6)
    tied = tt.TrainableTokensLayer(head, [4, 1], "lm_head", delta=layer.delta)
    assert tied.tied is True and tied.delta is layer.delta and tied.name == "lm_head"
    assert tied.extra_repr() == "tokens=[4, 1], tied to the input embedding, merged=False"
    assert tied.peft_state() == {}


def test_layer_keeps_its_indices_on_the_base_device():
    with torch.device("meta"):  # a default-device context does not move the index buffer
        layer = tt.TrainableTokensLayer(nn.Embedding(6, 3, device="cpu"), [1, 4], "e")
    assert layer.indices.device.type == "cpu" and layer.delta.device.type == "cpu"
    assert layer.indices.tolist() == [1, 4]


def test_layer_refuses_rows_out_of_range():
    tt.TrainableTokensLayer(_emb(), [5, 0], "e")  # the last row is fine
    with pytest.raises(AdapterConfigError) as err:
        tt.TrainableTokensLayer(_emb(), [2, 6, 9], "model.e")
    assert str(err.value) == (
        "lora: trainable_token_indices [6, 9] are out of range for 'model.e', which has 6 rows; resize the "
        "embedding first (model.resize_token_embeddings) or use ids below the vocabulary size"
    )


def _replaced(weight: torch.Tensor, idx: list[int], rows: torch.Tensor) -> torch.Tensor:
    w = weight.detach().clone()
    w[idx] = rows.to(w.dtype)
    return w


def test_embedding_lookup_and_gradients_by_hand():
    emb = _emb(padding_idx=2, scale_grad_by_freq=True)
    emb.weight.requires_grad_(False)
    layer = tt.TrainableTokensLayer(emb, [2, 4, 0], "e")
    with torch.no_grad():
        layer.delta.copy_(torch.arange(9, dtype=torch.float32).reshape(3, 3))
    x = torch.tensor([[4, 4, 2, 1], [0, 4, 5, 2]])
    out = layer.adapted_forward(emb, x)
    expected_w = _replaced(emb.weight, [2, 4, 0], layer.delta.detach())
    assert torch.equal(out, expected_w[x])
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * g).sum().backward()
    # Gradient of row r: sum of g over its occurrences / count (scale_grad_by_freq); padding row gets none.
    expected = torch.zeros(3, 3)
    for j, r in enumerate([2, 4, 0]):
        mask = x == r
        if r != 2 and mask.any():
            expected[j] = g[mask].sum(0) / mask.sum()
    torch.testing.assert_close(layer.delta.grad, expected)
    assert emb.weight.grad is None


def test_embedding_lookup_keeps_max_norm_and_norm_type():
    emb = _emb(max_norm=0.5, norm_type=1.0)
    layer = tt.TrainableTokensLayer(emb, [1], "e")
    with torch.no_grad():
        layer.delta.fill_(2.0)
    x = torch.tensor([1, 3, 1])
    expected_w = _replaced(emb.weight, [1], layer.delta.detach())
    expected = F.embedding(x, expected_w.clone(), max_norm=0.5, norm_type=1.0)
    out = layer.adapted_forward(emb, x)
    torch.testing.assert_close(out, expected)
    assert torch.allclose(out[0].abs().sum(), torch.tensor(0.5), atol=1e-6)  # L1 norm clipped to max_norm


def test_tied_linear_head_and_dtype_cast():
    torch.manual_seed(0)
    head = nn.Linear(3, 6, bias=True).double()
    delta = nn.Parameter(torch.tensor([[1.0, 2.0, 3.0]]))  # fp32 rows on an fp64 head
    layer = tt.TrainableTokensLayer(head, [5], "head", delta=delta)
    x = torch.randn(2, 3, dtype=torch.float64)
    out = layer.adapted_forward(head, x)
    w = _replaced(head.weight, [5], delta.detach())
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, x @ w.t() + head.bias.detach())
    out.sum().backward()
    torch.testing.assert_close(delta.grad, x.sum(0, keepdim=True).float())


def test_merge_unmerge_round_trip_and_safe():
    emb = _emb()
    before = emb.weight.detach().clone()
    layer = tt.TrainableTokensLayer(emb, [3, 0], "e")
    with torch.no_grad():
        layer.delta.copy_(torch.full((2, 3), 7.0))
    layer.unmerge(emb)  # nothing merged: nothing changes
    assert torch.equal(emb.weight, before) and layer.merged is False
    layer.merge(emb)
    assert layer.merged is True
    assert torch.equal(layer.merge_rows, before[[3, 0]])
    assert torch.equal(emb.weight.detach(), _replaced(before, [3, 0], torch.full((2, 3), 7.0)))
    assert layer.extra_repr() == "tokens=[3, 0], merged=True"
    layer.unmerge(emb)
    assert layer.merged is False and layer.merge_rows is None
    assert torch.equal(emb.weight, before)
    # safe=True refuses a non-finite row before writing; the default writes it.
    with torch.no_grad():
        layer.delta[0, 0] = float("nan")
    with pytest.raises(MergeError, match="merged weight has 1 non-finite"):
        layer.merge(emb, safe=True)
    assert torch.equal(emb.weight, before) and layer.merged is False
    layer.merge(emb)
    assert layer.merged is True and torch.isnan(emb.weight[3, 0])
    layer.unmerge(emb)
    assert torch.equal(emb.weight, before)
    layer.merge_rows = torch.zeros(1)
    layer.forget_merge()
    assert layer.merge_rows is None


def test_tied_merge_writes_nothing():
    emb = _emb()
    head = nn.Linear(3, 6, bias=False)
    head.weight = emb.weight
    src = tt.TrainableTokensLayer(emb, [1], "e")
    tied = tt.TrainableTokensLayer(head, [1], "h", delta=src.delta)
    with torch.no_grad():
        src.delta.fill_(3.0)
    before = emb.weight.detach().clone()
    tied.merge(head)
    assert tied.merged is True and tied.merge_rows is None and torch.equal(emb.weight, before)
    src.merge(emb)
    assert torch.equal(emb.weight[1], torch.full((3,), 3.0))
    tied.merge_rows = before[[1]] + 5  # a tied layer never writes back, even holding rows
    tied.unmerge(head)
    assert tied.merged is False and tied.merge_rows is None
    assert torch.equal(emb.weight[1], torch.full((3,), 3.0))
    src.unmerge(emb)
    assert torch.equal(emb.weight, before)


def test_peft_state_round_trip():
    emb = _emb()
    layer = tt.TrainableTokensLayer(emb, [0, 5], "e")
    state = layer.peft_state()
    assert torch.equal(state[tt.PEFT_SUFFIX], layer.delta.detach()) and not state[tt.PEFT_SUFFIX].requires_grad
    new = torch.arange(6, dtype=torch.float64).reshape(2, 3)
    layer.load_peft_state({tt.PEFT_SUFFIX: new})
    assert layer.delta.dtype == torch.float32 and torch.equal(layer.delta.detach(), new.float())
    layer.load_peft_state({"other": torch.zeros(2, 3)})  # no key of its own: unchanged
    assert torch.equal(layer.delta.detach(), new.float())
    layer.apply_dtype(torch.float16)  # rows keep the base dtype
    assert layer.delta.dtype == torch.float32


# --- token_layers -------------------------------------------------------------------------------------------------


class _LM(nn.Module):
    def __init__(self, tied: bool = False, get_in=None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Module()
        self.body.embed_tokens = nn.Embedding(10, 4)
        self.body.proj = nn.Linear(4, 4)
        self.lm_head = nn.Linear(4, 10, bias=False)
        if tied:
            self.lm_head.weight = self.body.embed_tokens.weight
        if get_in is not None:
            self.get_input_embeddings = get_in


def _cfg(spec, modules_to_save=None):
    return types.SimpleNamespace(trainable_token_indices=spec, modules_to_save=modules_to_save)


def test_token_layers_list_form_finds_the_input_embedding():
    assert tt.token_layers(_LM(), _cfg(None), []) == {}
    model = _LM()
    layers = tt.token_layers(model, _cfg([7, 2]), ["body.proj"])
    assert list(layers) == ["body.embed_tokens"]
    layer = layers["body.embed_tokens"]
    assert layer.name == "body.embed_tokens" and layer.indices.tolist() == [7, 2] and not layer.tied
    assert torch.equal(layer.delta.detach(), model.body.embed_tokens.weight.detach()[[7, 2]])
    # get_input_embeddings names the module, whatever its name
    other = _LM()
    other.body.add_module("tok", nn.Embedding(10, 4))
    other.get_input_embeddings = lambda: other.body.tok
    assert list(tt.token_layers(other, _cfg((1,)), [])) == ["body.tok"]
    for exc in (AttributeError, NotImplementedError):  # a failing getter falls back to the name

        def fail(exc=exc):
            raise exc

        model = _LM(get_in=fail)
        model.body.add_module("tok", nn.Embedding(10, 4))
        assert list(tt.token_layers(model, _cfg([1]), [])) == ["body.embed_tokens"]


def test_token_layers_list_form_needs_exactly_one_input_embedding():
    model = _LM()
    del model.body.embed_tokens
    with pytest.raises(TargetError) as err:
        tt.token_layers(model, _cfg([1]), [])
    assert str(err.value) == (
        "lora: trainable_token_indices is a list, which targets the model's input embedding, but none was found; "
        "give {embedding module name: indices} instead"
    )
    model = _LM()
    model.add_module("embed_tokens", nn.Embedding(10, 4))
    with pytest.raises(TargetError, match=r"but \['body.embed_tokens', 'embed_tokens'\] was found; give"):
        tt.token_layers(model, _cfg([1]), [])


def test_token_layers_dict_form_and_its_refusals():
    model = _LM()
    model.add_module("pos", nn.Embedding(8, 4))
    layers = tt.token_layers(model, _cfg({"embed_tokens": [1, 0], "pos": (7,)}), [])
    assert list(layers) == ["body.embed_tokens", "pos"]
    assert layers["pos"].indices.tolist() == [7] and layers["body.embed_tokens"].indices.tolist() == [1, 0]
    with pytest.raises(TargetError) as err:
        tt.token_layers(_LM(), _cfg({"nothing": [1]}), [])
    assert str(err.value) == (
        "lora: trainable_token_indices key 'nothing' matches 0 modules []; name exactly one embedding module"
    )
    with pytest.raises(TargetError, match=r"key '' matches 0 modules \[\]"):
        tt.token_layers(_LM(), _cfg({"": [1]}), [])
    twice = _LM()
    twice.add_module("x", nn.Module())
    twice.x.add_module("embed_tokens", nn.Embedding(10, 4))
    with pytest.raises(TargetError, match=r"key 'embed_tokens' matches 2 modules \['body.embed_tokens', 'x.embed"):
        tt.token_layers(twice, _cfg({"embed_tokens": [1]}), [])
    with pytest.raises(UnsupportedLayerError) as err:
        tt.token_layers(_LM(), _cfg({"proj": [1]}), [])
    assert str(err.value) == (
        "lora: trainable_token_indices names 'body.proj', a Linear; only nn.Embedding rows can be trained this "
        "way (name the input embedding, e.g. 'embed_tokens')"
    )
    with pytest.raises(TargetError) as err:
        tt.token_layers(_LM(), _cfg([1]), ["body.proj", "body.embed_tokens"])
    assert str(err.value) == (
        "lora: 'body.embed_tokens' is in trainable_token_indices and also in target_modules; choose one way to train it"
    )
    with pytest.raises(TargetError, match=r"'body.embed_tokens' is in trainable_token_indices and also in modu"):
        tt.token_layers(_LM(), _cfg([1], ["d_tokens"]), [])  # PEFT's suffix rule for modules_to_save
    assert list(tt.token_layers(_LM(), _cfg([1], ["lm_head"]), ["embed"])) == ["body.embed_tokens"]


def test_token_layers_refuses_an_embedding_that_is_not_plain():
    class Scaled(nn.Embedding):
        def forward(self, x):
            return super().forward(x) * 2.0

    model = _LM()
    model.body.embed_tokens = Scaled(10, 4)
    with pytest.raises(UnsupportedLayerError, match=r"^lora: 'body.embed_tokens' is a Scaled, a subclass of"):
        tt.token_layers(model, _cfg([1]), [])
    model = _LM()
    model.body.embed_tokens.max_norm = 1.0
    with pytest.raises(UnsupportedLayerError, match=r"^lora: 'body.embed_tokens' is an nn.Embedding with max_no"):
        tt.token_layers(model, _cfg([1]), [])

    class Plain(nn.Embedding):
        pass

    model = _LM()
    model.body.embed_tokens = Plain(10, 4)
    assert list(tt.token_layers(model, _cfg([3]), [])) == ["body.embed_tokens"]


def test_token_layers_tied_heads():
    model = _LM(tied=True)
    layers = tt.token_layers(model, _cfg([3, 9]), ["body.proj"])
    assert list(layers) == ["body.embed_tokens", "lm_head"]
    head = layers["lm_head"]
    assert head.tied and head.name == "lm_head" and head.delta is layers["body.embed_tokens"].delta
    assert head.indices.tolist() == [3, 9]
    with pytest.raises(TargetError) as err:
        tt.token_layers(_LM(tied=True), _cfg([3]), ["lm_head"])
    assert str(err.value) == (
        "lora: 'lm_head' shares its weight with 'body.embed_tokens' (tied embeddings); it cannot also be a LoRA "
        "target or carry its own trainable_token_indices"
    )
    # Two embeddings sharing the head's weight: the head cannot read two sets of rows.
    shared = _LM(tied=True)
    shared.add_module("emb2", nn.Embedding(10, 4))
    shared.emb2.weight = shared.lm_head.weight
    with pytest.raises(TargetError, match="'lm_head' shares its weight with 'emb2'"):
        tt.token_layers(shared, _cfg({"embed_tokens": [1], "emb2": [2]}), [])
    # An untied head (same shape, own weight) is left alone.
    assert list(tt.token_layers(_LM(), _cfg([3]), [])) == ["body.embed_tokens"]


def test_token_layers_never_takes_the_root_as_a_head():
    root = nn.Linear(4, 10, bias=False)
    root.add_module("embed_tokens", nn.Embedding(10, 4))
    root.embed_tokens.weight = root.weight
    root.add_module("head", nn.Linear(4, 10, bias=False))
    root.head.weight = root.weight
    layers = tt.token_layers(root, _cfg({"embed_tokens": [0]}), [])
    assert list(layers) == ["embed_tokens", "head"]


def test_unmerge_after_a_dtype_cast_restores_in_the_new_dtype():
    emb = _emb()
    before = emb.weight.detach().clone()
    layer = tt.TrainableTokensLayer(emb, [2], "e")
    with torch.no_grad():
        layer.delta.fill_(5.0)
    layer.merge(emb)
    emb.double()  # the model is cast while merged
    layer.unmerge(emb)
    assert emb.weight.dtype == torch.float64 and torch.equal(emb.weight, before.double())


def test_an_empty_index_list_is_a_no_op_layer():
    emb = _emb()
    layer = tt.TrainableTokensLayer(emb, [], "e")
    assert layer.indices.dtype == torch.long and layer.delta.shape == (0, 3)
    x = torch.tensor([0, 5, 2])
    assert torch.equal(layer.adapted_forward(emb, x), emb(x))


def test_sparse_embedding_trains_its_tokens_like_a_dense_one():
    """``sparse=True``: the same outputs and ``delta`` gradients as the dense twin (backward used to fail)."""
    outs, grads = [], []
    for sparse in (False, True):
        torch.manual_seed(0)
        m = nn.Module()
        m.embed_tokens = nn.Embedding(10, 4, sparse=sparse)
        m.q = nn.Linear(4, 4)
        m.forward = lambda ids, m=m: m.q(m.embed_tokens(ids))
        la.inject(m, la.LoRAConfig(r=2, target_modules=["q"], trainable_token_indices=[1, 2]))
        out = m(torch.tensor([1, 2, 3, 2]))
        (out * torch.arange(16.0).view(4, 4)).sum().backward()
        delta = next(p for n, p in m.named_parameters() if "delta" in n)
        outs.append(out.detach())
        grads.append(delta.grad.clone())
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)
    assert grads[1].abs().sum() > 0 and not grads[1].is_sparse
