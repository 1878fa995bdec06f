"""The per-GPU memory plan of an LLM run (``grpo_llm.py --plan-gpus 8``, ``reval_llm.py --preset paper-7b
--plan-gpus 8``): read before renting GPUs. The model is built on the meta device (no weights are loaded), so the
parameter counts are exact; the rest is the formula below, checked against peaks measured on a CPU
(``benchmarks/llm_memory.py``, docs/results.md).

Per GPU, with P parameters, W ranks (sharded states divide by W under FSDP) and a micro-batch of B sequences of
S = prompt + completion tokens:

persistent   fp32 master weights 4P, AdamW's two moments 8P, a frozen reference model 4P (when the algorithm uses
             one), DDP's gradient buckets 4P (DDP on several ranks only)
training     fp32 gradients 4P; the bf16 working copy of the weights (autocast's cache 2P without FSDP; under FSDP
             two gathered layers plus the embeddings and LM head, kept gathered by the root); activations kept for the
             backward, per token and decoder layer a*h + b*I + c*kv_dim + d*heads bytes (counted with
             saved_tensors_hooks on Qwen2: fp32 a,b,c,d = 32,16,8,4; bf16 autocast 30,8,4,4) or, with gradient
             checkpointing, each layer's input (4h) plus one layer recomputed; the loss's logits, LOGIT_COPIES fp32
             copies of [B, S, V] at its peak (the logits, the log-softmax of the completion's part, the entropy's
             temporaries; then their gradients)
generation   the gathered weights (FSDP: the whole model, bf16 with --bf16), the KV cache 2 * layers * kv_dim elements
             per token (2 bytes in bf16, 4 in fp32) for every sequence of the largest generate call, one layer's
             keys and values repeated for every query head (transformers' repeat_kv for grouped-query attention)
             and copied as the cache grows (2 * (h + kv_dim) per token), and two fp32 [sequences, V] logits

With ``--rollout-engine vllm`` the training process generates nothing: a colocated vLLM engine per GPU holds
``--vllm-gpu-memory-utilization`` u of the GPU (G bytes) while it generates, for its weights in the compute dtype
(w*P), the KV cache of the round's sequences (2 * layers * kv_dim * w per token) and its own buffers; it sleeps
during the update (its weights go to host memory, its KV cache is freed), and a weight sync gathers one parameter at
a time. Then generation = u * G (what vLLM reserves), and the engine's own needs must fit in it.

peak = persistent + max(training, generation). Not counted: the CUDA context and NCCL buffers (~1-3 GB per GPU),
allocator fragmentation (~5-10 %), and rank 0's host memory for a checkpoint (the full fp32 weights and AdamW state,
16P bytes).
"""

from __future__ import annotations

import math

LOGIT_COPIES = 3  # fp32 [B, S, V] tensors alive at the loss's peak (2.9 measured on a CPU: benchmarks/llm_memory.py)
GIB = 2 ** 30
GPU_SIZES_GB = (80, 141)  # H100/A100 80 GB and H200 141 GB

# Offline fallback for the paper presets' models (their config.json on the Hugging Face Hub)
KNOWN_CONFIGS = {
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                                                      num_hidden_layers=28, num_attention_heads=12,
                                                      num_key_value_heads=2, tie_word_embeddings=False),
    "Qwen/Qwen2.5-Math-7B": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                 num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
}


def model_config(name: str):
    """The transformers config of ``name``: the built-in model's, the local folder's or the Hub's (cached), else the
    paper models' from KNOWN_CONFIGS."""
    import os

    import transformers

    from utils.common import UserError, hub_offline
    from utils.llm_task import BUILTIN, MODEL_SIZES

    if name == BUILTIN:
        h, layers, heads, kv, ffn = MODEL_SIZES["s"]
        return transformers.Qwen2Config(vocab_size=512, hidden_size=h, num_hidden_layers=layers,
                                        num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=ffn,
                                        tie_word_embeddings=True)
    try:
        return transformers.AutoConfig.from_pretrained(name, local_files_only=os.path.isdir(name) or hub_offline())
    except Exception:  # noqa: BLE001 (offline, or no such model)
        if name in KNOWN_CONFIGS:
            return transformers.Qwen2Config(**KNOWN_CONFIGS[name])
        raise UserError(f"--plan-gpus: cannot read the config of model {name!r} (offline? give a local folder)"
                        ) from None


def model_shape(cfg) -> dict:
    """Parameter counts from the model built on the meta device (no memory), and the shapes the formula needs."""
    import torch
    import transformers

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    n = sum(p.numel() for p in model.parameters())
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or h // heads
    L = cfg.num_hidden_layers
    return dict(params=n, layer_params=layer, root_params=n - layer * L, layers=L, hidden=h,
                ffn=cfg.intermediate_size, heads=heads, kv_dim=cfg.num_key_value_heads * head_dim,
                vocab=cfg.vocab_size)


def memory_plan(shape: dict, world: int, fsdp: bool, bf16: bool, gradient_checkpointing: bool, use_ref: bool,
                micro_batch: int, seq_tokens: int, gen_sequences: int, materialized_attention: bool = False,
                engine_bytes: float = None) -> dict:
    """Bytes per GPU by item (see the module docstring), grouped into persistent / training / generation, and the
    peak. ``seq_tokens``: prompt + completion tokens of the longest sequence; ``gen_sequences``: sequences of the
    largest generate call on one rank. ``materialized_attention``: one layer's fp32 attention scores [B, heads, S,
    S] exist at a time, as in PyTorch's CPU attention with a padding mask (CUDA's fused kernels never form them).
    ``engine_bytes``: the vLLM engine's reservation (--rollout-engine vllm), None for HF generate."""
    P, s = shape["params"], world if fsdp else 1
    L, h, ffn, kvd, heads, V = (shape[k] for k in ("layers", "hidden", "ffn", "kv_dim", "heads", "vocab"))
    w = 2 if bf16 else 4  # bytes of a compute-precision weight or cache element
    persistent = {"master weights (fp32)": 4 * P / s, "AdamW moments (fp32)": 8 * P / s}
    if use_ref:
        persistent["reference model (fp32, frozen)"] = 4 * P / s
    if world > 1 and not fsdp:
        persistent["DDP gradient buckets"] = 4 * P
    tokens = micro_batch * seq_tokens
    a, b, c, d = (30, 8, 4, 4) if bf16 else (32, 16, 8, 4)
    per_layer = tokens * (a * h + b * ffn + c * kvd + d * heads)
    if gradient_checkpointing:
        acts = tokens * 4 * h * L + per_layer
    else:
        acts = per_layer * L
    if fsdp:
        working = w * (2 * shape["layer_params"] + shape["root_params"])
    else:
        working = 2 * P if bf16 else 0
    training = {"gradients (fp32)": 4 * P / s, "working weights (bf16 copy / gathered)": working,
                "activations": acts, "loss logits": LOGIT_COPIES * 4 * tokens * V}
    if materialized_attention:
        training["attention scores (one layer)"] = 4 * micro_batch * heads * seq_tokens ** 2
    if engine_bytes is None:  # HF generate in the training process
        generation = {"gathered weights": w * P if fsdp else 0,
                      "KV cache": 2 * L * kvd * w * gen_sequences * seq_tokens,
                      "one layer's K, V per query head + cache copy": 2 * (h + kvd) * w * gen_sequences * seq_tokens,
                      "next-token logits": 2 * 4 * gen_sequences * V}
    else:  # the vLLM engine's reservation; what it must hold within it
        generation = {"vLLM engine (its --vllm-gpu-memory-utilization share)": engine_bytes,
                      "  of which weights (compute dtype)": w * P,
                      "  of which KV cache of the round's sequences": 2 * L * kvd * w * gen_sequences * seq_tokens}
    tot = {k: sum(v for name, v in d.items() if not name.startswith("  ")) for k, d in (
        ("persistent", persistent), ("training", training), ("generation", generation))}
    return {"persistent": persistent, "training": training, "generation": generation, "totals": tot,
            "peak": tot["persistent"] + max(tot["training"], tot["generation"])}


def memory_plan_text(model: str, world: int, fsdp, bf16, gradient_checkpointing: bool, use_ref: bool,
                     micro_batch: int, prompt_tokens: int, new_tokens: int, round_sequences: int,
                     eval_sequences: int, engine: str = "hf", engine_share: float = 0.3) -> str:
    """The plan as a table for ``--plan-gpus``: the flags' defaults as a GPU run resolves them (FSDP on several
    GPUs for a real model, bf16 on). With the vLLM engine, one plan per GPU size (its share depends on it)."""
    if engine == "vllm":
        return "\n\n".join(memory_plan_text(model, world, fsdp, bf16, gradient_checkpointing, use_ref, micro_batch,
                                             prompt_tokens, new_tokens, round_sequences, eval_sequences, f"vllm:{g}",
                                             engine_share) for g in GPU_SIZES_GB)
    from utils.llm_task import BUILTIN

    fsdp = (world > 1 and model != BUILTIN) if fsdp is None else fsdp
    bf16 = True if bf16 is None else bf16
    shape = model_shape(model_config(model))
    train_seqs = math.ceil(round_sequences / world)
    gen = max(train_seqs, eval_sequences)
    gpu_gb = float(engine.split(":")[1]) if engine.startswith("vllm:") else None
    plan = memory_plan(shape, world, fsdp, bf16, gradient_checkpointing, use_ref, micro_batch,
                       prompt_tokens + new_tokens, gen, engine_bytes=gpu_gb and engine_share * gpu_gb * 1e9)
    lines = [f"memory plan per GPU: {model} ({shape['params'] / 1e9:.2f}B parameters) on {world} GPU(s), "
             f"{'FSDP' if fsdp else 'DDP' if world > 1 else 'one device'}, {'bf16' if bf16 else 'fp32'} compute, "
             + (f"vLLM engine with {engine_share:g} of a {gpu_gb:g} GB GPU, " if gpu_gb else "HF generate, ")
             + f"gradient checkpointing {'on' if gradient_checkpointing else 'off'}, micro-batch {micro_batch} x "
             f"{prompt_tokens + new_tokens} tokens, generate calls of {train_seqs} (training) and {eval_sequences} "
             f"(evaluation) sequences"]
    for group in ("persistent", "training", "generation"):
        lines.append(f"  {group:<12}{plan['totals'][group] / GIB:9.1f} GiB")
        lines += [f"    {k:<44}{v / GIB:9.1f} GiB" for k, v in plan[group].items()]
    peak = plan["peak"] / GIB
    sizes = (gpu_gb,) if gpu_gb else GPU_SIZES_GB
    fits = ", ".join(f"{g:g} GB: {'fits' if peak * GIB < 0.9 * g * 1e9 else 'does NOT fit'}" for g in sizes)
    lines.append(f"  peak = persistent + max(training, generation) = {peak:.1f} GiB  ({fits}; 10 % kept for the "
                 f"CUDA context and fragmentation)")
    if gpu_gb:
        g = plan["generation"]
        need = g["  of which weights (compute dtype)"] + g["  of which KV cache of the round's sequences"]
        lines.append(f"  the engine needs {need / GIB:.1f} GiB of its {engine_share * gpu_gb * 1e9 / GIB:.1f} GiB for "
                     f"its weights and one round's KV cache: "
                     + ("enough" if need < 0.9 * engine_share * gpu_gb * 1e9 else
                        "raise --vllm-gpu-memory-utilization (vLLM would generate in several waves)")
                     + f"; asleep during the update, it keeps {g['  of which weights (compute dtype)'] / GIB:.1f} GiB "
                       f"of host memory per GPU")
    if plan["totals"]["training"] > plan["totals"]["generation"] and not gradient_checkpointing:
        lines.append("  hint: --gradient-checkpointing shrinks the activations; a smaller --micro-batch-size shrinks "
                     "activations and logits")
    if plan["totals"]["generation"] > plan["totals"]["training"] and eval_sequences > train_seqs:
        lines.append("  hint: the evaluation's generate calls are the largest: a smaller --eval-batch-size (prompts "
                     "per call) shrinks their KV cache")
    return "\n".join(lines)
