"""LLM task layer shared by ``grpo_llm.py`` and ``reval_llm.py``: prompt datasets and templates, the verifier
reward, and the built-in offline task and base model used on CPU and in tests.

Public API
----------
``load_prompts(name, split, ...)``  -> list of ``{"question", "answer"}`` (built-in task, local JSONL/parquet, Hub id)
``load_task_prompts(...)``          -> (training, evaluation, overlap): a run's prompts, evaluation held out
``load_model(name, log)``           -> (tokenizer with left padding, causal LM in fp32 on the CPU)
``format_prompt(tokenizer, q, template)`` -> the prompt string (chat template when the tokenizer has one)
``last_boxed(text)``                -> the content of the last ``\\boxed{...}`` (nested braces), or None
``math_reward(completion, gold)``   -> 1.0 / 0.0 with math-verify (gold first), in worker processes killed on timeout
``math_rewards(completions, golds)`` -> the same for a batch, checked in parallel
``ensure_builtin_model(...)``       -> path of the built-in tiny Qwen2 model (built once, cached, deterministic)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import shutil
import tempfile
import threading
import time
from typing import Callable, Optional

from utils.common import UserError, current_umask, env_flag, hub_go_offline, hub_offline

# ---------------------------------------------------------------------------------------------------------------
# Built-in task: seeded GSM8K-style word problems with a short chain of thought and a \boxed{} answer
# ---------------------------------------------------------------------------------------------------------------
BUILTIN = "builtin"  # --dataset value of the built-in task
BUILTIN_SPLITS = ("train", "validation", "eval")  # disjoint splits ("test" is accepted as a name for "eval")
HELD_OUT = 256  # problems in each of the validation and eval splits
NAMES = ["Leo", "Mia", "Sam", "Ava", "Noah", "Zoe", "Eli", "Ivy", "Max", "Lily", "Ben", "Ruby"]
ITEMS = ["cookies", "apples", "marbles", "stickers", "books", "coins", "pencils", "cards", "shells", "stamps"]


def make_problem(rng: random.Random, max_num: int = 50, max_steps: int = 3) -> dict:
    """One problem: a start value, then 1..max_steps of +b, -b or *b (values stay in 1..999)."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    value = rng.randint(2, max_num)
    sentences, cot = [f"{name} has {value} {item}."], []
    for _ in range(rng.randint(1, max_steps)):
        op = rng.choice(["+", "-", "*"])
        if op == "*" and value * 4 <= 999:
            b = rng.randint(2, 4)
            sentences.append(f"{name}'s amount of {item} is multiplied by {b}.")
            new = value * b
        elif op == "-" and value > 2:
            b = rng.randint(1, value - 1)
            sentences.append(f"{name} gives away {b} {item}.")
            new = value - b
        else:
            b = rng.randint(1, max_num)
            if value + b > 999:
                continue
            sentences.append(f"{name} gets {b} more {item}.")
            op, new = "+", value + b
        cot.append(f"{value}{op}{b}={new}.")
        value = new
    question = " ".join(sentences) + f" How many {item} does {name} have now?"
    return {"question": question, "answer": str(value), "solution": " ".join(cot)}


def builtin_split(split: str, n: int, seed: int = 0) -> list:
    """Deterministic, pairwise disjoint splits: eval (the first 256 held-out problems), validation (the next 256 less
    those repeating an eval question, for choosing hyperparameters) and train (which skips every held-out question)."""
    eval_rng = random.Random(f"eval-{seed}")
    held = [make_problem(eval_rng) for _ in range(2 * HELD_OUT)]
    if split == "eval":
        return held[:HELD_OUT][:n]
    if split == "validation":  # the rest, less repeats of an eval question
        seen = {p["question"] for p in held[:HELD_OUT]}
        return [p for p in held[HELD_OUT:] if p["question"] not in seen][:n]
    held_out = {p["question"] for p in held}
    rng, out = random.Random(f"train-{seed}"), []
    while len(out) < n:
        p = make_problem(rng)
        if p["question"] not in held_out:
            out.append(p)
    return out


def completion_text(solution: str, answer: str) -> str:
    """The built-in model's answer format (after the prompt "Question: ...\\nAnswer:")."""
    return f" {solution} The answer is \\boxed{{{answer}}}."


# ---------------------------------------------------------------------------------------------------------------
# Prompt datasets and templates
# ---------------------------------------------------------------------------------------------------------------
TEMPLATES = {
    # what the built-in model was warmed up on
    "plain": "Question: {question}\nAnswer:",
    # ReVal App. F, DeepSeek-R1-Distill user turn (also the user turn of the Qwen2.5-Math template)
    "r1": "{question} Let's think step by step and output the final answer within \\boxed{{}}.",
}
QWEN_MATH_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


def format_prompt(tokenizer, question: str, template: str, system: Optional[str] = None) -> str:
    """The prompt text; with a chat template (real instruct/distilled models) the user turn goes through it."""
    if template not in TEMPLATES:
        raise UserError(f"unknown --prompt-template {template!r}; choose one of {', '.join(TEMPLATES)}")
    text = TEMPLATES[template].format(question=question)
    if template != "plain" and getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text


def _read_local(path: str) -> list:
    """Rows of a local .jsonl / .json / .parquet file; anything malformed is a one-line UserError naming the place."""
    if os.path.isdir(path):
        raise UserError(f"--dataset {path!r} is a folder, not a file")
    try:
        if path.endswith(".jsonl"):
            rows = []
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise UserError(f"--dataset {path}: line {n} is not valid JSON ({e.msg})") from None
            return rows
        if path.endswith(".json"):
            with open(path, encoding="utf-8") as f:
                try:
                    data = json.load(f)
                except json.JSONDecodeError as e:
                    raise UserError(f"--dataset {path}: not valid JSON ({e.msg} at line {e.lineno})") from None
            data = data.get("data") if isinstance(data, dict) and isinstance(data.get("data"), list) else data
            if not isinstance(data, list):
                raise UserError(f"--dataset {path}: a .json dataset must be a list of records (objects with a "
                                f"question and an answer field), or {{\"data\": [...]}}; this file holds a "
                                f"{type(data).__name__}")
            return data
    except UnicodeDecodeError as e:
        raise UserError(f"--dataset {path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise UserError(f"--dataset {path}: cannot read it ({e.strerror})") from None
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise UserError("reading parquet needs pyarrow: pip install pyarrow") from None
        try:
            return pq.read_table(path).to_pylist()
        except Exception as e:  # noqa: BLE001 (pyarrow raises its own error types for a damaged file)
            raise UserError(f"--dataset {path}: not a readable parquet file ({type(e).__name__})") from None
    raise UserError(f"--dataset {path!r}: local files must be .jsonl, .json or .parquet")


def _load_hub(name: str, split: str, config: Optional[str]) -> list:
    cached_only = env_flag("HF_DATASETS_OFFLINE") or hub_offline()
    try:
        import datasets
    except ImportError:
        raise UserError(f"cannot load dataset {name!r}: Hugging Face dataset ids need `pip install datasets` "
                        f"(or use --dataset builtin, or a local .jsonl file)") from None
    if cached_only:  # fail in seconds, not after ~25 s of retries per file
        hub_go_offline()
    try:
        return list(datasets.load_dataset(name, config, split=split))
    except Exception as e:  # noqa: BLE001 (datasets raises many types for a missing dataset or split)
        where = "and there is no network (or HF_HUB_OFFLINE is set)" if cached_only else "from the Hub"
        raise UserError(f"cannot load dataset {name!r} split {split!r} {where}: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}. Use --dataset builtin or a local .jsonl "
                        f"file with question/answer fields.") from None


def load_prompts(name: str, split: str, question_field: str = "question", answer_field: str = "answer",
                 n: Optional[int] = None, config: Optional[str] = None, seed: int = 0) -> list:
    """``[{"question": str, "answer": str}, ...]`` from the built-in task, a local file, or a Hub dataset id."""
    if name == BUILTIN:
        if split not in BUILTIN_SPLITS:
            raise UserError(f"the built-in task has no split {split!r}; its splits are {', '.join(BUILTIN_SPLITS)}")
        return [{"question": p["question"], "answer": p["answer"]}
                for p in builtin_split(split, n or (20_000 if split == "train" else HELD_OUT), seed)]
    looks_local = is_local(name)
    if looks_local and not os.path.exists(os.path.expanduser(name)):
        raise UserError(f"cannot load dataset {name!r}: no such file")
    rows = _read_local(os.path.expanduser(name)) if looks_local else _load_hub(name, split, config)
    if not rows:
        raise UserError(f"--dataset {name!r} ({split}) is empty")
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise UserError(f"--dataset {name!r}: row {i + 1} is a {type(r).__name__}, not an object with "
                            f"{question_field!r} and {answer_field!r} fields")
        missing = [f for f in (question_field, answer_field) if r.get(f) is None]
        if missing:
            raise UserError(f"--dataset {name!r}: row {i + 1} has no (or a null) {missing[0]!r} field; it has "
                            f"{sorted(r)}. Set --question-field/--answer-field")
    out = [{"question": str(r[question_field]), "answer": str(r[answer_field])} for r in rows]
    if answer_field == "answer" and "####" in out[0]["answer"]:  # GSM8K: "<solution> #### 72"
        for r in out:
            r["answer"] = r["answer"].split("####")[-1].strip().replace(",", "")
    return out[:n] if n else out


def is_local(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.endswith((".jsonl", ".json", ".parquet", ".csv"))


def train_eval_split(train: list, evals: list, n_eval: int, same_source: bool, allow_overlap: bool = False) -> tuple:
    """(train, eval, overlap): evaluation prompts are never trained on unless ``allow_overlap``.

    ``same_source``: both lists come from one file / split; then ``n_eval`` prompts (a fixed random choice, the same
    for every seed) are held out of it for evaluation. Otherwise ``eval`` is the first ``n_eval`` of ``evals`` and
    any training prompt whose question also appears there is dropped. ``overlap`` = how many were shared."""
    if same_source:
        order = list(range(len(train)))
        random.Random("held-out-eval").shuffle(order)
        held = set(order[:n_eval])
        evals = [train[i] for i in sorted(held)]
        rest = [r for i, r in enumerate(train) if i not in held]
        return (train if allow_overlap else rest), evals, (len(evals) if allow_overlap else 0)
    evals = evals[:n_eval]
    questions = {r["question"] for r in evals}
    kept = [r for r in train if r["question"] not in questions]
    return (train if allow_overlap else kept), evals, len(train) - len(kept)


def default_split(name: str, split: str) -> str:
    return "eval" if name == BUILTIN and split == "test" else split


def load_task_prompts(dataset: str, eval_dataset: Optional[str], dataset_config: Optional[str], train_split: str,
                      eval_split: str, question_field: str, answer_field: str, eval_prompts: int,
                      prompts_per_round: int, allow_eval_overlap: bool, log) -> tuple:
    """(training prompts, evaluation prompts, overlap): never overlapping unless ``allow_eval_overlap`` (one file, or
    one split, used for both: the evaluation prompts are held out of it)."""
    eval_name = eval_dataset or dataset
    train_split, eval_split = default_split(dataset, train_split), default_split(eval_name, eval_split)
    kw = dict(question_field=question_field, answer_field=answer_field, config=dataset_config)
    train = load_prompts(dataset, train_split, **kw)
    same = eval_name == dataset and (is_local(eval_name) or eval_split == train_split)
    evals = train if same else load_prompts(eval_name, eval_split, **kw)
    train, evals, overlap = train_eval_split(train, evals, eval_prompts, same, allow_eval_overlap)
    if same and not allow_eval_overlap:
        log(f"evaluation: {len(evals)} prompts held out of {dataset} ({train_split}); {len(train)} to train on")
    elif overlap:
        log(f"{overlap} training prompts also in the evaluation set were " +
            ("kept (--allow-eval-overlap)" if allow_eval_overlap else "removed from training"))
    if len(train) < prompts_per_round:
        raise UserError(f"--dataset {dataset}: {len(train)} training prompts (after holding out the evaluation "
                        f"prompts) is fewer than --prompts-per-round {prompts_per_round}")
    return train, evals, overlap


def looks_like_path(name: str) -> bool:
    """A --model that can only be a folder: a Hub id is 'name' or 'org/name'."""
    return name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1 or os.path.isfile(name)


def load_model(name: str, log, resume: Optional[str] = None) -> tuple:
    """Tokenizer (left padding) and causal LM on the CPU in fp32, the master weights whatever --bf16 says
    (prepare_model places them); missing Hub models fail in seconds with one line when offline. ``resume``: the
    run being resumed (``name`` is its checkpoint folder), for the errors."""
    import torch
    import transformers

    path = ensure_builtin_model(log=log) if name == BUILTIN else os.path.expanduser(name)
    what = f"--resume {resume}: the checkpoint's model in {name}" if resume else f"--model {name}"
    if name != BUILTIN and looks_like_path(name) and not os.path.isdir(path):
        kind = "is a file" if os.path.isfile(path) else "does not exist"
        raise UserError(f"{what} {kind}: a local model is a folder with config.json (as save_pretrained writes it); "
                        f"a Hub model is an id such as Qwen/Qwen2.5-Math-1.5B, or use 'builtin'")
    local_only = os.path.isdir(path) or hub_offline()  # offline: the local cache only, failing at once, not in ~50 s
    try:  # the config first: an unknown model type is named as such, not blamed on the tokenizer
        transformers.AutoConfig.from_pretrained(path, local_files_only=local_only)
    except ValueError as e:
        if "model type" in str(e) or "model_type" in str(e):
            kind = re.search(r"model type `([^`]*)`", str(e))
            raise UserError(f"{what}: its config.json has model_type {kind.group(1) if kind else '?'!r}, which "
                            f"transformers {transformers.__version__} does not know; use a newer transformers or "
                            f"another model") from None
    except Exception:  # noqa: BLE001 (a missing model: reported below, with the loader's own message)
        pass
    try:
        tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=local_only)
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                                  local_files_only=local_only)
    except Exception as e:  # noqa: BLE001 (OSError, HFValidationError, ValueError: all mean "no such model here")
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if resume:  # the folder exists and held a complete checkpoint when it was written
            raise UserError(f"{what} cannot be loaded, its files are damaged or truncated ({type(e).__name__}: "
                            f"{first[:150]}); nothing was changed. Restore the folder from a copy, or start afresh "
                            f"with --overwrite") from None
        raise UserError(f"cannot load model {name!r}: {first} (offline? set --model to a local directory, or "
                        f"'builtin')") from None
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok, model


# ---------------------------------------------------------------------------------------------------------------
# Verifier reward
# ---------------------------------------------------------------------------------------------------------------
def last_boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}`` in ``text`` (braces nested to any depth); None when there is none or the
    last one is never closed."""
    start = text.rfind("\\boxed{")
    while start != -1:
        depth, i = 0, start + len("\\boxed")
        for j in range(i, len(text)):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    return text[i + 1:j]
        return None  # the last \boxed{ is unclosed: no answer
    return None


# A reward call must never hang a run. math-verify (sympy) can spend unbounded time inside one C-level call (a power
# tower such as 10^{10^{10^{10}}} is evaluated through one big-integer power), which no signal handler can interrupt,
# and SIGALRM only works in the main thread. So, as verl and TRL do, the check runs in worker processes: a check that
# overruns its limit has its worker killed (SIGKILL) and replaced, and scores 0. In front of the workers sit a cheap
# pre-screen (answers no verifier should be asked to evaluate) and an exact fast path for plain integers, the common
# case on GSM8K-style tasks, which needs no worker at all.
MAX_ANSWER_CHARS = 1000  # a boxed answer longer than this scores 0 without verification
MAX_BRACE_DEPTH = 64
_INTEGER = re.compile(r"-?[0-9]{1,30}")
_POWER_TOWER = re.compile(r"\^\s*\{[^{}]*\^|\^\s*\d*\s*\^|\^\s*\{\s*\d{7,}|\^\s*\d{7,}|\d{5,}\s*!")


def prescreen(boxed: str) -> bool:
    """False for boxed answers that are not worth a verifier call: too long, control characters, braces nested too
    deep, power towers, huge literal exponents or factorials. Such answers score 0."""
    if len(boxed) > MAX_ANSWER_CHARS or any(ord(c) < 32 and c not in "\t\n" for c in boxed):
        return False
    depth = 0
    for c in boxed:
        depth += (c == "{") - (c == "}")
        if depth > MAX_BRACE_DEPTH:
            return False
    return _POWER_TOWER.search(boxed) is None


def _gold_latex(gold: str) -> str:
    return gold if "\\boxed" in gold or "$" in gold else f"${gold}$"


def _verify_in_process(gold: str, boxed: str) -> float:
    """``verify(parse(gold), parse(pred))``, gold first, with math-verify's own (signal-based) timeouts disabled."""
    import logging

    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns on every call that its own timeouts are off
    try:
        g = parse(_gold_latex(gold), parsing_timeout=None)
        p = parse(f"\\boxed{{{boxed}}}", parsing_timeout=None)
        return 1.0 if (g and p and verify(g, p, timeout_seconds=None)) else 0.0
    except Exception:  # noqa: BLE001 (any verifier failure is a wrong answer, never a crash)
        return 0.0


def _verifier_worker() -> None:
    """Worker process loop: read ``[id, gold, boxed]`` JSON lines on stdin, answer ``[id, reward]`` on stdout."""
    import sys

    import math_verify  # noqa: F401  (imported before announcing readiness, so the first check is not slowed)

    sys.stdout.write('"ready"\n')
    sys.stdout.flush()
    for line in sys.stdin:
        i, gold, boxed = json.loads(line)
        sys.stdout.write(json.dumps([i, _verify_in_process(gold, boxed)]) + "\n")
        sys.stdout.flush()


class _Worker:
    def __init__(self):
        import subprocess
        import sys

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the folder holding this package
        code = f"import sys; sys.path.insert(0, {root!r}); from {__name__} import _verifier_worker; _verifier_worker()"
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        self.fd, self.buf, self.ready, self.job, self.deadline = self.proc.stdout.fileno(), b"", False, None, 0.0
        self.started = time.monotonic()

    def send(self, job: int, gold: str, boxed: str, timeout: float) -> None:
        self.proc.stdin.write((json.dumps([job, gold, boxed]) + "\n").encode())
        self.proc.stdin.flush()
        self.job, self.deadline = job, time.monotonic() + timeout

    def read_lines(self) -> Optional[list]:
        """Complete lines available now; None at end of file (the worker died)."""
        chunk = os.read(self.fd, 65536)
        if not chunk:
            return None
        self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        return [json.loads(x) for x in lines if x.strip()]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                f.close()


class VerifierPool:
    """A few math-verify worker processes. ``score(pairs, timeout)`` checks ``(gold, boxed)`` pairs in parallel; a
    check that has not answered within ``timeout`` seconds scores 0 and its worker is killed and replaced, so no
    completion can stall the caller for longer than about ``timeout`` (plus a worker restart, ~0.3 s)."""

    BOOT_TIMEOUT = 60.0

    def __init__(self, workers: int = 0):
        self.n = workers or max(1, min(4, os.cpu_count() or 1))
        self.workers: list = []
        self.lock = threading.Lock()

    def _spawn(self) -> _Worker:
        w = _Worker()
        self.workers.append(w)
        return w

    def _replace(self, w: _Worker) -> None:
        w.kill()
        self.workers.remove(w)
        self._spawn()

    def score(self, pairs: list, timeout: float) -> list:
        import selectors

        if not pairs:
            return []
        with self.lock:
            while len(self.workers) < min(self.n, len(pairs)):
                self._spawn()
            out, todo = [0.0] * len(pairs), list(range(len(pairs)))[::-1]
            sel = selectors.DefaultSelector()
            while todo or any(w.job is not None for w in self.workers):
                for w in self.workers:
                    if w.ready and w.job is None and todo:
                        i = todo.pop()
                        w.send(i, *pairs[i], timeout)
                now = time.monotonic()
                waits = [w.deadline - now if w.ready else w.started + self.BOOT_TIMEOUT - now for w in self.workers
                         if w.job is not None or not w.ready]
                for w in self.workers:
                    sel.register(w.fd, selectors.EVENT_READ, w)
                events = sel.select(max(min(waits, default=0.05), 0.0))
                for w in self.workers:
                    sel.unregister(w.fd)
                for key, _ in events:
                    w = key.data
                    lines = w.read_lines()
                    if lines is None:  # died (out of memory, a crash in sympy's C code): that check scores 0
                        if not w.ready:
                            raise RuntimeError("the math-verify worker process failed to start "
                                               "(is math-verify installed? pip install math-verify)")
                        self._replace(w)
                        continue
                    for msg in lines:
                        if msg == "ready":
                            w.ready = True
                        else:
                            out[msg[0]], w.job = float(msg[1]), None
                now = time.monotonic()
                for w in list(self.workers):
                    if w.job is not None and now > w.deadline:  # overran its limit: kill it, the check scores 0
                        self._replace(w)
                    elif not w.ready and now > w.started + self.BOOT_TIMEOUT:
                        raise RuntimeError("the math-verify worker process did not start within "
                                           f"{self.BOOT_TIMEOUT:.0f} s")
            sel.close()
            return out

    def close(self) -> None:
        for w in self.workers:
            w.kill()
        self.workers = []


_POOL: Optional[VerifierPool] = None


def verifier_pool() -> VerifierPool:
    """The process-wide pool (one per rank), started on first use and stopped at exit."""
    global _POOL
    if _POOL is None:
        import atexit

        _POOL = VerifierPool()
        atexit.register(_POOL.close)
    return _POOL


def math_rewards(completions: list, golds: list, timeout: float = 1.0) -> list:
    """``math_reward`` for a batch: 1.0 where the last ``\\boxed{}`` of a completion is mathematically equal to its
    gold answer, else 0.0, with the checks that need math-verify run in parallel worker processes.

    No box, an unclosed box, an answer the pre-screen rejects, a parse failure, or a check that takes longer than
    ``timeout`` seconds all give 0. Plain integers on both sides are compared exactly without math-verify. Otherwise
    math-verify is called as ``verify(parse(gold), parse(pred))`` (gold first) on the extracted box only, so its
    lenient unanchored extraction ("the answer is 72" without a box) does not apply.
    """
    if not timeout > 0 or not math.isfinite(timeout):
        raise ValueError(f"the reward timeout must be a positive number of seconds, got {timeout}")
    out, pending = [0.0] * len(completions), []
    for i, (completion, gold) in enumerate(zip(completions, golds)):
        boxed = last_boxed(completion)
        if boxed is None or not boxed.strip() or not prescreen(boxed):
            continue
        b, g = boxed.strip(), gold.strip()
        if _INTEGER.fullmatch(b) and _INTEGER.fullmatch(g):  # exact, and what math-verify would answer
            out[i] = float(int(b) == int(g))
        else:
            pending.append(i)
    if pending:
        scores = verifier_pool().score([(golds[i], last_boxed(completions[i])) for i in pending], timeout)
        for i, r in zip(pending, scores):
            out[i] = r
    return out


def math_reward(completion: str, gold: str, timeout: float = 1.0) -> float:
    """1.0 if the last ``\\boxed{}`` of ``completion`` is mathematically equal to ``gold``, else 0.0 (see
    ``math_rewards``); never takes much longer than ``timeout`` seconds, from any thread."""
    return math_rewards([completion], [gold], timeout)[0]


def has_format(completion: str) -> bool:
    """Format check: the completion ends its reasoning with a closed ``\\boxed{}`` answer."""
    return last_boxed(completion) is not None


# ---------------------------------------------------------------------------------------------------------------
# Built-in base model: a tiny Qwen2 with a locally trained byte-level BPE tokenizer, warmed up by noisy SFT
# ---------------------------------------------------------------------------------------------------------------
# Qwen2's pre-tokenizer split pattern: every digit is its own token, as in Qwen.
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                 r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
MODEL_SIZES = {  # hidden, layers, heads, kv heads, ffn
    "xs": (64, 2, 4, 2, 256),  # 0.15 M parameters: tests
    "s": (128, 4, 4, 2, 512),  # 1.04 M parameters: the default
}
BUILTIN_VERSION = 1


def train_tokenizer(texts: list):
    import transformers
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_PATTERN), "isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>", "<|pad|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                                padding_side="left")


def noisy_completion(p: dict, rng: random.Random, noise: float) -> str:
    """With probability ``noise`` the demo boxes a wrong answer (off by 1..10) after a correct chain of thought: a
    behavioural error that a verifiable reward can remove."""
    answer = int(p["answer"])
    if rng.random() < noise:
        answer = max(0, answer + rng.choice([-1, 1]) * rng.randint(1, 10))
    return completion_text(p["solution"], str(answer))


def build_builtin_model(out_dir: str, seed: int = 0, size: str = "s", sft_steps: int = 800, noise: float = 0.5,
                        batch_size: int = 64, lr: float = 3e-3, log: Callable[[str], None] = print) -> str:
    """Train the tokenizer, build the Qwen2 model and run the noisy SFT warm-up; save atomically to ``out_dir``."""
    import torch
    import transformers

    t0 = time.time()
    rng = random.Random(f"sft-{seed}")
    problems = builtin_split("train", 20_000, seed)
    texts = [TEMPLATES["plain"].format(question=p["question"]) + noisy_completion(p, rng, noise) for p in problems]
    tok = train_tokenizer(texts[:4000])
    h, layers, heads, kv, ffn = MODEL_SIZES[size]
    cfg = transformers.Qwen2Config(
        vocab_size=len(tok), hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv, intermediate_size=ffn, max_position_embeddings=512, tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = min(50, max(sft_steps // 10, 1))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s / max(sft_steps, 1), 1.0)))))
    prompts = [TEMPLATES["plain"].format(question=p["question"]) for p in problems]
    tok.padding_side = "right"
    model.train()
    for step in range(sft_steps):
        idx = [rng.randrange(len(texts)) for _ in range(batch_size)]
        enc = tok([texts[i] + tok.eos_token for i in idx], return_tensors="pt", padding=True)
        labels = enc.input_ids.clone()
        labels[enc.attention_mask == 0] = -100
        for row, i in enumerate(idx):  # completion-only loss: mask the prompt tokens
            labels[row, : len(tok(prompts[i]).input_ids)] = -100
        loss = model(**enc, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0:
            log(f"built-in model SFT step {step + 1}/{sft_steps}: loss {loss.item():.3f} ({time.time() - t0:.0f}s)")
    tok.padding_side = "left"
    model.generation_config.pad_token_id = tok.pad_token_id
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".building-")
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700 folders: give the cache normal permissions
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        with open(os.path.join(tmp, "builtin.json"), "w") as f:
            json.dump({"seed": seed, "size": size, "sft_steps": sft_steps, "noise": noise,
                       "version": BUILTIN_VERSION}, f)
        if os.path.exists(out_dir):  # built meanwhile by another process: keep that one
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"built-in model ready at {out_dir} ({time.time() - t0:.0f}s)")
    return out_dir


def cache_root() -> str:
    return os.environ.get("REFERENCE_RL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "reference-rl")


def ensure_builtin_model(seed: int = 0, size: str = "s", sft_steps: int = 800, log: Callable[[str], None] = print
                         ) -> str:
    """Path of the built-in model for these settings, building it once (about 4 minutes on 2 CPU cores)."""
    out = os.path.join(cache_root(), f"tiny-qwen2-{size}-sft{sft_steps}-seed{seed}-v{BUILTIN_VERSION}")
    if os.path.isfile(os.path.join(out, "builtin.json")):
        return out
    log(f"building the built-in base model (tokenizer, {size} Qwen2, {sft_steps} noisy SFT steps) into {out} ...")
    return build_builtin_model(out, seed=seed, size=size, sft_steps=sft_steps, log=log)
