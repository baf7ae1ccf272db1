"""CheckpointManager (DCP, atomic rename, keep-k, resharding 2 -> 1), RNG state, and the bundle export."""

from __future__ import annotations

import random
import shutil

import numpy as np
import pytest
import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

import opensora.checkpoint as ckpt_mod
from opensora.checkpoint import CheckpointManager, FnState, ModelState, RNGState, engine_state, export_bundle
from opensora.models.stdit import STDiT, stdit_config


def tiny_model(seed: int) -> STDiT:
    torch.manual_seed(seed)
    model = STDiT(stdit_config("STDiT-debug", depth=1))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return model


def trained(seed: int):
    """A model and an AdamW with state after one step."""
    model = tiny_model(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(1, 4, 2, 8, 8), torch.tensor([3]), torch.randn(1, 1, 16, 32)).square().mean().backward()
    opt.step()
    opt.zero_grad()
    return model, opt


def app_state(model, opt, **train):
    optim = FnState(lambda: get_optimizer_state_dict(model, opt),
                    lambda sd: set_optimizer_state_dict(model, opt, sd))
    return {"model": ModelState(model), "optimizer": optim, "rng": RNGState(), "train": dict(train)}


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


def test_save_load_round_trip_restores_everything(tmp_path):
    model, opt = trained(0)
    mgr = CheckpointManager(tmp_path / "ckpt")
    assert mgr.latest_step() is None
    torch.manual_seed(123), np.random.seed(4), random.seed(5)
    torch.randn(3), np.random.randn(3), random.gauss(0, 1)  # python random keeps a cached gaussian
    mgr.save(7, app_state(model, opt, step=7, samples=56, lrs=[0.1, 0.2], name="stage1"))
    expected = torch.randn(4), np.random.randn(4), [random.random(), random.gauss(0, 1)]
    assert mgr.latest_step() == 7 and (tmp_path / "ckpt" / "step-00000007" / ".metadata").is_file()

    other, other_opt = trained(1)  # different weights and Adam moments
    state = app_state(other, other_opt, step=0, samples=0, lrs=[0.0, 0.0], name="")
    torch.manual_seed(999), np.random.seed(999), random.seed(999)
    assert mgr.load(state) == 7
    assert state["train"] == {"step": 7, "samples": 56, "lrs": [0.1, 0.2], "name": "stage1"}
    assert_same_state(other, model)
    sa, sb = opt.state_dict()["state"], other_opt.state_dict()["state"]
    for i in sa:
        for k in sa[i]:
            torch.testing.assert_close(sa[i][k], sb[i][k], rtol=0, atol=0)
    got = torch.randn(4), np.random.randn(4), [random.random(), random.gauss(0, 1)]
    torch.testing.assert_close(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    assert got[2] == expected[2]


def test_keeps_newest_k_and_loads_an_older_step(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=2)
    for step in (1, 2, 3):
        mgr.save(step, {"train": {"step": step, "w": torch.full((3,), float(step))}})
    assert mgr.steps() == [2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000002", "step-00000003"]
    state = {"train": {"step": -1, "w": torch.zeros(3)}}
    assert mgr.load(state, step=2) == 2
    assert state["train"]["step"] == 2 and state["train"]["w"].tolist() == [2.0] * 3
    with pytest.raises(FileNotFoundError, match="step-00000001"):
        mgr.load(state, step=1)


def test_crash_mid_save_leaves_previous_checkpoint_and_tmp_is_cleaned(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path)
    mgr.save(10, {"train": {"w": torch.ones(2)}})
    real_save = ckpt_mod.dcp.save

    def crashing_save(state, checkpoint_id, no_dist):
        real_save(state, checkpoint_id=checkpoint_id, no_dist=no_dist)  # shards and even the metadata are on disk...
        raise KeyboardInterrupt("killed before the rename")  # ...but the rename never happens

    monkeypatch.setattr(ckpt_mod.dcp, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        mgr.save(20, {"train": {"w": torch.full((2,), 2.0)}})
    monkeypatch.undo()
    assert (tmp_path / "step-00000020.tmp" / ".metadata").is_file()
    assert mgr.latest_step() == 10
    state = {"train": {"w": torch.zeros(2)}}
    assert mgr.load(state) == 10 and state["train"]["w"].tolist() == [1.0, 1.0]

    mgr.save(30, {"train": {"w": torch.full((2,), 3.0)}})
    assert not (tmp_path / "step-00000020.tmp").exists()
    assert mgr.steps() == [10, 30]


def test_load_errors_name_the_checkpoint(tmp_path):
    mgr = CheckpointManager(tmp_path)
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        mgr.load({"train": {"w": torch.zeros(1)}})
    mgr.save(1, {"train": {"w": torch.zeros(1)}})
    with pytest.raises(RuntimeError, match="step-00000001"):
        mgr.load({"train": {"w": torch.zeros(1)}, "ema": {"w": torch.zeros(1)}})  # key not in the checkpoint
    with pytest.raises(ValueError, match="keep"):
        CheckpointManager(tmp_path, keep=0)


def _lazy_optimizer_state(opt):
    """An optimizer Stateful as ZeRO's was: torch's raw state_dict, whose state is empty until the first step."""
    return FnState(opt.state_dict, opt.load_state_dict)


def test_resume_refuses_a_template_that_misses_saved_entries(tmp_path):
    """A fresh optimizer that creates its state lazily offers DCP a template without exp_avg / exp_avg_sq / step:
    DCP would load nothing into it and say nothing. The manager must fail, naming the entries."""
    model, opt = trained(0)
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, {"model": ModelState(model), "optimizer": _lazy_optimizer_state(opt)})
    fresh = tiny_model(1)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    with pytest.raises(RuntimeError, match=r"entries have no place.*optimizer\.state\.0\.exp_avg"):
        mgr.load({"model": ModelState(fresh), "optimizer": _lazy_optimizer_state(fresh_opt)})


def test_init_optimizer_state_makes_the_template_complete(tmp_path):
    """What the ZeRO engine does before building its template: state exists, the weights did not move, and the
    resume restores the saved moments exactly."""
    from opensora.distributed.engines import init_optimizer_state

    model, opt = trained(0)
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, {"model": ModelState(model), "optimizer": _lazy_optimizer_state(opt)})
    fresh = tiny_model(1)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2, weight_decay=0.1)
    init_optimizer_state(fresh_opt)
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items()), "lr 0: nothing moved"
    assert len(fresh_opt.state) == len(list(fresh.parameters())) and fresh_opt.param_groups[0]["lr"] == 1e-2
    mgr.load({"model": ModelState(fresh), "optimizer": _lazy_optimizer_state(fresh_opt)})
    saved, loaded = opt.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert saved.keys() == loaded.keys()
    for i in saved:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(saved[i][key], loaded[i][key]), (i, key)


def test_export_bundle_round_trip(tmp_path):
    from opensora.bundle import load_bundle, load_bundle_config
    from tools import init_checkpoint

    src = tmp_path / "init"
    assert init_checkpoint.main(["--model", "STDiT-debug", "--out", str(src), "--force"]) == 0
    model = STDiT.from_pretrained(src / "model")
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)  # "trained" weights differ from the init bundle's
    out = export_bundle(model, model.config, load_bundle_config(src), tmp_path / "export", copy_from=src)
    bundle = load_bundle(out, device="cpu")
    assert_same_state(bundle.model, model)

    ema = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    export_bundle(ema, model.config, load_bundle_config(src), tmp_path / "export_ema", copy_from=src)
    loaded = load_bundle(tmp_path / "export_ema", device="cpu").model
    assert all(v.dtype == torch.float32 for v in loaded.state_dict().values())
    torch.testing.assert_close(loaded.state_dict()["blocks.0.mlp.fc1.weight"],
                               ema["blocks.0.mlp.fc1.weight"].float(), rtol=0, atol=0)


@pytest.mark.slow
def test_fsdp_checkpoint_from_2_ranks_loads_on_1(tmp_path):
    """Save with 2 FSDP2 ranks (sharded), load on 1: identical full model and Adam tensors."""
    from safetensors.torch import load_file

    from opensora.distributed import ParallelConfig, build_engine, destroy_distributed, init_distributed
    from tests.dist_workers.engine_worker import LR, WD, make_model
    from tests.test_distributed import torchrun

    torchrun(tmp_path, "ckpt")
    reference = load_file(str(tmp_path / "reference.safetensors"))
    mgr = CheckpointManager(tmp_path / "ckpt")
    assert mgr.steps() == [1]

    info = init_distributed()
    try:
        engine = build_engine(ParallelConfig(engine="fsdp", param_dtype="fp32"), info)
        model = make_model(seed=5)
        model, opt = engine.prepare(model, torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD))
        state = {**engine_state(engine), "rng": RNGState(), "train": {"step": 0, "samples": 0}}
        with pytest.warns(UserWarning, match="2 ranks"):
            assert mgr.load(state) == 1
        assert state["train"] == {"step": 1, "samples": 4}
        full_model = engine.full_model_state_dict()
        full_opt = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    finally:
        destroy_distributed()
    assert len(full_model) == sum(k.startswith("model.") for k in reference)
    for k, v in full_model.items():
        torch.testing.assert_close(v, reference[f"model.{k}"], rtol=0, atol=0, msg=k)
    n = 0
    for fqn, st in full_opt["state"].items():
        for k, v in st.items():
            torch.testing.assert_close(v.reshape(reference[f"optim.{fqn}.{k}"].shape), reference[f"optim.{fqn}.{k}"],
                                       rtol=0, atol=0, msg=f"{fqn}.{k}")
            n += 1
    assert n == sum(k.startswith("optim.") for k in reference) and n > 0
