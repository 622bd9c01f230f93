"""`python -m causal ...` is the `causal` command."""
import sys

from causal.cli import main

sys.exit(main())
