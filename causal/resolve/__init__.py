"""AST + model + data -> a typed Experiment, every name, index and token checked before compute."""


def resolve(file, model, methods, seed: int = 0):
    """See causal.resolve.resolver.resolve (imported here on first use: `names` stays torch-free)."""
    from causal.resolve.resolver import resolve as resolve_file
    return resolve_file(file, model, methods, seed)


__all__ = ["resolve"]
