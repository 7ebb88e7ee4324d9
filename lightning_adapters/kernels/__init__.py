"""Performance kernels of the adapter methods: the fast forms of their formulas, each equal to the plain one.

A method file keeps its config, its maths, a reference forward and one dispatch call into these modules; a kernel
knows nothing of configs or layers beyond the base module it multiplies with. Each module states its dispatch
thresholds, and ``tests/kernels`` checks outputs and every gradient against plain autograd of the formula on both
sides of them.

- ``lowrank``: ``x Wᵀ + b + s·(x_d Aᵀ) Bᵀ`` as one autograd Function (LoRA, AdaLoRA): folded ``W + s·B·A``,
  ``[W + s·B·A | s·B]`` backward, thin-side-first rank-r products split over two row halves.
- ``dora``: DoRA's ``f ⊙ (x (W + s·B·A)ᵀ) + b`` (``f = m / ‖W + s·B·A‖``, norm detached) as one autograd Function:
  one product by the folded weight, ``diag(f)[W + s·B·A | s·B]`` backward, ``∂m`` from the saved unscaled output.
- ``folded``: ``op(x, W + ΔW(factors))`` as one product for Linear/Conv1D/Conv1d/Conv2d, ``W + ΔW`` rebuilt in
  backward (LoHa, LoKr), and PEFT's two-product form for an adapter in another dtype.
- ``kronecker``: ``(w1 ⊗ w2) x`` through ``w1 · X · w2ᵀ`` without forming ``ΔW`` (LoKr on Linear/Conv1D).
- ``hadamard``: ``(w1a·w1b) ⊙ (w2a·w2b)`` as one rank-``r²`` Khatri-Rao product (LoHa on Linear/Conv1D).
- ``rotation``: the batched Cayley inverse and block-diagonal rotation chains in any feature layout, and
  ``F.linear(x·R, W)`` rotating whichever of ``x`` and ``W`` is smaller (OFT, BOFT).
- ``quantized``: the low-rank layer on a quantized base (QLoRA: LoRA, AdaLoRA) and DoRA's (``dora``'s maths), ``W``
  dequantized in forward and again in backward, never kept between them, with ``s·B·A`` folded into the fresh
  dequantized weight.
"""
