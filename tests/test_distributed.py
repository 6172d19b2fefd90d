"""torch.distributed on one box: two CPU processes over gloo, on the tiny Qwen3 decoder.

DDP: ranks train on different data and end with identical adapter tensors; rank 0 saves, every
rank loads. FSDP2 (`fully_shard` per decoder block, then the root): the adapter trains sharded,
`ll.save` on every rank gathers the shards into one file that a plain model loads. Calibrated
attach: every rank passes the same batches and computes bit-identical tensors.

Each test spawns its two workers afresh; they rendezvous through a file store in tmp_path (no
port to race for) and the whole run is bounded by TIMEOUT_S.
"""

from __future__ import annotations

import datetime
import faulthandler
import math
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lora_lite as ll

from conftest import make_qwen, rel_err

WORLD = 2
TIMEOUT_S = 90
STEPS = 3

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not dist.is_available(), reason="torch built without distributed")]  # spawns gloo process groups


def run_workers(fn, tmp_path) -> None:
    """Run fn(rank, tmp_path) on WORLD spawned processes; a worker's exception fails the test."""
    ctx = mp.start_processes(
        _worker, args=(fn, str(tmp_path)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not _joined(ctx, tmp_path):  # re-raises a worker's exception with its traceback
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"distributed workers did not finish within {TIMEOUT_S} s")


def _joined(ctx, tmp_path) -> bool:
    """ctx.join(1 s); a worker killed by a signal fails with the ranks that had passed every check
    (a crash in teardown reads differently from one in the test) and the workers' stack dumps."""
    try:
        return ctx.join(timeout=1.0)
    except mp.ProcessExitedException as e:
        done = sorted(f.name for f in tmp_path.glob("passed-rank*"))
        raise AssertionError(f"{e}; ranks past their checks: {done or 'none'}") from e


def _worker(rank: int, fn, tmp: str) -> None:
    faulthandler.enable()  # a worker killed by SIGABRT/SIGSEGV prints its Python stacks to stderr
    torch.set_num_threads(1)  # two processes on a 2-core box
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=TIMEOUT_S),
    )
    try:
        fn(rank, tmp)
        dist.barrier()  # no rank tears gloo down while another is still in a collective
        open(os.path.join(tmp, f"passed-rank{rank}"), "w").close()
    finally:
        dist.destroy_process_group()


def _gathered(t: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(WORLD)]
    dist.all_gather(out, t.detach().contiguous())
    return out


def _assert_same_on_every_rank(named: dict[str, torch.Tensor]) -> None:
    for name, t in named.items():
        copies = _gathered(t)
        assert all(torch.equal(copies[0], c) for c in copies[1:]), f"{name} differs across ranks"


def _trainables(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _train(model, rank: int) -> list[float]:
    """STEPS AdamW steps on random tokens drawn from a per-rank seed (different data per rank)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(100 + rank)
    losses = []
    for _ in range(STEPS):
        ids = torch.randint(0, 256, (2, 10), generator=g)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


# --- DDP ------------------------------------------------------------------------------------


def _ddp(rank: int, tmp: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    bench = make_qwen()  # seeded: the same base and the same adapter init on every rank
    model = bench.model.train()
    ll.attach(model, ll.LoRAConfig(r=4, alpha=8))
    before = {n: p.detach().clone() for n, p in _trainables(model).items()}
    losses = _train(DDP(model), rank)
    first = _gathered(torch.tensor(losses[0]))
    assert first[0] != first[1], "the ranks should see different data"
    after = _trainables(model)
    _assert_same_on_every_rank(after)
    assert all(not torch.equal(before[n], p) for n, p in after.items()), "an adapter tensor did not move"

    path = os.path.join(tmp, "ddp.safetensors")
    if rank == 0:
        ll.save(model, path)  # the unwrapped model (DDP's .module) holds the adapter
    dist.barrier()
    y_rank0 = bench.out(model.eval())
    dist.broadcast(y_rank0, src=0)
    fresh = make_qwen().model
    ll.load(fresh, path)
    assert rel_err(bench.out(fresh), y_rank0) <= 1e-6


def test_ddp_keeps_ranks_identical_and_rank0_checkpoint_loads_everywhere(tmp_path):
    run_workers(_ddp, tmp_path)


# --- FSDP2 ----------------------------------------------------------------------------------


def _fsdp2(rank: int, tmp: str) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    bench = make_qwen()
    model = bench.model.train()
    ll.attach(model, ll.LoRAConfig(r=4, alpha=8))
    before = {n: p.detach().clone() for n, p in _trainables(model).items()}
    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)
    sharded = _trainables(model)
    assert all(isinstance(p, DTensor) for p in sharded.values()), "adapter tensors should be sharded"

    losses = _train(model, rank)
    assert all(math.isfinite(v) for v in losses), losses
    # full_tensor() is a collective: every rank gathers the same tensors in the same order
    assert all(not torch.equal(before[n], p.full_tensor()) for n, p in sharded.items())

    path = os.path.join(tmp, "fsdp2.safetensors")
    ll.save(model, path)  # on every rank: gathers the shards, rank 0 writes
    dist.barrier()
    assert os.path.isfile(path)
    assert not [f for f in os.listdir(tmp) if f.endswith(".tmp")]
    y_sharded = bench.out(model.eval())
    plain = make_qwen().model
    ll.load(plain, path)
    assert rel_err(bench.out(plain), y_sharded) <= 1e-6


def test_fsdp2_trains_and_save_gathers_shards_into_one_loadable_file(tmp_path):
    run_workers(_fsdp2, tmp_path)


# --- calibrated attach ----------------------------------------------------------------------

CALIBRATED = {
    "eva": lambda: ll.EVAConfig(r=4, alpha=8),
    "antipasto_corda": lambda: ll.AntiPaSTOCorDAConfig(r=4),
}


def _calibrated(rank: int, tmp: str) -> None:
    for case, make_cfg in CALIBRATED.items():
        bench = make_qwen()
        model = bench.model
        # The documented choice: every rank passes the same batches, so statistics and tensors
        # come out identical without communication (FSDP2 shards whatever each rank holds).
        ll.attach(model, make_cfg(), calibration_data=bench.calibration, progress=False)
        state = model.state_dict()
        assert any(".lora_" in k for k in state)
        _assert_same_on_every_rank({f"{case}: {k}": v for k, v in state.items()})


def test_calibrated_attach_with_the_same_batches_is_bit_identical_across_ranks(tmp_path):
    run_workers(_calibrated, tmp_path)
