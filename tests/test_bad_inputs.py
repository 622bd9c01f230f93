"""Bad inputs that other test files leave out, one test (or parameter) per row of docs/reliability.md.

The promise under test: a bad experiment file, data file, model folder, run setting or output
location fails with a `CausalError` before any forward pass (file:line:col and a caret for the
experiment file, the offending value for data and models), and the CLI prints it and exits 2
without a traceback. Nothing is a silent wrong answer. A test here that fails is a bug report.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from safetensors.torch import load_file, save_file

import causal
from causal import CausalError, RunConfig
from causal.app.cli import main
from causal.engine.forward import Runner
from causal.zoo import word_tokenizer
from tests.conftest import make_rows

ROOT = Path(__file__).resolve().parents[1]
BODY = "metric logprob(io)\nablate mlp_out[layer=*] with zero"  # lines 4-5 of the file write_experiment writes
SWEEP = "metric logprob(io)\npatch resid_pre[layer=*, pos=*] from corrupt into clean"


def error_of(path: Path, **settings) -> CausalError:
    with pytest.raises(CausalError) as info:
        causal.run(path, RunConfig(**{"device": "cpu", "progress": False, **settings}))
    return info.value


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """`causal ARGS` in this process: (exit code, stdout, stderr). Hydra exits with SystemExit on its own errors."""
    try:
        code = main(list(args))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def _accepted():
    raise RuntimeError("a forward pass ran: the bad setting was accepted")


def run_args(path: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["run", str(path), f"hydra.run.dir={tmp_path / 'run'}", "device=cpu", "progress=false", "plots=false",
            *extra]


def copy_model(source: Path, folder: Path) -> Path:
    shutil.copytree(source, folder)
    return folder


# --------------------------------------------------------------------------------- the command line

def test_cli_syntax_error_exits_2_with_location_caret_and_no_traceback(write_experiment, tmp_path):
    path = write_experiment("metric logprob(io)\nablate mlp_out[layer=0] wiht zero")
    result = subprocess.run([sys.executable, "-m", "causal.app.cli", "run", str(path), f"hydra.run.dir={tmp_path / 'r'}"],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines[0] == f"{path}:5:25: error: syntax error: unexpected 'wiht'; expected '+', 'with'"
    assert lines[1] == "    ablate mlp_out[layer=0] wiht zero"
    assert lines[2] == "    " + " " * 24 + "^"
    assert "hint: did you mean 'with'?" in result.stderr
    assert not (tmp_path / "r" / "results.nc").exists()


@pytest.mark.parametrize("setting, needles", [
    ("device=tpu", ["error: unknown device 'tpu'; use 'auto', 'cpu', 'cuda[:N]' or 'mps'"]),
    ("dtype=float64", ["error: unknown dtype 'float64'; choose one of float32, float16, bfloat16"]),
    ("pack=fast", ["error: unknown pack 'fast'; choose one of auto, sites, exact"]),
    ("batch_size=0", ["error: setting batch_size=0 must be a whole number in 1..2147483647"]),
    ("batch_size=abc", ["batch_size", "abc"]),
    ("batch_size=2.5", ["batch_size", "2.5"]),
    ("seed=abc", ["seed", "abc"]),
    ("plots=maybe", ["plots", "maybe"]),
    ("batchsize=4", ["error: unknown parameter 'batchsize' on the command line; ", "did you mean 'batch_size'?"]),
    ("n=[1,", ["[1,"]),
], ids=["device", "dtype", "pack", "batch_size-zero", "batch_size-text", "batch_size-float", "seed-text",
        "plots-not-bool", "misspelt-setting", "override-syntax"])
def test_cli_bad_run_setting_exits_2_without_traceback(write_experiment, tmp_path, capsys, monkeypatch, setting,
                                                       needles):
    forwards: list = []
    monkeypatch.setattr(Runner, "forward", lambda *a, **k: forwards.append(1) or _accepted())
    code, _, err = cli(capsys, *run_args(write_experiment(BODY), tmp_path, setting))
    assert (code, "Traceback" in err) == (2, False), err
    assert all(needle in err for needle in needles), err
    assert forwards == []


@pytest.mark.parametrize("args, message", [
    (["run"], "error: expected one experiment file, got none\nusage:"),
    (["run", "a.cx", "b.cx"], "error: expected one experiment file, got ['a.cx', 'b.cx']\nusage:"),
    (["run", "missing.cx"], "error: cannot read experiment file 'missing.cx': no such file"),
    (["frobnicate"], "usage:\n  causal run FILE [key=value ...]"),
    (["plot", "no-such-run"], "error: no results at 'no-such-run' (expected results.nc, a run directory or a "
                              "multirun directory)"),
], ids=["run-without-file", "run-two-files", "run-missing-file", "unknown-command", "plot-missing-run"])
def test_cli_usage_errors(capsys, args, message):
    code, _, err = cli(capsys, *args)
    assert (code, "Traceback" in err) == (2, False), err
    assert err.startswith(message)


def test_cli_output_folder_under_a_file(write_experiment, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    path = write_experiment(BODY)
    code, _, err = cli(capsys, "run", str(path), f"hydra.run.dir={blocker / 'run'}", "device=cpu", "progress=false")
    assert (code, "Traceback" in err) == (2, False), err
    assert str(blocker) in err and "Not a directory" in err


def test_cli_checkpoint_folder_under_a_file(write_experiment, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, _, err = cli(capsys, *run_args(write_experiment(BODY), tmp_path, f"checkpoints={blocker / 'ck'}"))
    assert (code, "Traceback" in err) == (2, False), err
    assert f"error: cannot write checkpoints under '{blocker / 'ck'}': Not a directory" in err


def test_cli_disk_full_while_saving_results(write_experiment, tmp_path, capsys, monkeypatch):
    def full(self, path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(xr.Dataset, "to_netcdf", full)
    code, _, err = cli(capsys, *run_args(write_experiment(BODY), tmp_path))
    assert (code, "Traceback" in err) == (2, False), err
    assert f"error: cannot write results to '{tmp_path / 'run' / 'results.nc'}': No space left on device" in err
    assert not list((tmp_path / "run").glob("*.nc*")), "no partial results file is left behind"


def test_disk_full_while_saving_results_keeps_the_checkpoints(write_experiment, tmp_path, capsys, monkeypatch):
    """Hours of batches must survive a failed save: free some space, run the same command, and it resumes."""
    def full(self, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(xr.Dataset, "to_netcdf", full)
    checkpoints = tmp_path / "ck"
    code, _, err = cli(capsys, *run_args(write_experiment(SWEEP), tmp_path, f"checkpoints={checkpoints}"))
    assert code == 2 and "No space left on device" in err
    assert list(checkpoints.glob("*/job-*.safetensors")), "the finished batches were deleted before the save"


def test_cli_summary_of_a_statement_without_swept_dims(write_experiment, tmp_path, capsys):
    """Not a bad input: `ablate mlp_out with zero` has one effect per example; the printed summary must cope."""
    code, out, err = cli(capsys, *run_args(write_experiment("metric logprob(io)\nablate mlp_out with zero"), tmp_path))
    assert (code, "Traceback" in err) == (0, False), err
    assert "ablate_mlp_out (ablate mlp_out with zero)" in out


# --------------------------------------------------------------------------------- run settings (Python API)

@pytest.mark.parametrize("settings, message", [
    ({"device": "tpu"}, "error: unknown device 'tpu'; use 'auto', 'cpu', 'cuda[:N]' or 'mps'"),
    ({"device": "cuda:x"}, "error: unknown device 'cuda:x'; use 'auto', 'cpu', 'cuda[:N]' or 'mps'"),
    ({"device": "cuda"}, "error: device 'cuda' was asked for but CUDA is not available here"),
    ({"dtype": "float64"}, "error: unknown dtype 'float64'; choose one of float32, float16, bfloat16"),
    ({"pack": "fast"}, "error: unknown pack 'fast'; choose one of auto, sites, exact"),
    ({"batch_size": 0}, "error: setting batch_size=0 must be a whole number in 1..2147483647"),
    ({"batch_size": -3}, "error: setting batch_size=-3 must be a whole number in 1..2147483647"),
], ids=["device-unknown", "device-bad-index", "device-cuda-missing", "dtype", "pack", "batch_size-zero",
        "batch_size-negative"])
def test_bad_run_settings_before_any_forward(write_experiment, no_forward, monkeypatch, settings, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a GPU machine
    assert str(error_of(write_experiment(BODY), **settings)) == message


# --------------------------------------------------------------------------------- data files

@pytest.mark.parametrize("name, content, reason", [
    ("data.jsonl", b'{"clean": "t1 t2\xff"}\n', "invalid start byte at byte 16"),
    ("d.csv", b"clean,io\nt1 \xe9,t2\n", "invalid continuation byte at byte 12"),
], ids=["jsonl", "csv"])
def test_data_file_that_is_not_utf8(write_experiment, tmp_path, no_forward, name, content, reason):
    path = write_experiment(BODY)
    path.write_text(path.read_text().replace('data "data.jsonl"', f'data "{name}"'))
    (tmp_path / name).write_bytes(content)
    assert str(error_of(path)).startswith(
        f"{path}:3:1: error: cannot read data file '{tmp_path / name}': not UTF-8 text ({reason})")


@pytest.mark.parametrize("name, content", [
    ("data.jsonl", ""), ("data.jsonl", "\n   \n\n"), ("d.csv", ""), ("d.tsv", ""), ("d.json", "[]"),
], ids=["jsonl-empty", "jsonl-blank-lines", "csv-empty", "tsv-empty", "json-empty-list"])
def test_empty_data_file(write_experiment, tmp_path, no_forward, name, content):
    path = write_experiment(BODY)
    path.write_text(path.read_text().replace('data "data.jsonl"', f'data "{name}"'))
    (tmp_path / name).write_text(content)
    assert str(error_of(path)).startswith(f"{path}:3:1: error: the data has no examples\n")


def test_empty_json_file(write_experiment, tmp_path, no_forward):
    path = write_experiment(BODY)
    path.write_text(path.read_text().replace('data "data.jsonl"', 'data "d.json"'))
    (tmp_path / "d.json").write_text("")
    assert str(error_of(path)).startswith(
        f"{path}:3:1: error: {tmp_path / 'd.json'}:1:1: invalid JSON: Expecting value")


def test_data_path_that_is_a_folder(write_experiment, tmp_path, no_forward):
    path = write_experiment(BODY)
    path.write_text(path.read_text().replace('data "data.jsonl"', 'data "folder.jsonl"'))
    (tmp_path / "folder.jsonl").mkdir()
    assert str(error_of(path)).startswith(
        f"{path}:3:1: error: cannot read data file '{tmp_path / 'folder.jsonl'}': it is a folder, not a regular file")


@pytest.mark.parametrize("value", [{"a": 1}, None, True, [1, "x"], [1.5, 2], [True, 5]],
                         ids=["object", "null", "bool", "mixed-list", "float-list", "bool-list"])
def test_prompt_column_of_the_wrong_type(write_experiment, no_forward, value):
    rows = make_rows()
    rows[2]["clean"] = value
    path = write_experiment(BODY, rows)
    assert str(error_of(path)).startswith(
        f"{path}:5:1: error: column 'clean', example 2: expected text or a list of token ids, got {value!r}")


@pytest.mark.parametrize("value", [None, 3.7, [5], {"t": 5}], ids=["null", "float", "list", "object"])
def test_answer_column_of_the_wrong_type(write_experiment, no_forward, value):
    rows = make_rows()
    rows[2]["io"] = value
    path = write_experiment(BODY, rows)
    assert str(error_of(path)).startswith(
        f"{path}:4:16: error: column 'io', example 2: an answer is text or a token id, got {value!r}")


def test_prompt_longer_than_the_model_context(write_experiment, no_forward):
    """The tiny GPT-2 has 64 learned positions; a 70-token prompt cannot run (an IndexError deep in torch today)."""
    rows = make_rows()
    rows[2]["clean"] = rows[2]["corrupt"] = " ".join(["t1"] * 70)
    err = error_of(write_experiment(BODY, rows))
    assert "example 2" in err.message and "70" in err.message and "64" in err.message


def test_token_ids_beyond_the_model_embeddings(write_experiment, tiny_gpt2, tmp_path, no_forward):
    """A tokenizer with more tokens (128) than the model has embeddings (64): 't100' has no embedding row."""
    model = copy_model(tiny_gpt2, tmp_path / "bigger-tokenizer")
    word_tokenizer(128).save_pretrained(model)
    rows = make_rows()
    rows[0]["clean"] = rows[0]["corrupt"] = "t1 t100 t2 t3 t4 t5 t6"
    err = error_of(write_experiment(BODY, rows, model))
    assert "example 0" in err.message and "100" in err.message and "64" in err.message


def test_answer_tokens_beyond_the_model_logits(write_experiment, tiny_gpt2, tmp_path, no_forward):
    """The answer 't100' is a token of the (bigger) tokenizer, but the model scores only 64 tokens."""
    model = copy_model(tiny_gpt2, tmp_path / "bigger-tokenizer")
    word_tokenizer(128).save_pretrained(model)
    rows = make_rows()
    rows[4]["io"] = "t100"
    path = write_experiment(BODY, rows, model)
    err = error_of(path)
    assert str(err).startswith(f"{path}:4:16:")
    assert err.message == ("column 'io', example 4: answer token id 100 has no logit: the model scores 64 tokens "
                           "(its tokenizer knows more tokens than the model)")


def test_next_token_metric_on_a_one_token_prompt(write_experiment, no_forward):
    """A one-token prompt has no next token to score; today logprob(next) silently scores a padding position."""
    rows = make_rows()
    rows[3]["clean"], rows[3]["corrupt"] = "t5", "t6"
    path = write_experiment("metric logprob(next)\nablate mlp_out[layer=*] with zero", rows)
    err = error_of(path)
    assert str(err).startswith(f"{path}:4:") and "example 3" in err.message


# --------------------------------------------------------------------------------- model folders

def _drop(*names):
    def damage(folder: Path) -> None:
        for name in names:
            (folder / name).unlink()
    return damage


def _edit_config(**changes):
    def damage(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return damage


@pytest.mark.parametrize("damage, message", [
    (_drop("model.safetensors"), "Error no file named model.safetensors, or pytorch_model.bin, found in directory"),
    (_drop("config.json"), "has no config.json, so it is not a Hugging Face model folder (it holds: "),
    (lambda folder: (folder / "config.json").write_text("{not json"), "is not a valid JSON file"),
    (_edit_config(model_type="no_such_arch"),
     "The checkpoint you are trying to load has model type `no_such_arch` but Transformers does not recognize"),
], ids=["no-weights", "no-config", "config-not-json", "unknown-model-type"])
def test_broken_model_folder(write_experiment, tiny_gpt2, tmp_path, no_forward, damage, message):
    model = copy_model(tiny_gpt2, tmp_path / "model")
    damage(model)
    path = write_experiment(BODY, model=model)
    err = str(error_of(path))
    assert err.startswith(f"{path}:2:7: error: ") and f"'{model}'" in err and message in err, err


def test_model_override_that_cannot_be_loaded(write_experiment, tmp_path, no_forward):
    """`causal run FILE model=...` replaces the file's model; the error names the reference that failed."""
    missing = tmp_path / "no-such-model"
    err = str(error_of(write_experiment(BODY), model=str(missing)))
    assert f"error: no model folder '{missing}'" in err


def test_hub_model_without_network_or_cache(write_experiment, monkeypatch, no_forward):
    """Offline (HF_HUB_OFFLINE=1) a hub id not in the cache fails at once (so it does where the hub cannot be
    reached: tests/test_launchers.py)."""
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    path = write_experiment(BODY, model="someorg/some-model")
    assert str(error_of(path)).startswith(
        f"{path}:2:7: error: cannot load model 'someorg/some-model': HF_HUB_OFFLINE is set, and the model is not in "
        "the local HF cache")


def test_model_folder_without_a_tokenizer(write_experiment, tiny_gpt2, tmp_path, no_forward):
    """Transformers builds an empty tokenizer; the user is told 'the prompt is empty' at the ablate line."""
    model = copy_model(tiny_gpt2, tmp_path / "model")
    _drop("tokenizer.json", "tokenizer_config.json")(model)
    path = write_experiment(BODY, model=model)
    err = error_of(path)
    assert str(err).startswith(f"{path}:2:7: error:") and "tokenizer" in err.message


def test_truncated_weights_file(write_experiment, tiny_gpt2, tmp_path, no_forward):
    model = copy_model(tiny_gpt2, tmp_path / "model")
    weights = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    path = write_experiment(BODY, model=model)
    assert str(error_of(path)).startswith(f"{path}:2:7: error: cannot load model '{model}'")


def test_weights_that_do_not_fit_the_config(write_experiment, tiny_gpt2, tmp_path, no_forward):
    model = copy_model(tiny_gpt2, tmp_path / "model")
    _edit_config(n_embd=64)(model)
    path = write_experiment(BODY, model=model)
    assert str(error_of(path)).startswith(f"{path}:2:7: error: cannot load model '{model}'")


def test_weights_missing_a_tensor(write_experiment, tiny_gpt2, tmp_path, no_forward):
    """Transformers initialises a missing tensor at random and only logs it: every number after it is noise."""
    model = copy_model(tiny_gpt2, tmp_path / "model")
    weights = load_file(model / "model.safetensors")
    del weights["transformer.h.0.attn.c_attn.weight"]
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    path = write_experiment(BODY, model=model)
    err = error_of(path)
    assert str(err).startswith(f"{path}:2:7: error:") and "transformer.h.0.attn.c_attn.weight" in err.message


def test_model_that_ships_its_own_code_is_refused_without_running_it(write_experiment, tiny_gpt2, tmp_path,
                                                                    no_forward):
    """config.json maps the model to Python files in the folder; without trust_remote_code they never run."""
    model = copy_model(tiny_gpt2, tmp_path / "model")
    marker = tmp_path / "code-ran"
    _edit_config(model_type="custom", auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                                                "AutoModelForCausalLM": "modeling_custom.CustomModel"})(model)
    for name in ("configuration_custom.py", "modeling_custom.py"):
        (model / name).write_text(f"import os\nos.mkdir({str(marker)!r})\n")
    path = write_experiment(BODY, model=model)
    assert str(error_of(path)).startswith(f"{path}:2:7: error: cannot load model '{model}': The repository {model} "
                                          "contains custom code which must be executed to correctly load the model.")
    assert not marker.exists()


class _RunsCode:
    """Pickles to 'call os.mkdir(marker)': what a malicious pytorch_model.bin would do on an unsafe load."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@pytest.fixture
def pickle_with_code(tiny_gpt2, tmp_path) -> tuple[Path, Path]:
    """(model folder whose only weights are a pickle that runs code, the folder that code would create)."""
    model = copy_model(tiny_gpt2, tmp_path / "model")
    (model / "model.safetensors").unlink()
    marker = tmp_path / "code-ran"
    torch.save({"transformer.wte.weight": _RunsCode(marker)}, model / "pytorch_model.bin")
    return model, marker


def test_pickled_weights_never_run_code(write_experiment, pickle_with_code):
    model, marker = pickle_with_code
    with pytest.raises(Exception):  # noqa: B017 - which error is the next test's concern
        causal.run(write_experiment(BODY, model=model), RunConfig(device="cpu", progress=False))
    assert not marker.exists()


def test_pickled_weights_with_code_are_a_causal_error(write_experiment, pickle_with_code, no_forward):
    model, marker = pickle_with_code
    path = write_experiment(BODY, model=model)
    assert str(error_of(path)).startswith(f"{path}:2:7: error: cannot load model '{model}'")
    assert not marker.exists()


# --------------------------------------------------------------------------------- at run time

def test_out_of_memory_in_the_unpatched_runs(write_experiment, monkeypatch):
    def no_memory(self, ids, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(Runner, "forward", no_memory)
    assert re.fullmatch(r"error: out of memory running 6 unpatched '(clean|corrupt)' prompts at once; "
                        r"lower batch_size \(now 128\)", str(error_of(write_experiment(SWEEP))))


def test_steering_that_overflows_names_the_statement(write_experiment):
    path = write_experiment("metric logprob(io)\nsteer resid_pre[layer=*] by 1e38 * mean(clean)")
    assert str(error_of(path)) == (
        "error: NaN or inf first appears in resid_post of layer 0 for example 0 while running "
        "'steer resid_pre[layer=*] by 1e38 * mean(clean)' at layer=0\n"
        "hint: with float16, try dtype=bfloat16 or float32")


def test_logits_that_overflow_with_finite_layers(write_experiment, tiny_models, tmp_path):
    """GPT-NeoX's unembedding with entries near float32's limit: every layer is finite, the logits are not."""
    model = copy_model(tiny_models["gpt_neox"], tmp_path / "model")
    weights = load_file(model / "model.safetensors")
    generator = torch.Generator().manual_seed(0)
    huge = torch.randn(weights["embed_out.weight"].shape, generator=generator) * 1e38
    weights["embed_out.weight"] = huge.clamp(-3e38, 3e38)
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    err = str(error_of(write_experiment(BODY, model=model)))
    assert re.fullmatch(r"error: metric logprob\(io\) is NaN or inf for example \d of the unpatched 'clean' prompts "
                        r"although every layer's output is finite \(logits overflow\?\)", err), err


def test_same_seed_same_noise_and_resampling(write_experiment):
    """Seeded randomness (noise samples, resampled examples) repeats bit for bit; another seed draws anew."""
    path = write_experiment("metric logprob(io)\ntrace noise(3 sigma, samples=2) on [1, 2] restore "
                            "resid_pre[layer=*, pos=*]\nablate z[layer=*, head=*] with resample")
    first, second, other = (causal.run(path, RunConfig(device="cpu", progress=False, seed=seed)) for seed in (5, 5, 6))
    for name in first.data_vars:
        np.testing.assert_array_equal(first[name].values, second[name].values)
    for name in ("trace_resid_pre_noised", "ablate_z"):
        assert not np.array_equal(first[name].values, other[name].values), name


# --------------------------------------------------------------------------------- files and folders

def test_experiment_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.cx"
    path.write_bytes('model "m"\ndata "donn\xe9es.jsonl"\n'.encode("latin-1"))
    assert str(error_of(path)) == f"error: experiment file '{path}' is not UTF-8 text"


def test_experiment_path_that_is_a_folder(tmp_path):
    (tmp_path / "folder.cx").mkdir()
    assert str(error_of(tmp_path / "folder.cx")) == (
        f"error: cannot read experiment file '{tmp_path / 'folder.cx'}': it is a folder, not a regular file")


def test_experiment_file_with_a_byte_order_mark(write_experiment, cpu_config):
    """Editors on Windows write a UTF-8 BOM; data files tolerate it, experiment files should too."""
    path = write_experiment(BODY)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert causal.prepare(path, cpu_config).n_examples == 6


def test_disk_full_while_saving_a_checkpoint(write_experiment, tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr("causal.engine.checkpoint.save_file", full)
    err = error_of(write_experiment(SWEEP), checkpoints=str(tmp_path / "ck"))
    folder, = (tmp_path / "ck").iterdir()
    assert str(err) == f"error: cannot write checkpoint to '{folder}': No space left on device"
    assert not list(folder.glob("*.tmp")), "no partial checkpoint is left behind"


@pytest.fixture
def kept_checkpoints(write_experiment, tmp_path, monkeypatch) -> tuple[Path, Path]:
    """(experiment, checkpoint folder) of a run that finished every batch but was stopped before cleaning up."""
    path = write_experiment(SWEEP)
    monkeypatch.setattr("causal.engine.checkpoint.ChunkStore.clear", lambda self: None)
    causal.run(path, RunConfig(device="cpu", progress=False, batch_size=4, checkpoints=str(tmp_path / "ck")))
    monkeypatch.undo()
    folder, = (tmp_path / "ck").iterdir()
    return path, folder


def test_damaged_checkpoint_on_resume(kept_checkpoints, tmp_path):
    """A chunk file emptied by a crash or a full disk: recompute it, or say which file; never a raw traceback."""
    path, folder = kept_checkpoints
    damaged = sorted(folder.glob("job-*.safetensors"))[0]
    damaged.write_bytes(b"")
    config = RunConfig(device="cpu", progress=False, batch_size=4, checkpoints=str(tmp_path / "ck"))
    try:
        resumed = causal.run(path, config)
    except CausalError as err:
        assert str(damaged) in str(err)
        return
    fresh = causal.run(path, RunConfig(device="cpu", progress=False, batch_size=4))
    np.testing.assert_array_equal(resumed["patch_resid_pre"].values, fresh["patch_resid_pre"].values)


def test_interrupted_run_keeps_finished_batches_and_resumes(write_experiment, tmp_path, monkeypatch):
    """Ctrl-C (KeyboardInterrupt) part-way: finished batches stay on disk, the same call finishes the rest."""
    path = write_experiment(SWEEP)
    config = RunConfig(device="cpu", progress=False, batch_size=4, checkpoints=str(tmp_path / "ck"))
    real, calls = Runner.forward, []

    def interrupt_later(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 8:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)
    monkeypatch.setattr(Runner, "forward", interrupt_later)
    with pytest.raises(KeyboardInterrupt):
        causal.run(path, config)
    monkeypatch.undo()
    folder, = (tmp_path / "ck").iterdir()
    assert len(list(folder.glob("job-*.safetensors"))) >= 3
    resumed = causal.run(path, config)
    fresh = causal.run(path, RunConfig(device="cpu", progress=False, batch_size=4))
    for name in fresh.data_vars:
        np.testing.assert_array_equal(resumed[name].values, fresh[name].values)
    assert not folder.exists()


# --------------------------------------------------------------------------------- the table itself

def test_every_test_the_reliability_table_cites_exists():
    """docs/reliability.md backs each row with a test; a renamed or deleted test must not leave a dead row."""
    cited = re.findall(r"`(tests/[\w/]+\.py)::(\w+)(?:\[[^`]*\])?`", (ROOT / "docs" / "reliability.md").read_text())
    assert len(cited) > 100
    for file, name in cited:
        assert re.search(rf"^def {name}\(", (ROOT / file).read_text(), re.M), f"{file}::{name}"
