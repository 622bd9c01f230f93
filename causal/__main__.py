"""`python -m causal ...` is the `causal` command."""
import sys

from causal.app.cli import main

sys.exit(main())
