"""Llama-Adapter train-step time against PEFT's adaption prompt, alternating in one process.

Decoder of PERFORMANCE.md (Llama-style, hidden 512, 4 layers, 8 heads / 4 KV heads, ffn 1376, vocab 32000,
batch 4×256, fp32), 10 prompt tokens in the top 2 layers. A step is zero_grad + forward + backward + AdamW
over the adapter parameters. Both models start from the same base and the same adapter values; steps
alternate so that drift in machine speed hits both alike. Prints the median times and their ratio.

Run (glibc settings keep freed memory mapped, which removes most page-fault noise on these VMs)::

    MALLOC_TRIM_THRESHOLD_=-1 MALLOC_MMAP_THRESHOLD_=1000000000000 \\
        python -m experiments.benchmarks.llama_adapter_vs_peft --steps 20
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import torch


def _model(quick: bool) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    h, layers, ffn, vocab = (64, 2, 96, 512) if quick else (512, 4, 1376, 32000)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=h,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=ffn,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).train()


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: dict) -> float:
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="toy sizes, for a smoke run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from peft import AdaptionPromptConfig, get_peft_model

    import lightning_adapters as la

    base = _model(args.quick)
    peft = get_peft_model(copy.deepcopy(base), AdaptionPromptConfig(adapter_len=10, adapter_layers=2))
    # A non-zero gate, so the prompt path carries gradient; ours loads the very same adapter.
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if name.endswith("adaption_gate"):
                p.fill_(0.1)
    with tempfile.TemporaryDirectory() as d:
        peft.save_pretrained(d)
        ours = la.load_peft(copy.deepcopy(base), d)
    bsz, seq = (2, 16) if args.quick else (4, 256)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, base.config.vocab_size, (bsz, seq), generator=g)
    batch = {"input_ids": ids, "labels": ids}
    runs = {
        "ours": (ours, torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-3)),
        "peft": (peft, torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-3)),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(args.warmup + args.steps):
        for name, (model, opt) in runs.items():
            t = _step(model, opt, batch)
            if i >= args.warmup:
                times[name].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k}: median {v * 1000:.1f} ms over {args.steps} steps")
    print(f"ratio ours / peft: {med['ours'] / med['peft']:.3f}")


if __name__ == "__main__":
    main()
