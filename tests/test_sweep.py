"""The sweep helper builds one main.py command and workdir per grid point."""

from scripts import sweep


def test_grid_commands_one_workdir_each():
  grid = sweep.parse_grid(["model.hybrid.ratio=0,1", "train.learning_rate=1e-3,3e-4,1e-4"])
  cmds = sweep.commands("configs/default.py:smoke", "runs/s", grid, ["--config.progress=false"], "train")
  assert len(cmds) == 6
  workdirs = {c[3] for c in cmds}
  assert len(workdirs) == 6
  assert "--workdir=runs/s/model.hybrid.ratio=1,train.learning_rate=1e-4" in workdirs
  assert all(c[-1] == "--config.progress=false" for c in cmds)
  assert "--config.model.hybrid.ratio=0" in cmds[0]
