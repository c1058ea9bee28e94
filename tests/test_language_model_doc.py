"""The pure parts of ``benchmarks/language_model.py``: budget picks, target verdicts and the rendered report."""

from benchmarks import language_model as lm


def _point(params, loss, **extra):
  return {"params": params, "loss": loss, "ranks": {"fc": 1}, **extra}


def _figures(half_loss=2.02, full_loss=2.0, dense_loss=1.96, svd_loss=2.3, wall=500.0):
  curve = [{"fraction": fr, "budget": int(fr * 1000), "maestro": _point(int(fr * 990), full_loss + (1 - fr) / 10),
            "svd_greedy": _point(int(fr * 980), svd_loss), "svd_uniform": _point(int(fr * 970), svd_loss + 0.1,
                                                                                 fraction=fr / 2)}
           for fr in (1.0, 0.5, 0.25)]
  curve[1]["maestro"]["loss"] = half_loss
  return {
      "model_description": "2 blocks", "seq_len": 64, "validation_tokens": 12345,
      "dense": {"params": 1200, "loss": dense_loss}, "maestro_full": _point(1000, full_loss),
      "maestro_capacity_params": 1500, "maestro_factorized_params": 1400, "half_budget": 500,
      "maestro_half": curve[1]["maestro"], "half_trained_budget": 495, "maestro_half_trained": _point(490, 2.05),
      "svd_greedy_half": curve[1]["svd_greedy"], "svd_uniform_half": curve[1]["svd_uniform"],
      "svd_full": _point(1200, dense_loss), "curve": curve, "trained_ranks": {"fc": 7}, "full_ranks": {"fc": 8},
      "greedy_step": 4, "calibration_tokens": 2048,
      "samples": {"prompt": "ROMEO:", "chars": 5, "seed": 0, "temperature": 0.8,
                  "items": [{"label": "full", "fraction": 1.0, "params": 1000, "loss": full_loss, "text": " hi"}]},
      "training": {"maestro": {"wall_seconds": wall, "validation_loss": full_loss},
                   "dense": {"wall_seconds": 300.0, "validation_loss": dense_loss}},
      "timings": {"greedy_s": 1.0, "score_s": 2.0, "sample_s": 3.0}, "report_seconds": 7.0,
      "machine": "2 CPU cores", "jax_version": "0.0",
  }


def test_first_within_is_what_a_search_to_the_budget_returns():
  path = [{"params": 100}, {"params": 80}, {"params": 60}]
  assert lm.first_within(path, 100) is path[0]
  assert lm.first_within(path, 79) is path[2]


def test_largest_uniform_fraction_fits_the_budget():
  caps = {"a": 8, "b": 4}
  params_of = lambda r: 10 * r["a"] + 10 * r["b"]
  fraction, ranks = lm.largest_uniform_fraction(caps, 60, params_of)
  assert (fraction, ranks) == (0.5, {"a": 4, "b": 2})


def test_targets_and_report():
  verdicts = {t["name"]: t["met"] for t in lm.targets(_figures())}
  assert all(verdicts.values())
  bad = {t["name"].split(",")[-1].strip(): t["met"] for t in lm.targets(_figures(half_loss=2.4, wall=700.0))}
  assert not bad["below post-hoc SVD (greedy ranks) at that size"]
  assert not bad["within 5% of its own full rank"]
  assert not bad["training within 10 minutes"]
  md = lm.render(_figures())
  assert "| dense twin | 1,200 | 1.9600 |" in md
  assert "| Maestro, greedy search to 50% of its trained size | 490 | 2.0500 |" in md
  assert "![validation loss against parameters](language_model.png)" in md
  assert "seed 0, temperature 0.8" in md and "ROMEO: hi" in md
  assert "python -m benchmarks.language_model --maestro" in md
