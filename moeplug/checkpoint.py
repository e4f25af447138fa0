"""Checkpoints of expert-parallel models: sharded save, load at any `ep_size`, export to transformers.

Layout of a checkpoint directory (safetensors):
    replicated.safetensors                  every parameter/buffer that is not an expert shard (rank 0)
    experts-00000-of-00002.safetensors      the expert rows of EP rank 0 (global ids in the metadata)
    moeplug.json                            format version and the number of experts per parameter
    optimizer-00000-of-00002.pt             with `optimizer=`: the optimizer state of EP rank 0 (torch.save)

Writes are atomic: all ranks write into `<dir>.partial`, then rank 0 swaps it in for `<dir>` (the
old one is moved to `<dir>.previous` and removed only after the swap). A crash at any point leaves
the last complete checkpoint in `<dir>` or, between the two renames, in `<dir>.previous`;
`load_checkpoint` falls back to it.

Optimizer state is saved per EP rank (the state of its expert shards and of the replicated parameters;
data-parallel replicas of one EP rank hold the same state when trained with
`moeplug.dispatch.allreduce_gradients`, so one of them writes it). It can be resumed with the same
`ep_size` and any number of data-parallel replicas; the model weights alone load at any `ep_size`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from .dispatch import expert_parallel_parameters
from .ep_layout import ExpertParallel

FORMAT_VERSION = 1


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _rank_world()[1] > 1:
        dist.barrier()


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies; safetensors refuses tensors that share storage (tied embeddings)."""
    seen, out = set(), {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        out[name] = tensor.clone() if key in seen else tensor
        seen.add(key)
    return out


def _publish(partial: Path, final: Path) -> None:
    """Swap a completely written `partial` directory in for `final` (rank 0 only)."""
    previous = final.with_name(final.name + ".previous")
    if final.exists():
        if previous.exists():
            shutil.rmtree(previous)
        final.rename(previous)
    partial.rename(final)
    if previous.exists():
        shutil.rmtree(previous)


def _prepare_partial(directory: Path) -> Path:
    partial = directory.with_name(directory.name + ".partial")
    rank, _ = _rank_world()
    if rank == 0:
        if partial.exists():
            shutil.rmtree(partial)  # left over by a crashed save
        partial.mkdir(parents=True)
    _barrier()
    return partial


def _contiguous_experts(model: torch.nn.Module) -> dict:
    """Expert shards by name; refuses a model moved to a placement (its rows are not in expert order)."""
    experts = expert_parallel_parameters(model)
    if any(ep.slots is not None for _, ep in experts.values()):
        raise ValueError("this model has an expert placement applied: its expert rows are in slot order; use "
                         "moeplug.placement.save_placed_checkpoint / load_placed_checkpoint instead")
    return experts


def _ep_layout(experts: dict) -> ExpertParallel:
    """This rank's expert-parallel layout (every sharded module has the same one); EP size 1 without shards."""
    return next(iter(experts.values()))[1] if experts else ExpertParallel(1, 0, 0)


def _optimizer_file(ep_rank: int, ep_size: int) -> str:
    return f"optimizer-{ep_rank:05d}-of-{ep_size:05d}.pt"


def _check_optimizer(optimizer) -> None:
    """Only a torch optimizer's state is the same on data-parallel replicas (one of them writes it)."""
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer (or Accelerate's wrapper of one), got "
                        f"{type(optimizer).__name__}; a DeepSpeed ZeRO optimizer partitions its state over ranks, "
                        "which these checkpoints do not store")


def save_checkpoint(model: torch.nn.Module, directory: str | Path, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Save `model` with each expert shard written once (by the first expert-data-parallel replica).

    With `optimizer` (a torch optimizer over this rank's parameters, e.g. `FP8AdamW` or `AdamW`), its
    state is saved too, once per EP rank, for `load_checkpoint(..., optimizer=)` to resume training.
    Collective: every rank must call it.
    """
    directory = Path(directory)
    _check_optimizer(optimizer)
    rank, _ = _rank_world()
    experts = _contiguous_experts(model)
    ep = _ep_layout(experts)
    partial = _prepare_partial(directory)
    state = model.state_dict()
    if rank == 0:
        save_file(_unshared({k: v for k, v in state.items() if k not in experts}), str(partial / "replicated.safetensors"))
        totals = {name: ep.num_experts for name, (_, ep) in experts.items()}
        meta = {"format": FORMAT_VERSION, "num_experts": totals}
        if optimizer is not None:
            meta["optimizer_ep_size"] = ep.ep_size
        (partial / "moeplug.json").write_text(json.dumps(meta))
    if rank < ep.ep_size:  # EP group 0 holds every expert exactly once
        if experts:
            save_file(_unshared({name: state[name] for name in experts}),
                      str(partial / f"experts-{ep.ep_rank:05d}-of-{ep.ep_size:05d}.safetensors"),
                      metadata={"first_expert": str(ep.local_experts.start)})
        if optimizer is not None:
            torch.save(optimizer.state_dict(), partial / _optimizer_file(ep.ep_rank, ep.ep_size))
    _barrier()
    if rank == 0:
        _publish(partial, directory)
    _barrier()


def _resolve(directory: Path) -> Path:
    if directory.exists():
        return directory
    previous = directory.with_name(directory.name + ".previous")
    if previous.exists():  # a save crashed between its two renames
        return previous
    raise FileNotFoundError(f"no checkpoint at {directory}")


def _expert_rows(directory: Path, name: str, first: int, stop: int) -> torch.Tensor:
    """Rows [first, stop) of expert parameter `name`, read from whichever shard files hold them."""
    pieces = []
    for path in sorted(directory.glob("experts-*.safetensors")):
        with safe_open(str(path), framework="pt") as shard:
            start = int(shard.metadata()["first_expert"])
            rows = shard.get_slice(name)
            count = rows.get_shape()[0]
            lo, hi = max(first, start), min(stop, start + count)
            if lo < hi:
                pieces.append((lo, rows[lo - start: hi - start]))
    tensor = torch.cat([piece for _, piece in sorted(pieces, key=lambda p: p[0])])
    if tensor.shape[0] != stop - first:
        raise ValueError(f"checkpoint {directory} has {tensor.shape[0]} of experts {first}..{stop - 1} of {name}")
    return tensor


def load_checkpoint(model: torch.nn.Module, directory: str | Path, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Load a `save_checkpoint` directory into `model`, whatever its (or the saved) `ep_size`.

    Each rank reads only the expert rows it holds. Raises on missing or unexpected weights. With
    `optimizer` (built over the loaded model's parameters, as when the checkpoint was saved), its state
    is restored too; that needs the saved `ep_size` (any number of data-parallel replicas) and raises
    ValueError naming both sizes otherwise, or when the checkpoint holds no optimizer state.
    """
    _check_optimizer(optimizer)
    directory = _resolve(Path(directory))
    meta = json.loads((directory / "moeplug.json").read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"checkpoint format {meta.get('format')} is not supported (expected {FORMAT_VERSION})")
    local = _contiguous_experts(model)
    state = {}
    with safe_open(str(directory / "replicated.safetensors"), framework="pt") as replicated:
        for key in replicated.keys():
            state[key] = replicated.get_tensor(key)
    for name, total in meta["num_experts"].items():
        if name in local:
            layout = local[name][1].local_experts
            state[name] = _expert_rows(directory, name, layout.start, layout.stop)
        else:
            state[name] = _expert_rows(directory, name, 0, total)
    for name, (_, ep) in local.items():
        if name not in meta["num_experts"] and name in state:  # saved without expert parallelism
            state[name] = state[name][ep.local_experts.start: ep.local_experts.stop]
    if optimizer is not None:  # checked before the model changes, so a refused load leaves it as it was
        optimizer_state = _optimizer_state(directory, meta, _ep_layout(local))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to the embeddings
    if missing or unexpected:
        raise ValueError(f"checkpoint {directory} does not match the model: missing {missing}, unexpected {unexpected}")
    if optimizer is not None:
        optimizer.load_state_dict(optimizer_state)


def _optimizer_state(directory: Path, meta: dict, ep: ExpertParallel) -> dict:
    """This EP rank's saved optimizer state, after checking that the layouts agree."""
    saved = meta.get("optimizer_ep_size")
    if saved is None:
        raise ValueError(f"checkpoint {directory} holds no optimizer state (saved without optimizer=)")
    if saved != ep.ep_size:
        raise ValueError(f"checkpoint {directory} holds optimizer state for ep_size={saved}, this model has "
                         f"ep_size={ep.ep_size}: resume with ep_size={saved}, or load the weights alone (optimizer=None)")
    return torch.load(directory / _optimizer_file(ep.ep_rank, ep.ep_size), map_location="cpu", weights_only=True)


def _gather_experts(param: torch.Tensor, ep) -> torch.Tensor:
    parts = [torch.empty_like(param) for _ in range(ep.ep_size)]
    dist.all_gather(parts, param.detach().contiguous(), group=ep.group)
    return torch.cat(parts)


def export_pretrained(model: torch.nn.Module, directory: str | Path, **save_kwargs) -> None:
    """Write a plain transformers checkpoint (`save_pretrained` layout, full experts) of a patched model.

    Collective: experts are gathered over each EP group; rank 0 writes, atomically.
    Unpatched transformers loads the result with the same outputs.
    """
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"{type(model).__name__} is not a transformers model; use save_checkpoint instead")
    directory = Path(directory)
    rank, _ = _rank_world()
    experts = _contiguous_experts(model)
    state = {k: v for k, v in model.state_dict().items()}
    for name, (param, ep) in experts.items():
        state[name] = _gather_experts(param, ep)
    partial = _prepare_partial(directory)
    if rank == 0:
        model.save_pretrained(str(partial), state_dict=state, **save_kwargs)
        _publish(partial, directory)
    _barrier()
