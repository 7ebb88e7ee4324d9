"""Per-sample routing (``la.per_sample``) for every per-layer method and layer kind of the contract suite.

Truth: the same model run one row at a time with that row's adapter active (``"__base__"`` rows with every adapter
disabled). Outputs and the gradients of a loss linear in the output (adapter tensors of both adapters and the
input) must agree, on both of the forward's paths (additive layers with low-rank terms: one base pass plus per-group
terms; others, LoHa and LoKr included: one pass per group).
"""

from __future__ import annotations

import pytest
import torch

import lightning_adapters as la
from tests.contract.test_contract import _build
from tests.contract.test_named import CASES, _randomize
from tests.helpers import ContractCase, tiny_llama

PARAMS = [pytest.param(c, id=c.id) for c in CASES]


def _names(batch: int) -> list[str]:
    # Rows out of order, every name used, and the base where the batch is large enough.
    pattern = ["b", "a", "__base__", "b", "a"] if batch >= 3 else ["b", "a"]
    return [pattern[i % len(pattern)] for i in range(batch)]


def _two(case: ContractCase, second: ContractCase | None = None) -> tuple[torch.nn.Module, torch.Tensor]:
    model, x = _build(case)
    la.inject(model, case.make_config(["layer"]), name="a")
    la.inject(model, (second or case).make_config(["layer"]), name="b")
    _randomize(model, "a", 1)
    _randomize(model, "b", 2)
    la.set_trainable(model, ["a", "b"])
    return model, x


def _loss_grads(model: torch.nn.Module, y: torch.Tensor, x: torch.Tensor) -> dict[str, torch.Tensor]:
    g = torch.linspace(-1, 1, y.numel()).reshape(y.shape).to(y.dtype)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    inputs = list(params.values()) + ([x] if x.requires_grad else [])
    grads = torch.autograd.grad((y * g).sum(), inputs, allow_unused=True)
    out = dict(zip(list(params) + (["input"] if x.requires_grad else []), grads))
    return {k: (v if v is not None else torch.zeros_like(dict(params, input=x)[k])) for k, v in out.items()}


def _row_by_row(model: torch.nn.Module, x: torch.Tensor, names: list[str]) -> torch.Tensor:
    outs = []
    for i, name in enumerate(names):
        if name == "__base__":
            with la.disabled(model):
                outs.append(model(x[i : i + 1]))
        else:
            la.set_active(model, name)
            outs.append(model(x[i : i + 1]))
    la.set_active(model, "a")
    return torch.cat(outs)


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    # Float32 sums in another order (one batched pass vs one row at a time): relative to the tensor's scale.
    err = (got - want).abs().max().item() if got.numel() else 0.0
    assert err <= 1e-5 * (1.0 + want.abs().max().item()), f"{what}: max error {err}"


def _check(model: torch.nn.Module, x: torch.Tensor, names: list[str]) -> None:
    if x.is_floating_point():
        x = x.clone().requires_grad_(True)
    with la.per_sample(model, names):
        y = model(x)
    assert la.active(model) == ["a"]
    want = _row_by_row(model, x, names)
    assert y.shape == want.shape
    _close(y, want, "output")
    grads, want_grads = _loss_grads(model, y, x), _loss_grads(model, want, x)
    assert grads.keys() == want_grads.keys()
    assert any(".a." in k for k in grads) and any(".b." in k for k in grads)
    for k, gr in grads.items():
        _close(gr, want_grads[k], k)


@pytest.mark.parametrize("case", PARAMS)
def test_per_sample_equals_row_by_row(case: ContractCase) -> None:
    model, x = _two(case)
    _check(model, x, _names(x.shape[0]))


def test_per_sample_mixes_a_rotation_and_an_additive_method_on_one_module() -> None:
    # OFT on one adapter and LoRA on the other: the module takes the per-group path, and a LoRA row keeps its scale.
    lora = next(c for c in CASES if c.id.startswith("lora-plain-linear"))
    oft = next(c for c in CASES if c.id.startswith("oft-") and c.layer == "linear")
    model, x = _two(lora, second=oft)
    _check(model, x, ["b", "a", "__base__"])
    la.set_scale(model, "a", 0.5)
    _check(model, x, ["a", "__base__", "b"])


def test_per_sample_scaled_additive_adapters() -> None:
    loha = next(c for c in CASES if c.id.startswith("loha-") and c.layer == "linear")
    model, x = _two(loha)
    la.set_scale(model, "b", 0.25)
    _check(model, x, ["b", "a", "b"])


def test_per_sample_scaled_low_rank_adapters_on_the_one_base_pass() -> None:
    lora = next(c for c in CASES if c.id.startswith("lora-plain-linear"))
    model, x = _two(lora)
    la.set_scale(model, "b", 0.25)
    _check(model, x, ["b", "a", "b"])


@pytest.mark.parametrize(
    ("second", "one_base_pass"),
    [("lora-plain-linear", True), ("adalora-", True), ("loha-", False), ("lokr-", False), ("oft-", False)],
)
def test_per_sample_runs_the_base_once_only_for_low_rank_terms(
    second: str, one_base_pass: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A dense term (LoHa's and LoKr's weight-sized ΔW applied to the rows) would cost a second base matmul: those
    # modules fold W + ΔW per group instead. Counted on the adapted module's own base forward.
    lora = next(c for c in CASES if c.id.startswith("lora-plain-linear"))
    other = next(c for c in CASES if c.id.startswith(second) and c.layer == "linear")
    model, x = _two(lora, second=other)
    layer = model.layer
    calls = []
    base_forward = layer._la_base_forward
    monkeypatch.setattr(layer, "_la_base_forward", lambda *a, **k: calls.append(a[0].shape[0]) or base_forward(*a, **k))
    with la.per_sample(model, ["b", "a", "__base__", "a"]):
        y = model(x[:4] if x.shape[0] >= 4 else x.repeat(4, *[1] * (x.dim() - 1))[:4])
    assert y.shape[0] == 4
    if one_base_pass:
        assert calls == [4]
    else:
        # The base rows alone, and no pass over the whole batch.
        assert 4 not in calls and 1 in calls
    _check(model, x, _names(x.shape[0]))


def test_per_sample_rows_for_an_adapter_missing_on_a_module_get_the_base_output() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    la.inject(model, la.LoRAConfig(r=2, target_modules=["0", "2"], init_weights=False), name="a")
    la.inject(model, la.LoKrConfig(r=2, target_modules=["2"], init_weights=False), name="b")
    la.set_trainable(model, ["a", "b"])
    _check(model, torch.randn(4, 6), ["a", "b", "__base__", "b"])


def test_generate_inside_per_sample_equals_each_row_alone() -> None:
    model = tiny_llama().eval()
    la.inject(model, la.LoRAConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False), name="a")
    la.inject(model, la.LoHaConfig(r=2, target_modules=["q_proj", "o_proj"], init_weights=False), name="b")
    _randomize(model, "a", 3)
    _randomize(model, "b", 4)
    ids = torch.randint(0, model.config.vocab_size, (3, 5), generator=torch.Generator().manual_seed(0))
    names = ["b", "__base__", "a"]
    # min_new_tokens: no row stops early at EOS (the batch would pad it, a lone row would not).
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with la.per_sample(model, names):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    for i, name in enumerate(names):
        row = ids[i : i + 1]
        if name == "__base__":
            with la.disabled(model):
                want = model.generate(row, attention_mask=torch.ones_like(row), **kw)
        else:
            la.set_active(model, name)
            want = model.generate(row, attention_mask=torch.ones_like(row), **kw)
        assert torch.equal(out[i : i + 1], want), name
    # The adapters really differ on these prompts, so the comparison above is not vacuous.
    la.set_active(model, "a")
    a_out = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    assert not torch.equal(a_out, out)


def test_per_sample_refusals_leave_the_model_unrouted() -> None:
    model = tiny_llama()
    la.inject(model, la.LoRAConfig(r=2, target_modules=["q_proj"]), name="a")
    la.inject(model, la.LoRAConfig(r=2, target_modules=["q_proj"]), name="b")
    ids = torch.randint(0, 50, (2, 4))
    with pytest.raises(la.AdapterStateError, match=r"first dimension is not the 3 rows routed"):
        with la.per_sample(model, ["a", "b", "a"]):
            model(ids)
    with la.per_sample(model, ["a", "b"]):
        with pytest.raises(la.AdapterStateError, match="already routed per sample"):
            with la.per_sample(model, ["a", "b"]):
                pass
        model(ids)
    assert all(getattr(m, "routing", None) is None for m in model.modules())
