"""The `causal` command: Hydra run directories, sweeps, plots, and errors without tracebacks."""
from __future__ import annotations

import subprocess
import sys

import xarray as xr

import causal
from causal.cli import main


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


def test_errors_exit_2_without_traceback(write_experiment, tmp_path):
    path = write_experiment("metric logprob(io)\nablate attn_out[layer=9] with zero")
    result = subprocess.run([sys.executable, "-m", "causal.cli", "run", str(path), f"hydra.run.dir={tmp_path / 'r'}"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"{path}:5:23: error: layer 9 is out of range" in result.stderr
    missing = subprocess.run([sys.executable, "-m", "causal.cli", "run", "nope.cx"], capture_output=True, text=True)
    assert missing.returncode == 2 and "no experiment file 'nope.cx'" in missing.stderr
