"""Resume after SIGKILL, out-of-memory back-off, determinism, numeric health, safety, file-system errors."""
from __future__ import annotations

import json
import logging
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from safetensors.torch import load_file, save_file

import causal
from causal import CausalError, RunConfig
from causal.engine.plan import bytes_per_example, compile_plan
from causal.engine.execute import Executor
from causal.engine.forward import Runner
from tests.conftest import make_rows

pytestmark = pytest.mark.slow  # subprocesses killed and resumed

SWEEP = "metric logprob(io)\npatch resid_pre[layer=*, pos=*] from corrupt into clean\nablate z[layer=*, head=*] with mean"


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "causal.app.cli", "run", *args]


def test_sigkill_then_same_command_resumes_to_the_uninterrupted_result(write_experiment, tmp_path):
    path = write_experiment(SWEEP, make_rows(n=16))
    checkpoints = tmp_path / "ck"
    command = cli(str(path), f"hydra.run.dir={tmp_path / 'run'}", f"checkpoints={checkpoints}", "batch_size=2",
                  "pack=exact", "device=cpu", "progress=false", "plots=false")
    victim = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while len(list(checkpoints.glob("*/job-*.safetensors"))) < 5:
        assert victim.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    folder, = checkpoints.iterdir()
    done = len(list(folder.glob("job-*.safetensors")))
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    config = RunConfig(device="cpu", progress=False, batch_size=2, pack="exact")
    total = len(compile_plan(causal.prepare(path, config), 2, "exact").jobs)
    assert re.search(rf"resuming: {done} of {total} batches already done", resumed.stderr + resumed.stdout)
    assert not folder.exists(), "checkpoints are removed once the results are saved"
    uninterrupted = [a.replace(str(tmp_path / "run"), str(tmp_path / "fresh")).replace(str(checkpoints), str(
        tmp_path / "ck2")) for a in command]  # same process settings (threads) as the killed run
    assert subprocess.run(uninterrupted, capture_output=True, timeout=300).returncode == 0
    fresh = causal.load(tmp_path / "fresh")
    back = causal.load(tmp_path / "run")
    for name in ("patch_resid_pre", "ablate_z", "clean", "corrupt"):
        np.testing.assert_array_equal(back[name].values, fresh[name].values)


def test_changed_experiment_does_not_reuse_old_chunks(write_experiment, tmp_path):
    path = write_experiment(SWEEP)
    checkpoints = tmp_path / "ck"
    config = RunConfig(device="cpu", progress=False, batch_size=4, checkpoints=str(checkpoints))
    causal.prepare(path, config)
    from causal.app.api import checkpoint_store
    experiment = causal.prepare(path, config)
    plan = compile_plan(experiment, 4)
    old = checkpoint_store(experiment, config, plan)
    for index, job in enumerate(plan.jobs):  # poison every chunk of the old file
        old.save(f"job-{index:06d}", torch.full((len(job.examples), 1), 123.0))
    path.write_text(path.read_text().replace("metric logprob(io)", "metric prob(io)"))
    result = causal.run(path, config)
    assert not (result["patch_resid_pre"] == 123.0).any()
    assert old.folder.exists() and len(old.completed()) > 0  # left alone, not mixed in
    # ... while the unchanged file would have picked them up:
    other = RunConfig(device="cpu", progress=False, batch_size=4, checkpoints=str(checkpoints), seed=1)
    assert checkpoint_store(causal.prepare(path, other), other, plan).key != checkpoint_store(
        causal.prepare(path, config), config, plan).key


def test_out_of_memory_halves_the_batch_and_says_so(write_experiment, monkeypatch, caplog):
    path = write_experiment(SWEEP)
    expected = causal.run(path, RunConfig(device="cpu", progress=False, batch_size=64))
    real = Runner.forward
    seen = []

    def small_device(self, ids, *args, **kwargs):
        seen.append(len(ids))
        if len(ids) > 10 and len(ids) != 6:  # base runs (6 examples) fit; big patched batches do not
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, ids, *args, **kwargs)
    monkeypatch.setattr(Runner, "forward", small_device)
    with caplog.at_level(logging.WARNING, logger="causal.engine.execute"):
        got = causal.run(path, RunConfig(device="cpu", progress=False, batch_size=64))
    first = max(n for n in seen if n != 6)
    assert first > 10
    assert f"out of memory with {first} rows per forward pass; retrying with {first // 2}" in caplog.text
    fitted = max(n for n in seen[-5:])
    assert fitted <= 10 and f"retrying with {fitted}" in caplog.text  # later runs start at the size that fitted
    for name in ("patch_resid_pre", "ablate_z"):
        np.testing.assert_allclose(got[name].values, expected[name].values, atol=1e-5)


def test_out_of_memory_on_one_row_is_an_error(write_experiment, monkeypatch):
    real = Runner.forward

    def no_memory(self, ids, *args, **kwargs):
        if len(ids) != 6:
            raise RuntimeError("CUDA error: out of memory")
        return real(self, ids, *args, **kwargs)
    monkeypatch.setattr(Runner, "forward", no_memory)
    with pytest.raises(CausalError, match="out of memory with a single row per forward pass"):
        causal.run(write_experiment(SWEEP), RunConfig(device="cpu", progress=False))


def test_same_file_and_seed_give_identical_results(write_experiment):
    path = write_experiment(SWEEP + "\nablate mlp_out[layer=*] with zero")
    first = causal.run(path, RunConfig(device="cpu", progress=False, seed=7))
    second = causal.run(path, RunConfig(device="cpu", progress=False, seed=7))
    for name in first.data_vars:
        np.testing.assert_array_equal(first[name].values, second[name].values)


@pytest.fixture
def model_with_nan_token(tiny_gpt2, tmp_path) -> Path:
    """The tiny GPT-2 with token t63's embedding set to NaN."""
    folder = tmp_path / "nan-model"
    folder.mkdir()
    for item in tiny_gpt2.iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    weights = load_file(folder / "model.safetensors")
    weights["transformer.wte.weight"][63] = float("nan")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_nan_is_reported_with_layer_and_example(write_experiment, model_with_nan_token):
    rows = make_rows()
    rows[4]["clean"] += " t63"
    rows[4]["corrupt"] += " t63"
    path = write_experiment("metric logprob(io)\nablate mlp_out[layer=1] with zero", rows, model_with_nan_token)
    with pytest.raises(CausalError, match=r"NaN or inf first appears in resid_post of layer 0 for example 4 "
                                          r"of the unpatched 'clean' prompts"):
        causal.run(path, RunConfig(device="cpu", progress=False))


def test_nan_introduced_by_an_intervention_names_the_site(write_experiment, tiny_gpt2, tmp_path):
    rows = make_rows()
    path = write_experiment("metric logprob(io)\npatch attn_out[layer=*, pos=*] from corrupt into clean", rows)
    experiment = causal.prepare(path, RunConfig(device="cpu", progress=False))
    plan = compile_plan(experiment, 500, pack="exact")
    executor = Executor(experiment, plan, progress=False, store=None)
    executor.prepare_statistics()
    caches = executor.base_runs(0, plan.chunks[0], set(), need=True)
    key = ("corrupt", ("attn_out", 2))
    caches.tensors[key] = caches.tensors[key].clone()
    caches.tensors[key][3, 1] = float("inf")  # a corrupted source activation
    job = next(j for j in plan.jobs if (j.start_layer, j.start_pos) == (2, 1))
    with pytest.raises(CausalError, match=r"first appears in resid_post of layer 2 for example 3 while running "
                                          r"'patch attn_out\[layer=\*, pos=\*\] from corrupt into clean' at layer=2 pos=1"):
        executor.run_job(job, caches)


def test_experiment_files_cannot_run_code():
    from causal.lang.parser import parse_text
    for attack in ('model "m"\n__import__("os").system("touch /tmp/pwned")\n',
                   'model "m"\ndata "d"\nmetric logprob(io)\nablate z[layer=`rm -rf /`] with zero\n',
                   'model "m"\ndata "d"\nmetric eval(open("x").read())\nablate z with zero\n'):
        with pytest.raises(CausalError, match="syntax error"):
            parse_text(attack, "attack.cx")
    source = "\n".join(p.read_text() for p in (Path(causal.__file__).parent).rglob("*.py"))
    for dangerous in (r"(?<![.\w])eval\(", r"(?<![.\w])exec\(", r"import pickle|pickle\.loads?\(", r"torch\.load\(",
                      r"trust_remote_code=True"):
        assert not re.search(dangerous, source), dangerous


def test_remote_code_is_off_unless_asked(tmp_path, monkeypatch):
    folder = tmp_path / "remote"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": {
        "AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel"}}))
    (folder / "configuration_evil.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(CausalError, match="cannot load model"):
        causal.models.load_model(str(folder), device="cpu")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    seen = {}
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: seen.update(tok=k["trust_remote_code"]) or 1 / 0)
    with pytest.raises(CausalError, match="division by zero"):  # what the loader was asked, then refused plainly
        causal.models.load_model("zoo:attn-only-2l", device="cpu")
    assert seen["tok"] is False
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: 1 / 0)
    with pytest.raises(CausalError, match="division by zero"):
        causal.models.load_model("zoo:attn-only-2l", device="cpu", trust_remote_code=True)
    assert seen["tok"] is True


def test_checkpoints_hold_no_pickles(write_experiment, tmp_path, monkeypatch):
    from causal.engine import checkpoint
    cleared = []
    monkeypatch.setattr(checkpoint.ChunkStore, "clear", lambda self: cleared.append(self.folder))
    causal.run(write_experiment(SWEEP), RunConfig(device="cpu", progress=False, checkpoints=str(tmp_path / "ck")))
    folder, = cleared
    assert {p.suffix for p in folder.iterdir()} == {".safetensors", ".json"}


def test_unwritable_output_and_checkpoint_locations(write_experiment, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    ds = causal.run(write_experiment("metric logprob(io)\nablate mlp_out with zero"),
                    RunConfig(device="cpu", progress=False))
    with pytest.raises(CausalError, match="cannot write results to"):
        causal.save(ds, blocker / "run" / "results.nc")
    with pytest.raises(CausalError, match="cannot write checkpoints under"):
        causal.run(write_experiment("metric logprob(io)\nablate mlp_out with zero"),
                   RunConfig(device="cpu", progress=False, checkpoints=str(blocker / "ck")))
    assert isinstance(ds, xr.Dataset)


def test_memory_budget_splits_examples_into_chunks_with_the_same_results(write_experiment):
    path = write_experiment(SWEEP, make_rows(n=9, ragged=True))
    whole = causal.run(path, RunConfig(device="cpu", progress=False))
    experiment = causal.prepare(path, RunConfig(device="cpu", progress=False))
    per_example = bytes_per_example(experiment, compile_plan(experiment, 8))
    budget_gb = 2.5 * per_example / 2 ** 30  # two examples' caches per chunk
    plan = compile_plan(experiment, 8, cache_bytes=budget_gb * 2 ** 30)
    assert [len(c.examples) for c in plan.chunks] == [2, 2, 2, 2, 1]
    chunked = causal.run(path, RunConfig(device="cpu", progress=False, cache_gb=budget_gb))
    for name in whole.data_vars:
        np.testing.assert_allclose(chunked[name].values, whole[name].values, atol=1e-5, equal_nan=True)


def test_attribution_resumes_from_its_checkpointed_chunks(write_experiment, tmp_path, monkeypatch):
    """Killed after two of five chunks, the re-run restores those two (estimates and q/k notes) and
    computes only the rest; the result equals an uninterrupted run's."""
    from causal.methods.attribute import Attribute
    path = write_experiment("metric logprob(io)\nattribute q[layer=*, head=*] + k[layer=*, kv_head=*] "
                            "from corrupt into clean verify top 2", make_rows(n=10))
    experiment = causal.prepare(path, RunConfig(device="cpu", progress=False))
    per_example = bytes_per_example(experiment, compile_plan(experiment, 8))
    config = RunConfig(device="cpu", progress=False, cache_gb=2.5 * per_example / 2 ** 30,
                       checkpoints=str(tmp_path / "ck"))
    uninterrupted = causal.run(path, replace(config, checkpoints=None))
    computed: list[int] = []
    real_chunk = Attribute.chunk_pass

    class Killed(KeyboardInterrupt):  # as a real interruption: it passes the internal-error boundary
        pass

    kill = [True]

    def dies_after_two(self, run, chunk, state):
        if kill and len(computed) == 2:
            kill.clear()
            raise Killed
        computed.append(int(chunk.examples[0]))
        return real_chunk(self, run, chunk, state)

    monkeypatch.setattr(Attribute, "chunk_pass", dies_after_two)
    with pytest.raises(Killed):
        causal.run(path, config)
    assert computed == [0, 2]
    resumed = causal.run(path, config)
    assert computed == [0, 2, 4, 6, 8], "the two checkpointed chunks were computed again"
    xr.testing.assert_identical(resumed.drop_attrs(deep=False), uninterrupted.drop_attrs(deep=False))
    assert resumed["attribute_q"].attrs["qk_fix_layers"] == [0, 1, 2]  # restored notes, compared above too
