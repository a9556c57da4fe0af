"""Pool the per-seed runs of one FiRe-OPD demo setting into markdown tables.

    PYTHONPATH=. python bench/results/demo/combine.py RUN_DIR [RUN_DIR ...]

Each RUN_DIR is the --out of one `pyopd fire-opd` run (summary.json + per_prompt.json).
"""
import sys
from pathlib import Path

from pyopd.demo.fire_opd import combine_seeds, format_combined

if __name__ == "__main__":
    print(format_combined(combine_seeds([Path(d) for d in sys.argv[1:]])))
