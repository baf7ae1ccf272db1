"""Distributed engines and Ulysses sequence parallelism on 2 gloo ranks vs one process (CPU, fp32).

The multi-process tests launch tests/dist_workers/engine_worker.py with torchrun; every rank computes the
single-process reference itself and rank 0 reports the differences as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from opensora.distributed import ParallelConfig, ParallelDims, build_engine, destroy_distributed, init_distributed
from opensora.distributed.engines import ColossalAIEngine, Engine
from opensora.distributed.parallel import parallelize
from opensora.distributed.sequence_parallel import UlyssesAttention
from opensora.models.stdit import STDiT, stdit_config

WORKER = Path(__file__).parent / "dist_workers" / "engine_worker.py"


def torchrun(tmp_path: Path, *args: str, nproc: int = 2, timeout: float = 120) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(WORKER), *args, "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads((tmp_path / "result.json").read_text())


# ----------------------------------------------------------------------------------------------------
# Config and single-process behaviour
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [("engine", "deepspeed"), ("sp_size", 0), ("param_dtype", "fp16"),
                                          ("reduce_dtype", "bf16"), ("zero_stage", 3)])
def test_parallel_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        ParallelConfig(**{field: value})


def test_parallel_dims_split_world_into_sp_groups():
    from opensora.distributed import DistInfo

    info = DistInfo(rank=5, world_size=8, local_rank=5, device=torch.device("cpu"), backend="gloo")
    assert ParallelDims.build(ParallelConfig(sp_size=4), info) == ParallelDims(dp_size=2, dp_rank=1, sp_size=4, sp_rank=1)
    with pytest.raises(ValueError, match="does not divide"):
        ParallelDims.build(ParallelConfig(sp_size=3), info)


def test_build_engine_picks_class_without_importing_colossalai():
    info = init_distributed()
    try:
        assert type(build_engine(ParallelConfig(engine="fsdp"), info)) is Engine
        assert type(build_engine(ParallelConfig(engine="ddp"), info)) is Engine
        code = "import opensora.distributed, sys; assert 'colossalai' not in sys.modules"
        subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
        assert isinstance(build_engine(ParallelConfig(engine="colossalai"), info), ColossalAIEngine)
    finally:
        destroy_distributed()


def test_single_process_fsdp_world_of_one_trains_like_plain_model():
    """Without torchrun init_distributed makes a world of one; FSDP2 + grad checkpointing then matches eager."""
    torch.manual_seed(0)
    ref = STDiT(stdit_config("STDiT-debug", class_dropout_prob=0.0))
    model = STDiT(ref.config)
    model.load_state_dict(ref.state_dict())
    x, t = torch.randn(1, 4, 2, 8, 8), torch.tensor([10])
    y, mask = torch.randn(1, 1, 16, 32), torch.ones(1, 16)
    ref(x, t, y, mask).square().mean().backward()

    info = init_distributed()
    try:
        assert (info.rank, info.world_size, info.device.type, info.backend) == (0, 1, "cpu", "gloo")
        engine = build_engine(ParallelConfig(grad_ckpt=True, grad_ckpt_blocks=1), info)
        model, opt = engine.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
        assert model.gradient_checkpointing and model.gradient_checkpointing_blocks == 1  # selective: block 0 only
        assert [id(p) for g in opt.param_groups for p in g["params"]] == [id(p) for p in model.parameters()]
        engine.backward(model(x, t, y, mask).square().mean())
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad.full_tensor(), dict(ref.named_parameters())[name].grad, msg=name)
        norm = engine.optimizer_step(1e9)  # the norm is taken before the update
        expected = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ref.parameters()]))
        torch.testing.assert_close(norm, expected)
    finally:
        destroy_distributed()


def test_fsdp_bf16_policy_keeps_float_timesteps_in_fp32(monkeypatch):
    """FSDP2 with the bf16 policy a GPU run uses (forced on here: the CPU path computes in fp32). The blocks
    compute in bf16, but the root must not cast its inputs: a rectified-flow timestep of 700.7 is 700 in bf16."""
    import opensora.distributed.parallel as parallel_mod

    monkeypatch.setattr(parallel_mod, "uses_mixed_precision", lambda pcfg, info: True)
    torch.manual_seed(0)
    model = STDiT(stdit_config("STDiT-debug"))
    seen = {}
    model.t_embedder.register_forward_pre_hook(lambda m, args: seen.__setitem__("t", args[0].clone()))
    model.blocks[0].register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0].dtype))
    info = init_distributed()
    try:
        model = parallelize(model, ParallelConfig(engine="fsdp", param_dtype="bf16"), info)
        t = torch.tensor([700.7, 3.3])
        out = model(torch.randn(2, 4, 2, 8, 8), t, torch.randn(2, 1, 16, 32), torch.ones(2, 16))
        assert seen["x"] == torch.bfloat16, "the bf16 policy is active in the blocks"
        assert seen["t"].dtype == torch.float32 and torch.equal(seen["t"], t)
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
    finally:
        destroy_distributed()


def test_engine_prepare_refuses_optimizer_with_state():
    model = STDiT(stdit_config("STDiT-debug"))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(1, 4, 1, 8, 8), torch.tensor([1]), torch.randn(1, 1, 16, 32)).sum().backward()
    opt.step()
    info = init_distributed()
    try:
        with pytest.raises(ValueError, match="fresh optimizer"):
            build_engine(ParallelConfig(), info).prepare(model, opt)
    finally:
        destroy_distributed()


def test_sequence_parallel_checks_heads_and_world():
    info = init_distributed()
    try:
        with pytest.raises(ValueError, match="does not divide the world size"):
            parallelize(STDiT(stdit_config("STDiT-debug")), ParallelConfig(sp_size=2), info)
    finally:
        destroy_distributed()


# ----------------------------------------------------------------------------------------------------
# Two gloo ranks vs one process
# ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("engine, wrapped", [("fsdp", "FSDPSTDiT"), ("ddp", "DistributedDataParallel"),
                                             ("colossalai", "TorchDDPModel")])
def test_engine_step_matches_single_process(tmp_path, engine, wrapped):
    """2 ranks x 2 accumulated samples, one clipped AdamW step == one process on the 4 samples (loss, grad
    norm, params)."""
    results = torchrun(tmp_path, "step", "--engine", engine)
    r0 = results[0]
    assert r0["wrapped"] == wrapped
    assert r0["param_change"] > 1e-3  # the step moved the weights, so equal params mean equal steps
    assert r0["param_diff"] < 1e-4
    # set_grad_sync(False) really skipped the reduction of the first accumulation micro-step
    unsynced = [r["unsynced_grad"] for r in results]
    assert unsynced == [None, None] if engine == "fsdp" else unsynced[0] != unsynced[1]
    for r in results:
        assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-5)
        assert r["ref_norm"] > 0.5  # clipping was active
        assert r["norm"] == pytest.approx(r["ref_norm"], rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("engine, grad_ckpt, per_frame_t", [("ddp", False, False), ("fsdp", True, False),
                                                            ("fsdp", True, True)])
def test_sequence_parallel_matches_single_process(tmp_path, engine, grad_ckpt, per_frame_t):
    """Ulysses over T on 2 ranks: the same output and the same (data-parallel averaged) gradients; with
    per-frame timesteps (frame conditioning) each rank must modulate its own frames."""
    results = torchrun(tmp_path, "sp", "--engine", engine, *(["--grad-ckpt"] if grad_ckpt else []),
                       *(["--per-frame-t"] if per_frame_t else []))
    for r in results:
        # the blocks really saw half of the 4 frames (twice with checkpointing: forward and recompute)
        assert r["seen_T"] == ([2, 2] if grad_ckpt else [2])
        assert r["out_diff"] < 1e-5 and r["loss_diff"] < 1e-6
        assert r["min_grad"] > 0  # every parameter gets a gradient in the reference, so all are checked
        assert r["grad_rel_diff"] < 1e-4


def test_ulysses_attention_rejects_mask():
    with pytest.raises(ValueError, match="mask"):
        UlyssesAttention(torch.nn.Identity(), group=None)(torch.zeros(1), torch.zeros(1), torch.zeros(1),
                                                          attn_mask=torch.ones(1))


def bf16_probe(model: STDiT) -> dict:
    """Records the dtype block 0's attention projection computes in, at every forward. A Linear's output, not a
    block's input: under DDP's autocast the activations between ops stay fp32, the matmuls run in bf16."""
    seen = {}
    model.blocks[0].attn.qkv.register_forward_hook(lambda m, args, out: seen.__setitem__("dtype", out.dtype))
    return seen


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


# The bf16 forward's output vs the fp32 model's, as a relative L2 norm (bf16 keeps 8 significant bits; the
# CPU run of this check with FSDP2's bf16 policy measured 0.008). A loss comparison could not see a 10 % error in
# the output: against random targets that moves an MSE by about 3 %.
BF16_OUT_REL = 0.03


def bf16_step_and_round_trip(tmp_path: Path, engine: str, info, compute_dtype=torch.bfloat16) -> None:
    """The body of test_gpu_bf16_engine_step_and_checkpoint_round_trip (on ``info.device``; a CPU run of it, with
    the bf16 policy forced or ``compute_dtype`` fp32, checks the checks)."""
    from opensora.checkpoint import CheckpointManager, engine_state
    from tests.dist_workers.engine_worker import loss_fn, make_batch, make_model

    batch = {k: v.to(info.device) for k, v in make_batch(2).items()}
    with torch.no_grad():
        _, ref_out = loss_fn(make_model().to(info.device), batch)
    eng = build_engine(ParallelConfig(engine=engine), info)  # bf16 compute, fp32 master weights
    model = make_model()
    model, _ = eng.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    seen = bf16_probe(eng.unwrap())
    with eng.autocast():
        loss, out = loss_fn(model, batch)
    assert seen["dtype"] == compute_dtype, f"the forward computed in {seen['dtype']}: mixed precision is off"
    assert rel_err(out, ref_out) < (BF16_OUT_REL if compute_dtype == torch.bfloat16 else 1e-5)
    eng.backward(loss)
    norm = eng.optimizer_step(1.0)
    assert torch.isfinite(norm) and norm > 0

    def forward() -> torch.Tensor:  # the working copy the engine computes with
        with torch.no_grad(), eng.autocast():
            out = loss_fn(eng.model, batch)[1].float()
        eng.reshard()
        return out

    mgr = CheckpointManager(tmp_path)
    mgr.save(1, engine_state(eng))
    saved, saved_out = {k: v.clone() for k, v in eng.full_model_state_dict().items()}, forward()
    # Perturb through the engine: under ZeRO that moves the fp32 masters (what is saved and loaded) and the bf16
    # working copy (what computes); perturbing the module's parameters alone would leave the masters as saved.
    eng.load_model_state_dict({k: v + 0.05 for k, v in eng.model_state_dict().items()})
    moved = eng.full_model_state_dict()
    assert all(not torch.equal(moved[k], v) for k, v in saved.items()), "every saved weight was perturbed"
    assert rel_err(forward(), saved_out) > 0.1, "the working copy was perturbed"
    assert mgr.load(engine_state(eng)) == 1
    for k, v in eng.full_model_state_dict().items():
        torch.testing.assert_close(v, saved[k], rtol=0, atol=0, msg=k)
    assert rel_err(forward(), saved_out) < 1e-3, "the working copy was loaded too"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("engine", ["fsdp", "ddp", "colossalai"])
def test_gpu_bf16_engine_step_and_checkpoint_round_trip(tmp_path, engine):
    """On one GPU: the forward computes in bf16 and its output is the fp32 model's to bf16 error, the grad norm is
    finite, and save -> perturb (masters and working copy) -> load restores both."""
    info = init_distributed()
    try:
        bf16_step_and_round_trip(tmp_path, engine, info)
    finally:
        destroy_distributed()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("engine,zero_stage", [("fsdp", 2), ("ddp", 2), ("colossalai", 1), ("colossalai", 2)])
def test_gpu_resume_restores_optimizer_state_and_fp32_masters(tmp_path, engine, zero_stage):
    """Two bf16 steps straight vs one step, a save, a fresh engine that loads it, and the second step: the
    same optimizer state (AdamW moments and step), the same fp32 weights and the same second loss. Under ZeRO a
    fresh optimizer has no state to build the template from, and the model's own weights are bf16 copies."""
    from opensora.checkpoint import CheckpointManager, engine_state
    from tests.dist_workers.engine_worker import loss_fn, make_batch, make_model

    info = init_distributed()
    pcfg = ParallelConfig(engine=engine, zero_stage=zero_stage)
    batches = [{k: v.cuda() for k, v in make_batch(2, seed=s).items()} for s in (1, 2)]

    def fresh():
        eng = build_engine(pcfg, info)
        model = make_model()
        eng.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
        return eng

    def step(eng, batch):
        seen = bf16_probe(eng.unwrap())
        with eng.autocast():
            loss, _ = loss_fn(eng.model, batch)
        assert seen["dtype"] == torch.bfloat16, "mixed precision is on"
        eng.backward(loss)
        eng.optimizer_step(1.0)
        return float(loss)

    try:
        straight = fresh()
        step(straight, batches[0])
        mgr = CheckpointManager(tmp_path)
        mgr.save(1, engine_state(straight))
        masters = {k: v.clone() for k, v in straight.full_model_state_dict().items()}
        assert all(v.dtype == torch.float32 for k, v in masters.items() if v.is_floating_point()), "fp32 masters"
        opt_state = torch.utils._pytree.tree_map(  # copies: the next step updates the moments in place
            lambda v: _full(v).clone() if isinstance(v, torch.Tensor) else v, straight.optimizer_state_dict())
        second = step(straight, batches[1])

        resumed = fresh()
        mgr.load(engine_state(resumed))
        for k, v in resumed.full_model_state_dict().items():
            torch.testing.assert_close(v, masters[k], rtol=0, atol=0, msg=k)
        flat_saved = torch.utils._pytree.tree_leaves(opt_state)
        flat_loaded = torch.utils._pytree.tree_leaves(resumed.optimizer_state_dict())
        assert len(flat_saved) == len(flat_loaded)
        for a, b in zip(flat_saved, flat_loaded):
            if isinstance(a, torch.Tensor):
                torch.testing.assert_close(_full(b), _full(a), rtol=0, atol=0)
        assert step(resumed, batches[1]) == pytest.approx(second, rel=1e-6, abs=1e-7)
    finally:
        destroy_distributed()


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("diffusion", ["iddpm", "rflow"])
@pytest.mark.parametrize("cached", [True, False])
def test_gpu_training_step_never_blocks_the_host(diffusion, cached):
    """The trainer's step (TrainStep, as tools/benchmark.py builds it) runs under sync debug mode "error": no
    host-device synchronisation inside forward, backward and the update (the loss is read only at log steps)."""
    from tools import benchmark

    argv = ["--model", "STDiT-debug", "--engine", "fsdp", "--batch", "2", "--frames", "4", "--height", "32",
            "--width", "32", "--vae-downsample", "1", "--diffusion", diffusion] + (["--cached-latents"] if cached else [])
    args = benchmark.parse_args(argv)
    cfg = stdit_config("STDiT-debug", **({} if cached else {"in_channels": 3}))
    info = init_distributed()
    try:
        steps, ema, batch = benchmark.build_step(args, info, cfg, torch.bfloat16)
        steps.forward_backward(batch, 0, 0)  # the first step allocates, compiles kernels, builds caches
        steps.optimizer_step()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for i in range(1, 3):
                steps.forward_backward(batch, i, 0)
                steps.optimizer_step()
                ema.update(i + 1)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    finally:
        destroy_distributed()
