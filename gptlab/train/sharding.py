"""Fully sharded data parallel (FSDP2) for `gptlab pretrain --fsdp true` under torchrun.

DDP keeps a whole copy of the weights, gradients and AdamW moments on every rank; FSDP keeps 1/W of each
and gathers a block's weights just before it runs (Zhao et al. 2023, PyTorch FSDP; here the per-parameter
`torch.distributed.fsdp.fully_shard` API). That is what lets a model larger than one GPU's memory train.

Design decisions
- One FSDP unit per transformer block, plus the root (embeddings, final norm, head): a block's weights are
  gathered for its forward and backward and freed after, so peak memory is the shards plus ~one block.
- Checkpoints keep one format whatever the launch: full (unsharded) weights and optimizer states in the
  plain `optimizer.state_dict()` layout (parameters numbered in param-group order), gathered to rank 0 to
  save and sharded again on load. A run saved under FSDP resumes under DDP or in one process, and back.
  The price is that rank 0 holds one full copy in CPU memory while saving: fine up to models that fit a
  host's RAM, which covers every preset here (the multi-host sharded format, `torch.distributed.checkpoint`,
  would lift it).
- AdamW only: Muon orthogonalises whole matrices, which a rank holding a slice cannot do.
- Gradient accumulation: `set_requires_gradient_sync(False)` on all but the last micro-batch keeps the
  reduce-scatter to one per step, as `no_sync` does for DDP.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..model import GPT

# gathered to rank 0's CPU: the save path never needs a full copy on the accelerator
_FULL_ON_RANK0 = {"full_state_dict": True, "cpu_offload": True}


def shard_model(model: GPT) -> GPT:
    """Shard `model` in place over the default process group: one FSDP unit per block, then the root."""
    from torch.distributed.fsdp import fully_shard

    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)
    return model


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Fully qualified names of the optimizer's parameters in `state_dict()` numbering order."""
    name_of = {id(p): name for name, p in model.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_state(model: GPT, optimizers: list[torch.optim.Optimizer]) -> tuple[dict, list[dict]]:
    """Gather the full model state and optimizer states (plain numbered layout). A collective: every rank
    must call it; rank 0 gets the tensors on its CPU, the other ranks get empty dicts."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(**_FULL_ON_RANK0)
    model_state = get_model_state_dict(model, options=options)
    optimizer_states = []
    for opt in optimizers:
        by_name = get_optimizer_state_dict(model, opt, options=options)
        if not by_name:  # not rank 0
            optimizer_states.append({})
            continue
        names = _param_names(model, opt)
        index = {name: i for i, name in enumerate(names)}
        numbered = {"state": {index[name]: s for name, s in by_name["state"].items()}, "param_groups": []}
        for group in by_name["param_groups"]:
            numbered["param_groups"].append({**group, "params": [index[name] for name in group["params"]]})
        optimizer_states.append(numbered)
    return model_state, optimizer_states


def load_optimizer_states(model: GPT, optimizers: list[torch.optim.Optimizer], states: list[dict]) -> None:
    """Shard full optimizer states (plain numbered layout, as `opt.state_dict()` of an unsharded run) into
    the optimizers of the sharded `model`; every rank passes the same full states."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    for opt, state in zip(optimizers, states):
        names = _param_names(model, opt)
        by_name = {"state": {names[i]: s for i, s in state["state"].items()},
                   "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
        set_optimizer_state_dict(model, opt, by_name, options=StateDictOptions(full_state_dict=True))


def grad_norm_value(norm: torch.Tensor) -> float:
    """`clip_grad_norm_`'s result as a float: over sharded gradients it is a DTensor (a partial norm per
    rank until reduced)."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
