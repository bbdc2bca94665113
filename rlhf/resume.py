"""Training-state checkpoints, so a killed policy stage resumes where it stopped and ends with the same weights.

A checkpoint (checkpoints/<stage>/iter-NNNNNN.pt, not a DVC output) holds whatever the stage needs to go on:
trainable weights, optimizer, scheduler, every RNG state and the metrics so far, with a fingerprint of the
params and inputs it was made with; one made with others is never resumed.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict
from pathlib import Path

import torch

from rlhf import tracking
from rlhf.outputs import atomic_path


def fingerprint(section: str, params, precision: str, inputs: list[str | Path]) -> str:
    """What a checkpoint must match to be resumed: the stage's params, the precision and the inputs' DVC hashes."""
    spec = {section: asdict(params), "precision": precision,
            "inputs": {str(p): tracking.dvc_md5(p) for p in inputs if Path(p).exists()}}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def checkpoint_path(folder: Path, iteration: int) -> Path:
    return folder / f"iter-{iteration:06d}.pt"


def save_state(folder: Path, state: dict) -> Path:
    """One file per checkpoint, written durably (rlhf.outputs.atomic_path); the older ones are removed only once
    the new one loads back."""
    folder.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(folder, state["iteration"])
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    torch.load(path, map_location="cpu", weights_only=False)  # raises if it does not: the older ones stay
    for old in folder.glob("iter-*.pt"):
        if old != path:
            old.unlink()
    return path


def load_latest_state(folder: Path, expected_fingerprint: str) -> dict | None:
    """The newest checkpoint that loads and was made with the same params and inputs; one that does not load
    (cut short by a crash of the disk, say) is skipped for the one before it; stale ones are removed, with a note."""
    for path in sorted(folder.glob("iter-*.pt"), reverse=True):
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as error:  # torch raises several kinds for a damaged file
            print(f"{folder}: {path.name} does not load ({type(error).__name__}); trying the one before it.")
            continue
        if state.get("fingerprint") != expected_fingerprint:
            print(f"{folder}: {path.name} was made with other params or inputs; starting from scratch and removing it.")
            for stale in folder.glob("iter-*.pt"):
                stale.unlink()
            return None
        return state
    return None


def rng_states() -> dict:
    states = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng(states: dict) -> None:
    random.setstate(states["python"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
