"""grpo_llm.py: GRPO (Shao et al. 2024, arXiv 2402.03300; Dr. GRPO and DAPO variants). Docs: docs/grpo_llm.md.

STATUS: not implemented yet (issue #5). Running it prints this and exits with status 3.
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
    print("grpo_llm.py is not implemented yet (issue #5)", file=sys.stderr)
    sys.exit(3)


if __name__ == "__main__":
    run_cli(main)
