"""The memory plan (utils/llm_memory.py) against peaks measured on this CPU.

Each case runs in a fresh process: build a random Qwen2 (fp32), then two GRPO updates (grpo_llm.optimizer_step, the
scripts' own step, AdamW) on a fixed batch of one micro-batch, or one generate call; the measured peak is the
process's peak resident memory (VmHWM) less its resident memory before the model was built. The plan is
memory_plan(world 1, fp32, no FSDP): persistent + training for the same shapes, or the weights + generation for a
generate call (that process builds no optimizer).

    python benchmarks/llm_memory.py            # writes benchmarks/results/llm_memory.json and prints the table
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

BUILTIN = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True)  # utils/llm_task.py, size "s"
QWEN_50M = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=2, vocab_size=32000, tie_word_embeddings=False)
CASES = [  # (name, config, micro-batch, tokens per sequence, checkpointing, phase)
    ("builtin", BUILTIN, 32, 512, False, "train"),
    ("builtin", BUILTIN, 32, 512, True, "train"),
    ("qwen2-50m", QWEN_50M, 4, 512, False, "train"),
    ("qwen2-50m", QWEN_50M, 4, 512, True, "train"),
    ("qwen2-50m", QWEN_50M, 1, 2048, False, "train"),
    ("qwen2-50m", QWEN_50M, 64, 512, False, "generate"),
]


def rss_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def child(cfg: dict, micro_batch: int, seq_tokens: int, checkpointing: bool, phase: str) -> dict:
    """Runs in the fresh process: the measured step and its peak."""
    import torch
    import transformers

    import grpo_llm as g
    from tests.dist_step import fixed_batch

    torch.set_num_threads(1)
    torch.zeros(1) @ torch.zeros(1)  # load the math libraries before the baseline
    base = rss_kib("VmRSS")
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(max_position_embeddings=4096, **cfg))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    prompt = seq_tokens // 4
    if phase == "train":
        model.train()
        batch = fixed_batch(cfg["vocab_size"], reval=False, n=micro_batch, prompt=prompt,
                            completion=seq_tokens - prompt)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        args = g.Args(micro_batch_size=micro_batch, max_new_tokens=seq_tokens - prompt)
        for _ in range(2):
            g.optimizer_step(model, opt, batch, args, 1, lambda: torch.autocast("cpu", enabled=False))
    else:
        model.eval()
        ids = torch.randint(2, cfg["vocab_size"], (micro_batch, prompt))
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0,
                           max_new_tokens=seq_tokens - prompt, min_new_tokens=seq_tokens - prompt, pad_token_id=0)
    return {"measured_gib": (rss_kib("VmHWM") - base) / 2 ** 20}


def measure(cfg: dict, micro_batch: int, seq_tokens: int, checkpointing: bool, phase: str = "train") -> dict:
    """Plan and measured peak (GiB) of one case, the measurement in a fresh process."""
    import transformers

    from utils.llm_memory import memory_plan, model_shape

    code = (f"import json, sys; sys.path.insert(0, {REPO!r}); from benchmarks.llm_memory import child; "
            f"print(json.dumps(child({cfg!r}, {micro_batch}, {seq_tokens}, {checkpointing}, {phase!r})))")
    # a fixed mmap threshold: every large tensor is its own mapping, returned to the system when freed, so the peak
    # resident memory is the peak of live tensors (glibc's adaptive threshold would keep freed blocks up to 32 MB)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-2000:])
    measured = json.loads(p.stdout.strip().splitlines()[-1])["measured_gib"]
    shape = model_shape(transformers.Qwen2Config(**cfg))
    gen = micro_batch if phase == "generate" else 0
    plan = memory_plan(shape, 1, False, False, checkpointing, False, micro_batch, seq_tokens, gen,
                       materialized_attention=phase == "train")
    if phase == "train":
        planned = plan["totals"]["persistent"] + plan["totals"]["training"]
    else:  # the measured process holds the model alone: no optimizer
        planned = plan["persistent"]["master weights (fp32)"] + plan["totals"]["generation"]
    return {"params": shape["params"], "planned_gib": planned / 2 ** 30, "measured_gib": measured,
            "plan": {k: {n: b / 2 ** 30 for n, b in v.items()} for k, v in plan.items() if k != "peak"}}


def main() -> None:
    rows = []
    for name, cfg, mb, seq, ckpt, phase in CASES:
        r = measure(cfg, mb, seq, ckpt, phase)
        r.update(model=name, micro_batch=mb, seq_tokens=seq, checkpointing=ckpt, phase=phase,
                 ratio=r["planned_gib"] / r["measured_gib"])
        rows.append(r)
        print(f"{name:10s} {r['params'] / 1e6:6.1f}M {phase:8s} B={mb:<3d} S={seq:<5d} ckpt={ckpt!s:5s} "
              f"planned {r['planned_gib']:.3f} GiB, measured {r['measured_gib']:.3f} GiB, ratio {r['ratio']:.2f}",
              flush=True)
    out = os.path.join(REPO, "benchmarks", "results", "llm_memory.json")
    with open(out, "w") as f:
        json.dump({"torch": __import__("torch").__version__, "rows": rows}, f, indent=1)
    print(out)


if __name__ == "__main__":
    main()
