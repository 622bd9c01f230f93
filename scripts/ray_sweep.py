"""Local Ray sweeps, run in the Ray venv of README's "Sweeps and launchers": one with a failed job, and one
of two shards (issue 18 item 5).

hydra-ray-launcher pins cloudpickle < 3, which the test environment's joblib refuses, so these checks
live here rather than in the suite: `python scripts/ray_sweep.py` exits 0 when the Ray launcher brings
every job's outcome back ("1 of 2 jobs failed", the good job's results on disk) and when `causal.load`
of a 2-shard sweep on a local Ray instance equals the unsharded run bit for bit.
"""
from __future__ import annotations

import contextlib
import io
import sys
import tempfile
from pathlib import Path

import causal
from causal.app.cli import main

EXPERIMENT = Path(__file__).resolve().parent.parent / "experiments" / "induction.cx"


def ray_sweep(folder: Path) -> None:
    data = folder / "data.jsonl"
    data.write_text('{"clean": "t1 t2 t3 t4", "corrupt": "t5 t2 t3 t4", "io": "t6"}\n' * 2)
    experiment = folder / "e.cx"
    experiment.write_text(f'model "zoo:attn-only-2l"\ndata "{data}"\nmetric logprob(io)\nablate z[layer=0] with zero\n')
    sweep, err = folder / "sweep", io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main(["run", "-m", str(experiment), f"hydra.sweep.dir={sweep}", "model=zoo:attn-only-2l,zoo:nope",
                       "device=cpu", "progress=false", "plots=false", "hydra/launcher=ray",
                       "+hydra.launcher.ray.init.num_cpus=1"])
    print(err.getvalue(), file=sys.stderr)
    assert status == 2, status
    assert "1 of 2 jobs failed:\n  #1 model=zoo:nope device=cpu" in err.getvalue()
    assert (sweep / "0" / "results.nc").exists() and not (sweep / "1").exists()


def ray_shards(folder: Path) -> None:
    sweep = folder / "shards"
    status = main(["run", "-m", str(EXPERIMENT), "shard=0/2,1/2", f"hydra.sweep.dir={sweep}", "device=cpu",
                   "progress=false", "plots=false", "hydra/launcher=ray", "+hydra.launcher.ray.init.num_cpus=2"])
    assert status == 0, status
    merged = causal.load(sweep)
    whole = causal.run(EXPERIMENT, causal.RunConfig(device="cpu", progress=False))
    different = [name for name in whole.data_vars if merged[name].values.tobytes() != whole[name].values.tobytes()]
    assert not different, f"merged shards differ from the unsharded run in {different}"


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        ray_sweep(Path(tmp))
        print("ray sweep: the failed job was reported and the good one's results written")
        ray_shards(Path(tmp))
        print("ray shards: 2 shards on a local Ray instance, merged by causal.load, equal the unsharded run bit for bit")
