"""Rollout speed of the scripts' generation path (``generate()`` in grpo_llm.py / reval_llm.py: Hugging Face
``generate`` with the KV cache, sampling with top_k=0, top_p=1) on this CPU, and what it implies for the paper
presets on GPUs (computed below, not measured: no GPU here).

Measured: random-weight Qwen2 models of the built-in model's shape and of ~50M parameters; every sequence is forced to
its full length (min_new_tokens), so tokens/s counts real decode steps. The per-step time at batch 1 of the 4-layer
built-in shape is almost all fixed cost per decoder layer (Python, dispatch, small kernels): ``overhead_ms_per_layer``
below, which the GPU estimate takes as the host-side floor of one decode step.

    python benchmarks/llm_generation.py     # ~2 minutes; writes benchmarks/results/llm_generation.json
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from benchmarks.llm_memory import BUILTIN, QWEN_50M  # noqa: E402

# (preset, parameters, layers, kv bytes per token (bf16), sequences per rank on 8 GPUs, prompt, new tokens)
PAPER = {"paper-1.5b": (1.78e9, 28, 2 * 28 * 256 * 2, 128 * 8 // 8, 1024, 7168),
         "paper-7b": (7.62e9, 28, 2 * 28 * 512 * 2, 128 * 8 // 8, 1024, 3072)}
GPU_BANDWIDTH = {"H100 SXM": 3.35e12, "H200": 4.8e12}  # bytes/s, vendor figures
BF16_FLOPS, MFU = 989e12, 0.4  # dense bf16 peak of both (vendor figure), and an assumed 40 % of it for the updates
PROMPT_TOKENS, MEAN_COMPLETION = 200, 0.5  # assumed: a DeepScaleR prompt with its template; completions at half the cap


def time_generate(cfg: dict, batch: int, prompt: int, new: int, repeats: int = 3) -> float:
    """Median seconds of one generate call of ``batch`` sequences, ``new`` tokens each."""
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(max_position_embeddings=4096, **cfg)).eval()
    ids = torch.randint(2, cfg["vocab_size"], (batch, prompt))
    times = []
    for _ in range(repeats + 1):  # the first call warms up
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0, top_p=1.0,
                           temperature=1.0, max_new_tokens=new, min_new_tokens=new, pad_token_id=0, eos_token_id=1)
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def gpu_round_estimate(overhead_ms_per_layer: float) -> dict:
    """Seconds of one paper-preset round per rank (8 GPUs, HF generate, bf16). Generation: the round lasts as long
    as its longest completion (the cap, ``new`` steps); every decode step reads the weights and the KV cache once
    (memory-bound) and costs at least the host-side floor measured here. Updates (ReVal, K = 2, gradient
    checkpointing): 2 x (forward + backward + recomputed forward = 8 P FLOPs per token) + the reference's forward
    (2 P) = 18 P FLOPs per token at MFU x the bf16 peak."""
    out = {}
    for name, (params, layers, kv_tok, seqs, prompt, new) in PAPER.items():
        floor = overhead_ms_per_layer * layers / 1e3
        for gpu, bw in GPU_BANDWIDTH.items():
            mean_ctx = prompt + new / 2
            step = max(floor, (2 * params + kv_tok * seqs * mean_ctx) / bw)
            tokens = seqs * (PROMPT_TOKENS + MEAN_COMPLETION * new)
            update = 18 * params * tokens / (MFU * BF16_FLOPS)
            out[f"{name} on {gpu}"] = {"decode_step_s": round(step, 4), "host_floor_s": round(floor, 4),
                                       "memory_bound_step_s": round((2 * params + kv_tok * seqs * mean_ctx) / bw, 4),
                                       "generation_s_per_round": round(step * new), "update_s_per_round": round(update),
                                       "round_s": round(step * new + update),
                                       "hours_for_650_rounds": round((step * new + update) * 650 / 3600, 1),
                                       "sequences_per_rank": seqs, "new_tokens": new}
    return out


def main() -> None:
    import torch

    rows = []
    for name, cfg in (("builtin", BUILTIN), ("qwen2-50m", QWEN_50M)):
        for batch in (1, 32):
            s = time_generate(cfg, batch, 32, 64)
            rows.append({"model": name, "batch": batch, "prompt": 32, "new_tokens": 64, "seconds": round(s, 3),
                         "tokens_per_s": round(batch * 64 / s, 1), "ms_per_step": round(1e3 * s / 64, 2)})
            print(rows[-1], flush=True)
    floor = rows[0]["ms_per_step"] / BUILTIN["num_hidden_layers"]
    est = gpu_round_estimate(floor)
    for k, v in est.items():
        print(k, v)
    out = os.path.join(REPO, "benchmarks", "results", "llm_generation.json")
    with open(out, "w") as f:
        json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows,
                   "overhead_ms_per_layer": round(floor, 3), "gpu_estimate": est}, f, indent=1)
    print(out)


if __name__ == "__main__":
    main()
