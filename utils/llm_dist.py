"""Scale for the LLM scripts (``grpo_llm.py``, ``reval_llm.py``): process setup under torchrun, mixed precision with
fp32 master weights, FSDP2 sharding, and checkpoint folders gathered from the shards. Generic harness, no algorithm.

Precision. The trained weights and AdamW's state are always fp32 ("master weights"). With ``--bf16`` the forward and
backward passes run in bfloat16: under FSDP2 through ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``
(the gathered copy of each layer is bf16, gradients are reduced and stored in fp32), otherwise through
``torch.autocast``. Stepping bf16 weights directly would lose the update: at the paper's learning rate of 1e-6 an
Adam step (~lr per weight) is far below bf16's spacing near |w| = 0.02 (2^-6 * 2^-7 = 1.2e-4), so it rounds away.

Sharding. ``--fsdp`` applies ``torch.distributed.fsdp.fully_shard`` to each decoder layer, then to the whole model
(the layout TRL and verl use): every rank holds 1/world of the weights, gradients and optimizer state, and gathers one
layer at a time for its forward and backward. For generation, the whole model is gathered once per call
(``gathered``), so the many small decode forwards need no communication and ranks may stop at different lengths.
"""

from __future__ import annotations

import contextlib
import os
import re

import torch
import torch.distributed as dist

from utils.common import UserError


def setup_distributed(device_flag: str) -> tuple:
    """(rank, world_size, device). Under torchrun: one process per device, gloo on CPU, nccl on GPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device_flag == "auto":
        device_flag = "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device_flag):
        raise UserError(f"--device {device_flag!r} is not supported: use auto, cpu, cuda or cuda:N")
    if device_flag.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device_flag} asked for, but torch sees no CUDA GPU (use --device cpu)")
    device = torch.device(f"cuda:{local_rank}" if device_flag == "cuda" and world > 1 else device_flag)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)
    return rank, world, device


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum over ranks (in place); ``x`` itself in a single process."""
    if dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def unwrap(model):
    """The Hugging Face model inside a DDP wrapper (an FSDP2 model is the Hugging Face model itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def prepare_model(model, device: torch.device, world: int, fsdp: bool, bf16: bool, trainable: bool,
                  gradient_checkpointing: bool = False):
    """Place a (CPU, fp32) model for training or as a frozen reference.

    fsdp: shard each decoder layer, then the root, over all ranks (bf16 compute with ``bf16``); the states move to
    ``device`` shard by shard, so a rank never holds the whole fp32 model on its GPU. Otherwise the model moves to
    ``device``, and a trainable one on several ranks is wrapped in DDP."""
    if gradient_checkpointing and trainable:  # keep only each layer's input; recompute the rest in the backward
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not trainable:
        model.eval().requires_grad_(False)
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(device.type, (world,))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
            MixedPrecisionPolicy()
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        return model
    model = model.to(device)
    if trainable and world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                          else None)
    return model


def decoder_layers(model) -> list:
    """The transformer blocks of a Hugging Face causal LM (``model.model.layers`` for Llama, Qwen2, Mistral, ...)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise UserError(f"--fsdp: cannot find the decoder layers of {type(model).__name__} (expected model.layers); "
                        f"run it with --fsdp False")
    return list(layers)


def precision(model, bf16: bool):
    """The compute-precision context of a forward pass: bf16 autocast over fp32 weights, unless FSDP2's
    mixed-precision policy already casts the gathered weights (then nothing is needed)."""
    if not bf16 or is_sharded(model):
        return contextlib.nullcontext()
    return torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16)


@contextlib.contextmanager
def gathered(model):
    """Hold FSDP2's full (gathered) weights for the duration, e.g. one ``generate`` call: without it, each of the
    thousands of decode steps would all-gather every layer, and ranks that stop generating early would leave the
    others waiting in a collective. Gathering is collective: every rank enters it equally often (an evaluation
    holds it once around all of its calls, whose number differs between ranks). A no-op for an unsharded model."""
    from torch.distributed.fsdp import FSDPModule

    if getattr(model, "_held_gathered", False):  # nested (an evaluation's generate calls): already gathered
        yield model
        return
    mods = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in mods:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    model._held_gathered = True
    try:
        yield model
    finally:
        model._held_gathered = False
        for m in mods:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)


def as_float(x) -> float:
    """A scalar tensor (a DTensor too, e.g. the total norm that clip_grad_norm_ returns under FSDP2) as a float."""
    return float(x.full_tensor() if hasattr(x, "full_tensor") else x)


def all_finite(model) -> bool:
    """True when every parameter is finite on every rank (each rank checks its own shards)."""
    ok = all(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all() for p in model.parameters())
    flag = torch.tensor(float(ok), device=next(model.parameters()).device)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def full_state(model, opt=None) -> tuple:
    """(model state dict, optimizer state dict), full and on the CPU on rank 0, empty on the other ranks. Collective
    under FSDP: every rank must call it. The optimizer's state is keyed by parameter name, so the same file resumes
    with or without sharding."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    model = unwrap(model)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    sd = get_model_state_dict(model, options=options)
    osd = get_optimizer_state_dict(model, opt, options=options) if opt is not None else None
    return sd, osd


def load_optimizer_state(model, opt, optim_state: dict) -> None:
    """Restore a state dict written by ``full_state`` (every rank passes the full dict; each keeps its shards)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(unwrap(model), opt, optim_state, options=StateDictOptions(full_state_dict=True))


def gather_to_rank0(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on rank 0 (None elsewhere); [obj] in a single process."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def find_checkpoint(resume: str) -> str:
    """The checkpoint folder of ``--resume`` (a run folder, its checkpoint/ or a leftover checkpoint.old/)."""
    for d in (os.path.join(resume, "checkpoint"), os.path.join(resume, "checkpoint.old"), resume):
        if os.path.isfile(os.path.join(d, "trainer_state.pt")):
            return d
    raise UserError(f"--resume {resume!r}: no checkpoint/ with trainer_state.pt there")


def read_trainer_state(resume: str, version: int) -> tuple:
    """(checkpoint folder, its trainer_state.pt loaded without executing anything, memory-mapped); a file of another
    format version is refused in one line (no migrations)."""
    from utils.common import safe_torch_load

    folder = find_checkpoint(resume)
    saved = safe_torch_load(os.path.join(folder, "trainer_state.pt"), f"--resume {resume}", mmap=True)
    fmt = saved.get("format", 1) if isinstance(saved, dict) else None
    if fmt != version:
        raise UserError(f"--resume {resume}: the checkpoint has format {fmt} and this script reads format {version}; "
                        f"resume it with the version of the script that wrote it")
    return folder, saved


def swap_in_folder(tmp: str, final: str) -> None:
    """Replace the folder ``final`` by the complete folder ``tmp``: a crash at any point leaves a complete
    checkpoint (``final``, or ``final``.old, which ``find_checkpoint`` also takes)."""
    import shutil

    from utils.common import current_umask

    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700 folders; give the user's normal permissions
    old = final + ".old"
    if os.path.isdir(final) and os.path.exists(old):  # a kill during the last rmtree(old); final is complete
        shutil.rmtree(old)
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
