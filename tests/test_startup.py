"""Start-up: `--help`, `--version` and the mistakes found before a run come back without torch.

Each command runs in a fresh interpreter, which then lists the heavy packages it imported
(sys.modules, not a timer: the promise is what gets imported, whatever the machine's speed).
"""
from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

import causal
from causal.app.cli import package_version

ROOT = Path(__file__).resolve().parents[1]
HEAVY = {"torch", "transformers", "xarray", "seaborn"}
PROBE = ("import sys, causal.app.cli\n"
         "code = causal.app.cli.main(sys.argv[1:])\n"
         f"print('imported:', sorted({{m.split('.')[0] for m in sys.modules}} & set({sorted(HEAVY)!r})))\n"
         "sys.exit(code)\n")
SYNTAX_ERROR = 'experiment test\nmodel "zoo:attn-only-2l"\ndata "data.jsonl"\nmetric logprob(io)\n' \
               "ablate mlp_out[layer=0] wiht zero\n"


def command(*args: str, cwd: Path) -> tuple[int, str, str]:
    """`causal ARGS` in a fresh interpreter: (exit code, stdout without the last line, stderr); asserts
    that no heavy package was imported."""
    result = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120,
                            cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT)})
    *out, imported = result.stdout.rstrip("\n").split("\n")
    assert imported == "imported: []", f"causal {' '.join(args)} imported {imported}\n{result.stderr}"
    return result.returncode, "\n".join(out), result.stderr


@pytest.mark.parametrize("args, shown", [
    (["--help"], "causal run FILE [key=value ...]"),
    (["-h"], "causal check FILE [key=value ...]"),
    (["run", "--help"], "--config-dir"),
    (["run", "-h"], "batch_size=128"),
    (["check", "--help"], "usage: causal check"),
    (["plot", "--help"], "usage: causal plot [-h] RUN_DIR"),
], ids=["help", "h", "run-help", "run-h", "check-help", "plot-help"])
@pytest.mark.slow
def test_help_without_torch(tmp_path, args, shown):
    code, out, err = command(*args, cwd=tmp_path)
    assert (code, err) == (0, "") and shown in out


def test_version_without_torch(tmp_path):
    code, out, _ = command("--version", cwd=tmp_path)
    assert code == 0 and out == f"causal {version('causal')}" == f"causal {package_version()}"


@pytest.mark.parametrize("subcommand", ["run", "check"])
def test_syntax_error_without_torch(tmp_path, subcommand):
    path = tmp_path / "exp.cx"
    path.write_text(SYNTAX_ERROR)
    code, _, err = command(subcommand, str(path), "seed=1", cwd=tmp_path)
    lines = err.splitlines()
    assert code == 2 and "Traceback" not in err
    assert lines[0] == f"{path}:5:25: error: syntax error: unexpected 'wiht'; expected '+', 'with'"
    assert lines[1:3] == ["    ablate mlp_out[layer=0] wiht zero", "    " + " " * 24 + "^"]
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("subcommand", ["run", "check"])
def test_misspelt_metric_without_torch(tmp_path, subcommand):
    path = tmp_path / "exp.cx"
    path.write_text(SYNTAX_ERROR.replace("logprob(io)", "logprb(io)").replace("wiht", "with"))
    code, _, err = command(subcommand, str(path), cwd=tmp_path)
    lines = err.splitlines()
    assert code == 2 and "Traceback" not in err
    assert lines[0].startswith(f"{path}:4:1: error: unknown metric 'logprb'; metrics: logprob, prob, logit_diff")
    assert lines[1] == "    metric logprb(io)" and lines[-1] == "hint: did you mean 'logprob'?"


@pytest.mark.parametrize("setting, message", [
    ("batch_size=abc", "error: setting batch_size='abc' must be int"),
    ("batchsize=4", "error: unknown parameter 'batchsize' on the command line"),
    ("n=abc", "error: parameter 'n' must be an int (its default is 3), got 'abc'"),
    ("seed=0,1", "error: bad setting on the command line: seed=0,1 is a sweep"),
], ids=["type", "unknown-key", "param-type", "sweep-without-m"])
@pytest.mark.slow
def test_bad_setting_without_torch(tmp_path, setting, message):
    path = tmp_path / "exp.cx"
    path.write_text(SYNTAX_ERROR.replace("wiht", "with").replace("metric", "param n = 3\nmetric"))
    code, _, err = command("run", str(path), setting, cwd=tmp_path)
    assert code == 2 and err.startswith(message), err


def test_python_dash_m_causal_is_the_causal_command(tmp_path):
    def both(*args):
        module = subprocess.run([sys.executable, "-m", "causal", *args], capture_output=True, text=True,
                                cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
        code, out, err = command(*args, cwd=tmp_path)
        assert (module.returncode, module.stdout.rstrip("\n"), module.stderr) == (code, out, err)
        return module
    assert both("--version").stdout == f"causal {version('causal')}\n"
    assert "causal run -m FILE" in both("--help").stdout
    assert both("frobnicate").returncode == 2


def test_import_causal_is_lazy():
    script = ("import sys, causal\n"
              "config = causal.RunConfig(device='cpu', progress=False)\n"
              "assert config.device == 'cpu' and config.checkpoints is None, config\n"
              "assert isinstance(causal.CausalError('x'), Exception)\n"
              f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({sorted(HEAVY)!r})))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.stdout == "[]\n", result.stderr


def test_every_public_name_resolves():
    assert causal.__all__ == ["CausalError", "RunConfig", "load", "merge_runs", "plot", "prepare", "prepare_text",
                              "run", "run_prepared", "run_text", "save"]
    from causal.app.api import prepare, run
    from causal.app.settings import RunConfig
    assert causal.run is run and causal.prepare is prepare and causal.RunConfig is RunConfig
    assert all(callable(getattr(causal, name)) for name in causal.__all__)
    assert set(causal.__all__) <= set(dir(causal))
    with pytest.raises(AttributeError, match="no attribute 'nonesuch'"):
        causal.nonesuch  # noqa: B018
