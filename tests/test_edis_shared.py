"""The blocks edis_iql.py and edis_calql.py (and grpo_llm.py and reval_llm.py) share on purpose (marked
`# >>> shared:NAME` ... `# <<< shared:NAME`) must stay textually identical, so each file works alone and
`diff edis_iql.py edis_calql.py` shows only the algorithm. Inside a shared block, fenced algorithm regions
(`# >>> algo: what it does` ... `# <<< algo`) may differ: that is where main() calls each file's own update."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXPECTED = {"args_common", "presets_device", "buffers", "networks", "edis", "extras", "checkpoint", "main"}


def shared_blocks(path: Path) -> dict:
    text = path.read_text()
    blocks, open_name, lines = {}, None, []
    for line in text.splitlines():
        m = re.fullmatch(r"# (>>>|<<<) shared:(\w+)", line.strip())
        if m and m.group(1) == ">>>":
            assert open_name is None, f"{path.name}: block {m.group(2)} opened inside {open_name}"
            open_name, lines = m.group(2), []
        elif m:
            assert m.group(2) == open_name, f"{path.name}: block {m.group(2)} closed while {open_name} is open"
            assert open_name not in blocks, f"{path.name}: block {open_name} defined twice"
            blocks[open_name], open_name = "\n".join(lines), None
        elif open_name is not None:
            lines.append(line)
    assert open_name is None, f"{path.name}: block {open_name} never closed"
    return blocks


ALGO_REGION = re.compile(r"^ *# >>> algo: .*?^ *# <<< algo\n", re.S | re.M)


def without_algo_regions(block: str) -> str:
    """The block with its fenced algorithm regions (markers included) removed."""
    assert block.count("# >>> algo:") == block.count("# <<< algo"), "an algorithm region is not closed"
    return ALGO_REGION.sub("", block + "\n")


def test_shared_blocks_identical():
    iql, calql = shared_blocks(REPO / "edis_iql.py"), shared_blocks(REPO / "edis_calql.py")
    assert set(iql) == EXPECTED and set(calql) == EXPECTED
    for name in sorted(EXPECTED):
        a, b = without_algo_regions(iql[name]), without_algo_regions(calql[name])
        assert a == b, f"shared block {name!r} differs between edis_iql.py and edis_calql.py"
        assert len(iql[name].splitlines()) > 5
    # main() is where the algorithms differ, and only inside its regions: the rows of the offline data, the agent and
    # its update, the fine-tuning batch without EDIS and the online update
    assert iql["main"].count("# >>> algo:") == 4 and calql["main"].count("# >>> algo:") == 4
    assert "iql_update" in iql["main"] and "calql_update" in calql["main"] and "# >>> algo" not in iql["edis"]


LLM_EXPECTED = {"args_common", "rollout", "train", "eval", "main"}


def test_llm_shared_blocks_identical():
    grpo, reval = shared_blocks(REPO / "grpo_llm.py"), shared_blocks(REPO / "reval_llm.py")
    assert set(grpo) == LLM_EXPECTED and set(reval) == LLM_EXPECTED
    for name in sorted(LLM_EXPECTED):
        a, b = without_algo_regions(grpo[name]), without_algo_regions(reval[name])
        assert a == b, f"shared block {name!r} differs between grpo_llm.py and reval_llm.py"
    # main(): the defaults (and ReVal's sampling requirement), the reference model, the round's update(s); ReVal
    # also its replay buffer and the reset reference on resume
    assert grpo["main"].count("# >>> algo:") == 3 and reval["main"].count("# >>> algo:") == 5
    assert "prepare_round" in grpo["main"] and "buffer_sample" in reval["main"]


def test_drift_is_detected(tmp_path):
    """The checker itself: a one-character change inside a block is reported, also in main() outside its algorithm
    regions, while a change inside a region is allowed."""
    src = (REPO / "edis_calql.py").read_text().replace("def frozen_flags(ckpt: dict) -> set:",
                                                        "def frozen_flags(ckpt: dict)  -> set:")
    changed = tmp_path / "edis_calql.py"
    changed.write_text(src)
    assert shared_blocks(REPO / "edis_iql.py")["checkpoint"] != shared_blocks(changed)["checkpoint"]
    main = shared_blocks(REPO / "edis_iql.py")["main"]
    outside = main.replace("    bar.close()", "    bar.close( )")
    inside = main.replace("after_update(update(batch, step), step + 1)\n                # <<< algo",
                          "after_update(update(batch, step), step + 1)  # changed\n                # <<< algo")
    assert inside != main and without_algo_regions(inside) == without_algo_regions(main)
    assert without_algo_regions(outside) != without_algo_regions(main)
