"""Fine-tune with rowsft on several processes with Hugging Face accelerate (DDP, or sharded with FSDP2).

Run it on 2 CPU processes (no GPU needed), or on every GPU of the machine::

    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_finetune.py --model tiny-llama --steps 4
    torchrun --nproc_per_node 2 examples/accelerate_finetune.py --model tiny-llama --steps 4     # the same
    accelerate launch --multi_gpu examples/accelerate_finetune.py --model smollm2-135m --steps 200 --out runs/boolq
    # sharded: frozen weights, deltas and optimizer state split across the processes (torch FSDP2)
    accelerate launch --config_file examples/accelerate_fsdp2.yaml examples/accelerate_finetune.py --cpu --steps 4

Without a GPU the processes train on the CPU and talk through gloo. (``accelerate launch --cpu
--num_processes 2`` starts ONE process in accelerate 1.x unless an MPI hostfile is configured; pass
``--expect-processes 2`` to turn such a silent single-process run into an error.)

What every process does, in order (see ``rowsft.distributed`` for why this order):

1. load the same model and the same shuffled batches; keep its own share of them (``ShardedBatches``);
2. score rows on its calibration batches: ``rowsft.score`` all-reduces the scores across processes,
   so every process selects the same rows (``check_same_selection`` verifies it);
3. ``rowsft.apply`` BEFORE ``accelerator.prepare`` (DDP and FSDP2 must see the deltas when they wrap or shard);
4. train: ``accelerator.backward`` averages the deltas' gradients across processes;
5. the adapter is saved (``adapter_config.json`` + ``adapter_model.safetensors``): by the main process under
   DDP; under FSDP2 every process calls ``rowsft.save_adapter`` (it gathers the deltas' slices) and the main
   process writes.

Prints one JSON line per step (loss averaged over processes) and a final summary line from the main
process. The script never needs the network for the bundled models and tasks.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
from accelerate import Accelerator, FullyShardedDataParallelPlugin
from accelerate.utils import DistributedType, gather_object

import rowsft
from rowsft.cli.job import parse_budget
from rowsft.distributed import (
    ShardedBatches,
    check_same_selection,
    check_supported_wrapper,
    is_sharded,
    local_bytes,
    wrapper_kind,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="tiny-llama", help="bundled model name, HF folder or id")
    p.add_argument("--task", default="boolq", help="bundled task (boolq, piqa, siqa, ...)")
    p.add_argument("--metric", default="taylor", help="row importance metric")
    p.add_argument("--budget", default="8", help="rows per layer (8), ratio (0.02), 'lora:8' or 'params:N'")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--batch-size", type=int, default=2, help="examples per process per step")
    p.add_argument("--max-length", type=int, default=64, help="tokens per example")
    p.add_argument("--max-train", type=int, default=64, help="training rows to load")
    p.add_argument("--calibration-batches", type=int, default=1, help="batches per process used for scoring")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order and dropout (same on every process)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    p.add_argument("--out", default="runs/accelerate-rowsft", help="folder the main process saves the adapter to")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    p.add_argument("--expect-processes", type=int, default=None,
                   help="fail unless the launcher started this many processes")
    return p.parse_args(argv)


def batches_forever(batches):
    """Epoch after epoch (every process re-iterates in step, so shuffles stay identical)."""
    while True:
        yield from batches


def fsdp_on_cpu(accelerator: Accelerator) -> None:
    """accelerate 1.x selects FSDP only with GPUs: under an FSDP config, CPU processes would quietly train with DDP.
    Switch accelerate's own FSDP2 path on for them (gloo), so the config shards on a laptop as it does on GPUs."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true" \
            or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()                 # the launcher's FSDP_* settings
    if plugin.fsdp_version != 2:
        raise SystemExit("rowsft shards with FSDP2 only: set fsdp_version: 2 in the accelerate config "
                         "(examples/accelerate_fsdp2.yaml)")
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    accelerator = Accelerator(cpu=args.cpu or not torch.cuda.is_available())   # CPU processes use gloo
    fsdp_on_cpu(accelerator)
    if args.expect_processes is not None and accelerator.num_processes != args.expect_processes:
        raise SystemExit(f"expected {args.expect_processes} processes, the launcher started "
                         f"{accelerator.num_processes}: use `accelerate launch --multi_gpu --num_processes "
                         f"{args.expect_processes}` or `torchrun --nproc_per_node {args.expect_processes}` "
                         "(`accelerate launch --cpu` starts one process without an MPI hostfile)")
    torch.manual_seed(args.seed)
    log = accelerator.print                               # prints on the main process only

    # 1. the same model and batches everywhere; each process keeps its share
    model, tokenizer = rowsft.load_model(args.model)
    data = rowsft.load_dataset(args.task, max_train=args.max_train, seed=args.seed)
    batches = rowsft.batches(data["train"], tokenizer, batch_size=args.batch_size, max_length=args.max_length,
                             seed=args.seed)
    local = ShardedBatches(batches, accelerator.process_index, accelerator.num_processes)
    if len(local) == 0:
        raise SystemExit(f"{len(batches)} batches cannot be shared by {accelerator.num_processes} processes; "
                         "load more rows (--max-train) or use a smaller --batch-size")
    model.to(accelerator.device)

    # 2. score on this process's calibration batches; the scores are all-reduced inside score()
    stream = batches_forever(local)
    calibration = [next(stream) for _ in range(args.calibration_batches)]
    scores = rowsft.score(model, calibration, metric=args.metric, unit="row",
                          num_batches=args.calibration_batches)
    selection = rowsft.select(scores, parse_budget(args.budget))
    digest = check_same_selection(selection)              # raises if processes chose different rows
    # each process reports its own digest through a gather, and only the main process prints: two processes writing
    # to one shared stdout can interleave their lines
    for process, process_digest in enumerate(gather_object([digest])):
        log(json.dumps({"process": process, "selection": process_digest}))

    # 3. apply before prepare (DDP registers the deltas when it wraps the model, FSDP2 when it shards it)
    rowsft.apply(model, selection)
    trainable, total = rowsft.trainable_parameters(model)
    log(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    check_supported_wrapper(model)                        # FSDP1 / DeepSpeed: a message naming FSDP2
    log(json.dumps({"processes": accelerator.num_processes, "wrapper": wrapper_kind(model)}))
    # what each process holds: under FSDP2 its slice of every weight, delta and (later) optimizer state
    for process, held in enumerate(gather_object([local_bytes(model)])):
        log(json.dumps({"bytes": held, "of_process": process}))

    # 4. train: gradients of the deltas are averaged across processes (DDP all-reduce, FSDP2 reduce-scatter)
    model.train()
    start = time.perf_counter()
    losses = []
    for step in range(1, args.steps + 1):
        batch = {k: v.to(accelerator.device) for k, v in next(stream).items()}
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mean_loss = float(accelerator.reduce(loss.detach(), reduction="mean"))
        losses.append(mean_loss)
        log(json.dumps({"step": step, "loss": round(mean_loss, 6), "elapsed": round(time.perf_counter() - start, 3)}))

    # 5. save the adapter: the main process under DDP; every process under FSDP2 (the deltas' slices are
    #    gathered, the main process writes, the others wait)
    accelerator.wait_for_everyone()
    if is_sharded(model) or accelerator.is_main_process:
        rowsft.save_adapter(accelerator.unwrap_model(model), args.out)
    log(json.dumps({"adapter": args.out, "selection": digest, "trainable": trainable, "losses": losses}))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
