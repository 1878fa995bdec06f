"""utils/llm_task.py: verifier reward, built-in task, prompt datasets and the built-in model."""

import json
import re
import time

import pytest

from utils.common import UserError
from utils.llm_task import (
    build_builtin_model,
    builtin_split,
    format_prompt,
    last_boxed,
    load_prompts,
    math_reward,
)


@pytest.mark.parametrize("text, expected", [
    ("so \\boxed{72}.", "72"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces
    ("\\boxed{\\sqrt{\\frac{a}{b}}} done", "\\sqrt{\\frac{a}{b}}"),
    ("first \\boxed{2} then \\boxed{3}", "3"),  # several boxes: the last one
    ("the answer is 72", None),  # no box
    ("\\boxed{1} and then \\boxed{2", None),  # the last box is never closed: no answer
    ("\\boxed{" + "9" * 10000 + "}", "9" * 10000),  # huge numbers
    ("", None),
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize("completion, gold, reward", [
    ("12+5=17. The answer is \\boxed{17}.", "17", 1.0),
    ("\\boxed{16}", "17", 0.0),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{1,234}", "1234", 1.0),
    ("the answer is 72", "72", 0.0),  # math-verify alone would accept this unboxed answer; we require a box
    ("\\boxed{2} then \\boxed{3}", "3", 1.0),
    ("\\boxed{17", "17", 0.0),
    ("\\boxed{}", "17", 0.0),
    ("\\boxed{" + "9" * 5000 + "}", "1", 0.0),
])
def test_math_reward(completion, gold, reward):
    t0 = time.time()
    assert math_reward(completion, gold) == reward
    assert time.time() - t0 < 3


POWER_TOWER = "10^{10^{10^{10}}}"  # sympy evaluates this through one C-level big-integer power: never returns


@pytest.mark.parametrize("completion, gold, reward", [
    ("\\boxed{" + POWER_TOWER + "}", "72", 0.0),
    ("\\boxed{2^{2^{2^{2^{2}}}}}", "72", 0.0),
    ("\\boxed{10^{123456789}}", "72", 0.0),
    ("\\boxed{99999!}", "72", 0.0),
    ("\\boxed{" + "9" * 100_000 + "}", "72", 0.0),  # a huge number
    ("\\boxed{" + "{" * 10_000 + "72" + "}" * 10_000 + "}", "72", 0.0),  # 10^4-deep braces
    ("\\boxed{" + "{" * 10_000 + "72", "72", 0.0),  # unclosed
    ("\\boxed{72" * 1000, "72", 0.0),  # many unclosed boxes
    ("\\boxed{1}" * 1000 + "\\boxed{72}", "72", 1.0),  # repeated boxes: the last one counts
    ("\\boxed{7\x002}", "72", 0.0),  # control characters
    ("\\boxed{\x1b[31m72}", "72", 0.0),
    ("\\boxed{\u0667\u0662}", "72", 0.0),  # Arabic-Indic digits are not the ASCII integer 72
    ("\\boxed{\uff17\uff12}", "72", 0.0),  # full-width digits
    ("\\boxed{\U0001F600}", "72", 0.0),
])
def test_math_reward_adversarial_answers_return_fast(completion, gold, reward):
    t0 = time.time()
    assert math_reward(completion, gold, timeout=1.0) == reward
    assert time.time() - t0 < 2.0


def test_hanging_check_is_killed_in_any_thread():
    """Past the pre-screen (called on the pool directly), the real power tower runs in a worker that is killed at the
    limit: the check scores 0 within ~1 s, the other checks of the batch still count, and the pool goes on working.
    From a non-main thread too, where no signal-based limit could work."""
    import threading

    from utils.llm_task import verifier_pool

    out = []

    def work():
        t0 = time.time()
        out.append((verifier_pool().score([("72", POWER_TOWER), ("1/2", "0.5"), ("3", "4")], timeout=1.0),
                    time.time() - t0))

    th = threading.Thread(target=work)
    th.start()
    th.join(timeout=30)
    (scores, seconds), = out
    assert scores == [0.0, 1.0, 0.0] and seconds < 3.0
    assert math_reward("\\boxed{\\frac{2}{4}}", "0.5") == 1.0  # a fresh worker replaced the killed one


def test_integer_fast_path_agrees_with_math_verify():
    """The exact integer comparison that skips the workers answers what math-verify itself answers."""
    from utils.llm_task import _verify_in_process, math_rewards

    pairs = [("72", "72"), ("72", "072"), ("-5", "-5"), ("5", "-5"), ("1234", "1243"), ("0", "-0"), ("10", "1")]
    fast = math_rewards([f"\\boxed{{{b}}}" for _, b in pairs], [g for g, _ in pairs])
    assert fast == [_verify_in_process(g, b) for g, b in pairs]


def test_math_rewards_batch_and_bad_timeout():
    from utils.llm_task import math_rewards

    comps = [f"\\boxed{{{i}.0}}" for i in range(24)] + ["\\boxed{" + POWER_TOWER + "}"]
    t0 = time.time()
    assert math_rewards(comps, [str(i) for i in range(25)]) == [1.0] * 24 + [0.0]
    assert time.time() - t0 < 10
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            math_rewards(["\\boxed{1}"], ["1"], timeout=bad)


def test_builtin_task_is_deterministic_correct_and_disjoint():
    train, evals, valid = (builtin_split("train", 2000, 0), builtin_split("eval", 256, 0),
                           builtin_split("validation", 256, 0))
    assert train == builtin_split("train", 2000, 0) and train != builtin_split("train", 2000, 1)
    assert len(evals) == 256 and len(builtin_split("eval", 10_000, 0)) == 256 and len(valid) > 200
    questions = [{p["question"] for p in x} for x in (train, evals, valid)]
    assert not questions[0] & questions[1] and not questions[0] & questions[2] and not questions[1] & questions[2]
    for p in train[:500]:  # the chain of thought computes the answer, step by step
        steps = re.findall(r"(\d+)([+\-*])(\d+)=(\d+)\.", p["solution"])
        assert steps and steps[-1][3] == p["answer"]
        for a, op, b, c in steps:
            assert {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] == int(c)
        assert 1 <= int(p["answer"]) <= 999


def test_load_prompts_local_files(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"problem": f"q{i}", "solution": f"work #### {i}"}) for i in range(5)))
    rows = load_prompts(str(path), "train", "problem", "solution")
    assert rows[3] == {"question": "q3", "answer": "work #### 3"}
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text(json.dumps({"question": "q", "answer": "2+2=4 #### 1,234"}))
    assert load_prompts(str(gsm), "train")[0]["answer"] == "1234"  # GSM8K's final-answer convention
    with pytest.raises(UserError, match="row 1 has no .* field"):
        load_prompts(str(path), "train")
    with pytest.raises(UserError, match=".jsonl"):
        (tmp_path / "x.csv").write_text("a")
        load_prompts(str(tmp_path / "x.csv"), "train")


def test_hub_dataset_offline_fails_fast(monkeypatch):
    """`datasets` is a requirement: a Hub id goes through datasets.load_dataset up to the network call, then fails in
    seconds with one line (HF_HUB_OFFLINE set here; without it, hub_offline() finds no network the same way)."""
    import datasets  # noqa: F401  (installed by requirements.txt)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    with pytest.raises(UserError, match="'openai/gsm8k' split 'train' and there is no network"):
        load_prompts("openai/gsm8k", "train", config="main")
    assert time.time() - t0 < 10


def test_builtin_model_loads_with_plain_transformers(tiny_model_dir, tmp_path):
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert type(model).__name__ == "Qwen2ForCausalLM" and tok.padding_side == "left"
    assert tok.pad_token_id != tok.eos_token_id
    text = "héllo wörld 日本 \\frac{1}{2} 12345"
    assert tok.decode(tok(text).input_ids) == text  # byte-level: any UTF-8 round-trips
    assert [tok.decode([t]) for t in tok("12345").input_ids] == list("12345")  # one token per digit (Qwen2 regex)
    again = build_builtin_model(str(tmp_path / "again"), size="xs", sft_steps=40, log=lambda s: None)
    m2 = transformers.AutoModelForCausalLM.from_pretrained(again)
    for (k, a), b in zip(model.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k  # rebuilt deterministically from the seed


def test_format_prompt_plain_and_chat(tiny_model_dir):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
    assert format_prompt(tok, "What is 1+1?", "plain") == "Question: What is 1+1?\nAnswer:"
    assert format_prompt(tok, "Q", "r1").endswith("output the final answer within \\boxed{}.")
    tok.chat_template = "{% for m in messages %}<{{m.role}}>{{m.content}}{% endfor %}<assistant>"
    assert format_prompt(tok, "Q", "r1", system="S") == (
        "<system>S<user>Q Let's think step by step and output the final answer within \\boxed{}.<assistant>")
    with pytest.raises(UserError):
        format_prompt(tok, "Q", "nope")
