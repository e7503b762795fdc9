"""rowsft under torch FSDP2 (``fully_shard``) on two CPU processes (gloo): the same deltas and adapter as one
process on the same global batch, frozen weights split between the ranks, index buffers whole and equal on
both, and each option (rebuilt inputs, gradient checkpointing, bf16 MixedPrecisionPolicy, AdamW with
clipping) checked against one process.

Each run on the ranks: score on the rank's calibration batch (all-reduced), select, ``rowsft.apply``,
``rowsft.distributed.shard`` (fully_shard per decoder block, then the root), three steps on the rank's
share of the batches, gather the deltas, save the adapter on every rank (rank 0 writes). The reference is
rowsft in one process, float32, on the concatenation of both ranks' batches of each step.
"""
from __future__ import annotations

import os
import resource
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from _ranks import gloo_ranks, run_ranks
from _reference import random_batches
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecisionPolicy, fully_shard

import rowsft
from rowsft.data.models import tiny_model
from rowsft.distributed import (
    ShardedBatches,
    check_can_apply,
    check_same_selection,
    check_supported_wrapper,
    full_tensor,
    is_sharded,
    local_bytes,
    shard,
    transformer_blocks,
    wrapper_kind,
)
from rowsft.integrations.hf_trainer import RowSFTTrainerCallback, check_trainer_parallelism
from rowsft.layers.tuner import sparse_layers

VOCAB, B, T = 128, 2, 12
WORLD, STEPS, BUDGET = 2, 3, 5            # k = 5 rows: uneven shards (3 + 2 rows, FSDP2 pads the second)
CALIBRATION = random_batches(WORLD, B, T, VOCAB, seed=11)        # rank r scores on CALIBRATION[r]
TRAIN = random_batches(WORLD * STEPS, B, T, VOCAB, seed=12)      # step s uses TRAIN[WORLD*s + r] on rank r
SGD = dict(optimizer="sgd", lr=0.5, max_grad_norm=None, schedule="constant")
RUNS = {   # name: (apply options, shard options, train options); "unit" picks the scored unit (default rows)
    "sgd": ({}, {}, SGD),
    "columns": ({"unit": "column"}, {}, SGD),
    "elements": ({"unit": "element"}, {}, SGD),
    "adamw_clipped": ({}, {}, dict(optimizer="adamw", lr=1e-2, max_grad_norm=0.5, schedule="constant")),
    "no_rebuild": ({"rebuild_inputs": False}, {}, SGD),
    "checkpointing": ({}, {}, dict(SGD, gradient_checkpointing=True)),
    "bf16": ({}, {"bf16": True}, SGD),
}


def model32():
    return tiny_model("llama", vocab_size=VOCAB, seed=0)


def train(model, batches, options):
    return rowsft.train(model, batches, steps=STEPS, progress=False, seed=0, **options)


def gathered_deltas(model) -> dict[str, torch.Tensor]:
    """Every layer's whole update: ``delta (k, d_in)`` rows, ``(d_out, k)`` columns, ``values (k,)`` elements."""
    return {name: full_tensor(layer.update).detach().clone() for name, layer in sparse_layers(model).items()}


def split(options: dict) -> tuple[str, dict]:
    """``(unit, rowsft.apply options)`` of a run."""
    options = dict(options)
    return options.pop("unit", "row"), options


def _refusals(rank: int, out_dir: str, trained) -> dict[str, str]:
    """The messages of the orders and combinations rowsft refuses on a sharded model."""
    errors = {}
    plain = model32()
    for key, call in {"apply_after_shard": lambda: rowsft.apply(trained, {"model.layers.0.mlp.up_proj": [0]}),
                      "shard_twice": lambda: shard(trained),
                      "merge_sharded": lambda: rowsft.merge(trained),
                      "unmerge_sharded": lambda: rowsft.unmerge(trained),
                      "shard_without_layers": lambda: shard(plain),
                      "load_into_sharded_plain": lambda: _shard_plain_then_load(out_dir),
                      "save_into_foreign_folder": lambda: rowsft.save_adapter(trained, _foreign_folder(rank, out_dir))}.items():
        try:
            call()
            errors[key] = "not refused"
        except Exception as e:  # noqa: BLE001 - the message is what the test reads
            errors[key] = f"{type(e).__name__}: {e}"
    return errors


def _shard_plain_then_load(out_dir: str):
    model = model32()
    for block in model.model.layers:          # FSDP2 as a user writes it, without rowsft's helper
        fully_shard(block)
    fully_shard(model)
    rowsft.load_adapter(model, os.path.join(out_dir, "adapter-sgd"))


def _foreign_folder(rank: int, out_dir: str) -> str:
    folder = os.path.join(out_dir, "foreign")
    if rank == 0:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "notes.txt"), "w") as f:
            f.write("not an adapter")
    dist.barrier()
    return folder


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    with gloo_ranks(rank, WORLD, init_file):
        result = {"runs": {}}
        for name, (options, shard_options, train_options) in RUNS.items():
            unit, apply_options = split(options)
            model = model32()
            scores = rowsft.score(model, [CALIBRATION[rank]], metric="taylor", unit=unit, num_batches=1)
            selection = rowsft.select(scores, BUDGET)
            check_same_selection(selection)
            rowsft.apply(model, selection, **apply_options)
            policy = None
            if shard_options.get("bf16"):
                policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            shard(model, mp_policy=policy)
            before = local_bytes(model)
            history = train(model, ShardedBatches(TRAIN, rank, WORLD), train_options)
            layers = sparse_layers(model)
            run = {"selection": selection.to_dict(), "wrapper": wrapper_kind(model), "bytes": before,
                   "losses": history.losses, "deltas": gathered_deltas(model),
                   "local_dtypes": sorted({str(layer.update.to_local().dtype) for layer in layers.values()}),
                   "indices": {n: (type(layer.indices).__name__, layer.indices.clone()) for n, layer in layers.items()},
                   "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad),
                   "keep_cast": sorted({layer.keep_cast_weight for layer in layers.values()}),
                   "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
            run["saved"] = str(rowsft.save_adapter(model, os.path.join(out_dir, f"adapter-{name}")))   # every rank
            result["runs"][name] = run
            if name == "sgd":
                trained, trained_selection = model, selection
        # the Trainer callback writes a checkpoint's adapter from a sharded model (all ranks call on_save)
        callback = RowSFTTrainerCallback()
        callback.on_save(SimpleNamespace(output_dir=out_dir, should_save=rank == 0),
                         SimpleNamespace(global_step=STEPS), None, model=trained)
        result["lora"] = str(rowsft.save_as_lora(trained, os.path.join(out_dir, "lora-sgd")))   # every rank
        # loading into a sharded model that carries the selection: every rank copies its slice in
        fresh = model32()
        rowsft.apply(fresh, trained_selection)
        shard(fresh)
        rowsft.load_adapter(fresh, os.path.join(out_dir, "adapter-sgd"))
        result["loaded_sharded"] = gathered_deltas(fresh)
        result["errors"] = _refusals(rank, out_dir, trained)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    run_ranks(_worker, str(tmp), nprocs=WORLD)
    return tmp, [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def single_process(name: str, selection_dict: dict, out_dir=None):
    """rowsft in one process on the global batches, with the ranks' selection and the run's options."""
    torch.set_num_threads(1)
    options, _, train_options = RUNS[name]
    _, apply_options = split(options)
    model = model32()
    rowsft.apply(model, rowsft.Selection.from_dict(selection_dict), **apply_options)
    frozen = local_bytes(model)["frozen"]
    global_batches = [{k: torch.cat([b[k] for b in TRAIN[WORLD * s: WORLD * (s + 1)]]) for k in TRAIN[0]}
                      for s in range(STEPS)]
    history = train(model, global_batches, train_options)
    if out_dir is not None:
        rowsft.save_adapter(model, out_dir)
    return model, history, frozen


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sgd", "columns", "elements", "adamw_clipped", "no_rebuild", "checkpointing"])
def test_fsdp2_deltas_equal_one_process_on_the_global_batch(ranks, name):
    _, results = ranks
    first, second = (r["runs"][name] for r in results)
    assert first["selection"] == second["selection"] and first["wrapper"] == "fsdp2"
    model, history, _ = single_process(name, first["selection"])
    expected = {n: layer.update.detach() for n, layer in sparse_layers(model).items()}
    for rank in (first, second):
        assert rank["deltas"].keys() == expected.keys()
        for layer, delta in rank["deltas"].items():
            assert float(expected[layer].abs().max()) > 1e-4, f"{layer}: the reference did not move"
            assert torch.allclose(delta, expected[layer], atol=1e-6, rtol=0), \
                f"{name} {layer}: max diff {float((delta - expected[layer]).abs().max()):.3g}"
    for step in range(STEPS):       # each rank logs its half's mean loss; full-length batches: their mean is global
        assert (first["losses"][step] + second["losses"][step]) / 2 == pytest.approx(history.losses[step], rel=1e-5)


@pytest.mark.slow
def test_bf16_mixed_precision_keeps_float32_deltas_close_to_one_process(ranks):
    _, results = ranks
    run = results[0]["runs"]["bf16"]
    assert run["local_dtypes"] == ["torch.float32"]                 # the sharded deltas (and optimizer) stay fp32
    model, _, _ = single_process("bf16", run["selection"])
    for layer, reference in ((n, l.update.detach()) for n, l in sparse_layers(model).items()):
        delta = run["deltas"][layer]
        assert torch.isfinite(delta).all() and torch.equal(delta, results[1]["runs"]["bf16"]["deltas"][layer])
        scale = float(reference.abs().max())
        assert float((delta - reference).abs().max()) < 0.05 * scale, layer   # bf16 compute, ~1% here


@pytest.mark.slow
def test_frozen_weights_are_split_and_index_buffers_stay_whole(ranks):
    _, results = ranks
    run0, run1 = (r["runs"]["sgd"] for r in results)
    _, _, single_frozen = single_process("sgd", run0["selection"])
    for rank, run in enumerate((run0, run1)):
        print(f"rank {rank}: frozen {run['bytes']['frozen']:,d} B (one process: {single_frozen:,d} B), "
              f"deltas {run['bytes']['trainable']:,d} B, peak RSS {run['peak_rss_kib'] / 1024:.0f} MiB")
        assert run["bytes"]["frozen"] == pytest.approx(single_frozen / WORLD, rel=0.02)
        assert all(name.endswith(".delta") for name in run["trainable"])   # the optimizer steps the deltas only
        assert run["keep_cast"] == [False]          # no whole weight kept in the autocast dtype on each rank
    selection = rowsft.Selection.from_dict(run0["selection"])
    for layer, (kind, indices) in run0["indices"].items():
        other_kind, other = run1["indices"][layer]
        assert kind == other_kind == "Tensor"                              # buffers: never DTensors
        assert torch.equal(indices, other) and torch.equal(indices, selection[layer].sort().values)


@pytest.mark.slow
def test_adapter_saved_from_the_sharded_model_equals_the_one_process_adapter(ranks, tmp_path):
    out_dir, results = ranks
    assert results[0]["runs"]["sgd"]["saved"] == results[1]["runs"]["sgd"]["saved"]   # both ranks returned it
    single_process("sgd", results[0]["runs"]["sgd"]["selection"], out_dir=tmp_path / "single")
    sharded, single = model32(), model32()
    rowsft.load_adapter(sharded, out_dir / "adapter-sgd")
    rowsft.load_adapter(single, tmp_path / "single")
    mine, theirs = sparse_layers(sharded), sparse_layers(single)
    assert mine.keys() == theirs.keys()
    for name in mine:
        assert torch.equal(mine[name].indices, theirs[name].indices)
        assert torch.allclose(mine[name].delta, theirs[name].delta, atol=1e-6, rtol=0), name
    # the Trainer callback's checkpoint adapter and loading into an already sharded model
    checkpoint = model32()
    rowsft.load_adapter(checkpoint, out_dir / f"checkpoint-{STEPS}")
    for name, layer in sparse_layers(checkpoint).items():
        assert torch.equal(layer.delta, mine[name].delta)
    for rank in results:
        for name, delta in rank["loaded_sharded"].items():
            assert torch.equal(delta, mine[name].delta), name
    # the LoRA export of the sharded model (every rank called save_as_lora; rank 0 wrote) computes the same model
    from peft import PeftModel
    assert results[0]["lora"] == results[1]["lora"]
    lora = PeftModel.from_pretrained(model32(), out_dir / "lora-sgd").eval()
    with torch.no_grad():
        expected, got = sharded.eval()(**TRAIN[0]).logits, lora(**TRAIN[0]).logits
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), float((got - expected).abs().max())


@pytest.mark.slow
def test_wrong_orders_on_a_sharded_model_are_refused_with_the_order_to_use(ranks):
    _, results = ranks
    for rank, result in enumerate(results):
        errors = result["errors"]
        assert "already sharded" in errors["apply_after_shard"] and "rowsft.distributed.shard" in errors["apply_after_shard"]
        assert "already sharded" in errors["shard_twice"]
        for key in ("merge_sharded", "unmerge_sharded"):
            assert "rowsft.load_adapter" in errors[key] and "slice" in errors[key], errors[key]
        assert errors["shard_without_layers"].startswith("ValueError") and "rowsft.apply" in errors["shard_without_layers"]
        assert "load the adapter into the plain model" in errors["load_into_sharded_plain"].lower()
        foreign = errors["save_into_foreign_folder"]
        assert foreign.startswith("ValueError") and "overwrite" in foreign        # rank 0's error on both ranks
        assert ("rank 0 failed" in foreign) == (rank == 1)


# ---------------------------------------------------------------- one process, no process group
def test_transformer_blocks_from_no_split_modules_or_the_layer_list():
    model = model32()
    assert [name for name, _ in transformer_blocks(model)] == ["model.layers.0", "model.layers.1"]
    stack = nn.Sequential(nn.Linear(4, 4), nn.ModuleList([nn.Linear(4, 4) for _ in range(3)]))
    assert [name for name, _ in transformer_blocks(stack)] == ["1.0", "1.1", "1.2"]


def test_shard_needs_a_process_group_and_changes_nothing_without_one():
    model = model32()
    rowsft.apply(model, rowsft.select(rowsft.score(model, None, metric="magnitude"), 2))
    with pytest.raises(RuntimeError, match="init_process_group"):
        shard(model)
    assert not is_sharded(model) and wrapper_kind(model) is None
    check_can_apply(model32())


def test_fsdp1_and_deepspeed_are_refused_naming_fsdp2():
    fsdp1 = FullyShardedDataParallel.__new__(FullyShardedDataParallel)   # no process group needed to test the check
    nn.Module.__init__(fsdp1)
    assert wrapper_kind(fsdp1) == "fsdp"
    with pytest.raises(NotImplementedError, match="FSDP2"):
        check_supported_wrapper(fsdp1)

    class DeepSpeedEngine(nn.Module):
        pass
    with pytest.raises(NotImplementedError, match="FSDP2"):
        check_can_apply(DeepSpeedEngine())
    with pytest.raises(NotImplementedError, match="FSDP2"):
        check_trainer_parallelism(SimpleNamespace(deepspeed="ds_config.json"), None)
