"""Is torch.compile faster for the IQL update on this CPU? (the speed issue's --compile item; it was not, so the
scripts have no --compile.)

    python benchmarks/compile_check.py --pairs 5    # ~3 min, nothing else running -> results/compile_check.json

edis_iql.py's update at AntMaze sizes (observation 29, action 8, batch 256, 2 x 256 twin critic, V, Gaussian actor),
one thread, eager against torch.compile of iql_losses. A compiled iql_losses is one graph, so its three losses take
one backward of their sum (the same gradients: V, Q and the actor have disjoint parameters and the advantages are
detached); the eager side does the same, so only compilation differs. Fresh process per measurement, alternating.
"""

import dataclasses
import json
import os
import subprocess
import sys
import time

import torch
import tyro
from study_common import short_commit, spread

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def updates_per_s(compiled: bool, device: str = "cpu", n: int = 500) -> float:
    torch.set_num_threads(1)
    sys.path.insert(0, ROOT)
    import edis_iql as m
    from utils.run import set_precision

    dev = torch.device(device)
    set_precision(dev, False, tf32=True)  # the scripts' default: TF32 matmuls on CUDA
    torch.manual_seed(0)
    agent = m.Agent(29, 8, 256, 1.0, 0.0).to(dev)
    opts = m.make_optimizers(agent, 3e-4, 3e-4)
    losses = torch.compile(m.iql_losses) if compiled else m.iql_losses
    g = torch.Generator().manual_seed(0)
    batches = [{k: v.to(dev) for k, v in {
        "observations": torch.randn(256, 29, generator=g), "actions": torch.rand(256, 8, generator=g) * 2 - 1,
        "rewards": torch.randn(256, generator=g), "next_observations": torch.randn(256, 29, generator=g),
        "terminals": torch.zeros(256)}.items()} for _ in range(50)]
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def update(batch: dict) -> None:
        v, q, pi, _ = losses(agent, batch, 0.9, 10.0, 0.99)
        for o in opts.values():
            o.zero_grad(set_to_none=True)
        (v + q + pi).backward()
        for o in opts.values():
            o.step()
        m.polyak(agent.q_target, agent.qf, 0.005)

    for i in range(30):  # warm-up (and compilation)
        update(batches[i % 50])
    sync()
    t = time.perf_counter()
    for i in range(n):
        update(batches[i % 50])
    sync()
    return n / (time.perf_counter() - t)


@dataclasses.dataclass
class Cli:
    pairs: int = 5
    """eager / compiled measurements, alternating, each in a fresh process"""
    device: str = "cpu"
    """torch device (cuda: on a lent GPU, benchmarks/gpu_check.sh)"""
    out: str = os.path.join(ROOT, "benchmarks", "results", "compile_check.json")
    """the results file (committed)"""
    one: str = ""
    """internal: eager or compiled, measured in this process"""


def main(a: Cli) -> None:
    if a.one:
        print(updates_per_s(a.one == "compiled", a.device))
        return
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    runs = {"eager": [], "compiled": []}
    for _ in range(a.pairs):
        for k in runs:
            p = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", k, "--device", a.device],
                               capture_output=True, text=True, env=env, check=True)
            runs[k].append(round(float(p.stdout.strip().splitlines()[-1]), 1))
            print(k, runs[k][-1], flush=True)
    ratios = [c / e for e, c in zip(runs["eager"], runs["compiled"])]
    commit = short_commit()
    result = {"commit": commit, "torch": torch.__version__, "device": a.device, "threads": 1, "updates_per_s": runs,
              "compiled_over_eager": spread(ratios)}
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result["compiled_over_eager"]))


if __name__ == "__main__":
    main(tyro.cli(Cli))
