"""Checkpoints: sharded, atomic, resumable on another world size; and the consolidated export.

``CheckpointManager`` saves an *app state* — a dict whose values are ``Stateful`` objects (model, EMA,
optimizer, LR schedule, data position, RNG, ledger, ...) or plain dicts of tensors and numbers — with
``torch.distributed.checkpoint`` (DCP): every rank writes its own shards, nobody gathers the model.
A save goes to ``step-XXXXXXXX.tmp/`` and is renamed to ``step-XXXXXXXX/`` by rank 0 once every rank has
finished, so a crash mid-save leaves the previous checkpoint as the latest one; leftover ``.tmp``
directories are never loaded and are removed by the next save. DCP stores global tensor shapes and
offsets, so a checkpoint written by N ranks loads on M (FSDP2 re-shards on load).

``export_bundle`` writes the model (or its EMA) as a pipeline bundle: one consolidated safetensors file
that ``tools/sample.py --ckpt`` loads (see ``opensora/bundle.py``).

Loading reads only DCP shards; the few pickled values DCP stores (ints, floats, lists, strings) are read
with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor

from opensora.distributed.env import barrier, get_rank, get_world_size

STEP_DIR = re.compile(r"^step-(\d{8})$")
TMP_SUFFIX = ".tmp"
METADATA_FILE = ".metadata"  # DCP writes it last, from the coordinator, after every rank's shards


class _SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, but non-tensor values are unpickled with ``weights_only=True``; and, unless the
    load is partial, every entry the checkpoint holds under the app state's top-level keys must have a place
    in the template.

    DCP reads only the keys of the template it is given and says nothing of the rest, so a template that
    misses entries (e.g. the optimizer state of a fresh optimizer that creates its state lazily) would
    resume with that state silently lost.
    """

    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
        super().set_up_planner(state_dict, metadata, is_coordinator)
        if self.allow_partial_load or metadata is None:
            return
        roots = {key.split(".", 1)[0] for key in self.state_dict}
        missing = sorted(fqn for fqn in metadata.state_dict_metadata
                         if fqn.split(".", 1)[0] in roots and fqn not in self.state_dict)
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise ValueError(
                f"{len(missing)} checkpoint entries have no place in the state being restored, so they would "
                f"not be loaded: {shown}. The state built for the resume does not match the one saved "
                "(e.g. an optimizer whose state was never initialised)"
            )

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


class CheckpointManager:
    """Sharded, atomic checkpoints under ``ckpt_dir/step-XXXXXXXX/``; keeps the newest ``keep``.

    Example::

        ckpt = CheckpointManager(run_dir / "stage1" / "checkpoints", keep=3)
        app_state = {"model": ModelState(model), "optimizer": ..., "rng": RNGState(), "train": {"step": 0}}
        if ckpt.latest_step() is not None:
            step = ckpt.load(app_state)
        ...
        ckpt.save(step, app_state)   # collective: every rank calls it
    """

    def __init__(self, ckpt_dir: str | Path, keep: int = 3):
        """
        Args:
            ckpt_dir: directory of this run's (stage's) checkpoints; must be shared by all ranks.
            keep: how many finished checkpoints to keep (newest first); older ones are deleted after a save.
        """
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.ckpt_dir = Path(ckpt_dir)
        self.keep = keep

    def path(self, step: int) -> Path:
        """Directory of the finished checkpoint of ``step``."""
        return self.ckpt_dir / f"step-{step:08d}"

    def steps(self) -> list[int]:
        """Steps of finished checkpoints, ascending (``.tmp`` leftovers and foreign entries ignored)."""
        if not self.ckpt_dir.is_dir():
            return []
        found = []
        for entry in self.ckpt_dir.iterdir():
            match = STEP_DIR.match(entry.name)
            if match and (entry / METADATA_FILE).is_file():
                found.append(int(match.group(1)))
        return sorted(found)

    def latest_step(self) -> int | None:
        """The newest finished checkpoint's step, or None if there is none."""
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, app_state: dict) -> Path:
        """Writes ``app_state`` as checkpoint ``step``. Collective: every rank must call it.

        Args:
            step: training step the state belongs to (the number of optimizer steps taken).
            app_state: name -> ``Stateful`` (DCP calls its ``state_dict``) or a plain nested dict of tensors,
                DTensors, numbers and strings.
        Returns:
            The finished checkpoint directory.
        """
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        final = self.path(step)
        tmp = final.with_name(final.name + TMP_SUFFIX)
        if get_rank() == 0:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            for leftover in self.ckpt_dir.glob(f"step-*{TMP_SUFFIX}"):  # from a crashed save
                shutil.rmtree(leftover, ignore_errors=True)
        barrier()
        with _quiet_single_process():
            dcp.save(app_state, checkpoint_id=tmp, no_dist=not dist.is_initialized())
        barrier()  # every rank's shards are on disk before the rename publishes them
        if get_rank() == 0:
            if final.exists():  # the same step saved again (e.g. after a resume): the new one wins
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.ckpt_dir)
            for old in self.steps()[: -self.keep]:
                shutil.rmtree(self.path(old), ignore_errors=True)
        barrier()
        return final

    def load(self, app_state: dict, step: int | None = None) -> int:
        """Loads checkpoint ``step`` (default: the latest) into ``app_state`` in place; returns its step.

        ``Stateful`` values get ``load_state_dict``; plain dict values are filled in place (top-level
        non-tensor values are replaced in ``app_state``). Every key must exist in the checkpoint, except
        inside an :class:`RNGState` (another world size or device type has other generators).

        Args:
            app_state: the same structure that was saved, built on the current world size.
            step: which checkpoint; None for the latest.
        """
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no finished checkpoint in {self.ckpt_dir}")
        path = self.path(step)
        if not (path / METADATA_FILE).is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist or is unfinished (no {METADATA_FILE})")
        strict = {k: v for k, v in app_state.items() if not isinstance(v, RNGState)}
        partial = {k: v for k, v in app_state.items() if isinstance(v, RNGState)}
        no_dist = not dist.is_initialized()
        try:
            with _quiet_single_process():
                dcp.load(strict, checkpoint_id=path, planner=_SafeLoadPlanner(), no_dist=no_dist)
                if partial:
                    planner = _SafeLoadPlanner(allow_partial_load=True)
                    dcp.load(partial, checkpoint_id=path, planner=planner, no_dist=no_dist)
        except (Exception, CheckpointException) as err:  # CheckpointException is a BaseException
            raise RuntimeError(f"cannot load checkpoint {path}: {err}") from err
        app_state.update({k: v for k, v in strict.items() if not isinstance(v, Stateful)})
        return step


@contextlib.contextmanager
def _quiet_single_process():
    """Silences DCP's warning that it runs without a process group (intended for single-process runs)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------------
# Stateful adapters
# ----------------------------------------------------------------------------------------------------


class ModelState(Stateful):
    """A model (plain, DDP or FSDP2 — e.g. the EMA copy) as a ``Stateful`` keyed by parameter names;
    FSDP2 shards stay shards."""

    def __init__(self, model: nn.Module):
        self.model = model

    def state_dict(self) -> dict:
        return get_model_state_dict(self.model)

    def load_state_dict(self, state_dict: dict) -> None:
        set_model_state_dict(self.model, state_dict)


class FnState(Stateful):
    """A ``Stateful`` from a getter and a setter, e.g. ``FnState(engine.optimizer_state_dict,
    engine.load_optimizer_state_dict)``."""

    def __init__(self, get: Callable[[], dict], set: Callable[[dict], None]):
        self._get, self._set = get, set

    def state_dict(self) -> dict:
        return self._get()

    def load_state_dict(self, state_dict: dict) -> None:
        self._set(state_dict)


def engine_state(engine) -> dict[str, Stateful]:
    """``{"model": ..., "optimizer": ...}`` of an :class:`opensora.distributed.Engine`, for an app state."""
    return {
        "model": FnState(engine.model_state_dict, engine.load_model_state_dict),
        "optimizer": FnState(engine.optimizer_state_dict, engine.load_optimizer_state_dict),
    }


class RNGState(Stateful):
    """This rank's random generators: torch (CPU and the current CUDA device), numpy, python ``random``.

    Each rank saves under its own key, so on the same world size every rank resumes its exact streams.
    On another world size the streams cannot simply continue (ranks would share or miss streams): every rank
    reseeds from its saved stream if it had one (else from its current one) plus its rank, and a warning
    says so. All values are tensors, so nothing is unpickled on load.
    """

    def state_dict(self) -> dict:
        return {"world_size": torch.tensor(get_world_size()), f"rank{get_rank()}": _capture_rng()}

    def load_state_dict(self, state_dict: dict) -> None:
        # The manager loads RNGState with a partial-load planner: a key missing from the checkpoint keeps the
        # current value (a rank the old run did not have; or no "cuda" entry in a CPU checkpoint).
        saved_world = int(state_dict["world_size"])
        _restore_rng(state_dict[f"rank{get_rank()}"])
        if saved_world != get_world_size():
            warnings.warn(
                f"checkpoint was written by {saved_world} ranks, this run has {get_world_size()}: "
                "random streams are reseeded, not resumed"
            )
            seed = int(torch.randint(0, 2**40, ())) + get_rank() * 1_000_003
            torch.manual_seed(seed)
            np.random.seed(seed % 2**32)
            random.seed(seed)


def _capture_rng() -> dict[str, torch.Tensor]:
    np_state = np.random.get_state()  # ("MT19937", key (624,) uint32, pos, has_gauss, cached_gaussian)
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_key": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": torch.tensor(np_state[2]),
        "numpy_gauss": torch.tensor([float(np_state[3]), float(np_state[4])], dtype=torch.float64),
        "python_internal": torch.tensor(py_internal, dtype=torch.int64),
        "python_gauss": torch.tensor([py_gauss is not None, py_gauss or 0.0], dtype=torch.float64),
        "python_version": torch.tensor(py_version),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _restore_rng(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    has_gauss, gauss = state["numpy_gauss"].tolist()
    np.random.set_state(
        ("MT19937", state["numpy_key"].numpy().astype(np.uint32), int(state["numpy_pos"]), int(has_gauss), gauss)
    )
    py_has_gauss, py_gauss = state["python_gauss"].tolist()
    random.setstate(
        (int(state["python_version"]), tuple(state["python_internal"].tolist()), py_gauss if py_has_gauss else None)
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


# ----------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------


def export_bundle(model_or_ema_state, model_config, bundle_config, out_dir: str | Path,
                  copy_from: str | Path | None = None) -> Path:
    """Writes a pipeline bundle (``model/model.safetensors`` fp32 + ``bundle.yaml``, written last) from a
    possibly sharded model or state dict. Collective: every rank calls it; rank 0 writes.

    Args:
        model_or_ema_state: an ``nn.Module`` (plain, DDP or FSDP2) or a full STDiT state dict (parameters and
            buffers) whose values may be DTensor shards (e.g. the EMA of an FSDP2 model).
        model_config: the ``STDiTConfig`` the weights belong to.
        bundle_config: the ``opensora.bundle.BundleConfig`` to write (VAE, text encoder, diffusion).
        out_dir: the bundle directory (e.g. ``OUTPUT_DIR/<stage>/export``).
        copy_from: a bundle directory whose ``vae/`` / ``text_encoder/`` subdirectories ``bundle_config``
            names by relative path (the bundle training started from).
    Returns:
        ``out_dir``.
    """
    from opensora.bundle import write_bundle
    from opensora.models.stdit import STDiT

    if isinstance(model_or_ema_state, nn.Module):
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(model_or_ema_state, options=options)
    else:
        # full_tensor() is a collective: every rank runs it on every DTensor, in the same order.
        state = {k: (v.full_tensor() if isinstance(v, DTensor) else v) for k, v in model_or_ema_state.items()}
    out_dir = Path(out_dir)
    if get_rank() == 0:
        state = {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu() for k, v in state.items()}
        with torch.device("meta"):
            skeleton = STDiT(model_config)  # only its config is used; the weights come from ``state``
        write_bundle(out_dir, skeleton, bundle_config, copy_from=copy_from, state_dict=state)
    barrier()
    return out_dir
