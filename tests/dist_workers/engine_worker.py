"""torchrun worker for tests/test_distributed.py and tests/test_checkpoint.py (gloo, CPU, fp32).

Every rank also computes the single-process reference on its own copy of the model, so the comparison
needs no file exchange; rank 0 writes the measured differences as JSON for the test to assert on.

    torchrun --standalone --nproc_per_node 2 tests/dist_workers/engine_worker.py step --engine fsdp --out DIR
    ... sp --engine ddp [--grad-ckpt] [--per-frame-t] --out DIR   # Ulysses SP over 2 ranks vs one process
    ... ckpt --out DIR                               # FSDP2 step, sharded save, full reference dump
    ... trainer-sync --recipe R --out DIR            # Trainer.train_step with accumulation, per engine: when
                                                     # the gradients are reduced
    ... sp-broken --recipe R --out DIR               # trainer with SP over 2 ranks, a clip failing on rank 1 only
    ... compile --sp-size 2 [--grad-ckpt] --out DIR  # compile_check on every rank (tests/test_compile.py)
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, when run as a script

from opensora.checkpoint import CheckpointManager, RNGState, engine_state  # noqa: E402
from opensora.distributed import ParallelConfig, build_engine, destroy_distributed, exit_process, init_distributed  # noqa: E402
from opensora.models.stdit import STDiT, stdit_config  # noqa: E402

LR, WD, MAX_NORM = 1e-2, 0.01, 0.5


def make_model(seed: int = 0) -> STDiT:
    """STDiT-debug with every parameter random (the zero-initialised projections would hide errors)."""
    torch.manual_seed(seed)
    model = STDiT(stdit_config("STDiT-debug", class_dropout_prob=0.0))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return model


def make_batch(n: int, T: int = 4, seed: int = 1, per_frame_t: bool = False) -> dict:
    """A random batch; ``per_frame_t``: (n, T) timesteps, frame 0 at t = 0 (a given frame), the rest distinct."""
    g = torch.Generator().manual_seed(seed)
    cfg = stdit_config("STDiT-debug")
    mask = torch.ones(n, cfg.model_max_length)
    mask[:, cfg.model_max_length // 2:] = torch.rand(n, cfg.model_max_length // 2, generator=g) > 0.5
    t = torch.randint(0, 1000, (n, T) if per_frame_t else (n,), generator=g)
    if per_frame_t:
        t[:, 0] = 0
    return dict(
        x=torch.randn(n, 4, T, 8, 8, generator=g),
        t=t,
        y=torch.randn(n, 1, cfg.model_max_length, cfg.caption_channels, generator=g),
        mask=mask,
        target=torch.randn(n, 8, T, 8, 8, generator=g),
    )


def loss_fn(model, b: dict) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(b["x"], b["t"], b["y"], b["mask"])
    return F.mse_loss(out, b["target"]), out


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max(float((full(a[k]).float() - full(b[k]).float()).abs().max()) for k in a)


def cmd_step(args, info) -> dict:
    """One optimizer step on 2 ranks x 2 accumulated samples vs one process on the 4 samples."""
    W, r = info.world_size, info.rank
    batch = make_batch(2 * W)
    ref = make_model()
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=LR, weight_decay=WD)
    ref_loss, _ = loss_fn(ref, batch)
    ref_loss.backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), MAX_NORM)
    ref_opt.step()

    engine = build_engine(ParallelConfig(engine=args.engine, param_dtype="fp32"), info)
    model = make_model()
    model, opt = engine.prepare(model, torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD))
    # Two accumulated micro-steps of one sample each; gradients are synchronised after the second only.
    losses = []
    for micro in range(2):
        sample = {k: v[2 * r + micro: 2 * r + micro + 1] for k, v in batch.items()}
        engine.set_grad_sync(micro == 1)
        loss, _ = loss_fn(model, sample)
        engine.backward(loss / 2)
        losses.append(loss.detach())
        if micro == 0:  # not reduced yet: DDP grads differ between ranks, FSDP2 keeps them off the shards
            grad = next(engine.unwrap().parameters()).grad
            unsynced_grad = None if grad is None else float(grad.sum())
    norm = engine.optimizer_step(MAX_NORM)
    mean_loss = torch.stack(losses).mean()
    dist.all_reduce(mean_loss)
    mean_loss /= W
    params = engine.full_model_state_dict()
    out = dict(loss=float(mean_loss), ref_loss=float(ref_loss), norm=float(norm), ref_norm=float(ref_norm),
               engine=type(engine).__name__, wrapped=type(model).__name__, unsynced_grad=unsynced_grad)
    if r == 0:
        out["param_diff"] = max_diff(params, ref.state_dict())
        out["param_change"] = max_diff(before, ref.state_dict())
    return out


def cmd_sp(args, info) -> dict:
    """Ulysses SP over all ranks (dp = 1: every rank gets the same batch) vs one process: outputs and grads;
    ``--per-frame-t``: per-frame timesteps, whose modulation must be sharded with T."""
    batch = make_batch(2, T=4, per_frame_t=args.per_frame_t)
    ref = make_model()
    ref_loss, ref_out = loss_fn(ref, batch)
    ref_loss.backward()

    pcfg = ParallelConfig(engine=args.engine, sp_size=info.world_size, grad_ckpt=args.grad_ckpt, param_dtype="fp32")
    engine = build_engine(pcfg, info)
    model = make_model()
    model, _ = engine.prepare(model, torch.optim.SGD(model.parameters(), lr=0.0))
    seen_T = []
    engine.unwrap().blocks[-1].register_forward_pre_hook(lambda m, a: seen_T.append(a[0].shape[1]))
    loss, out = loss_fn(model, batch)
    engine.backward(loss)
    grads = {n: full(p.grad) for n, p in engine.unwrap().named_parameters()}
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    return dict(
        seen_T=seen_T,
        out_diff=float((out - ref_out).detach().abs().max()),
        loss_diff=float((loss - ref_loss).detach().abs()),
        # per parameter, relative to that parameter's largest gradient entry
        grad_rel_diff=max(float((grads[n] - g).abs().max() / g.abs().max()) for n, g in ref_grads.items()),
        min_grad=min(float(g.abs().max()) for g in ref_grads.values()),
    )


def cmd_ckpt(args, info) -> dict:
    """FSDP2 on all ranks: one step, a sharded save, and the full tensors (model + Adam state) as reference."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    engine = build_engine(ParallelConfig(engine="fsdp", param_dtype="fp32"), info)
    model = make_model()
    model, opt = engine.prepare(model, torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD))
    b = make_batch(2, seed=2 + info.rank)
    loss, _ = loss_fn(model, b)
    engine.backward(loss)
    engine.optimizer_step()
    ckpt = CheckpointManager(Path(args.out) / "ckpt", keep=2)
    app_state = {**engine_state(engine), "rng": RNGState(), "train": {"step": 1, "samples": 2 * info.world_size}}
    path = ckpt.save(1, app_state)
    model_full = engine.full_model_state_dict()
    opt_full = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if info.rank == 0:
        flat = {f"model.{k}": v.contiguous() for k, v in model_full.items()}
        for fqn, state in opt_full["state"].items():
            flat.update({f"optim.{fqn}.{k}": v.reshape(v.shape).contiguous() for k, v in state.items()})
        save_file(flat, str(Path(args.out) / "reference.safetensors"))
    return dict(path=str(path))


def cmd_trainer_sync(args, info) -> dict:
    """The trainer's own step (``Trainer.train_step``, 2 micro-steps per rank) on each engine: how many gradient
    reductions each micro-step's backward started. Counted at the collectives: FSDP2's reduce-scatter (a Python
    call), DDP's all-reduce buckets through a communication hook (the booster's TorchDDPPlugin wraps DDP)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel

    from opensora.training import Trainer, load_recipe
    from opensora.training.recipe import init_dir_of

    calls = [0]
    original = dist.reduce_scatter_single

    def counting_reduce_scatter(*a, **k):
        calls[0] += 1
        return original(*a, **k)

    def counting_hook(state, bucket):
        calls[0] += 1
        return allreduce_hook(state, bucket)

    dist.reduce_scatter_single = counting_reduce_scatter
    out = {}
    for engine in ("fsdp", "ddp", "colossalai"):
        recipe = load_recipe(args.recipe, [f"parallel.engine={engine}", "stages.0.micro_batch_size=1"])
        run_dir = Path(args.out) / engine
        stage = recipe.stages[0]
        trainer = Trainer(recipe, stage, run_dir, init_dir_of(recipe, 0, run_dir, info), info)
        ddp = [m for m in (trainer.model_fn, getattr(trainer.model_fn, "module", None))
               if isinstance(m, DistributedDataParallel)]
        if ddp:
            ddp[0].register_comm_hook(dist.group.WORLD, counting_hook)
        per_micro = []
        forward_backward = trainer.steps.forward_backward

        def counted(batch, step, micro):
            before = calls[0]
            loss = forward_backward(batch, step, micro)
            per_micro.append(calls[0] - before)
            return loss

        trainer.steps.forward_backward = counted
        for _ in range(2):
            trainer.train_step()
        out[engine] = dict(accum=trainer.accum, per_micro=per_micro)
        trainer.close()
    dist.reduce_scatter_single = original
    return out


def cmd_sp_broken(args, info) -> dict:
    """The trainer with sequence parallelism over both ranks (one SP group, so both load the same batches), and
    a transient read error on rank 1 only: its first clip load fails. Records the indices of every micro-batch
    each rank trained on, and the losses."""
    from opensora.data.dataset import VideoDataset
    from opensora.training import Trainer, load_recipe
    from opensora.training.recipe import init_dir_of

    if info.rank == 1:
        load, calls = VideoDataset.load, [0]

        def flaky_load(self, index, random_start=None):
            calls[0] += 1
            if calls[0] == 1:
                raise OSError(f"simulated transient read error on rank 1 (index {index})")
            return load(self, index, random_start)

        VideoDataset.load = flaky_load
    recipe = load_recipe(args.recipe, ["parallel.sp_size=2", "parallel.engine=fsdp", "stages.0.micro_batch_size=2"])
    run_dir, stage = Path(args.out) / "run", recipe.stages[0]
    trainer = Trainer(recipe, stage, run_dir, init_dir_of(recipe, 0, run_dir, info), info)
    seen, forward_backward = [], trainer.steps.forward_backward

    def recorded(batch, step, micro):
        seen.append(batch["index"].tolist())
        return forward_backward(batch, step, micro)

    trainer.steps.forward_backward = recorded
    losses = [float(trainer.train_step()["loss"]) for _ in range(2)]
    trainer.close()
    return dict(seen=seen, losses=losses)


def cmd_compile(args, info) -> dict:
    """``compile_check`` (compiled vs eager steps, dynamo's counts) on every rank, e.g. with SP over both."""
    from opensora.distributed.compile_check import compile_check

    pcfg = ParallelConfig(engine=args.engine, sp_size=args.sp_size, grad_ckpt=args.grad_ckpt,
                          compile_backend=args.backend, param_dtype="fp32")
    return compile_check(pcfg, info, batch_sizes=[int(b) for b in args.batch_sizes.split(",")])


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["step", "sp", "ckpt", "trainer-sync", "sp-broken", "compile"])
    p.add_argument("--recipe", default=None)
    p.add_argument("--engine", default="fsdp")
    p.add_argument("--grad-ckpt", action="store_true")
    p.add_argument("--per-frame-t", action="store_true", help="sp: (B, T) timesteps (frame conditioning)")
    p.add_argument("--sp-size", type=int, default=2, help="compile: ranks per sequence-parallel group")
    p.add_argument("--backend", default="aot_eager", help="compile: the torch.compile backend")
    p.add_argument("--batch-sizes", default="2,1,3", help="compile: the batch size of each step")
    p.add_argument("--out", required=True)
    return run_mode(p.parse_args(argv), {"step": cmd_step, "sp": cmd_sp, "ckpt": cmd_ckpt,
                                         "trainer-sync": cmd_trainer_sync, "sp-broken": cmd_sp_broken,
                                         "compile": cmd_compile})


def run_mode(args, modes: dict) -> int:
    """Runs ``modes[args.mode](args, info)`` on every rank; rank 0 writes all ranks' results to OUT/result.json."""
    torch.set_num_threads(1)
    info = init_distributed()
    result = modes[args.mode](args, info)
    results = [None] * info.world_size
    dist.all_gather_object(results, result)
    if info.rank == 0:
        Path(args.out, "result.json").write_text(json.dumps(results))
    dist.barrier()
    destroy_distributed()
    return 0


if __name__ == "__main__":
    exit_process(main())  # skips the teardown step that aborted 1 run in 50 (see exit_process)
