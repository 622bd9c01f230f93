"""The engine: plan, pack, execute, checkpoint and watch numeric health. It knows no method by name."""
