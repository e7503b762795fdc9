"""examples/accelerate_finetune.py under `accelerate launch` on 2 CPU processes (gloo), offline: data parallel
(DDP) and sharded (FSDP2, examples/accelerate_fsdp2.yaml)."""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rowsft
from rowsft.distributed import local_bytes, selection_digest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "accelerate_finetune.py"
FSDP2_CONFIG = ROOT / "examples" / "accelerate_fsdp2.yaml"
SCRIPT_ARGS = ["--cpu", "--expect-processes", "2", "--model", "tiny-llama", "--task", "boolq", "--steps", "3",
               "--max-train", "16", "--batch-size", "2", "--max-length", "64", "--budget", "4", "--lr", "1e-2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher() -> list[str]:
    exe = Path(sys.executable).with_name("accelerate")
    return [str(exe), "launch"] if exe.exists() else [sys.executable, "-m", "accelerate.commands.launch"]


def run_example(tmp_path, launch_options: list[str]) -> tuple[list[dict], Path]:
    """Run the example on 2 CPU processes with ``launch_options``; its JSON records and the adapter folder."""
    pytest.importorskip("accelerate")
    out = tmp_path / "adapter"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    command = [*launcher(), *launch_options, "--main_process_port", str(free_port()), str(SCRIPT), *SCRIPT_ARGS,
               "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=150, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")], out


def check_run(records: list[dict], out: Path, wrapper: str) -> None:
    """Both processes chose the same rows, trained 3 steps, and the saved adapter loads and changes the outputs."""
    digests = {r["process"]: r["selection"] for r in records if "process" in r}
    assert set(digests) == {0, 1} and digests[0] == digests[1]          # both processes chose the same rows
    assert any(r.get("processes") == 2 and r.get("wrapper") == wrapper for r in records)
    steps = [r for r in records if "step" in r]
    assert [r["step"] for r in steps] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in steps)
    summary = next(r for r in records if "adapter" in r)
    assert summary["selection"] == digests[0]

    # the adapter saved by the main process loads into a fresh base model and changes its outputs
    torch.set_num_threads(1)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny-llama"
    base, _ = rowsft.load_model("tiny-llama")
    base.eval()
    ids = torch.randint(3, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = base(input_ids=ids).logits
        rowsft.load_adapter(base, out)
        after = base(input_ids=ids).logits
    layers = rowsft.layers.tuner.sparse_layers(base)
    assert layers and all(layer.k == 4 for layer in layers.values())
    assert any(float(layer.delta.detach().abs().max()) > 0 for layer in layers.values())
    assert not torch.allclose(before, after)
    assert selection_digest(rowsft.layers.tuner.current_selection(base)) == digests[0]


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(tmp_path):
    # `accelerate launch --cpu --num_processes 2` starts ONE process in accelerate 1.x (multi-CPU needs an MPI
    # hostfile); --multi_gpu goes through torchrun, and the script's --cpu makes the processes use gloo.
    records, out = run_example(tmp_path, ["--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                                          "--mixed_precision", "no", "--dynamo_backend", "no"])
    check_run(records, out, "ddp")


def test_accelerate_fsdp2_config_shards_two_cpu_processes(tmp_path):
    records, out = run_example(tmp_path, ["--config_file", str(FSDP2_CONFIG)])
    check_run(records, out, "fsdp2")
    held = {r["of_process"]: r["bytes"] for r in records if "of_process" in r}
    whole, _ = rowsft.load_model("tiny-llama")
    frozen = sum(local_bytes(whole)[kind] for kind in ("frozen", "trainable"))    # every weight, before apply
    print(f"frozen bytes per process under FSDP2: {held} (one process holds {frozen:,d})")
    for process in (0, 1):                                   # each process holds half of the frozen weights
        assert held[process]["frozen"] == pytest.approx(frozen / 2, rel=0.02)
