"""Where one EDIS retrain spends its time, by part and by op (the speed issue's profile, before any change).

    OMP_NUM_THREADS=1 python benchmarks/retrain_profile.py     # ~3 minutes; -> benchmarks/results/retrain_profile.json
    OMP_NUM_THREADS=1 python benchmarks/retrain_profile.py --bf16   # the same under bf16 autocast (fp32 weights), as
                                                                    # edis_retrain runs with --bf16
    python benchmarks/retrain_profile.py --device cuda [--bf16] [--out DIR]   # on a GPU (TF32 matmuls, the scripts'
                                                              # default) -> DIR/retrain_profile_cuda[_bf16].json

The retrain of edis_iql.py at the CPU preset and PointMaze sizes (x = [s, a, r, s', d], D = 12; denoiser 256 x 3;
12,000 denoiser steps, 2,048 x 10 negatives per energy set, 100 InfoNCE steps, 20,000 guided samples of 32 Heun
steps), each part run at a fraction of its count with the script's own functions, timed, and scaled to the full
count (every part is a loop of identical steps); then each part once more under torch.profiler for its top ops by
self CPU time. One thread, the paper's form (guidance at every noise level, three energies).
"""

import dataclasses
import json
import os
import sys
import time

import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import edis_iql as m  # noqa: E402
from utils.run import bf16_autocast  # noqa: E402

S, A = 4, 2
FULL = dict(diffusion_steps=12_000, negatives=2048 * 10 * 3 + 2048, infonce_steps=100, samples=20_000)
PART = dict(diffusion_steps=600, pool=256, infonce_steps=50, samples=2_000)


def setup(device: torch.device = torch.device("cpu")):
    g = torch.Generator(device).manual_seed(0)
    codec = m.TransitionCodec(S, A, device)
    x = torch.randn(100_000, codec.dim, generator=g, device=device)
    x[:, codec.d] = (x[:, codec.d] > 2).float()
    online = m.ReplayBuffer(S, A, 10_000, device)
    online.add_batch(codec.decode(torch.randn(10_000, codec.dim, generator=g, device=device)))
    state = m.EDISState(codec)
    m.build_energies(state, False, (0, 1))
    return g, codec, x, online, state


def clock() -> float:
    """time.perf_counter() once the GPU (if any) has finished what was queued."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def parts(g, codec, x, online, state, n: dict) -> dict:
    """Seconds of each part at the counts ``n``."""
    cond = torch.stack([codec.mask(codec.s), codec.mask(codec.s, codec.a)])
    out = {}
    t = clock()
    den, _ = m.train_diffusion(x, n["diffusion_steps"], 256, 3, g, cond)
    out["denoiser training"] = clock() - t
    pos = online.sample(n["pool"], g)
    x_on = codec.encode(pos)
    sample = lambda k, known=None, mask=None: m.sample_chunked(den, k, codec.dim, 32, g, known=known,  # noqa: E731
                                                               known_mask=mask)
    t = clock()
    with torch.no_grad():
        sets = m.contrastive_sets(("state", "policy", "transition"), sample, codec, x_on, x_on, None, 10)
    out["conditional sampling of the negatives"] = clock() - t
    sigmas = m.karras_sigmas(32, codec.mean.device)[:-1]
    t = clock()
    m.train_energies(state.energies, state.energy_opt, sets, sigmas, n["infonce_steps"], g)
    out["InfoNCE steps"] = clock() - t
    t = clock()
    m.sample_chunked(den, n["samples"], codec.dim, 32, g, guidance=m.make_guidance(state.energies, {},
                                                                                   m.guided_dims(codec, False)))
    out["guided generation"] = clock() - t
    return out


def to_full(measured: dict) -> dict:
    """Seconds of each part at the PART counts, scaled to the FULL counts (each part is a loop of identical steps)."""
    scale = {"denoiser training": FULL["diffusion_steps"] / PART["diffusion_steps"],
             "conditional sampling of the negatives": FULL["negatives"] / (PART["pool"] * 10 * 3 + PART["pool"]),
             "InfoNCE steps": FULL["infonce_steps"] / PART["infonce_steps"],
             "guided generation": FULL["samples"] / PART["samples"]}
    return {k: v * scale[k] for k, v in measured.items()}


@dataclasses.dataclass
class Cli:
    bf16: bool = False
    """under bf16 autocast (fp32 weights), as edis_retrain runs with --bf16"""
    device: str = "cpu"
    """cpu or cuda (TF32 matmuls on CUDA, the scripts' default)"""
    out: str = os.path.join(ROOT, "benchmarks", "results")
    """the folder of retrain_profile[_cuda][_bf16].json"""


def main(a: Cli) -> None:
    torch.set_num_threads(1)
    bf16, device = a.bf16, torch.device(a.device)
    from utils.run import set_precision  # here: retrain_speed.py imports this module beside older code

    set_precision(device, bf16, tf32=True)  # the scripts' default: TF32 matmuls on CUDA
    if bf16:  # what the scripts' amp() context does around edis_retrain with --bf16
        bf16_autocast(device, True).__enter__()
    g, codec, x, online, state = setup(device)
    parts(g, codec, x, online, state, dict(diffusion_steps=50, pool=16, infonce_steps=5, samples=200))  # warm-up
    full = to_full(parts(g, codec, x, online, state, PART))
    total = sum(full.values())
    ops = {}
    from torch.profiler import ProfilerActivity, profile

    small = dict(diffusion_steps=100, pool=32, infonce_steps=10, samples=400)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for name in full:
        with profile(activities=activities) as prof:
            parts_one = parts(g, codec, x, online, state, {**small, **{k: (v if name_of(k) == name else 1)
                                                                        for k, v in small.items()}})
        del parts_one
        own = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"  # GPU: kernel time
        rows = sorted(prof.key_averages(), key=lambda e: -getattr(e, own))
        tot = sum(getattr(e, own) for e in rows) or 1
        ops[name] = [{"op": e.key, "self_share": round(getattr(e, own) / tot, 3), "calls": e.count}
                     for e in rows[:8]]
    result = {"threads": 1, "bf16": bf16, "device": str(device), "torch": torch.__version__, "full_counts": FULL,
              "measured_counts": PART,
              "seconds_full": {k: round(v, 1) for k, v in full.items()}, "total_s": round(total, 1),
              "share": {k: round(v / total, 3) for k, v in full.items()}, "top_ops": ops}
    for k, v in full.items():
        print(f"{k:>40}: {v:7.1f} s  {v / total:5.1%}   top ops: "
              + ", ".join(f"{o['op']} {o['self_share']:.0%}" for o in ops[k][:4]))
    print(f"{'one retrain':>40}: {total:7.1f} s")
    tag = ("_cuda" if device.type == "cuda" else "") + ("_bf16" if bf16 else "")
    out = os.path.join(a.out, f"retrain_profile{tag}.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(out)


def name_of(count_key: str) -> str:
    return {"diffusion_steps": "denoiser training", "pool": "conditional sampling of the negatives",
            "infonce_steps": "InfoNCE steps", "samples": "guided generation"}[count_key]


if __name__ == "__main__":
    main(tyro.cli(Cli))
