"""Nothing lost, every failure one line: --fresh, signals, NaN stops, typed overrides, resume fallbacks, locks.

Each test reproduces a way a user lost work or met a traceback, and checks it no longer happens.
"""

import gc
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from maestro_train import config as config_lib
from maestro_train import interrupt
from maestro_train import main as main_lib
from maestro_train import train as train_lib
from maestro_train import workdir as workdir_lib
from test_train import tiny_config

REPO = Path(__file__).resolve().parents[1]
TINY_OVERRIDES = ["model_kwargs={'hidden': (32,)}", "batch_size=64", "learning_rate=0.1", "lasso=1e-2",
                  "shrink_threshold=5e-2", "rank_quantum=1", "reslice_min_saving=0.0", "checkpoint_every_steps=5",
                  "log_every_steps=5", "eval_batch_size=128"]


def _cli_error(argv, capsys=None) -> str:
  with pytest.raises(SystemExit) as info:
    main_lib.cli(argv)
  message = info.value.code
  assert isinstance(message, str), message  # sys.exit(message): exit status 1, the message on stderr
  assert "\n" not in message and "Traceback" not in message
  return message


def _steps(workdir: Path) -> list[int]:
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _records(workdir: Path) -> list[dict]:
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- 1. --fresh


def test_fresh_refuses_a_folder_the_runner_did_not_write(tmp_path):
  mine = tmp_path / "myproject"
  mine.mkdir()
  (mine / "notes.txt").write_text("my own work")
  message = _cli_error(["epochs=1", "--workdir", str(mine), "--fresh"])
  assert "is not a maestro-train workdir" in message and "nothing was removed" in message
  assert (mine / "notes.txt").read_text() == "my own work"
  # Without --fresh a folder of one's own is not taken over either.
  assert "holds files maestro-train did not write (notes.txt)" in _cli_error(["epochs=1", "--workdir", str(mine)])
  assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def test_fresh_removes_only_what_the_runner_wrote(tmp_path):
  workdir = workdir_lib.prepare(tmp_path / "run")
  for name in ("checkpoints/10/state", "tensorboard/events", "sweep/sweep.json", "export/model/exported.json"):
    (workdir / name).parent.mkdir(parents=True, exist_ok=True)
    (workdir / name).write_text("x")
  for name in ("config.json", "metrics.jsonl", "summary.json", "ranks.png", "my_notes.txt"):
    (workdir / name).write_text("x")
  removed = workdir_lib.clear(workdir)
  assert set(removed) == {"checkpoints", "tensorboard", "config.json", "metrics.jsonl", "summary.json", "ranks.png"}
  left = sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*") if p.is_file())
  assert left == [workdir_lib.MARKER, "export/model/exported.json", "my_notes.txt", "sweep/sweep.json"]


# ----------------------------------------------------------------------------- 3. NaN stops


def test_nan_stop_never_saves_a_non_finite_state_and_the_advised_rerun_works(tmp_path, capsys):
  # A checkpoint every step and the loss looked at rarely: the state goes non-finite between loss checks.
  config = tiny_config(epochs=1, learning_rate=1e4, checkpoint_every_steps=1, log_every_steps=100)
  with pytest.raises(train_lib.NonFiniteLossError) as info:
    train_lib.train_and_evaluate(config, tmp_path, progress=False)
  message = str(info.value)
  newest = _steps(tmp_path)[-1]
  assert f"The newest finite checkpoint, step {newest}, is kept" in message and "None" not in message
  manager = train_lib._checkpoint_manager(tmp_path, config)
  for step in _steps(tmp_path):  # Every kept checkpoint is finite.
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state) if np.issubdtype(np.asarray(x).dtype,
                                                                                      np.floating))
  manager.close()
  assert "add --fresh" in message  # The advice: start over with a lower learning rate.
  main_lib.cli(["epochs=1", "learning_rate=0.1", *TINY_OVERRIDES[:1], "batch_size=64", "--workdir", str(tmp_path),
                "--fresh", "--no-progress"])
  assert [r["epoch"] for r in _records(tmp_path)] == [1]


# A learning rate beyond float32's range overflows when cast: the first update makes the state infinite.
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_a_state_made_non_finite_by_the_update_is_not_saved(tmp_path):
  # The loss (computed before the update) is finite; the state after it is not, and is not saved.
  with pytest.raises(train_lib.NonFiniteLossError, match=r"^the train state is not finite at step 1; stopped. "
                                                         r"No checkpoint was saved; start over"):
    train_lib.train_and_evaluate(tiny_config(epochs=1, learning_rate=1e39, checkpoint_every_steps=1,
                                             log_every_steps=100), tmp_path, progress=False)
  assert _steps(tmp_path) == []


def test_nan_stop_without_a_checkpoint_says_so(tmp_path):
  with pytest.raises(train_lib.NonFiniteLossError, match=r"loss is (nan|inf) at step 5; stopped. No checkpoint was"):
    train_lib.train_and_evaluate(tiny_config(epochs=1, learning_rate=1e12, checkpoint_every_steps=100), tmp_path,
                                 progress=False)


# ----------------------------------------------------------------------------- 4, 5. signals


def _start_cli(workdir: Path, *extra: str) -> subprocess.Popen:
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  return subprocess.Popen([sys.executable, "-m", "maestro_train", "epochs=3", *TINY_OVERRIDES, "--no-progress",
                           "--workdir", str(workdir), *extra], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_once_says_where_to_resume_and_exits_128_plus_signal(tmp_path, signum):
  proc = _start_cli(tmp_path)
  for line in proc.stdout:  # Training has started once the first epoch is reported.
    if line.startswith("epoch 1:"):
      break
  proc.send_signal(signum)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 128 + signum, err[-3000:]
  lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("WARNING", "I0000", "W0000"))]
  assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
  name = signal.Signals(signum).name
  # The step it stopped at is the step saved: nothing trained is lost.
  match = re.fullmatch(rf"maestro-train: stopped by {name} (at step (\d+); saved, rerun the same command to resume "
                       r"from step \2 .*|after the run finished \(step (\d+) is saved\))", lines[0])
  assert match, lines[0]
  step = int(match.group(2) or match.group(3))
  assert _steps(tmp_path)[-1] == step
  # The epoch records and the checkpoint agree: every record is in the restored history, none is missing.
  assert all(r["step"] <= step for r in _records(tmp_path)) and len(_records(tmp_path)) == step // 22
  resumed = _start_cli(tmp_path)
  out, err = resumed.communicate(timeout=300)
  assert resumed.returncode == 0, err[-3000:]
  assert f"resumed from step {step} " in out
  assert [r["epoch"] for r in _records(tmp_path)] == [1, 2, 3]


def test_ctrl_c_after_the_epoch_checkpoint_is_queued_saves_nothing_twice(tmp_path, monkeypatch):
  append = workdir_lib.append_record

  def interrupted_append(workdir, record):  # Ctrl-C lands between the epoch's checkpoint and its record.
    os.kill(os.getpid(), signal.SIGINT)
    append(workdir, record)

  monkeypatch.setattr(workdir_lib, "append_record", interrupted_append)
  with pytest.raises(interrupt.Interrupted) as info:
    train_lib.train_and_evaluate(tiny_config(epochs=2), tmp_path, progress=False)
  assert info.value.exit_code == 130
  assert str(info.value) == (f"stopped by SIGINT at step 22; saved, rerun the same command to resume from step 22 "
                             f"({tmp_path / 'checkpoints'})")
  assert _steps(tmp_path)[-1] == 22 and [r["step"] for r in _records(tmp_path)] == [22]


def test_a_record_without_its_checkpoint_is_dropped_and_one_lost_after_it_restored(tmp_path):
  train_lib.train_and_evaluate(tiny_config(epochs=2), tmp_path, progress=False)
  records = _records(tmp_path)
  # A kill during the epoch-2 save: its record was written but the checkpoint never finished.
  shutil.rmtree(tmp_path / "checkpoints" / "44")
  train_lib.train_and_evaluate(tiny_config(epochs=2), tmp_path, progress=False)
  assert [r["epoch"] for r in _records(tmp_path)] == [1, 2]
  # A kill between the epoch-2 checkpoint and its record: the record comes back from the checkpoint.
  workdir_lib.write_records(tmp_path, records[:1])
  train_lib.train_and_evaluate(tiny_config(epochs=2), tmp_path, progress=False)
  assert [r["epoch"] for r in _records(tmp_path)] == [1, 2]


# ----------------------------------------------------------------------------- 6. typed overrides


@pytest.mark.parametrize("item, expected", [
    ("epochs=abc", "config: epochs='abc' is not an int"),
    ("epochs=2.5", "config: epochs=2.5 is not an int"),
    ("batch_size=64.0", "config: batch_size=64.0 is not an int"),
    ("learning_rate=abc", "config: learning_rate='abc' is not a number"),
    ("model_kwargs=abc", "config: model_kwargs='abc' is not a dict"),
    ("shrink=maybe", "config: shrink='maybe' is not True or False"),
    ("rank_fraction=half", "config: rank_fraction='half' is not a number or None"),
])
def test_overrides_are_typed_and_fail_in_one_line(tmp_path, item, expected):
  workdir = tmp_path / "w"
  assert _cli_error([item, "--workdir", str(workdir)]) == f"maestro-train: error: {expected}"
  assert not workdir.exists()  # Refused before anything is written.


def test_overrides_convert_to_the_declared_type():
  config = config_lib.override(config_lib.load("digits_mlp"), ["learning_rate=1", "dense_layers=['fc1']",
                                                              "data_dir=2024", "shrink=false", "rank_fraction=None"])
  assert config.learning_rate == 1.0 and isinstance(config.learning_rate, float)
  assert (config.dense_layers, config.data_dir, config.shrink, config.rank_fraction) == (("fc1",), "2024", False, None)


# ----------------------------------------------------------------------------- 7. damaged checkpoints


def _collect_failed_reads() -> None:
  """Lets the futures of failed Orbax reads finish and be collected inside the test that caused them."""
  for _ in range(3):
    gc.collect()
    time.sleep(0.1)


def _garble(step_dir: Path) -> None:
  for f in (step_dir / "state").rglob("*"):
    if f.is_file() and f.parent.name == "d":
      f.write_bytes(b"\x00garbage" * 8)


# Orbax leaves the futures of a failed TensorStore read to finish after its event loop closed (harmless); each
# test collects them itself so that the warnings are not reported against the next test.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_damaged_newest_checkpoint_resumes_from_the_previous_one(tmp_path, capfd):
  config = tiny_config(epochs=1)
  train_lib.train_and_evaluate(config, tmp_path, progress=False)
  assert _steps(tmp_path) == [15, 20, 22]
  _garble(tmp_path / "checkpoints" / "22")
  (tmp_path / "checkpoints" / "20" / "meta" / "metadata").write_bytes(b"\xff\xfe not json")
  (tmp_path / "checkpoints" / "30").mkdir()  # a stray folder
  capfd.readouterr()
  run = train_lib.load_run(tmp_path)  # what sweep and export see: a warning and the newest good step
  assert int(run.state["step"]) == 15
  warnings = [line for line in capfd.readouterr().err.splitlines() if line.startswith("warning:")]
  assert [re.match(r"warning: skipped checkpoint step (\d+) \(", w).group(1) for w in warnings] == ["30", "22", "20"]
  assert all(w.endswith("using step 15") for w in warnings)
  assert _steps(tmp_path) == [15, 20, 22, 30]  # reading moves nothing
  summary = train_lib.train_and_evaluate(config, tmp_path, progress=False)
  assert "resumed from step 15 " in capfd.readouterr().out
  assert summary["epochs"] == 1 and _steps(tmp_path)[-1] == 22
  assert sorted(p.name for p in (tmp_path / "skipped_checkpoints").iterdir()) == ["20", "22", "30"]
  _collect_failed_reads()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # see the test above
def test_export_reads_no_optimizer_state(tmp_path):
  train_lib.train_and_evaluate(tiny_config(epochs=1, checkpoint_every_steps=100), tmp_path, progress=False)
  # An optimizer state that cannot be read into the config's optimizer (here: another optimizer's).
  saved = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps(dict(saved, optimizer="adam")))
  with pytest.raises(ValueError, match="no checkpoint in .* restores"):
    train_lib.load_run(tmp_path, optimizer_state=True)
  run = train_lib.load_run(tmp_path)
  assert int(run.state["step"]) == 22 and "opt_state" not in run.state
  _collect_failed_reads()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_checkpoints_that_all_fail_are_never_silently_replaced(tmp_path):
  train_lib.train_and_evaluate(tiny_config(epochs=1, checkpoint_every_steps=100), tmp_path, progress=False)
  _garble(tmp_path / "checkpoints" / "22")
  with pytest.raises(ValueError, match=r"no checkpoint in .* restores \(step 22: .*pass --fresh"):
    train_lib.train_and_evaluate(tiny_config(epochs=1, checkpoint_every_steps=100), tmp_path, progress=False)
  assert _steps(tmp_path) == [22]
  _collect_failed_reads()


# ----------------------------------------------------------------------------- 8. two runs, one workdir


def test_a_second_live_run_is_refused_and_a_stale_lock_taken_over(tmp_path):
  workdir = workdir_lib.prepare(tmp_path)
  with workdir_lib.lock(workdir):
    with pytest.raises(workdir_lib.WorkdirError, match=rf"in use by another maestro-train run \(pid {os.getpid()}\)"):
      train_lib.train_and_evaluate(tiny_config(epochs=1), workdir, progress=False)
  assert not (workdir / "config.json").exists()
  dead = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  (workdir / workdir_lib.LOCK).write_text(f"{dead.pid}\n")
  dead.kill()
  dead.wait()
  assert train_lib.train_and_evaluate(tiny_config(epochs=1), workdir, progress=False)["epochs"] == 1


# ----------------------------------------------------------------------------- 9. changed trajectory


def test_changed_epochs_are_refused_unless_allowed_then_recorded_and_wall_time_adds_up(tmp_path):
  train_lib.train_and_evaluate(tiny_config(epochs=1), tmp_path, progress=False)
  manager = train_lib._checkpoint_manager(tmp_path, tiny_config(epochs=1))
  first_checkpoint_seconds = manager.restore(22, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"][
      "wall_seconds"]
  manager.close()
  saved_config = (tmp_path / "config.json").read_text()
  message = _cli_error(["epochs=2", *TINY_OVERRIDES, "--workdir", str(tmp_path), "--no-progress"])
  assert "resuming" in message and "changed trajectory (epochs: 1 -> 2)" in message and "--allow-changes" in message
  assert (tmp_path / "config.json").read_text() == saved_config
  second = train_lib.train_and_evaluate(tiny_config(epochs=2), tmp_path, progress=False, allow_changes=True)
  changes = [json.loads(line) for line in (tmp_path / "config_changes.jsonl").read_text().splitlines()]
  assert changes == [{"step": 22, "changes": {"epochs": [1, 2]}}]
  assert json.loads((tmp_path / "config.json").read_text())["epochs"] == 2
  # The summary counts both sessions: the first's time (as its last checkpoint recorded it) plus the second's.
  assert second["wall_seconds"] >= first_checkpoint_seconds + _records(tmp_path)[1]["epoch_seconds"] - 0.05


# ----------------------------------------------------------------------------- 11. one-line CLI errors


def test_cli_errors_a_user_can_cause_are_one_line(tmp_path, capsys):
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  assert _cli_error(["--workdir", str(a_file)]) == f"maestro-train: error: workdir {a_file} is a file, not a folder"
  message = _cli_error(["--workdir", str(a_file / "sub")])
  assert message.startswith(f"maestro-train: error: cannot create workdir {a_file / 'sub'}: ")
  assert _cli_error(["--workdir", "/proc/maestro_test"]).startswith(
      "maestro-train: error: cannot create workdir /proc/maestro_test: ")
  # A config.json written by another version, with a field this one does not know.
  workdir = workdir_lib.prepare(tmp_path / "other_version")
  (workdir / "checkpoints" / "10").mkdir(parents=True)
  (workdir / "config.json").write_text(json.dumps(dict(json.loads(config_lib.load("digits_mlp").to_json()),
                                                       warmup_steps=100)))
  message = _cli_error(["--workdir", str(workdir)])
  assert message == (f"maestro-train: error: {workdir / 'config.json'} has unknown config field(s) 'warmup_steps' "
                     "(written by another version of maestro_train?)")
  capsys.readouterr()
  _cli_error(["--workdir", str(a_file), "--debug"])
  assert "Traceback" in capsys.readouterr().err
