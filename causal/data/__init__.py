"""Examples for an experiment: user data files or built-in generators, then tokenization.

- examples: `Examples` (named columns) and the file readers (JSONL, JSON list, CSV, TSV);
- params: typed generator parameters, checked from each generator's signature;
- load: the generator registry and `load_examples`, which serves the `data` statement;
- prompts: `Prompts` (tokenized columns with text and character offsets), single-token
  answers, and `find_span` for named positions.

The built-in generators (induction, ioi, counterfact, hiereq) live in causal.tasks, a layer above: they
register themselves when causal.tasks is imported, as the resolver does before it serves a `data` line.
"""
from causal.data.examples import Examples, read_csv, read_json, read_jsonl, read_records, read_table
from causal.data.load import GENERATORS, load_examples, register_generator
from causal.data.params import Count, Range, Seed
from causal.data.prompts import Prompts, answer_ids, find_span, find_spans, tokenize_column

__all__ = ["Count", "Examples", "GENERATORS", "Prompts", "Range", "Seed", "answer_ids", "find_span", "find_spans",
           "load_examples", "read_csv", "read_json", "read_jsonl", "read_records", "read_table",
           "register_generator", "tokenize_column"]
