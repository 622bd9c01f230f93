"""Hydra's config module for `causal run`. Loading it (hydra.main, or compose with
initialize_config_module("causal.conf")) registers the structured configs run.yaml builds on."""
from causal.app import launchers
from causal.app.settings import register

register()
launchers.register()
