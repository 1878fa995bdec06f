"""Turn benchmarks/results/throughput.jsonl (from benchmarks/throughput.sh) into the table in throughput.md."""

import collections
import json
import statistics
import sys
from pathlib import Path

REFERENCE = {"iql": 153.0, "calql": 3.6}  # CORL finetune/{iql,cal_ql}.py on this machine, measured for the issues


def main(path: str = "benchmarks/results/throughput.jsonl") -> None:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    groups = collections.defaultdict(list)
    for r in rows:
        groups[(r["algo"], r["edis_batch"], r["bf16"])].append(r["updates_per_s"])
    print("| algorithm | batch | matmul dtype | updates/s, median (all runs) | vs CORL |")
    print("|---|---|---|---|---|")
    for (algo, edis, bf16), v in groups.items():
        med = statistics.median(v)
        runs = ", ".join(f"{x:.1f}" for x in v)
        batch, dtype = "synthetic + online (EDIS)" if edis else "offline", "bf16 autocast" if bf16 else "fp32"
        print(f"| {algo} | {batch} | {dtype} | {med:.1f} ({runs}) | {med / REFERENCE[algo]:.2f}x |")


if __name__ == "__main__":
    main(*sys.argv[1:])
