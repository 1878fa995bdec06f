"""edis_iql.py: IQL (Kostrikov et al. 2021, arXiv 2110.06169) offline pre-training, then online fine-tuning with EDIS
(Liu et al. 2024, arXiv 2407.12448). Docs: docs/edis_iql.md.

STATUS: the data layer is wired in (task registry, dataset loading, environments); the algorithm is not
implemented yet (issue #3). Running the script resolves --env, loads the offline dataset exactly as the
finished script will, prints what it found, and exits with status 3.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Optional

import tyro

from utils.common import UserError, run_cli
from utils.offline_data import get_task, load_offline_data


@dataclasses.dataclass
class Args:
    env: str = "pointmaze-umaze"
    """D4RL-style task name, e.g. antmaze-large (= antmaze-large-diverse), pen-human, hopper-medium, pointmaze-umaze"""
    dataset_path: Optional[str] = None
    """a D4RL-layout hdf5 file or a Minari dataset folder to use instead of the task's Minari dataset"""
    seed: int = 1
    """seed of the run"""


def main() -> None:
    args = tyro.cli(Args)
    task = get_task(args.env)
    data = load_offline_data(task, dataset_path=args.dataset_path)
    print(f"{task.name}: {len(data)} transitions in {data.num_episodes} episodes from {data.source}")
    print("the training loop is not implemented yet (issue #3)", file=sys.stderr)
    sys.exit(3)


if __name__ == "__main__":
    run_cli(main)
