"""The runner's language-modelling task on a tiny generated corpus: train, resume, sweep, export and generate."""

import dataclasses
import json
import math

import jax
import numpy as np
import pytest

from maestro_jax import text
from maestro_jax import training
from maestro_train import config as config_lib
from maestro_train import deploy
from maestro_train import train as train_lib

WORDS = ("the king", "a rose", "my lord", "sweet love", "of night", "and day", "is fair", "doth speak", "no more")


def _corpus(n_chars: int = 12_000) -> str:
  """Seeded sentences of a few words: enough structure for a tiny model to beat the unigram loss quickly."""
  rng = np.random.default_rng(0)
  lines = []
  while sum(map(len, lines)) < n_chars:
    words = [WORDS[i] for i in rng.integers(0, len(WORDS), rng.integers(2, 6))]
    lines.append(" ".join(words).capitalize() + ".\n")
  return "".join(lines)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  path = tmp_path_factory.mktemp("corpus") / "verse.txt"
  path.write_text(_corpus())
  return path


def lm_config(corpus, **changes) -> config_lib.Config:
  fields = dict(task="language_modeling", dataset="text", data_dir=str(corpus), model="transformer_lm",
                model_kwargs={"d_model": 16, "num_heads": 2, "num_layers": 1, "mlp_dim": 32}, seq_len=16,
                batch_size=8, eval_batch_size=16, steps_per_epoch=6, epochs=2, eval_max_windows=4,
                optimizer="adam", learning_rate=1e-2, weight_decay=0.0, schedule="constant", lasso=1e-3,
                shrink_threshold=0.3, recalibrate_batches=0, checkpoint_every_steps=4, log_every_steps=2)
  fields.update(changes)
  return dataclasses.replace(config_lib.Config(), **fields).validate()


@pytest.fixture(scope="module")
def workdir(corpus, tmp_path_factory):
  path = tmp_path_factory.mktemp("lm")
  train_lib.train_and_evaluate(lm_config(corpus), path, progress=False)
  return path


def _full_validation_loss(run, keeps=None, params=None) -> float:
  batches = run.task.eval_batches(run.sources.evaluation, run.config, 16)
  return training.evaluate(training.make_eval_step(run.model), params or run.state["params"],
                           run.state["model_state"], batches, keeps)["loss"]


def test_run_trains_shrinks_and_reports_nats_bits_and_perplexity(workdir, tmp_path):
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [6, 12]
  for r in records:
    assert r["validation_bits_per_char"] == pytest.approx(r["validation_loss"] / math.log(2))
    assert r["validation_perplexity"] == pytest.approx(math.exp(r["validation_loss"]))
  summary = json.loads((workdir / "summary.json").read_text())
  run = train_lib.load_run(workdir)
  vocab = text.CharVocab.load(workdir / "vocab.json")
  assert vocab == run.sources.vocab and "\n" in vocab.chars  # saved with the run
  (tmp_path / "copy").mkdir()
  (tmp_path / "copy" / "vocab.json").write_text(text.CharVocab(vocab.chars + ("~",)).to_json())
  assert train_lib.load_sources(run.config, tmp_path / "copy").vocab.chars[-1] == "~"  # a saved one is read back
  assert summary["validation_loss"] < math.log(vocab.size) - 0.5  # well below a uniform guess
  # The epochs scored 4 windows; the summary is the whole held-out text.
  assert summary["validation_loss"] == pytest.approx(_full_validation_loss(run), abs=1e-6)
  assert summary["validation_loss"] != pytest.approx(records[-1]["validation_loss"], abs=1e-6)
  assert any(rank < cap for rank, cap in summary["ranks"].values()), "the lasso should have cut components"
  assert set(run.positions.values()) == {1}  # MACs are per token: every projection runs once per token
  for name in ("loss.png", "ranks.png", "summary.txt"):
    assert (workdir / name).stat().st_size > 0
  assert "nats/char" in (workdir / "summary.txt").read_text()


def test_resume_after_a_crash_is_bit_identical(workdir, corpus, tmp_path, monkeypatch):
  config = lm_config(corpus)
  reference = workdir  # the same config, run without interruption

  make = training.make_train_step

  def crashing_make(*args, **kwargs):
    step, calls = make(*args, **kwargs), [0]

    def wrapped(state, batch, key):
      calls[0] += 1
      if calls[0] == 10:  # step 10: after the epoch-1 shrink and the mid-epoch checkpoint at step 8
        raise RuntimeError("simulated crash")
      return step(state, batch, key)
    return wrapped

  monkeypatch.setattr(training, "make_train_step", crashing_make)
  resumed = tmp_path / "resumed"
  with pytest.raises(RuntimeError, match="simulated crash"):
    train_lib.train_and_evaluate(config, resumed, progress=False)
  assert int(train_lib.load_run(resumed).state["step"]) == 8
  monkeypatch.undo()
  train_lib.train_and_evaluate(config, resumed, progress=False)
  a, b = train_lib.load_run(reference).state, train_lib.load_run(resumed).state
  assert int(a["step"]) == int(b["step"]) == 12
  jax.tree.map(np.testing.assert_array_equal, a["params"], b["params"])
  drop = lambda r: {k: v for k, v in json.loads(r).items() if k != "epoch_seconds"}
  assert [drop(r) for r in (reference / "metrics.jsonl").read_text().splitlines()] == \
      [drop(r) for r in (resumed / "metrics.jsonl").read_text().splitlines()]


def test_sweep_equals_per_configuration_evaluation(workdir, tmp_path):
  out = tmp_path / "sweep"
  result = deploy.sweep_cli(["--checkpoint", str(workdir), "--fractions", "0.2,0.4,0.6,0.8,1", "--out", str(out),
                             "--batch-size", "16"])
  assert result["task"] == "language_modeling" and result["macs_per"] == "token"
  run = train_lib.load_run(workdir)
  fam = result["families"]["fraction"]
  assert len(fam["loss"]) == 5 and fam["params"] == sorted(fam["params"])
  for keeps, loss, perplexity in zip(fam["keeps"], fam["loss"], fam["perplexity"]):
    assert abs(loss - _full_validation_loss(run, keeps)) <= 1e-5
    assert perplexity == pytest.approx(math.exp(loss))
  assert fam["loss"][-1] == pytest.approx(json.loads((workdir / "summary.json").read_text())["validation_loss"],
                                          abs=1e-5)
  printed = (out / "sweep.txt").read_text()
  assert "perplexity" in printed and "MACs/token" in printed and (out / "sweep.png").exists()


def test_export_for_a_budget_loads_back_and_generates_deterministically(workdir, tmp_path):
  run = train_lib.load_run(workdir)
  budget = int(0.7 * json.loads((workdir / "summary.json").read_text())["macs"]["shrunk"])
  base = ["--checkpoint", str(workdir), "--latency-runs", "2", "--latency-batch", "4", "--calibration-size", "64",
          "--sample", "40", "--prompt", "The ", "--temperature", "0.8"]
  first = deploy.export_cli(base + ["--budget-macs", str(budget), "--out", str(tmp_path / "a"), "--seed", "3"])
  again = deploy.export_cli(base + ["--budget-macs", str(budget), "--out", str(tmp_path / "b"), "--seed", "3"])
  assert first["after"]["macs"] <= budget < first["before"]["macs"]
  assert len(first["sample"]["text"]) == 40 and set(first["sample"]["text"]) <= set(run.sources.vocab.chars) | {"\ufffd"}
  assert first["sample"]["text"] == again["sample"]["text"]
  assert "The " + first["sample"]["text"] in (tmp_path / "a" / "report.md").read_text()

  model, params, state, report = deploy.load_model(tmp_path / "a")
  batches = run.task.eval_batches(run.sources.evaluation, run.config, 16)
  loss = training.evaluate(training.make_eval_step(model), params, state, batches)["loss"]
  assert abs(loss - report["after"]["loss"]) <= 1e-5
  vocab = text.CharVocab.load(tmp_path / "a" / "model" / "vocab.json")
  sample = lambda seed: deploy.sample_text(model, params, state, vocab, "The ", 40, seed=seed, temperature=0.8,
                                           max_len=16)
  assert sample(3) == first["sample"]["text"] != sample(4)


def test_language_model_errors_are_one_line(workdir, corpus, tmp_path):
  with pytest.raises(ValueError, match=r"dataset='text' needs data_dir"):
    train_lib.train_and_evaluate(lm_config(corpus, data_dir=None), tmp_path / "w", progress=False)
  with pytest.raises(ValueError, match=r"model='mlp' is not valid for task 'language_modeling'"):
    lm_config(corpus, model="mlp")
  with pytest.raises(SystemExit) as info:
    deploy.export_cli(["--checkpoint", str(workdir), "--fraction", "0", "--out", str(tmp_path / "x")])
  assert info.value.code == "maestro-export: error: --fraction must be in (0, 1], got 0.0"
