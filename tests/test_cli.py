"""The `causal` command: Hydra run directories, sweeps, plots, and errors without tracebacks."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import xarray as xr
from transformers import BloomConfig, BloomForCausalLM

import causal
from causal import RunConfig
from causal.app.api import plan_run, prepare
from causal.app.check import block_work
from causal.app.cli import main
from causal.zoo import word_tokenizer
from tests.conftest import VOCAB


def test_run_writes_results_and_plots(write_experiment, tmp_path, capsys):
    path = write_experiment("metric logprob(io)\npatch resid_pre[layer=*, pos=*] from corrupt into clean")
    out = tmp_path / "run"
    assert main(["run", str(path), f"hydra.run.dir={out}", "device=cpu", "progress=false", "seed=3"]) == 0
    ds = causal.load(out)
    assert ds.attrs["seed"] == 3 and "seed=3" in ds.attrs["overrides"]
    assert (out / "plots" / "patch_resid_pre.png").exists()
    assert (out / ".hydra" / "config.yaml").exists()
    printed = capsys.readouterr().out
    assert f"results: {out / 'results.nc'}" in printed and "largest mean effects layer=" in printed


def test_multirun_makes_one_directory_per_setting(write_experiment, tmp_path):
    path = write_experiment("metric logprob(io)\nablate mlp_out[layer=*] with zero")
    sweep = tmp_path / "sweep"
    assert main(["run", "-m", str(path), f"hydra.sweep.dir={sweep}", "batch_size=1,64", "progress=false",
                 "plots=false", "device=cpu"]) == 0
    first, second = (causal.load(sweep / str(i)) for i in (0, 1))
    assert (first.attrs["batch_size"], second.attrs["batch_size"]) == (1, 64)
    xr.testing.assert_allclose(first["ablate_mlp_out"], second["ablate_mlp_out"], atol=1e-5)


def test_plot_command_remakes_plots(write_experiment, tmp_path):
    path = write_experiment("metric logprob(io)\nablate z[layer=*, head=*] with zero")
    out = tmp_path / "run"
    assert main(["run", str(path), f"hydra.run.dir={out}", "progress=false", "plots=false", "device=cpu"]) == 0
    assert not (out / "plots").exists()
    assert main(["plot", str(out)]) == 0
    assert (out / "plots" / "ablate_z.png").exists()


@pytest.mark.slow
def test_errors_exit_2_without_traceback(write_experiment, tmp_path):
    path = write_experiment("metric logprob(io)\nablate attn_out[layer=9] with zero")
    result = subprocess.run([sys.executable, "-m", "causal.app.cli", "run", str(path), f"hydra.run.dir={tmp_path / 'r'}"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"{path}:5:23: error: layer 9 is out of range" in result.stderr
    missing = subprocess.run([sys.executable, "-m", "causal.app.cli", "run", "nope.cx"], capture_output=True, text=True)
    assert missing.returncode == 2 and "cannot read experiment file 'nope.cx': no such file" in missing.stderr


def test_check_shows_the_plan_without_running_anything(write_experiment, no_forward, capsys):
    path = write_experiment("metric logprob(io)\npatch resid_pre[layer=*, pos=*] from corrupt into clean")
    assert main(["check", str(path), "device=cpu", "batch_size=7", "pack=exact"]) == 0
    experiment = prepare(path, RunConfig(device="cpu"))
    plan = plan_run(experiment, RunConfig(device="cpu", batch_size=7, pack="exact"))
    layers, width, n = 3, int(experiment.prompts["clean"].ids.shape[1]), experiment.n_examples
    assert plan.rows == layers * width * n
    printed = capsys.readouterr().out
    assert f"{path}: ok, nothing run" in printed and "layers 3, heads 4, d_model 32" in printed
    assert f"layer {layers} x pos {width} = {layers * width} points; {plan.rows} rows in" in printed
    assert f"{len(plan.jobs) + 2} forward passes of up to 7 rows" in printed  # + clean and corrupt, 6 rows each
    assert not no_forward
    # Row (l, p) computes layers l.. and positions p.. only: sum over l, p of (L - l)(W - p) over (L W)^2.
    planned, full = block_work(experiment, plan)
    assert planned / full == pytest.approx((layers + 1) * (width + 1) / (4 * layers * width))
    assert f"compute {planned / full:.0%} of the token-layers" in printed


def test_check_counts_both_passes_of_path_patching(write_experiment, no_forward, capsys):
    """Pass one runs every layer (senders at layer 0); pass two starts at the receivers' layer 2 of 3."""
    path = write_experiment("metric logprob(io)\npath z[layer=0, head=*] -> q[layer=2, head=*] from corrupt into clean")
    assert main(["check", str(path), "device=cpu", "batch_size=7", "pack=exact"]) == 0
    experiment = prepare(path, RunConfig(device="cpu"))
    plan = plan_run(experiment, RunConfig(device="cpu", batch_size=7, pack="exact"))
    assert f"{plan.rows} rows in {2 * len(plan.jobs)} forward passes" in capsys.readouterr().out
    planned, full = block_work(experiment, plan)
    assert planned / full == pytest.approx((1 + 1 / 3) / 2)


@pytest.mark.parametrize("arguments, message", [
    (["nope=1"], "unknown parameter 'nope'"),
    (["batch_size=abc"], "setting batch_size='abc' must be int"),
    (["seed=0,1"], "bad setting on the command line"),
    (["pack=fastest"], "unknown pack 'fastest'"),
], ids=["unknown-key", "bad-type", "sweep", "bad-pack"])
def test_check_reports_bad_settings(write_experiment, no_forward, capsys, arguments, message):
    path = write_experiment("metric logprob(io)\nablate mlp_out[layer=*] with zero")
    assert main(["check", str(path), "device=cpu", *arguments]) == 2
    assert message in capsys.readouterr().err and not no_forward


def test_check_reports_experiment_errors_with_their_location(write_experiment, no_forward, capsys):
    path = write_experiment("metric logprob(io)\nablate attn_out[layer=9] with zero")
    assert main(["check", str(path), "device=cpu"]) == 2
    assert f"{path}:5:23: error: layer 9 is out of range" in capsys.readouterr().err and not no_forward


def test_check_on_a_model_without_an_adapter_offers_module_sites(write_experiment, tmp_path, no_forward, capsys):
    torch.manual_seed(0)
    folder = tmp_path / "bloom"
    BloomForCausalLM(BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4)).save_pretrained(folder)
    word_tokenizer(VOCAB).save_pretrained(folder)
    path = write_experiment('metric logprob(io)\nablate module("transformer.h.{layer}.mlp")[layer=*] with zero',
                            model=folder)
    assert main(["check", str(path), "device=cpu"]) == 0
    printed = capsys.readouterr().out
    assert "sites    module:<path> only (bloom has no architecture adapter)" in printed
    assert "layer 2 = 2 points; 12 rows in" in printed and not no_forward


def test_check_shows_parameters_with_command_line_values(write_experiment, no_forward, capsys):
    path = write_experiment("param scale = 2\nmetric logprob(io)\nsteer resid_pre[layer=0] by scale * mean(clean)")
    assert main(["check", str(path), "device=cpu", "scale=3"]) == 0
    assert "params   scale=3\n" in capsys.readouterr().out and not no_forward


# --------------------------------------------------------------------------------- the command line itself

def test_each_command_has_help(capsys):
    from causal.app.settings import command_line_settings
    assert main(["--help"]) == 0
    top = capsys.readouterr().out
    assert top.startswith("usage:\n  causal run FILE [key=value ...]")
    assert all(f"    {command} " in top for command in ("run", "check", "plot"))
    assert main(["run", "--help"]) == 0
    run_help = capsys.readouterr().out
    for f in command_line_settings():
        assert f.name == "file" or f"  {f.name}=" in run_help, f.name
    assert "--multirun, -m" in run_help and "--config-dir" in run_help and "--cfg" in run_help
    assert "batch_size=128" in run_help and "checkpoints=outputs/.checkpoints" in run_help
    assert main(["check", "-h"]) == 0 and "usage: causal check [-h] FILE [key=value ...]" in capsys.readouterr().out
    assert main(["plot", "-h"]) == 0 and "RUN_DIR" in capsys.readouterr().out


def test_version(capsys):
    from importlib.metadata import version
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"causal {version('causal')}\n"


def test_hydra_flags_pass_through(write_experiment, tmp_path, monkeypatch, no_forward, capsys):
    monkeypatch.chdir(tmp_path)
    path = write_experiment("param n = 3\nmetric logprob(io)\nablate mlp_out[layer=*] with zero")
    assert main(["run", str(path), "--cfg", "job", "seed=4", "n=5", "cache_gb=2"]) == 0
    shown = capsys.readouterr().out
    assert f"file: {path}\nseed: 4\n" in shown and "params:\n  'n': 5\n" in shown and "cache_gb: 2.0\n" in shown
    assert main(["run", "--info", "defaults"]) == 0  # Hydra's reports need no experiment file
    assert "run_settings" in capsys.readouterr().out
    launchers = tmp_path / "conf" / "hydra" / "launcher"
    launchers.mkdir(parents=True)
    (launchers / "mine.yaml").write_text("defaults:\n  - basic\n")
    assert main(["run", str(path), "--config-dir", str(tmp_path / "conf"), "hydra/launcher=mine", "--cfg", "hydra",
                 "--package", "hydra.launcher"]) == 0
    assert "BasicLauncher" in capsys.readouterr().out
    assert main(["run", "--hydra-help"]) == 0 and "Hydra (" in capsys.readouterr().out
    assert main(["run", "-sc", "install=bash"]) == 0 and "hydra_bash_completion" in capsys.readouterr().out
    assert not (tmp_path / "outputs").exists(), "nothing ran"


@pytest.mark.parametrize("arguments, message", [
    (["--cfg", "job", "--info"], "--cfg and --info: Hydra takes only one of"),
    (["--cfg", "everything"], "argument --cfg/-c: invalid choice: 'everything'"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["~seed"], "~seed would remove a run setting; give it a value instead (seed=0 is the default)"),
], ids=["two-modes", "bad-choice", "unknown-flag", "delete-setting"])
def test_bad_flags_exit_2(write_experiment, no_forward, capsys, arguments, message):
    assert main(["run", str(write_experiment("metric logprob(io)\nablate mlp_out with zero")), *arguments]) == 2
    assert message in capsys.readouterr().err


def test_shell_completion_completes_settings(monkeypatch, capsys):
    """Hydra's completion script calls `causal -sc query=bash` with the line typed so far."""
    monkeypatch.setenv("COMP_LINE", "causal run exp.cx batch_size=4 se")
    assert main(["-sc", "query=bash"]) == 0
    assert capsys.readouterr().out.split() == ["seed="]


def test_settings_are_declared_once():
    """RunConfig's fields are the run settings; `causal run`'s structured config is built from them."""
    from dataclasses import fields

    from hydra import compose, initialize_config_module
    from hydra.errors import ConfigCompositionException
    from omegaconf import OmegaConf

    import causal.app.api
    import causal.conf
    from causal.app.settings import RunConfig as Declared
    from causal.app.settings import RunSettings
    assert causal.RunConfig is causal.app.api.RunConfig is Declared
    python_only = {f.name for f in fields(Declared) if not f.metadata["command_line"]}
    assert python_only == {"optimize", "overrides"}
    assert [f.name for f in fields(RunSettings)] == [
        "file", *(f.name for f in fields(Declared) if f.name not in python_only), "plots", "resume"]
    assert all(f.metadata["help"] for f in fields(RunSettings))
    yaml = OmegaConf.load(causal.conf.__file__.replace("__init__.py", "run.yaml"))
    assert set(yaml) == {"defaults", "hydra"}, "run.yaml declares no setting"
    assert Declared().checkpoints is None  # Python: no checkpoints unless asked; `causal run`: resumable
    with initialize_config_module("causal.conf", version_base="1.3"):
        cfg = compose("run", overrides=["file=x.cx"])
        assert cfg.checkpoints == "outputs/.checkpoints" and cfg.batch_size == 128
        with pytest.raises(ConfigCompositionException):  # Hydra itself checks the types
            compose("run", overrides=["file=x.cx", "batch_size=abc"])


@pytest.mark.slow
def test_python_dash_m_causal_runs(write_experiment, tmp_path):
    path = write_experiment("metric logprob(io)\nablate mlp_out with zero")
    result = subprocess.run([sys.executable, "-m", "causal", "run", str(path), f"hydra.run.dir={tmp_path / 'r'}",
                             "device=cpu", "progress=false", "plots=false"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert causal.load(tmp_path / "r").attrs["overrides"]


def test_the_readme_sweep_on_ioi_varies_the_prompts(tmp_path):
    """README: `causal run -m experiments/ioi.cx ... data_seed=0,1`: the two jobs draw different prompts (the run
    seed does not reach the generator; a sweep over it used to give identical jobs)."""
    from pathlib import Path
    ioi = Path(__file__).resolve().parents[1] / "experiments" / "ioi.cx"
    assert "data_seed=0,1" in (ioi.parents[1] / "README.md").read_text()
    sweep = tmp_path / "sweep"
    assert main(["run", "-m", str(ioi), f"hydra.sweep.dir={sweep}", "n=6", "data_seed=0,1", "device=cpu",
                 "progress=false", "plots=false"]) == 0
    merged = causal.load(sweep)
    assert merged.sizes["data_seed"] == 2
    first, second = (merged["patch_resid_pre"].sel(data_seed=s).values for s in (0, 1))
    assert not (first == second).all()
