"""Compiled vs eager: a few training steps of an STDiT with every block compiled, against the same steps eager.

One function, :func:`compile_check`, for the CPU tests (tests/test_compile.py, inductor on CPU) and the GPU smoke
check (tools/gpu_smoke.py, on CUDA). It builds the same random model twice, runs one training step per entry of
``batch_sizes`` through the engine (forward, backward, clipped AdamW update) eagerly and then with
``compile=True``, and counts what dynamo did during the compiled run:

* ``graphs`` — FX graphs dynamo handed to the backend (recompiles included). ``parallelize`` gives every block
  the same inputs, so one graph serves all blocks: expect 1 (2 when the batch dim turns dynamic on a later
  step, see ``opensora.distributed.parallel.apply_compile``);
* ``graph_breaks`` — graph breaks (expect 0: the FSDP2 and sequence-parallel hooks run outside the compiled
  blocks, and nothing inside a block breaks the graph);
* ``recompiles`` — compiles of a code object that had already been compiled (a guard failed), with the
  reasons in ``recompile_reasons``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from opensora.distributed.env import DistInfo
from opensora.distributed.parallel import ParallelConfig


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _make_batch(cfg, n: int, num_frames: int, latent_size: int, seed: int, device) -> dict:
    """Random latents, timesteps, captions (half of the tokens padded at random) and regression target."""
    g = torch.Generator().manual_seed(seed)
    L = cfg.model_max_length
    mask = torch.ones(n, L)
    mask[:, L // 2:] = (torch.rand(n, L - L // 2, generator=g) > 0.5).float()
    shape = (n, cfg.in_channels, num_frames, latent_size, latent_size)
    batch = dict(
        x=torch.randn(*shape, generator=g),
        t=torch.rand(n, generator=g) * 1000,  # float timesteps, as rectified flow draws them
        y=torch.randn(n, 1, L, cfg.caption_channels, generator=g),
        mask=mask,
        target=torch.randn(n, cfg.out_channels, *shape[2:], generator=g),
    )
    return {k: v.to(device) for k, v in batch.items()}


def _train(pcfg: ParallelConfig, dist_info: DistInfo, cfg, batches: list[dict], lr: float, seed: int) -> dict:
    """One clipped AdamW step per batch; losses, per-step gradients (full tensors) and step times."""
    from opensora.distributed.engines import build_engine
    from opensora.models.stdit import STDiT

    torch.manual_seed(seed)
    model = STDiT(cfg)
    for p in model.parameters():  # every parameter random: the zero-initialised projections would hide errors
        torch.nn.init.normal_(p, std=0.05)
    engine = build_engine(pcfg, dist_info)
    model, _ = engine.prepare(model, torch.optim.AdamW(model.parameters(), lr=lr))
    losses, grads, seconds = [], [], []
    for b in batches:
        start = time.perf_counter()
        with engine.autocast():
            out = model(b["x"], b["t"], b["y"], b["mask"])
        loss = F.mse_loss(out.float(), b["target"])
        engine.backward(loss)
        grads.append({n: _full(p.grad).detach().float().cpu()
                      for n, p in engine.unwrap().named_parameters() if p.grad is not None})
        engine.optimizer_step(1.0)
        losses.append(float(loss.detach()))  # synchronises: the step time includes the device work
        seconds.append(time.perf_counter() - start)
    return dict(losses=losses, grads=grads, seconds=seconds)


def compile_check(
    pcfg: ParallelConfig,
    dist_info: DistInfo,
    model: str = "STDiT-debug",
    batch_sizes: Sequence[int] = (2, 1, 3),
    num_frames: int = 4,
    latent_size: int = 8,
    lr: float = 1e-3,
    seed: int = 0,
    **model_overrides,
) -> dict:
    """Trains the same model eager and compiled for ``len(batch_sizes)`` steps and counts graphs and recompiles.

    Resets dynamo first (``torch._dynamo.reset()``: every compiled cache in the process is dropped), so the
    counts are this check's alone. Every rank draws the same batches, as the ranks of one sequence-parallel
    group must. Collective when the world has more than one rank.

    Args:
        pcfg: how to parallelize; ``compile`` is forced off for the eager run and on for the compiled one
            (``compile_backend`` picks the backend: "inductor" is the real one, "aot_eager" traces the same
            graphs in a fraction of the time).
        dist_info: from :func:`opensora.distributed.init_distributed` (a world of one without torchrun).
        model: a size of ``opensora.models.stdit.STDiT_models``; ``model_overrides`` replace config fields.
            Caption dropout is off unless overridden, so both runs see the same captions.
        batch_sizes: the batch size of each step; a size that changes (a batch that shrinks after a broken
            clip) must not recompile per size.
        num_frames, latent_size: the latent (T, H, W) = (num_frames, latent_size, latent_size).
        lr: AdamW learning rate; gradients are clipped to norm 1, so the weights really move between steps.
        seed: model initialisation; step i's batch uses ``seed + 1 + i``.
    Returns:
        A JSON-ready dict: ``loss_eager`` / ``loss_compiled`` (the last step's, after the earlier updates),
        ``losses_eager`` / ``losses_compiled`` (every step), ``max_loss_rel_diff``, ``max_grad_rel_diff`` (over
        steps and parameters, each parameter's difference relative to its largest eager gradient entry),
        ``graphs``, ``graph_breaks``, ``recompiles``, ``graph_break_reasons``, ``recompile_reasons``,
        ``compiled_frames`` (the functions dynamo compiled: ``forward``, not hooks),
        ``seconds_eager`` / ``seconds_compiled`` (per step; the compiled run's first steps include compiling).
    """
    from torch._dynamo.utils import clear_compilation_metrics, counters, get_compilation_metrics

    from opensora.models.stdit import stdit_config

    cfg = stdit_config(model, **{"class_dropout_prob": 0.0, **model_overrides})
    batches = [_make_batch(cfg, n, num_frames, latent_size, seed + 1 + i, dist_info.device)
               for i, n in enumerate(batch_sizes)]
    eager = _train(dataclasses.replace(pcfg, compile=False), dist_info, cfg, batches, lr, seed)

    torch._dynamo.reset()
    counters.clear()
    clear_compilation_metrics()
    compiled = _train(dataclasses.replace(pcfg, compile=True), dist_info, cfg, batches, lr, seed)
    metrics = [m for m in get_compilation_metrics() if m.co_name is not None]  # the backward's own entries have none
    graph_breaks = dict(counters["graph_break"])

    def rel(a: float, b: float) -> float:
        return abs(a - b) / max(abs(b), 1e-12)

    grad_diffs = [float((g_c[n] - g).abs().max() / g.abs().max().clamp_min(1e-12))
                  for g_e, g_c in zip(eager["grads"], compiled["grads"]) for n, g in g_e.items()]
    return dict(
        loss_eager=eager["losses"][-1],
        loss_compiled=compiled["losses"][-1],
        losses_eager=eager["losses"],
        losses_compiled=compiled["losses"],
        max_loss_rel_diff=max(rel(c, e) for c, e in zip(compiled["losses"], eager["losses"])),
        max_grad_rel_diff=max(grad_diffs, default=None),
        graphs=int(counters["stats"]["unique_graphs"]),
        graph_breaks=int(sum(graph_breaks.values())),
        recompiles=sum(1 for m in metrics if m.recompile_reason),
        graph_break_reasons=[str(k) for k in graph_breaks],
        recompile_reasons=[f"{m.co_name}: {m.recompile_reason}" for m in metrics if m.recompile_reason],
        compiled_frames=sorted({m.co_name for m in metrics}),
        batch_sizes=list(batch_sizes),
        seconds_eager=eager["seconds"],
        seconds_compiled=compiled["seconds"],
    )
