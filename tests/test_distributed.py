"""Two CPU processes (gloo) give the same scores on every rank and the same deltas as one process
with the same global batch; wrong orders (apply after wrapping or sharding) are refused with the supported
path. FSDP2 training itself: tests/test_fsdp.py.

The single-process reference is dense fine-tuning in float64 whose weight gradient is masked to the
selected rows (no rowsft layers, no DDP), on the concatenation of both ranks' batches.
"""
from __future__ import annotations

import os
import signal

import pytest
import torch
from _ranks import gloo_ranks, run_ranks
from _reference import random_batches

import rowsft
from rowsft.data.models import tiny_model
from rowsft.distributed import (
    ShardedBatches,
    broadcast_selection,
    check_can_apply,
    check_same_selection,
    check_supported_wrapper,
    selection_digest,
    unwrap,
    wrapper_kind,
)
from rowsft.targets import weight_out_in

VOCAB, B, T = 128, 2, 12
WORLD, STEPS, LR, BUDGET = 2, 3, 0.5, 4


def local_batches(count: int, seed: int) -> list[dict]:
    """Full-length batches (every label token counts), so a mean over ranks is the global mean."""
    return random_batches(count, B, T, VOCAB, seed)


CALIBRATION = local_batches(WORLD, seed=11)        # rank r scores on CALIBRATION[r]
TRAIN = local_batches(WORLD * STEPS, seed=12)      # step s uses TRAIN[WORLD*s + r] on rank r


def model64():
    return tiny_model("llama", vocab_size=VOCAB, seed=0, dtype=torch.float64)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    with gloo_ranks(rank, WORLD, init_file):
        model = model64()
        scores = rowsft.score(model, [CALIBRATION[rank]], metric="taylor", unit="row", num_batches=1,
                              dtype=torch.float64)
        selection = rowsft.select(scores, BUDGET)
        digest = check_same_selection(selection)
        rowsft.apply(model, selection)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        errors = {}
        try:
            check_can_apply(ddp)
        except RuntimeError as e:
            errors["apply_after_ddp"] = str(e)
        check_supported_wrapper(ddp)                # DDP is the supported path: no error
        history = rowsft.train(ddp, ShardedBatches(TRAIN, rank, WORLD), steps=STEPS, lr=LR, optimizer="sgd",
                               max_grad_norm=None, schedule="constant", progress=False, seed=0)
        deltas = {n: layer.delta.detach().clone() for n, layer in rowsft.layers.tuner.sparse_layers(unwrap(ddp)).items()}
        errors["fsdp2"] = _fsdp2_message()
        # ranks that chose differently are caught
        different = rowsft.select(scores, BUDGET + rank)
        try:
            check_same_selection(different)
        except RuntimeError as e:
            errors["different"] = str(e)
        shared = broadcast_selection(different, src=0)
        torch.save({"scores": dict(scores.items()), "selection": selection.to_dict(), "digest": digest,
                    "deltas": deltas, "losses": history.losses, "errors": errors,
                    "shared_digest": selection_digest(shared), "wrapper": wrapper_kind(ddp)},
                   os.path.join(out_dir, f"rank{rank}.pt"))


def _fsdp2_message() -> str:
    """Shard a small model with FSDP2 on CPU and return rowsft's refusal to apply afterwards (or why FSDP2 is
    unavailable); the sharded model itself is a supported wrapper."""
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        tiny = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
        fully_shard(tiny, mesh=init_device_mesh("cpu", (WORLD,)))
    except Exception as e:  # noqa: BLE001 - FSDP2 on CPU depends on the torch build
        return f"unavailable: {type(e).__name__}: {e}"
    assert wrapper_kind(tiny) == "fsdp2"
    check_supported_wrapper(tiny)
    try:
        check_can_apply(tiny)
    except RuntimeError as e:
        return str(e)
    return "not refused"


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    run_ranks(_worker, str(tmp), nprocs=WORLD)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.slow
def test_scores_identical_across_ranks_and_equal_to_one_process_on_all_batches(ranks):
    first, second = ranks[0]["scores"], ranks[1]["scores"]
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name
    torch.set_num_threads(1)
    together = rowsft.score(model64(), CALIBRATION, metric="taylor", unit="row", num_batches=WORLD,
                            dtype=torch.float64)
    alone = rowsft.score(model64(), [CALIBRATION[0]], metric="taylor", unit="row", num_batches=1,
                         dtype=torch.float64)
    for name in first:
        assert torch.allclose(first[name], together[name], rtol=1e-9, atol=0), name
    assert any(not torch.allclose(first[n], alone[n], rtol=1e-3) for n in first), "ranks did not communicate"
    assert ranks[0]["digest"] == ranks[1]["digest"]


@pytest.mark.slow
def test_ddp_deltas_equal_single_process_masked_dense_reference(ranks):
    torch.set_num_threads(1)
    selection = rowsft.Selection.from_dict(ranks[0]["selection"])
    reference = model64().train()
    for p in reference.parameters():
        p.requires_grad_(False)
    weights = {name: weight_out_in(reference.get_submodule(name)) for name in selection}
    for name in selection:
        reference.get_submodule(name).weight.requires_grad_(True)
    start = {name: w.detach().clone() for name, w in weights.items()}
    losses = []
    for step in range(STEPS):
        chunk = TRAIN[WORLD * step: WORLD * (step + 1)]
        batch = {k: torch.cat([b[k] for b in chunk]) for k in chunk[0]}   # the global batch
        loss = reference(**batch).loss                                     # mean over all its tokens
        losses.append(float(loss.detach()))
        reference.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            for name, w in weights.items():
                grad = weight_out_in_grad(reference.get_submodule(name))   # (d_out, d_in)
                mask = torch.zeros(grad.shape[0], 1, dtype=grad.dtype)
                mask[selection[name]] = 1
                w -= LR * grad * mask
    for rank in ranks:
        assert rank["wrapper"] == "ddp"
        for name, delta in rank["deltas"].items():
            expected = (weights[name].detach() - start[name])[selection[name]]   # (k, d_in)
            assert float(expected.abs().max()) > 1e-4, f"{name}: the reference did not move"
            assert torch.allclose(delta, expected, atol=1e-6, rtol=0), \
                f"{name}: max diff {float((delta - expected).abs().max()):.3g}"
    # each rank's logged loss is its half of the global mean
    for step in range(STEPS):
        assert (ranks[0]["losses"][step] + ranks[1]["losses"][step]) / 2 == pytest.approx(losses[step], rel=1e-6)


def weight_out_in_grad(module) -> torch.Tensor:
    grad = module.weight.grad
    return grad.t() if weight_out_in(module) is not module.weight else grad


@pytest.mark.slow
def test_wrong_orders_are_refused_with_the_supported_path(ranks):
    errors = ranks[0]["errors"]
    assert "apply" in errors["apply_after_ddp"] and "first" in errors["apply_after_ddp"]
    assert "broadcast_selection" in errors["different"]
    assert ranks[0]["shared_digest"] == ranks[1]["shared_digest"]     # rank 0's choice reached rank 1
    fsdp = errors["fsdp2"]
    if fsdp.startswith("unavailable"):
        pytest.skip(f"FSDP2 on CPU: {fsdp}")
    assert "FSDP2" in fsdp and "rowsft.distributed.shard(model)" in fsdp and "first" in fsdp


def test_sharded_batches_split_evenly():
    data = list(range(7))
    shares = [list(ShardedBatches(data, r, 3)) for r in range(3)]
    assert shares == [[0, 3], [1, 4], [2, 5]]
    assert all(len(ShardedBatches(data, r, 3)) == 2 for r in range(3))
    with pytest.raises(ValueError, match="rank 3"):
        ShardedBatches(data, 3, 3)


def test_single_process_helpers_are_no_ops():
    model = tiny_model("llama", vocab_size=VOCAB, seed=0)
    assert wrapper_kind(model) is None and unwrap(model) is model
    check_can_apply(model)
    scores = rowsft.score(model, None, metric="magnitude")
    selection = rowsft.select(scores, 2)
    assert check_same_selection(selection) == selection_digest(selection)
    assert broadcast_selection(selection) is selection


def _abort_on_first_try(rank: int, init_file: str, out_dir: str) -> None:
    if init_file.endswith("-1") and rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)        # dies of a signal, as on gloo's abort (SIGKILL: no core dump)
    open(os.path.join(out_dir, f"{os.path.basename(init_file)}-rank{rank}"), "w").close()


def _raise(rank: int, init_file: str, out_dir: str) -> None:
    raise ValueError("a wrong result")


def test_run_ranks_reruns_a_rank_killed_by_a_signal_but_not_a_python_error(tmp_path):
    with pytest.warns(RuntimeWarning, match="SIGKILL"):
        run_ranks(_abort_on_first_try, str(tmp_path), nprocs=2, start_method="fork")
    assert (tmp_path / "init-2-rank0").exists() and (tmp_path / "init-2-rank1").exists()
    with pytest.raises(Exception, match="a wrong result"):
        run_ranks(_raise, str(tmp_path), nprocs=2, start_method="fork")
