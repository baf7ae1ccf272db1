"""torch.compile of the STDiT blocks, run for real on CPU: compiled training steps against eager ones, and what
dynamo did (graphs, graph breaks, recompiles), through ``opensora.distributed.compile_check``.

Inductor on CPU takes about a minute per new graph here (C++ kernels; seconds when its on-disk cache has them),
so only the first test uses it; the others use the "aot_eager" backend, which traces, guards and partitions
exactly as inductor's front end does and skips the code generation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from opensora.distributed import ParallelConfig, destroy_distributed, init_distributed, parallelize
from opensora.distributed.compile_check import compile_check
from opensora.models.stdit import STDiT, stdit_config

WORKER = Path(__file__).parent / "dist_workers" / "engine_worker.py"


def run_check(pcfg: ParallelConfig, **kwargs) -> dict:
    info = init_distributed()  # a world of one
    try:
        return compile_check(pcfg, info, **kwargs)
    finally:
        destroy_distributed()


def assert_matches_eager(r: dict) -> None:
    assert r["max_loss_rel_diff"] < 1e-5, (r["losses_eager"], r["losses_compiled"])
    assert r["max_grad_rel_diff"] < 1e-4


def test_inductor_steps_match_eager_with_one_graph_for_all_blocks():
    """FSDP2 + inductor, batches of 2 then 3: both blocks (block 0 alone gets the temporal embedding) and both
    sizes run one graph; FSDP2's hooks stay outside it (only ``forward`` is compiled, fullgraph)."""
    r = run_check(ParallelConfig(engine="fsdp", param_dtype="fp32"), batch_sizes=(2, 3))
    assert_matches_eager(r)
    assert (r["graphs"], r["graph_breaks"], r["recompiles"]) == (1, 0, 0), r["recompile_reasons"]
    assert r["compiled_frames"] == ["forward"]


@pytest.mark.parametrize("engine, grad_ckpt, ckpt_blocks, frames", [
    ("fsdp", False, None, ["forward"]),
    ("ddp", True, 1, ["_checkpointed_forward", "forward"]),  # selective: block 0 checkpointed, block 1 not
])
def test_changing_batch_size_recompiles_once_per_block_kind(engine, grad_ckpt, ckpt_blocks, frames):
    """Batches of 2, 1, 3 (a batch shrinks after a broken clip): the batch dim is dynamic from the first call, so
    only the size 1 (which torch always specialises) compiles again, once per distinct block forward. With
    checkpointing the checkpoint is inside the compiled block (torchtitan order) and the gradients still match."""
    pcfg = ParallelConfig(engine=engine, grad_ckpt=grad_ckpt, grad_ckpt_blocks=ckpt_blocks, param_dtype="fp32",
                          compile_backend="aot_eager")
    r = run_check(pcfg, batch_sizes=(2, 1, 3))
    assert_matches_eager(r)
    kinds = len(frames)
    assert (r["graphs"], r["graph_breaks"], r["recompiles"]) == (2 * kinds, 0, kinds), r["recompile_reasons"]
    assert r["compiled_frames"] == frames


def test_compiled_checkpointed_blocks_keep_few_activations():
    """The checkpoint traced into the compiled block really recomputes: the forward saves for backward a small
    fraction of what the compiled block without checkpointing saves (measured 2.2 MiB vs 16.3 MiB here)."""
    torch.manual_seed(0)
    cfg = stdit_config("STDiT-debug", class_dropout_prob=0.0)
    x, t, y, mask = torch.randn(2, 4, 8, 16, 16), torch.rand(2) * 1000, torch.randn(2, 1, 16, 32), torch.ones(2, 16)
    saved = {}
    info = init_distributed()
    try:
        for grad_ckpt in (False, True):
            model = STDiT(cfg)
            model = parallelize(model, ParallelConfig(engine="fsdp", grad_ckpt=grad_ckpt, compile=True,
                                                      compile_backend="aot_eager", param_dtype="fp32"), info)
            sizes = []

            def pack(tensor):
                sizes.append(tensor.numel() * tensor.element_size())
                return tensor

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                out = model(x, t, y, mask)
            out.square().mean().backward()  # the recompute runs
            assert all(p.grad is not None for p in model.parameters())
            saved[grad_ckpt] = sum(sizes)
    finally:
        destroy_distributed()
    assert saved[True] < 0.25 * saved[False], saved


@pytest.mark.slow
def test_sequence_parallel_compiled_blocks_have_no_graph_break(tmp_path):
    """Ulysses SP on 2 gloo ranks + checkpointing + compile: the all-to-alls inside temporal attention are traced
    into the graph (a functional collective); the slicing / gathering hooks of the first / last block are not."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
           "compile", "--sp-size", "2", "--grad-ckpt", "--batch-sizes", "2,1,3", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    for r in json.loads((tmp_path / "result.json").read_text()):
        assert_matches_eager(r)
        assert (r["graphs"], r["graph_breaks"], r["recompiles"]) == (2, 0, 1), r["recompile_reasons"]
        assert r["compiled_frames"] == ["_checkpointed_forward"]


def test_compile_keeps_parameter_names_and_checks_the_backend():
    """compile=True compiles every block in place, not the root (lazily: this checks the wiring, the tests above
    run it); checkpointing for compile replaces ``forward`` on the block (no wrapper module), so checkpoints keep
    their keys under either engine; a misspelt backend fails in ``parallelize``, not at the first forward."""
    model = STDiT(stdit_config("STDiT-debug"))
    names = list(model.state_dict())
    info = init_distributed()
    try:
        ddp = parallelize(STDiT(stdit_config("STDiT-debug")), ParallelConfig(engine="ddp", compile=True), info)
        assert all(b._compiled_call_impl is not None for b in ddp.module.blocks)
        assert ddp.module._compiled_call_impl is None  # only the blocks
        assert list(ddp.module.state_dict()) == names
        model = parallelize(model, ParallelConfig(engine="fsdp", grad_ckpt=True, compile=True), info)
        assert list(model.state_dict()) == names
        with pytest.raises(ValueError, match="compile_backend 'inductr'"):
            parallelize(STDiT(stdit_config("STDiT-debug")),
                        ParallelConfig(engine="ddp", compile=True, compile_backend="inductr"), info)
    finally:
        destroy_distributed()
