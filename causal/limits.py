"""The limits of the language, the data and the run settings, in one place (docs/reliability.md, "Limits").

Each stops a typo or a mistaken path at once, with its value named, instead of after hours of
compute or gigabytes of memory. Plain constants: every stage imports them without cost.
"""

LARGEST = 2 ** 31 - 1  # an integer in an experiment file (index, count, seed): beyond it a typo, and torch overflows
MAX_DEPTH = 200  # how deep the parse tree may nest: a sum of n terms or n unary minuses nests n deep
MAX_INDICES = 65_536  # values one index set may name (a list or a range); `*` names all, at no cost
MAX_SAMPLES = 10_000  # noise samples per example: ROME uses 10; more only costs forwards
MAX_COUNT = 100_000  # examples (or tokens) a generator makes: larger sets are a typo, or a job for a data file
MAX_SEED = LARGEST  # seeds in files, generators and `seed=` alike
MAX_BATCH = LARGEST  # rows per forward pass
MAX_EXPERIMENT_BYTES = 1 << 20  # 1 MiB: an experiment file is a page of text
MAX_DATA_BYTES = 1 << 30  # 1 GiB: a data file (JSONL, JSON, CSV, TSV); a generator makes larger sets
