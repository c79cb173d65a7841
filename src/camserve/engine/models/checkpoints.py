"""Weights files: state dicts without pickled code, in the shapes people save them.

:func:`read_state_dict` reads ``.safetensors`` with safetensors and anything else with
``torch.load(weights_only=True)`` (tensors and plain containers only: no pickled code runs).
Serialized programs are refused before anything is loaded — TorchScript, ONNX, ExportedProgram /
AOTInductor packages (``.pt2``) and shared objects: camserve needs the ``nn.Module`` itself to hook
its layers and differentiate through it. :func:`load_weights` unwraps ``{"state_dict": …}`` /
``{"model": …}`` nesting, strips ``module.`` / ``model.`` key prefixes and loads strictly: a missing
or unexpected key is an error that names the keys (only BatchNorm's ``num_batches_tracked``
counter, absent from old checkpoints, may be missing).
"""

from __future__ import annotations

import os
import zipfile
from typing import Dict, Mapping

import torch
from torch import nn

SHIP_INSTEAD = ("ship the model's state dict instead (torch.save(model.state_dict(), 'weights.pt') or "
                "safetensors) with its architecture (source torchvision/timm/transformers, or an eager "
                "model.py)")
NESTING_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "params")
PREFIXES = ("module.", "model.", "_orig_mod.")


class WeightsError(ValueError):
    """A weights file that camserve cannot or will not load; the message says why."""


def refuse_programs(path: str) -> None:
    """Raise :class:`WeightsError` for a serialized program (TorchScript, ONNX, AOTInductor, …)."""
    name = os.path.basename(path).lower()
    if name.endswith(".onnx"):
        raise WeightsError(f"{path}: an ONNX graph has no PyTorch modules to hook and no autograd; {SHIP_INSTEAD}")
    if name.endswith((".so", ".pt2", ".engine", ".plan")):
        raise WeightsError(f"{path}: a compiled/exported program (AOTInductor, ExportedProgram, TensorRT) has no "
                           f"hookable modules and no autograd; {SHIP_INSTEAD}")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            entries = archive.namelist()
        parts = {p for e in entries for p in e.split("/")[1:2]}
        if "code" in parts or any(e.endswith("constants.pkl") for e in entries):
            raise WeightsError(f"{path}: a TorchScript archive (torch.jit.save) cannot be hooked per layer or "
                               f"explained with camserve's backward passes; {SHIP_INSTEAD}")
        if any(e.endswith(("archive_format", "serialized_exported_program.json")) or "/models/" in e
               for e in entries):
            raise WeightsError(f"{path}: an exported program (torch.export / AOTInductor package) has no "
                               f"nn.Module to hook; {SHIP_INSTEAD}")
    else:
        with open(path, "rb") as f:
            head = f.read(16)
        if head.startswith(b"\x7fELF"):
            raise WeightsError(f"{path}: a shared object (compiled model) has no hookable modules; {SHIP_INSTEAD}")


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """The tensors of a weights file, unwrapped and with common key prefixes stripped."""
    if not os.path.isfile(path):
        raise WeightsError(f"weights file {path!r} not found")
    refuse_programs(path)
    if path.lower().endswith(".safetensors"):
        from safetensors.torch import load_file

        loaded: object = load_file(path, device="cpu")
    else:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - any unpickling refusal is the same message
            raise WeightsError(f"{path}: not a state dict loadable with torch.load(weights_only=True) "
                               f"({type(error).__name__}: {str(error).splitlines()[0][:300]}); {SHIP_INSTEAD}") from None
    return strip_prefixes(unwrap(loaded, path))


def unwrap(loaded: object, path: str = "weights") -> Dict[str, torch.Tensor]:
    """``{"state_dict": {…}}`` / ``{"model": {…}}`` (nested any depth) → the flat tensor mapping."""
    for _ in range(4):
        if isinstance(loaded, Mapping) and loaded and all(isinstance(v, torch.Tensor) for v in loaded.values()):
            return dict(loaded)
        if isinstance(loaded, Mapping):
            inner = next((loaded[k] for k in NESTING_KEYS if isinstance(loaded.get(k), Mapping)), None)
            if inner is not None:
                loaded = inner
                continue
            tensors = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
            if tensors:  # a checkpoint with tensors beside bookkeeping entries
                return tensors
        break
    raise WeightsError(f"{path}: no state dict found (expected a mapping of tensors, or one nested under "
                       f"{list(NESTING_KEYS)}); got {type(loaded).__name__}")


def strip_prefixes(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Remove a ``module.`` (DataParallel), ``model.`` or ``_orig_mod.`` (torch.compile) prefix shared
    by every key."""
    changed = True
    while changed and state:
        changed = False
        for prefix in PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


def load_weights(model: nn.Module, path: str) -> nn.Module:
    """Load ``path`` into ``model`` strictly; a key or shape mismatch raises :class:`WeightsError`
    naming the keys (a prefix the model expects, e.g. ``model.``, is tried once)."""
    state = read_state_dict(path)
    expected = model.state_dict()
    if set(state) != set(expected):
        for prefix in PREFIXES:
            if {prefix + k for k in state} == set(expected):
                state = {prefix + k: v for k, v in state.items()}
                break
    for key in set(expected) - set(state):  # checkpoints from before BatchNorm counted its batches
        if key.endswith(".num_batches_tracked"):
            state[key] = expected[key]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(k for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or shapes:
        def listing(keys):
            return ", ".join(keys[:8]) + (f" … ({len(keys)} in all)" if len(keys) > 8 else "")
        parts = []
        if missing:
            parts.append(f"missing keys: {listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {listing(unexpected)}")
        if shapes:
            parts.append("shape mismatch: " + listing([f"{k} {tuple(state[k].shape)} vs model "
                                                        f"{tuple(expected[k].shape)}" for k in shapes]))
        raise WeightsError(f"{path} does not fit the architecture ({type(model).__name__}): " + "; ".join(parts))
    model.load_state_dict(state, strict=True)
    return model
