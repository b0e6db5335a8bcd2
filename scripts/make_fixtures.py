"""Regenerate every parity fixture under tests/fixtures/ (deterministic, a few MB in all).

  python3 -m venv /tmp/fixenv && /tmp/fixenv/bin/pip install -r scripts/fixtures/requirements.txt
  /tmp/fixenv/bin/pip install --no-deps fla-core==0.6.0
  /tmp/fixenv/bin/python -m scripts.make_fixtures            # from the repository root

Each family is one module of scripts/fixtures/ (make_dit, make_vae, make_umt5, make_gdn) that
builds tiny random reference models with torch / diffusers / transformers / fla and writes
weights in the released on-disk layouts, inputs and reference outputs.
"""

import importlib
import sys

FAMILIES = ("make_gdn", "make_dit", "make_vae", "make_umt5", "make_t2v")  # t2v reads umt5


def main(argv):
  chosen = argv[1:] or FAMILIES
  for name in chosen:
    print(f"== {name}", flush=True)
    importlib.import_module(f"scripts.fixtures.{name}").main()


if __name__ == "__main__":
  main(sys.argv)
