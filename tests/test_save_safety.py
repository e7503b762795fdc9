"""Saving never loses a user's files; loading a damaged adapter never changes the model.

- save_adapter / RowSFTModel.save_pretrained / ``rowsft merge --out`` replace only their own files in
  a folder, refuse a file path and (without ``overwrite``) a non-empty folder that holds no adapter;
  temporary copies (``.<name>.rowsft-tmp-<pid>-<random>``) never outlive a save, and a killed save's
  are cleared by the next one.
- load_adapter checks the whole folder before it touches the model: each damage below raises a
  ValueError naming the file and the fix, and leaves the model's parameters and modules as they were.
- The weights file embeds the adapter config and is renamed in first: a save SIGKILLed between its
  two renames, or a save loop SIGKILLed at random moments, always leaves a loadable adapter (the
  new one once the weights are in), never new weights read with an old config.
- Scores.save writes only scores.safetensors and scores.json into its folder, with the same refusals.
"""
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import rowsft
import rowsft.data
from rowsft.cli.commands import main
from rowsft.integrations import RowSFTModel
from rowsft.io_utils import leftovers
from rowsft.layers import adapter_checks, adapters, tuner
from rowsft.scoring import Scores
from rowsft.selection.choice import LayerChoice, Selection

VOCAB = 128
DEAD_PID = 4194399          # above Linux's largest pid: no process has it
LAYERS = {"model.layers.0.self_attn.q_proj": ("row", [0, 7, 33], (64, 64)),
          "model.layers.0.self_attn.o_proj": ("column", [1, 2, 60], (64, 64)),
          "model.layers.1.mlp.down_proj": ("element", [4, 700, 8000], (64, 128))}
Q = "model.layers.0.self_attn.q_proj"


def selection():
    return Selection({n: LayerChoice(u, torch.tensor(i), s) for n, (u, i, s) in LAYERS.items()}, {"metric": "taylor"})


def trained_model(seed=1, arch="llama", **kwargs):
    model = rowsft.tiny_model(arch, vocab_size=VOCAB)
    if arch == "llama":
        tuner.apply(model, selection(), **kwargs)
    else:
        tuner.apply(model, Selection({"transformer.h.0.attn.c_attn": LayerChoice("row", torch.tensor([3, 100]), (192, 64))}),
                    **kwargs)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return model


def tree(folder):
    """Every file under ``folder`` (relative path -> bytes), folders as ``None``: a snapshot of the disk."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def updates(model):
    return {n: layer.update.detach().clone() for n, layer in tuner.sparse_layers(model).items()}


def assert_updates(model, expected):
    got = updates(model)
    assert got.keys() == expected.keys() and all(torch.equal(got[n], expected[n]) for n in got)


def foreign_files(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.md").write_text("my notes")
    (folder / "other_adapter").mkdir(parents=True)
    (folder / "other_adapter" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (folder / "checkpoint-500").mkdir()
    (folder / "checkpoint-500" / "optimizer.pt").write_bytes(b"\x00\x01")


# ------------------------------------------------------------------------------------------ saving
def test_foreign_files_in_an_adapter_folder_are_kept(tmp_path):
    target = tmp_path / "a"
    adapters.save_adapter(trained_model(1), target)
    foreign_files(target)
    before = {k: v for k, v in tree(target).items() if not k.startswith("adapter_")}
    model = trained_model(2)
    adapters.save_adapter(model, target)
    after = tree(target)
    assert {k: v for k, v in after.items() if not k.startswith("adapter_")} == before
    fresh = rowsft.tiny_model("llama", vocab_size=VOCAB)
    adapters.load_adapter(fresh, target)
    assert_updates(fresh, updates(model))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"], "no temporary copy is left"


def test_a_file_path_is_refused(tmp_path):
    target = tmp_path / "adapter"
    target.write_text("not a folder")
    before = tree(tmp_path)
    with pytest.raises(ValueError, match=r"is a file, not a folder.*move that file away"):
        adapters.save_adapter(trained_model(), target)
    assert tree(tmp_path) == before


def test_a_non_adapter_folder_is_refused_without_overwrite(tmp_path):
    runs = tmp_path / "runs"
    foreign_files(runs)
    before = tree(tmp_path)
    with pytest.raises(ValueError, match=r"holds no rowsft adapter.*overwrite=True"):
        adapters.save_adapter(trained_model(), runs)
    assert tree(tmp_path) == before


def test_an_adapter_of_another_kind_is_not_replaced_without_overwrite(tmp_path):
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (lora / "adapter_model.safetensors").write_bytes(b"not ours")
    before = tree(tmp_path)
    with pytest.raises(ValueError, match=r"holds no rowsft adapter"):
        adapters.save_adapter(trained_model(), lora)
    assert tree(tmp_path) == before


def test_a_peft_save_does_not_replace_a_rowsft_adapter(tmp_path):
    from rowsft.cli.outputs import check_peft_folder
    target = tmp_path / "a"
    adapters.save_adapter(trained_model(), target)
    with pytest.raises(ValueError, match=r"holds a rowsft adapter.*--overwrite"):
        check_peft_folder(target, overwrite=False)
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    assert check_peft_folder(lora, overwrite=False) == lora.resolve()          # an earlier LoRA save is replaced


def test_overwrite_writes_beside_the_other_files(tmp_path):
    runs = tmp_path / "runs"
    foreign_files(runs)
    before = tree(runs)
    model = trained_model()
    adapters.save_adapter(model, runs, overwrite=True)
    after = tree(runs)
    assert set(after) == set(before) | {"adapter_config.json", "adapter_model.safetensors"}
    assert {k: after[k] for k in before} == before
    assert adapter_checks.read_adapter_config(runs)["peft_type"] == "ROWSFT"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


def test_leftovers_of_a_killed_save_are_cleared_by_the_next_save(tmp_path):
    target = tmp_path / "a"
    adapters.save_adapter(trained_model(1), target)
    dead_folder = tmp_path / f".a.rowsft-tmp-{DEAD_PID}-0badc0de"
    dead_folder.mkdir()
    (dead_folder / "adapter_model.safetensors").write_bytes(b"half")
    (tmp_path / f".a.rowsft-tmp-{DEAD_PID}-12345678").write_bytes(b"half")
    kept = [tmp_path / f".b.rowsft-tmp-{DEAD_PID}-0badc0de", tmp_path / ".a.backup", tmp_path / "a.rowsft-tmp-1-ab"]
    for path in kept:                                  # another target's, and names outside the pattern
        path.write_text("keep me")
    assert len(leftovers(target)) == 2
    adapters.save_adapter(trained_model(2), target)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["a"] + [p.name for p in kept])
    assert all(p.read_text() == "keep me" for p in kept)


def test_save_into_the_current_folder(tmp_path, monkeypatch):
    folder = tmp_path / "work"
    folder.mkdir()
    monkeypatch.chdir(folder)
    model = trained_model(1)
    adapters.save_adapter(model, ".")
    (folder / "notes.md").write_text("mine")
    model = trained_model(2)
    adapters.save_adapter(model, ".")            # an adapter folder already: replaced in place
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "notes.md"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"], "no orphan temporary copy beside it"
    fresh = rowsft.tiny_model("llama", vocab_size=VOCAB)
    adapters.load_adapter(fresh, ".")
    assert_updates(fresh, updates(model))


def test_save_pretrained_keeps_checkpoints_and_readme(tmp_path):
    out = tmp_path / "out"
    (out / "checkpoint-500").mkdir(parents=True)
    (out / "checkpoint-500" / "trainer_state.json").write_text("{}")
    (out / "README.md").write_text("# my run")
    before = tree(out)
    RowSFTModel(trained_model()).save_pretrained(out)
    after = tree(out)
    assert {k: after[k] for k in before} == before
    assert set(after) - set(before) == {"adapter_config.json", "adapter_model.safetensors"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_cli_merge_out_keeps_other_files_and_refuses_a_non_model_folder(tmp_path, monkeypatch, capsys):
    adapters.save_adapter(trained_model(), tmp_path / "adapter")
    monkeypatch.setattr(rowsft.data, "load_model", lambda name: (rowsft.tiny_model("llama", vocab_size=VOCAB), None))
    other = tmp_path / "other"
    foreign_files(other)
    before = tree(other)
    assert main(["merge", "--adapter", str(tmp_path / "adapter"), "--out", str(other)]) == 2
    assert "--overwrite" in capsys.readouterr().err and tree(other) == before
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(tmp_path / "adapter"), "--out", str(out)]) == 0
    (out / "notes.md").write_text("mine")
    (out / "model-00001-of-00002.safetensors").write_bytes(b"old shard")   # a stale shard of an earlier model
    assert main(["merge", "--adapter", str(tmp_path / "adapter"), "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert "notes.md" in names and "config.json" in names and "model.safetensors" in names
    assert "model-00001-of-00002.safetensors" not in names
    assert main(["merge", "--adapter", str(tmp_path / "adapter"), "--out", str(other), "--overwrite"]) == 0
    after = tree(other)
    assert {k: after[k] for k in before} == before and "config.json" in after
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "merged", "other"]


# ------------------------------------------------------------------------------------------ loading
EMBEDDED = adapter_checks.EMBEDDED_CONFIG_KEY


def _weights(folder):
    """``(tensors, metadata)`` of an adapter folder's weights file."""
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def _write_weights(folder, tensors, metadata):
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata=metadata)


def _edit_config(folder, edit):
    """A hand edit of the config: ``adapter_config.json`` and the weights' embedded copy alike."""
    config = json.loads((folder / "adapter_config.json").read_text())
    edit(config)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    tensors, metadata = _weights(folder)
    if EMBEDDED in metadata:
        _write_weights(folder, tensors, {**metadata, EMBEDDED: json.dumps(config)})


def _edit_tensors(folder, edit):
    tensors, metadata = _weights(folder)
    edit(tensors)
    _write_weights(folder, tensors, metadata)


def _strip_embedded_config(folder):
    """Make the folder look like one saved before the weights embedded their config."""
    tensors, metadata = _weights(folder)
    _write_weights(folder, tensors, {k: v for k, v in metadata.items() if k != EMBEDDED})


def _bad_json(folder):
    text = '{"peft_type": "ROWSFT", "layers": '
    (folder / "adapter_config.json").write_text(text)
    tensors, metadata = _weights(folder)
    if EMBEDDED in metadata:
        _write_weights(folder, tensors, {**metadata, EMBEDDED: text})


def _set(mapping, key, value):
    mapping[key] = value


def _nan(tensors):
    tensors[f"{Q}.delta"][1, 2] = float("nan")


def _int64(folder):
    _edit_tensors(folder, lambda t: _set(t, f"{Q}.delta", t[f"{Q}.delta"].round().long()))
    _edit_config(folder, lambda c: _set(c["layers"][Q], "delta_dtype", "int64"))


CORRUPTIONS = {
    "wrong_delta_shape": (lambda f: _edit_tensors(f, lambda t: _set(t, f"{Q}.delta", t[f"{Q}.delta"][:, :63].clone())),
                          r"adapter_model\.safetensors.*q_proj\.delta has shape \(3, 63\), the config needs \(3, 64\)"),
    "missing_config_field": (lambda f: _edit_config(f, lambda c: c["layers"][Q].pop("k")),
                             r"adapter_config\.json.*missing field layers\[.*q_proj'\]\.'k'"),
    "missing_top_field": (lambda f: _edit_config(f, lambda c: c.pop("model_modules")),
                          r"adapter_config\.json.*missing field 'model_modules'"),
    "wrong_field_type": (lambda f: _edit_config(f, lambda c: _set(c["layers"][Q], "shape", "64x64")),
                         r"adapter_config\.json.*'shape' must be list, got str"),
    "unit_column_on_row_deltas": (lambda f: _edit_config(f, lambda c: _set(c["layers"][Q], "unit", "column")),
                                  r"q_proj\.delta has shape \(3, 64\), the config needs \(64, 3\)"),
    "int64_delta": (_int64, r"'delta_dtype' is 'int64', not a floating-point torch dtype"),
    "nan_delta": (lambda f: _edit_tensors(f, _nan), r"q_proj\.delta holds NaN or infinite values"),
    "unknown_extra_tensor": (lambda f: _edit_tensors(f, lambda t: _set(t, "model.layers.0.mlp.up_proj.delta",
                                                                      torch.zeros(2, 64))),
                             r"unknown tensors \['model\.layers\.0\.mlp\.up_proj\.delta'\]"),
    "float16_config_float32_tensor": (lambda f: _edit_config(f, lambda c: _set(c["layers"][Q], "delta_dtype", "float16")),
                                      r"q_proj\.delta has dtype float32 but the config says float16 "
                                      r"\(it is not converted silently\)"),
    "index_out_of_range": (lambda f: _edit_tensors(f, lambda t: _set(t, f"{Q}.indices", torch.tensor([0, 7, 64]))),
                           r"row indices must lie in \[0, 64\)"),
    "bad_json": (_bad_json, r"adapter_config\.json'?\)?: not valid JSON"),
    "unreadable_weights": (lambda f: (f / "adapter_model.safetensors").write_bytes(b"\x00" * 7),
                           r"adapter_model\.safetensors'? cannot be read as safetensors"),
}


def _assert_load_refused(model, folder, pattern):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    modules = [(n, type(m)) for n, m in model.named_modules()]
    files = tree(folder)
    with pytest.raises(ValueError, match=pattern) as info:
        adapters.load_adapter(model, folder)
    assert "save it again" in str(info.value) or "fix that field" in str(info.value)
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    assert tree(folder) == files


@pytest.mark.parametrize("embedded", [True, False], ids=["embedded-config", "config-json-only"])
@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_damaged_adapter_leaves_the_model_untouched(tmp_path, case, embedded):
    adapters.save_adapter(trained_model(), tmp_path / "a")
    if not embedded:
        _strip_embedded_config(tmp_path / "a")
    damage, pattern = CORRUPTIONS[case]
    damage(tmp_path / "a")
    model = rowsft.tiny_model("llama", vocab_size=VOCAB)
    _assert_load_refused(model, tmp_path / "a", pattern)
    assert not tuner.sparse_layers(model), "no sparse layer was added"


def test_bias_true_without_its_tensor_leaves_the_model_untouched(tmp_path):
    adapters.save_adapter(trained_model(arch="gpt2"), tmp_path / "a")
    _edit_config(tmp_path / "a", lambda c: _set(c["layers"]["transformer.h.0.attn.c_attn"], "bias", True))
    model = rowsft.tiny_model("gpt2", vocab_size=VOCAB)
    _assert_load_refused(model, tmp_path / "a", r"the tensor transformer\.h\.0\.attn\.c_attn\.bias_delta is missing")
    assert not tuner.sparse_layers(model)


def test_damaged_adapter_leaves_a_model_with_the_selection_untouched(tmp_path):
    adapters.save_adapter(trained_model(1), tmp_path / "a")
    _edit_tensors(tmp_path / "a", _nan)
    model = trained_model(2)
    _assert_load_refused(model, tmp_path / "a", r"NaN")
    assert set(tuner.sparse_layers(model)) == set(LAYERS)


# ------------------------------------------------------------------------------------------ embedded config
OTHER_LAYERS = {"model.layers.0.self_attn.q_proj": ("row", [5, 9], (64, 64)),
                "model.layers.1.mlp.up_proj": ("column", [3], (128, 64))}


def other_model(seed=3):
    """A model trained on another selection than ``LAYERS`` (its config cannot describe their weights)."""
    model = rowsft.tiny_model("llama", vocab_size=VOCAB)
    tuner.apply(model, Selection({n: LayerChoice(u, torch.tensor(i), s) for n, (u, i, s) in OTHER_LAYERS.items()}))
    torch.manual_seed(seed)
    with torch.no_grad():
        for layer in tuner.sparse_layers(model).values():
            layer.update.add_(torch.randn_like(layer.update))
    return model


def test_the_weights_embed_the_config(tmp_path):
    adapters.save_adapter(trained_model(), tmp_path / "a")
    _, metadata = _weights(tmp_path / "a")
    assert json.loads(metadata[EMBEDDED]) == json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert metadata["peft_type"] == "ROWSFT"


def test_a_stale_adapter_config_json_gives_way_to_the_embedded_one(tmp_path):
    """New weights beside the previous save's adapter_config.json (a kill between the two renames)."""
    target = tmp_path / "a"
    adapters.save_adapter(trained_model(), target)
    old_config = (target / "adapter_config.json").read_text()
    model = other_model()
    adapters.save_adapter(model, target)
    (target / "adapter_config.json").write_text(old_config)
    fresh = rowsft.tiny_model("llama", vocab_size=VOCAB)
    with pytest.warns(UserWarning, match=r"differs from the config embedded.*Save the adapter again"):
        adapters.load_adapter(fresh, target)
    assert_updates(fresh, updates(model))
    with pytest.warns(UserWarning, match="embedded config is used"):
        assert set(adapter_checks.read_adapter_config(target)["layers"]) == set(OTHER_LAYERS)


def test_an_unreadable_adapter_config_json_gives_way_to_the_embedded_one(tmp_path):
    model = trained_model()
    adapters.save_adapter(model, tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_bytes(b"\xff{ half")
    fresh = rowsft.tiny_model("llama", vocab_size=VOCAB)
    with pytest.warns(UserWarning, match="embedded config is used"):
        adapters.load_adapter(fresh, tmp_path / "a")
    assert_updates(fresh, updates(model))


def test_weights_alone_load_and_count_as_an_adapter_folder(tmp_path):
    """A first save killed between its renames leaves only the weights: they load, and the folder
    is taken for an adapter folder (no overwrite needed) even with foreign files beside it."""
    target = tmp_path / "a"
    model = trained_model()
    adapters.save_adapter(model, target)
    (target / "adapter_config.json").unlink()
    (target / "notes.md").write_text("mine")
    fresh = rowsft.tiny_model("llama", vocab_size=VOCAB)
    adapters.load_adapter(fresh, target)
    assert_updates(fresh, updates(model))
    assert adapters.is_rowsft_adapter_folder(target)
    adapters.save_adapter(trained_model(2), target)
    assert sorted(p.name for p in target.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "notes.md"]


def test_an_adapter_saved_before_the_embedded_config_still_loads(tmp_path):
    model = trained_model()
    adapters.save_adapter(model, tmp_path / "a")
    _strip_embedded_config(tmp_path / "a")
    fresh = rowsft.tiny_model("llama", vocab_size=VOCAB)
    adapters.load_adapter(fresh, tmp_path / "a")
    assert_updates(fresh, updates(model))
    (tmp_path / "a" / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks \['adapter_config\.json'\].*embeds no config"):
        adapters.load_adapter(rowsft.tiny_model("llama", vocab_size=VOCAB), tmp_path / "a")


# ------------------------------------------------------------------------------------------ scores
def small_scores(value=1.0):
    return Scores({Q: torch.full((64,), value)}, "magnitude", "row", shapes={Q: (64, 64)})


def test_foreign_files_in_a_scores_folder_survive_a_save(tmp_path):
    out = tmp_path / "scores"
    small_scores(1.0).save(out)
    foreign_files(out)
    before = {k: v for k, v in tree(out).items() if not k.startswith("scores.")}
    small_scores(2.0).save(out)
    after = tree(out)
    assert {k: v for k, v in after.items() if not k.startswith("scores.")} == before
    assert set(after) - set(before) == {"scores.json", "scores.safetensors"}
    assert torch.equal(Scores.load(out)[Q], torch.full((64,), 2.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores"], "no temporary copy is left"


def test_a_scores_save_refuses_a_file_path(tmp_path):
    target = tmp_path / "scores"
    target.write_text("not a folder")
    before = tree(tmp_path)
    with pytest.raises(ValueError, match=r"is a file, not a folder; give the path of a scores folder.*move that file away"):
        small_scores().save(target)
    assert tree(tmp_path) == before


def test_a_scores_save_refuses_a_foreign_folder_without_overwrite(tmp_path):
    runs = tmp_path / "runs"
    foreign_files(runs)
    before = tree(tmp_path)
    with pytest.raises(ValueError, match=r"holds no saved scores.*overwrite=True"):
        small_scores().save(runs)
    assert tree(tmp_path) == before
    before = tree(runs)
    small_scores(3.0).save(runs, overwrite=True)
    after = tree(runs)
    assert {k: after[k] for k in before} == before
    assert set(after) == set(before) | {"scores.json", "scores.safetensors"}
    assert torch.equal(Scores.load(runs)[Q], torch.full((64,), 3.0))


def test_scores_tensors_beside_a_stale_json_load_as_the_new_scores(tmp_path):
    out = tmp_path / "scores"
    small_scores(1.0).save(out)
    stale = (out / "scores.json").read_text()
    Scores({Q: torch.full((64,), 2.0)}, "taylor", "row", shapes={Q: (64, 64)}).save(out)
    (out / "scores.json").write_text(stale)       # a kill between the two renames
    back = Scores.load(out)
    assert back.metric == "taylor" and torch.equal(back[Q], torch.full((64,), 2.0))


# ------------------------------------------------------------------------------------------ kill test
SAVE_SERVER = textwrap.dedent("""
    import os, sys
    import torch
    import rowsft
    from rowsft.layers import adapters, tuner
    from rowsft.selection.choice import LayerChoice, Selection
    torch.set_num_threads(1)
    target, layers = sys.argv[1], {layers!r}
    model = rowsft.tiny_model("llama", vocab_size={vocab})
    tuner.apply(model, Selection({{n: LayerChoice(u, torch.tensor(i), s) for n, (u, i, s) in layers.items()}}))

    def save(value):
        with torch.no_grad():
            for layer in tuner.sparse_layers(model).values():
                layer.update.fill_(value)
        adapters.save_adapter(model, target)

    save(0.0)
    print("ready", flush=True)
    for round_ in range(1, 10**6):
        if not sys.stdin.readline():
            break
        pid = os.fork()
        if pid == 0:                       # the worker: saves new adapters until it is killed
            for i in range(10**9):
                save(round_ * 1000.0 + i)
        print(pid, flush=True)
        os.waitpid(pid, 0)
        print("reaped", flush=True)
""")


@pytest.mark.slow
def test_a_save_killed_at_any_moment_leaves_a_loadable_adapter(tmp_path):
    """A save loop is SIGKILLed 30 times at random moments: each time the folder holds one complete
    adapter (every update equal to the one value a single save wrote), and leftovers stay bounded."""
    target = tmp_path / "a"
    script = SAVE_SERVER.format(layers=LAYERS, vocab=VOCAB)
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([sys.executable, "-c", script, str(target)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert server.stdout.readline().strip() == "ready"
        model = rowsft.tiny_model("llama", vocab_size=VOCAB)
        tuner.apply(model, selection())
        rng = random.Random(0)
        for _ in range(30):
            server.stdin.write("go\n")
            server.stdin.flush()
            worker = int(server.stdout.readline())
            time.sleep(rng.uniform(0.0, 0.12))
            os.kill(worker, signal.SIGKILL)
            assert server.stdout.readline().strip() == "reaped"
            adapters.load_adapter(model, target)
            values = torch.cat([u.reshape(-1) for u in updates(model).values()])
            assert bool((values == values[0]).all()), "the adapter mixes two saves"
            strays = [p.name for p in tmp_path.iterdir() if p.name != "a" and p not in leftovers(target)]
            assert not strays and len(leftovers(target)) <= 2
    finally:
        server.stdin.close()
        server.kill()
        server.wait()
    adapters.save_adapter(model, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    assert sorted(p.name for p in target.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]



KILLED_BETWEEN_RENAMES = textwrap.dedent("""
    import os, signal, sys
    import torch
    import rowsft
    from rowsft.layers import adapters, tuner
    from rowsft.selection.choice import LayerChoice, Selection
    torch.set_num_threads(1)
    target, first_save = sys.argv[1], sys.argv[2] == "first"

    def save(layers, value):
        model = rowsft.tiny_model("llama", vocab_size={vocab})
        tuner.apply(model, Selection({{n: LayerChoice(u, torch.tensor(i), s) for n, (u, i, s) in layers.items()}}))
        with torch.no_grad():
            for layer in tuner.sparse_layers(model).values():
                layer.update.fill_(value)
        adapters.save_adapter(model, target)

    if not first_save:
        save({old!r}, 1.0)
    real_replace = os.replace

    def replace_then_die(src, dst, *args, **kwargs):
        real_replace(src, dst, *args, **kwargs)
        if os.path.basename(dst) == "adapter_model.safetensors":
            os.kill(os.getpid(), signal.SIGKILL)        # the weights are in, the config is not

    os.replace = replace_then_die
    save({new!r}, 2.0)
    print("the save was not killed", flush=True)
""")


@pytest.mark.parametrize("first_save", [False, True], ids=["over-an-adapter", "first-save"])
def test_a_save_killed_between_its_two_renames_loads_as_the_new_adapter(tmp_path, first_save):
    """SIGKILL right after the weights file is renamed in, before adapter_config.json is: the folder
    holds the new weights beside the old config (or none) and loads as the new adapter, whose
    selection differs from the old one (so the old config could not describe the new weights)."""
    target = tmp_path / "a"
    script = KILLED_BETWEEN_RENAMES.format(vocab=VOCAB, old=LAYERS, new=OTHER_LAYERS)
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    child = subprocess.run([sys.executable, "-c", script, str(target), "first" if first_save else "again"],
                           check=False, capture_output=True, text=True, env=env, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stdout + child.stderr
    names = sorted(p.name for p in target.iterdir())
    if first_save:
        assert names == ["adapter_model.safetensors"]
    else:
        old_config = json.loads((target / "adapter_config.json").read_text())
        assert set(old_config["layers"]) == set(LAYERS), "the config on disk is still the old one"
    fresh = rowsft.tiny_model("llama", vocab_size=VOCAB)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                 # the stale adapter_config.json is reported
        adapters.load_adapter(fresh, target)
    assert set(tuner.sparse_layers(fresh)) == set(OTHER_LAYERS)
    for name, (unit, indices, _) in OTHER_LAYERS.items():
        assert torch.equal(tuner.current_selection(fresh)[name], torch.tensor(indices))
    values = torch.cat([u.reshape(-1) for u in updates(fresh).values()])
    assert bool((values == 2.0).all()), "the adapter is the new one"
    assert len(leftovers(target)) == 1, "the killed save's staging folder is left, and only it"
    adapters.save_adapter(fresh, target)                # the next save clears it and writes a matching config
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    assert set(json.loads((target / "adapter_config.json").read_text())["layers"]) == set(OTHER_LAYERS)
