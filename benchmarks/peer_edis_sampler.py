"""The paper-form guided sampler against the official EDIS sampler, side by side, at equal work.

    python benchmarks/peer_edis_sampler.py --official DIR --pairs 5   # ~3 min -> results/peer_edis_sampler.json
    python benchmarks/peer_edis_sampler.py --official DIR --flops     # FLOPs per sample -> ..._flops.json

DIR holds the official code (liuxhym/EDIS at commit 28bf16d: diffusion/elucidated_diffusion.py, its
diffusion/denoiser_network.py and diffusion/norm.py, common/energy.py and common/network.py), outside this
repository and never copied into it. To get it: the library's `fetch` of github:liuxhym/EDIS, then
`git --git-dir MIRROR archive 28bf16d diffusion common | tar -x -C DIR`. It imports gin and gym only for decorators
and type hints (stubbed here) and einops (`pip install einops`).

Equal work, one thread, fp32 (and bf16 autocast for ours, reported apart: the official code has none): n samples of
D = 11 (PointMaze: s 4, a 2, r, s' 4; the official transition has no terminal), 32 stochastic Heun steps, each
evaluation = the denoiser (residual MLP, width 256, 3 blocks with LayerNorm, time-embedding width 256) + the three
energies' gradients (MLPs of 3 x 256 on the transition and the noise level). The official sampler takes one backward
per energy (three), ours one backward of their weighted sum: the same gradient. Fresh process per measurement,
official and ours alternating.
"""

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
import types

import torch
import tyro
from study_common import flops_of, short_commit, spread

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OFFICIAL_COMMIT = "28bf16d"
S, A, WIDTH, DEPTH, STEPS = 4, 2, 256, 3, 32
D = 2 * S + A + 1


def official_sampler(official: str):
    """The official sampler at these sizes: run(k) draws k samples."""
    sys.modules.setdefault("gin", types.SimpleNamespace(configurable=lambda f: f))  # decorators only
    sys.modules.setdefault("gym", types.SimpleNamespace(Env=object))  # a type hint only
    sys.path.insert(0, official)
    from common.energy import energy_model
    from diffusion.denoiser_network import ResidualMLPDenoiser
    from diffusion.elucidated_diffusion import ElucidatedDiffusion
    from diffusion.norm import Normalizer

    torch.manual_seed(0)
    net = ResidualMLPDenoiser(d_in=D, dim_t=WIDTH, mlp_width=WIDTH, num_layers=DEPTH, layer_norm=True)
    net.requires_grad_(False)  # it samples with its EMA copy (ema-pytorch), which has no gradients
    flags = argparse.Namespace(state_guide=True, transition_guide=True, policy_guide=True, ope_clip=2.0, te_clip=0.1,
                               pe_clip=0.1)
    diffusion = ElucidatedDiffusion(net, Normalizer(torch.randn(1000, D)), [D], num_sample_steps=STEPS, args=flags)
    energies = [energy_model(S, A, DEPTH, torch.nn.ReLU, False, with_reward=True) for _ in range(3)]
    env = types.SimpleNamespace(observation_space=types.SimpleNamespace(shape=(S,)),
                                action_space=types.SimpleNamespace(shape=(A,)))
    return lambda k: diffusion.sample(*energies, env, 1.0, batch_size=k, num_sample_steps=STEPS, clamp=False,
                                      disable_tqdm=True)


def official_samples_per_s(official: str, n: int) -> float:
    run = official_sampler(official)
    run(64)  # warm-up
    t = time.perf_counter()
    run(n)
    return n / (time.perf_counter() - t)


def ours_sampler(guided: bool = True):
    """Ours at the same sizes, the paper's form (``guided=False``: the denoiser alone): run(k) draws k samples."""
    sys.path.insert(0, ROOT)
    import edis_iql as m

    torch.manual_seed(0)
    net = m.ResidualMLPDenoiser(D, WIDTH, DEPTH)
    energies = torch.nn.ModuleDict({k: m.EnergyNet(D) for k in ("state", "policy", "transition")})
    dims = torch.ones(D)
    dims[S + A] = 0.0  # the paper's form: r unguided (the official masks)
    guidance = m.make_guidance(energies, {}, dims)
    g = torch.Generator().manual_seed(0)
    return lambda k: m.edm_sample(net, k, D, STEPS, g, guidance=guidance if guided else None)


def ours_samples_per_s(n: int, bf16: bool) -> float:
    run = ours_sampler()  # first: it puts the repository on sys.path
    from utils.run import bf16_autocast

    with bf16_autocast(torch.device("cpu"), bf16):
        run(64)  # warm-up
        t = time.perf_counter()
        run(n)
        return n / (time.perf_counter() - t)


def count_flops(official: str, n: int, out: str) -> None:
    """--flops: matrix-product FLOPs per sample on each side (study_common.flops_of), and with the --out file's
    medians the FLOP rate each sustains."""
    res = {"commit": short_commit(), "official_commit": OFFICIAL_COMMIT, "samples": n, "mflop_per_sample": {}}
    for side, run in (("official", official_sampler(official)), ("ours", ours_sampler()),
                      ("ours_unguided", ours_sampler(guided=False))):  # the rest of "ours": the energies' gradients
        run(8)
        res["mflop_per_sample"][side] = round(flops_of(lambda: run(n)) / n / 1e6, 2)  # noqa: B023
    if os.path.isfile(out):  # samples/s (fp32, measured at that file's commit) x FLOPs per sample
        med = json.load(open(out))["samples_per_s_median"]
        res["gflop_per_s"] = {k: round(med[k] * v / 1e3, 1) for k, v in res["mflop_per_sample"].items() if k in med}
    print(json.dumps(res))
    with open(os.path.join(os.path.dirname(out), "peer_edis_sampler_flops.json"), "w") as f:
        json.dump(res, f, indent=1)


@dataclasses.dataclass
class Cli:
    official: str = ""
    """a folder with the official code at 28bf16d (see the module docstring)"""
    pairs: int = 5
    """official / ours (fp32) / ours (bf16) rounds, each measurement in a fresh process"""
    samples: int = 2000
    """samples per measurement (one batch)"""
    out: str = os.path.join(ROOT, "benchmarks", "results", "peer_edis_sampler.json")
    """the results file (committed)"""
    flops: bool = False
    """count each side's matrix-product FLOPs per sample instead (-> results/peer_edis_sampler_flops.json)"""
    one: str = ""
    """internal: official, ours or ours_bf16, measured in this process"""


def main(a: Cli) -> None:
    torch.set_num_threads(1)
    if a.one:
        rate = (official_samples_per_s(a.official, a.samples) if a.one == "official"
                else ours_samples_per_s(a.samples, a.one == "ours_bf16"))
        print(rate)
        return
    need = os.path.join(a.official, "diffusion", "elucidated_diffusion.py")
    if not a.official or not os.path.isfile(need):
        sys.exit(f"error: --official {a.official or '(none)'} has no diffusion/elucidated_diffusion.py: fetch "
                 f"github:liuxhym/EDIS and unpack commit {OFFICIAL_COMMIT} there (see --help)")
    if a.flops:
        count_flops(a.official, 256, a.out)
        return
    env = dict(os.environ, OMP_NUM_THREADS="1")
    runs = {"official": [], "ours": [], "ours_bf16": []}
    for _ in range(a.pairs):
        for k in runs:
            p = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", k, "--official", a.official,
                                "--samples", str(a.samples)], capture_output=True, text=True, env=env)
            if p.returncode != 0:
                sys.exit(f"{k}: failed\n{p.stderr[-2000:]}")
            runs[k].append(round(float(p.stdout.strip().splitlines()[-1]), 1))
            print(f"{k:>10}: {runs[k][-1]:7.1f} samples/s", flush=True)
    ratio = lambda k: [o / b for b, o in zip(runs["official"], runs[k])]  # noqa: E731  pair by pair
    commit = short_commit()
    result = {"commit": commit, "official_commit": OFFICIAL_COMMIT, "torch": torch.__version__, "threads": 1,
              "samples": a.samples, "dim": D, "width": WIDTH, "depth": DEPTH, "heun_steps": STEPS,
              "samples_per_s": runs, "samples_per_s_median": {k: statistics.median(v) for k, v in runs.items()},
              "vs_official": {k: spread(ratio(k)) for k in ("ours", "ours_bf16")}}
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result["vs_official"]))


if __name__ == "__main__":
    main(tyro.cli(Cli))
