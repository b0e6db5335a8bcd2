"""Run a grid over config fields, one workdir per point, each as its own main.py process.

  python scripts/sweep.py --config=configs/default.py:smoke --root=runs/sweep \\
      --grid=model.hybrid.ratio=0,0.5,1 --grid=train.learning_rate=1e-3,3e-4 [-- EXTRA FLAGS]

Workdirs are named after the point (runs/sweep/model.hybrid.ratio=0.5,train.learning_rate=3e-4);
a point whose workdir already holds checkpoints resumes. --dry_run prints the commands only.
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
  grid = []
  for item in items:
    field, sep, values = item.partition("=")
    if not sep or not field or not values:
      raise SystemExit(f"error: --grid={item!r} must look like FIELD=V1,V2,...")
    grid.append((field, values.split(",")))
  return grid


def commands(config: str, root: str, grid, extra: list[str], mode: str) -> list[list[str]]:
  out = []
  for point in itertools.product(*[[(f, v) for v in values] for f, values in grid]):
    name = ",".join(f"{f}={v}" for f, v in point) or "default"
    cmd = [sys.executable, os.path.join(ROOT, "main.py"), f"--config={config}",
           f"--workdir={os.path.join(root, name)}", f"--mode={mode}"]
    cmd += [f"--config.{f}={v}" for f, v in point] + extra
    out.append(cmd)
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/default.py")
  parser.add_argument("--root", required=True, help="parent directory of the workdirs")
  parser.add_argument("--grid", action="append", default=[], help="FIELD=V1,V2,... (repeat)")
  parser.add_argument("--mode", default="train")
  parser.add_argument("--dry_run", action="store_true")
  args, extra = parser.parse_known_args(argv)
  extra = [e for e in extra if e != "--"]
  failed = 0
  for cmd in commands(args.config, args.root, parse_grid(args.grid), extra, args.mode):
    print(" ".join(cmd), flush=True)
    if not args.dry_run:
      failed += subprocess.run(cmd, cwd=ROOT).returncode != 0
  if failed:
    raise SystemExit(f"error: {failed} sweep point(s) failed")


if __name__ == "__main__":
  main()
