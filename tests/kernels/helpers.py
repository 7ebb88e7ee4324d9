"""Kernel-versus-formula check shared by the kernel tests: outputs and every input gradient, in float64."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


def leaf(*shape: int, seed: int, grad: bool = True, scale: float = 1.0) -> torch.Tensor:
    """A float64 leaf of N(0, scale²) values (never zero, so a factor cannot hide a wrong gradient)."""
    return (torch.randn(*shape, dtype=F64, generator=gen(seed)) * scale).requires_grad_(grad)


def assert_kernel_matches(
    kernel: Callable[[], torch.Tensor],
    formula: Callable[[], torch.Tensor],
    inputs: Sequence[torch.Tensor],
    *,
    seed: int = 99,
    rtol: float = 1e-10,
    atol: float = 1e-10,
) -> None:
    """``kernel()`` equals ``formula()`` (plain autograd ops on the same ``inputs``), and so do the gradients of
    every input that requires grad under a random upstream gradient; the others must get none."""
    out = kernel()
    ref = formula()
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol, msg="output")
    wanted = [t for t in inputs if t.requires_grad]
    if not wanted:
        return
    g = torch.randn(ref.shape, dtype=ref.dtype, generator=gen(seed))
    got = torch.autograd.grad(out, wanted, g, allow_unused=True)
    exp = torch.autograd.grad(ref, wanted, g, allow_unused=True)
    for i, (a, b) in enumerate(zip(got, exp)):
        if b is None:
            assert a is None or not bool(a.any()), f"input {i}: the kernel gives a gradient the formula has not"
            continue
        assert a is not None, f"input {i}: the kernel gives no gradient"
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=f"gradient of input {i}")
