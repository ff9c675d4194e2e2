"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON.

`<dir>/step-000050/{tensors.safetensors, state.json}` is written to a temporary folder and renamed,
so a checkpoint folder that exists is complete.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cartridges.atomic import write_folder_atomically
from cartridges.errors import CartridgeError

TENSORS_FILE = "tensors.safetensors"
STATE_FILE = "state.json"


def _split(tree, prefix: str, tensors: dict[str, torch.Tensor]):
    """Replace every tensor in a nested dict/list by a key into `tensors`."""
    if isinstance(tree, torch.Tensor):
        tensors[prefix] = tree.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(tree, dict):
        return {str(k): _split(v, f"{prefix}.{k}", tensors) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_split(v, f"{prefix}.{i}", tensors) for i, v in enumerate(tree)]
    return tree


def _join(tree, tensors: dict[str, torch.Tensor]):
    if isinstance(tree, dict):
        if set(tree) == {"__tensor__"}:
            return tensors[tree["__tensor__"]]
        return {k: _join(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_join(v, tensors) for v in tree]
    return tree


def _int_keys(optimizer_state: dict) -> dict:
    """JSON turned the optimizer's integer parameter ids into strings; turn them back."""
    state = dict(optimizer_state)
    state["state"] = {int(k): v for k, v in state["state"].items()}
    return state


def save_checkpoint(
    folder: Path, step: int, prefix: torch.Tensor, optimizer: torch.optim.Optimizer, scheduler, extra: dict
) -> Path:
    target = folder / f"step-{step:06d}"
    if target.exists():
        return target
    tensors: dict[str, torch.Tensor] = {"prefix": prefix.detach().cpu().contiguous()}
    state = {
        "step": step,
        "optimizer": _split(optimizer.state_dict(), "optimizer", tensors),
        "scheduler": scheduler.state_dict(),
        "extra": extra,
    }

    def write(staging: Path) -> None:
        save_file(tensors, str(staging / TENSORS_FILE))
        (staging / STATE_FILE).write_text(json.dumps(state))

    write_folder_atomically(target, write)
    return target


def latest_checkpoint(folder: Path) -> Path | None:
    steps = sorted(p for p in folder.glob("step-*") if (p / STATE_FILE).is_file())
    return steps[-1] if steps else None


def load_checkpoint(path: Path, optimizer: torch.optim.Optimizer, scheduler) -> tuple[int, torch.Tensor, dict]:
    """Restore optimizer and scheduler in place; returns (step, prefix tensor, extra)."""
    try:
        tensors = load_file(str(path / TENSORS_FILE))
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CartridgeError(
            f"checkpoint {path} is unreadable ({exc}); delete it to resume from the one before"
        ) from None
    optimizer.load_state_dict(_int_keys(_join(state["optimizer"], tensors)))
    scheduler.load_state_dict(state["scheduler"])
    return state["step"], tensors["prefix"], state["extra"]
