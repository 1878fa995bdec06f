"""Update throughput (gradient updates per second) of the EDIS scripts' base algorithms at AntMaze sizes.

    python benchmarks/update_throughput.py --algo iql --threads 2 --updates 2000
    python benchmarks/update_throughput.py --algo iql --edis-batch      # the EDIS batch path (synthetic + online)

Sizes follow CORL's AntMaze configs: obs 29, action 8, batch 256; IQL 2x256 critics; Cal-QL 5x256 critics, 10 CQL
actions per set, Lagrange, max-target backup (the script's antmaze preset). Data is random (throughput
does not depend on values). Prints one JSON line per run; benchmarks/results/throughput.md collects them.
"""

import dataclasses
import importlib
import json
import os
import platform
import sys
import time
from typing import Literal

import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils.run import bf16_autocast, set_precision  # noqa: E402


@dataclasses.dataclass
class Cli:
    algo: Literal["iql", "calql"] = "iql"
    """which script's update to time"""
    threads: int = 2
    """torch threads"""
    updates: int = 2000
    """timed updates"""
    warmup: int = 200
    """untimed updates first"""
    edis_batch: bool = False
    """compose batches as synthetic + online buffers"""
    device: str = "cpu"
    """torch device"""
    bf16: bool = False
    """bfloat16 autocast (as the scripts' --bf16)"""
    tf32: bool = True
    """TF32 fp32 matmuls on CUDA (as the scripts' --tf32); no effect on a CPU"""


def make_step(a: Cli):
    """The script's own update at these sizes, on batches drawn from a filled buffer: step() -> metrics."""
    mod = importlib.import_module("edis_iql" if a.algo == "iql" else "edis_calql")
    from utils import run as harness
    from utils.tasks import get_task

    task = get_task("antmaze-large")
    dev = torch.device(a.device)
    sizes = {"q_layers": 5, "cql_n_actions": 10} if a.algo == "calql" else {}  # AntMaze sizes, not the CPU preset's
    args = harness.make_args(mod, env=task.name, device=a.device, offline_steps=10**6, online_steps=0, **sizes)
    obs_dim, act_dim, n = 29, 8, 100_000
    gen = torch.Generator(device=dev)
    gen.manual_seed(0)

    def filled(size):
        buf = mod.ReplayBuffer(obs_dim, act_dim, size, dev, extra=mod.BUFFER_EXTRA)
        buf.add_batch({"observations": torch.randn(size, obs_dim), "actions": torch.rand(size, act_dim) * 2 - 1,
                       "rewards": torch.randn(size), "next_observations": torch.randn(size, obs_dim),
                       "terminals": (torch.rand(size) < 0.01).float(), "mc_returns": torch.randn(size) * 10})
        return buf

    offline, synthetic = filled(n), filled(n)
    agent = mod.Agent(obs_dim, act_dim, args.hidden_dim, 1.0, args.actor_dropout if a.algo == "iql" else args.q_layers)
    agent = agent.to(dev)
    opts = mod.make_optimizers(agent, args.critic_lr, args.actor_lr)

    def batch():
        if a.edis_batch:
            k = int(args.batch_size * 0.5)
            return mod.concat_batches(synthetic.sample(k, gen), offline.sample(args.batch_size - k, gen))
        return offline.sample(args.batch_size, gen)

    if a.algo == "iql":  # main()'s offline-phase call
        def fn(b):
            return mod.iql_update(agent, opts, b, args.expectile, args.beta, args.gamma, args.tau)
    else:
        def fn(b):
            return mod.calql_update(agent, opts, b, None, gamma=args.gamma, tau=args.tau,
                                    n_actions=args.cql_n_actions, max_target_backup=args.cql_max_target_backup,
                                    lagrange=args.cql_lagrange, clip_min=args.cql_clip_diff_min,
                                    calibrate=args.calibration, cql_alpha=args.cql_alpha)
    update = fn  # torch.compile of this whole update breaks (several backwards): benchmarks/compile_check.py

    def step():
        with bf16_autocast(dev, a.bf16):
            return update(batch())

    return step


def main(a: Cli) -> None:
    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    set_precision(dev, a.bf16, a.tf32)
    step = make_step(a)
    for _ in range(a.warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(a.updates):
        out = step()
    float(next(iter(out.values())))  # one sync at the end
    dt = time.perf_counter() - t0
    print(json.dumps({"algo": a.algo, "edis_batch": a.edis_batch, "bf16": a.bf16, "tf32": a.tf32,
                      "threads": a.threads,
                      "device": a.device,
                      "updates": a.updates, "updates_per_s": round(a.updates / dt, 3),
                      "cpu": platform.processor() or platform.machine(), "torch": torch.__version__}))


if __name__ == "__main__":
    main(tyro.cli(Cli))
