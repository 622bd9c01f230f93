"""`causal run -m`'s sweeper, here because Hydra instantiates plugins only from the hydra_plugins package.

Hydra's basic sweeper, which also keeps every job's outcome (causal.app.launchers reports the failed ones).
"""
from typing import Any, List

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

from causal.app import launchers


class CausalSweeper(BasicSweeper):
    def sweep(self, arguments: List[str]) -> Any:
        returns = super().sweep(arguments)
        launchers.keep([job for batch in returns for job in batch])
        return returns
