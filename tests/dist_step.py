"""Helper of tests/test_llm_scale.py: two optimizer steps of grpo_llm.py or reval_llm.py on a fixed batch, in fp32
and with bf16 compute, in one process or under torchrun (each rank takes its share of the batch, as main() does);
rank 0 saves the weights.

    python tests/dist_step.py SCRIPT MODEL_DIR OUT.pt [--fsdp]
    python -m torch.distributed.run --nproc_per_node 2 tests/dist_step.py SCRIPT MODEL_DIR OUT.pt --fsdp
"""

import importlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.llm_dist import full_state, precision, prepare_model, unwrap  # noqa: E402


def fixed_batch(vocab: int, reval: bool, n: int = 8, prompt: int = 5, completion: int = 7) -> dict:
    """n sequences with left-padded prompts and right-padded completions of different lengths, fixed by a seed, with
    GRPO's advantages or ReVal's rewards and cached reference terms."""
    g = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(2, vocab, (n, prompt), generator=g)
    completion_ids = torch.randint(2, vocab, (n, completion), generator=g)
    prompt_mask = torch.ones(n, prompt, dtype=torch.long)
    completion_mask = torch.ones(n, completion, dtype=torch.long)
    for i in range(n):
        prompt_mask[i, : i % 3] = 0
        completion_mask[i, completion - i % 4:] = 0
    batch = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
             "completion_mask": completion_mask}
    if reval:
        return {**batch, "reward": torch.randn(n, generator=g), "ref_v1": torch.randn(n, generator=g),
                "ref_logp": -10 * torch.rand(n, generator=g)}
    return {**batch, "advantages": torch.randn(n, generator=g)}


def main() -> None:
    script, model_dir, out = sys.argv[1:4]
    fsdp = "--fsdp" in sys.argv
    mod = importlib.import_module(script[: -len(".py")])
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world > 1:
        torch.distributed.init_process_group("gloo")
    results = {}
    for bf16 in (False, True):  # fp32, then bf16 compute over fp32 master weights (FSDP's policy or autocast)
        torch.manual_seed(0)
        tok, model = mod.load_model(model_dir, lambda *a: None)
        model = prepare_model(model, torch.device("cpu"), world, fsdp, bf16=bf16, trainable=True)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.01)
        batch = fixed_batch(len(tok), reval=script == "reval_llm.py")
        n = batch["completion_ids"].shape[0] // world
        mine = {k: v[rank * n:(rank + 1) * n] for k, v in batch.items()}
        args = mod.Args(micro_batch_size=3, max_new_tokens=7)
        for _ in range(2):  # two updates: the second one uses AdamW's state from the first
            metrics = mod.optimizer_step(model, opt, mine, args, world, lambda: precision(model, bf16))
        sd, _ = full_state(model, opt)
        results["bf16" if bf16 else "fp32"] = {"weights": sd, "loss": metrics["train/loss"],
                                               "grad_norm": metrics["train/grad_norm"],
                                               "wrapped": type(unwrap(model)).__name__}
    if rank == 0:
        torch.save(results, out)
    if world > 1:  # as the scripts end: no rank tears gloo down while the other still works (rank 0 saving)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
