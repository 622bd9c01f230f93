"""Sweeps and their launchers: every shipped launcher config composes (or names its missing plugin), a sweep with
failed jobs says which and exits non-zero, leaving no empty folders; the run log; command-line model errors; hub
ids offline."""
from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import causal
from causal.app.cli import main
from causal.app.launchers import PLUGINS

pytestmark = pytest.mark.slow  # Hydra launchers in subprocesses

LAUNCHERS = Path(causal.__file__).parent / "conf" / "hydra" / "launcher"
TARGETS = {"basic": "BasicLauncher", "joblib": "JoblibLauncher", "submitit_local": "LocalLauncher",
           "submitit_slurm": "SlurmLauncher", "slurm": "SlurmLauncher", "ray": "RayLauncher", "ray_gpu": "RayLauncher"}


def _installed(name: str) -> bool:
    return name not in PLUGINS or importlib.util.find_spec(f"hydra_plugins.{PLUGINS[name][0]}") is not None


def test_every_shipped_launcher_config_is_tested():
    shipped = {p.stem for p in LAUNCHERS.glob("*.yaml")}
    assert shipped <= set(TARGETS) and shipped <= set(PLUGINS), "a new launcher config: add it to both tables"
    for path in LAUNCHERS.glob("*.yaml"):  # `defaults: [ray]` in ray.yaml included itself forever
        assert path.stem not in yaml.safe_load(path.read_text()).get("defaults", []), path.name


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_each_launcher_composes_or_names_its_plugin(write_experiment, no_forward, capsys, name):
    path = write_experiment("metric logprob(io)\nablate mlp_out with zero")
    status = main(["run", str(path), "--cfg", "hydra", "--package", "hydra.launcher", f"hydra/launcher={name}"])
    out, err = capsys.readouterr()
    if _installed(name):
        assert status == 0, err
        assert f".{TARGETS[name]}\n" in out
        if name == "ray_gpu":
            assert "num_gpus: 1" in out
    else:
        assert status == 2 and "Traceback" not in err
        assert f"hydra/launcher={name} needs Hydra's launcher plugin {PLUGINS[name][1]}" in err
        assert f"pip install {PLUGINS[name][1]}" in err
    assert not Path("outputs").exists(), "nothing ran"


def test_ray_gpu_extends_the_plugins_ray_config():
    """ray_gpu composes on top of the plugin's `ray` config, once (where the plugin is missing, a stand-in)."""
    from hydra import compose, initialize_config_module
    from hydra.core.config_store import ConfigStore
    store = ConfigStore.instance()
    stand_in = not _installed("ray")
    if stand_in:
        store.store(group="hydra/launcher", name="ray",
                    node={"_target_": "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher",
                          "ray": {"init": {"address": None}, "remote": {}}})
    try:
        with initialize_config_module("causal.conf", version_base="1.3"):
            cfg = compose("run", overrides=["file=x.cx", "hydra/launcher=ray_gpu"], return_hydra_config=True)
    finally:
        if stand_in:
            store.repo["hydra"]["launcher"].pop("ray.yaml")
    assert cfg.hydra.launcher._target_.endswith("RayLauncher")
    assert {"num_gpus": 1, "num_cpus": 4}.items() <= dict(cfg.hydra.launcher.ray.remote).items()


# --------------------------------------------------------------------------------- sweeps with failed jobs

@pytest.mark.parametrize("launcher", ["basic", "joblib"])
def test_a_sweep_with_failed_jobs_says_which_and_exits_non_zero(write_experiment, tmp_path, tiny_gpt2, capsys,
                                                                 launcher):
    """The jobs run in this process (basic) or in worker processes (joblib): their outcomes come back either way."""
    path = write_experiment("metric logprob(io)\nablate mlp_out with zero")
    sweep = tmp_path / "sweep"
    status = main(["run", "-m", str(path), f"hydra.sweep.dir={sweep}", f"model={tiny_gpt2},zoo:nope", "seed=0,1",
                   "device=cpu", "progress=false", "plots=false", f"hydra/launcher={launcher}"])
    err = capsys.readouterr().err
    assert status == 2
    assert "2 of 4 jobs failed:\n" in err
    for job in (2, 3):  # model is the outer loop
        assert f"  #{job} model=zoo:nope seed={job - 2} device=cpu " in err
        assert f": {sweep / str(job)} (removed: the job wrote nothing)\n" in err
        assert not (sweep / str(job)).exists(), "a refused job leaves no folder"
    assert "      command line: error: no toy model 'nope' in the zoo" in err
    assert sorted(p.name for p in sweep.iterdir()) == ["0", "1", "multirun.yaml"]
    assert causal.load(sweep).sizes["seed"] == 2


def test_a_sweep_whose_jobs_all_fail_leaves_no_folder(write_experiment, tmp_path, capsys):
    path = write_experiment("metric logprob(io)\nablate mlp_out with zero")
    sweep = tmp_path / "sweep"
    assert main(["run", "-m", str(path), f"hydra.sweep.dir={sweep}", "model=zoo:nope,zoo:nix", "device=cpu"]) == 2
    assert "2 of 2 jobs failed:" in capsys.readouterr().err
    assert not sweep.exists()


def test_a_sweep_that_succeeds_exits_0_without_a_report(write_experiment, tmp_path, capsys):
    path = write_experiment("metric logprob(io)\nablate mlp_out with zero")
    assert main(["run", "-m", str(path), f"hydra.sweep.dir={tmp_path / 's'}", "seed=0,1", "device=cpu",
                 "progress=false", "plots=false"]) == 0
    assert "failed" not in capsys.readouterr().err


# --------------------------------------------------------------------------------- the run log

def test_the_run_log_holds_what_the_run_printed(write_experiment, tmp_path, capsys):
    """Hydra's <job name>.log: the warnings, the progress bar's last state (not each redraw), the summary."""
    rows = [{"clean": "t1 t2 t3 t4", "corrupt": "t5 t2 t3 t4", "io": "t6", "s": "t7"}] * 2
    path = write_experiment("metric logprob(io)\nablate mlp_out with zero", rows=rows)
    out = tmp_path / "run"
    assert main(["run", str(path), f"hydra.run.dir={out}", "device=cpu", "plots=false", "progress=true"]) == 0
    printed = capsys.readouterr().out
    log = (out / "exp.log").read_text()
    summary = [line for line in printed.splitlines() if line.startswith(("results:", "ablate_mlp_out"))]
    assert len(summary) == 2 and all(f"[causal.stdout][INFO] - {line}\n" in log for line in summary)
    bars = [line for line in log.splitlines() if "batch/s" in line or "batch]" in line]
    assert len(bars) == 1 and "100%" in bars[0] and "[causal.stderr]" in bars[0]


def test_the_run_log_holds_warnings_and_errors(write_experiment, tmp_path, monkeypatch):
    import logging

    from causal.app import hydra_app
    real = hydra_app.run_keeping_checkpoints

    def warned(path, config):
        logging.getLogger("causal.data.prompts").warning("a warning from the run")
        return real(path, config)

    monkeypatch.setattr(hydra_app, "run_keeping_checkpoints", warned)
    path = write_experiment("metric logprob(io)\nablate mlp_out with zero")
    out = tmp_path / "run"
    assert main(["run", str(path), f"hydra.run.dir={out}", "device=cpu", "plots=false", "progress=false"]) == 0
    assert "[causal.data.prompts][WARNING] - a warning from the run" in (out / "exp.log").read_text()


# --------------------------------------------------------------------------------- a model from the command line

@pytest.mark.parametrize("command", ["run", "check"])
def test_a_bad_model_on_the_command_line_is_shown_there(write_experiment, tmp_path, no_forward, capsys, command):
    path = write_experiment("metric logprob(io)\nablate mlp_out with zero")
    folder = [f"hydra.run.dir={tmp_path / 'r'}"] if command == "run" else []
    assert main([command, str(path), "model=zoo:nope", "device=cpu", *folder]) == 2
    err = capsys.readouterr().err
    assert err.startswith("command line: error: no toy model 'nope' in the zoo")
    assert "\n    model=zoo:nope\n          ^^^^^^^^\n" in err
    assert f"{path}:" not in err and "model \"" not in err, "not the file's model line"
    assert not (tmp_path / "r").exists()


def test_a_bad_model_in_the_file_is_still_shown_there(write_experiment, no_forward, capsys):
    path = write_experiment("metric logprob(io)\nablate mlp_out with zero", model="zoo:nope")
    assert main(["check", str(path), "device=cpu"]) == 2
    assert capsys.readouterr().err.startswith(f"{path}:2:7: error: no toy model 'nope'")


def test_a_model_setting_from_python_points_at_no_file_line(write_experiment):
    path = write_experiment("metric logprob(io)\nablate mlp_out with zero")
    with pytest.raises(causal.CausalError) as caught:
        causal.run(path, causal.RunConfig(model="zoo:nope", device="cpu"))
    assert caught.value.span is None and str(caught.value).startswith("error: no toy model 'nope'")


# --------------------------------------------------------------------------------- hub ids without a hub

def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _offline_env(cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if "PROXY" not in k.upper() and k != "HF_HUB_OFFLINE"}
    return {**env, "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}", "HF_HUB_CACHE": str(cache)}


def test_a_hub_id_the_hub_cannot_give_fails_at_once(write_experiment, tmp_path):
    """No hub (a closed local port) and not in the cache: one message, no minutes of retries."""
    path = write_experiment("metric logprob(io)\nablate mlp_out with zero")
    result = subprocess.run([sys.executable, "-m", "causal", "run", str(path), "model=org/absent", "device=cpu",
                             f"hydra.run.dir={tmp_path / 'r'}"], capture_output=True, text=True, timeout=300,
                            env=_offline_env(tmp_path / "empty-cache"))
    assert result.returncode == 2
    assert result.stderr.startswith("command line: error: cannot load model 'org/absent': the hub (http://127.0.0.1:")
    assert "cannot be reached, and the model is not in the local HF cache" in result.stderr
    assert "Retrying" not in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.count("error:") == 1 and not (tmp_path / "r").exists()


def test_a_hub_id_in_the_cache_loads_without_the_hub(write_experiment, tmp_path, tiny_gpt2):
    """The HF cache's layout (models--org--name/snapshots/<commit>, refs/main), filled as a download would."""
    import shutil
    commit = "0" * 40
    snapshot = tmp_path / "cache" / "models--org--tiny" / "snapshots" / commit
    shutil.copytree(tiny_gpt2, snapshot)
    (tmp_path / "cache" / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "cache" / "models--org--tiny" / "refs" / "main").write_text(commit)
    path = write_experiment("metric logprob(io)\nablate mlp_out with zero", model="org/tiny")
    result = subprocess.run([sys.executable, "-m", "causal", "run", str(path), "device=cpu", "progress=false",
                             "plots=false", f"hydra.run.dir={tmp_path / 'r'}"], capture_output=True, text=True,
                            timeout=300, env=_offline_env(tmp_path / "cache"))
    assert result.returncode == 0, result.stderr
    assert "Retrying" not in result.stderr
    assert causal.load(tmp_path / "r").attrs["model"] == "org/tiny"


def test_the_hub_probe_connects(monkeypatch):
    """Loading by name stays real where the hub answers: the probe is a plain connection, with a short timeout."""
    from huggingface_hub import constants

    from causal.models.load import hub_reachable
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    monkeypatch.delenv("ALL_PROXY", raising=False)
    monkeypatch.delenv("all_proxy", raising=False)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hub_reachable.__wrapped__() is True
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    assert hub_reachable.__wrapped__() is False
