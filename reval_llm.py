"""reval_llm.py: ReVal: off-policy value-based RL for LLMs with a replay buffer (arXiv 2603.23355). Docs: docs/reval_llm.md.

STATUS: not implemented yet (issue #6). Running it prints this and exits with status 3.
"""

from __future__ import annotations

import dataclasses
import sys

import tyro

from utils.common import run_cli


@dataclasses.dataclass
class Args:
    seed: int = 1
    """seed of the run"""


def main() -> None:
    tyro.cli(Args)
    print("reval_llm.py is not implemented yet (issue #6)", file=sys.stderr)
    sys.exit(3)


if __name__ == "__main__":
    run_cli(main)
