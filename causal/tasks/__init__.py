"""Built-in data generators, called from experiment files as `data NAME(key=value, ...)`.

Each module registers its generator with causal.data.register_generator; the parameter
annotations are the argument schema (see causal.data.params).

- induction(n, length, seed): repeated random tokens (induction heads);
- ioi(n, seed, templates, corruption): indirect object identification (Wang et al. 2022);
- counterfact(path, n): factual recall prompts from CounterFact records (Meng et al. 2022);
- hiereq(n, seed): hierarchical equality base/source pairs with counterfactual labels (Geiger et al. 2023).
"""
from causal.tasks.counterfact import counterfact
from causal.tasks.hiereq import hiereq
from causal.tasks.induction import induction
from causal.tasks.ioi import ioi

__all__ = ["counterfact", "hiereq", "induction", "ioi"]
