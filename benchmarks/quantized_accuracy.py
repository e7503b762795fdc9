"""Rows on an nf4 base on the default task (issue 21's accuracy check), with the main job's settings.

The bundled SmolLM2-135M loaded with ``quantization="nf4"``, Rotten Tomatoes as an LM task, 2 Taylor rows per layer,
80 steps of 8 reviews of at most 96 tokens at the rows' rate 1e-3, 400 held-out reviews before and after (Wilson
intervals, exact McNemar of after against before). Compare with the float32 main job in the README (0.875,
0.839-0.904). Writes ``benchmarks/results/quantized_accuracy.json``.

    .venv/bin/python benchmarks/quantized_accuracy.py          # about 4 minutes on 2 cores
"""
import json, time, torch
import rowsft
from rowsft.evaluation.stats import exact_mcnemar
torch.manual_seed(0)
t0 = time.time()
model, tok = rowsft.load_model("smollm2-135m", quantization="nf4")
data = rowsft.load_dataset("rotten_tomatoes", max_train=2000, seed=0)
batches = rowsft.batches(data["train"], tok, batch_size=8, max_length=96, seed=0)
ev = dict(max_length=96, max_examples=400, batch_size=8, progress=False)
before = rowsft.evaluate(model, tok, data["validation"], **ev)
scores = rowsft.score(model, batches, metric="taylor", unit="row", num_batches=4)
sel = rowsft.select(scores, budget=2)
rowsft.apply(model, sel)
rowsft.train(model, batches, steps=80, lr=1e-3, warmup_steps=8, progress=False)
after = rowsft.evaluate(model, tok, data["validation"], **ev)
test = exact_mcnemar(before, after)
out = {"before": before["accuracy"], "before_interval": before["interval"], "after": after["accuracy"],
       "after_interval": after["interval"], "paired_p": test["p_value"], "fixed": test["b_only"], "broken": test["a_only"],
       "trainable": sel.trainable_parameters, "seconds": time.time() - t0}
print(json.dumps(out))
from pathlib import Path
Path(__file__).resolve().parent.joinpath("results", "quantized_accuracy.json").write_text(json.dumps(out, indent=1))
