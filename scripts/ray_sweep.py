"""A local Ray sweep with a failed job, run in the Ray venv of README's "Sweeps and launchers".

hydra-ray-launcher pins cloudpickle < 3, which the test environment's joblib refuses, so this check
lives here rather than in the suite: `python scripts/ray_sweep.py` exits 0 when the Ray launcher
brings every job's outcome back ("1 of 2 jobs failed", the good job's results on disk).
"""
from __future__ import annotations

import contextlib
import io
import sys
import tempfile
from pathlib import Path

from causal.cli import main


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


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        ray_sweep(Path(tmp))
    print("ray sweep: the failed job was reported and the good one's results written")
