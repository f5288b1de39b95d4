"""Scaling-law toolkit: isoFLOP fits, power laws, compute gaps, and the sweep scripts (numpy only, no training)."""

import importlib.util
import json
import math
import os

import numpy as np
import pytest

from replaid_jax import scaling
from replaid_jax import scaling_analysis
from replaid_jax import scaling_report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Planted laws of the reference method: N*(C) = 1e-2 C^0.5, L*(C) = B_L C^-0.05, L*(1e16) = 3.
ALPHA_N, A_N = 0.5, 1e-2
ALPHA_L, A_L = -0.05, 3.0 * 1e16**0.05
BUDGETS = np.geomspace(1e15, 1e19, 7)
CURVATURE, NOISE = 0.05, 0.003
GAP, PARAM_RATIO = 20.0, 3.4


def _load(name):
  spec = importlib.util.spec_from_file_location(f"sweeps_{name}", os.path.join(REPO, "launch", "sweeps", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _synthetic_runs(seed=0):
  """Reference 'ar' on the planted laws; 'replaid' reaches at C the loss 'ar' reaches at C / GAP with
  PARAM_RATIO times fewer parameters. Each budget: 7 sizes around N* (off-centre), a quadratic bowl in ln N."""
  rng = np.random.default_rng(seed)
  runs = []
  for method, c_scale, n_scale in (("ar", 1.0, 1.0), ("replaid", 1.0 / GAP, 1.0 / PARAM_RATIO)):
    for c in BUDGETS:
      n_opt = A_N * c**ALPHA_N * n_scale
      l_opt = A_L * (c * c_scale) ** ALPHA_L
      offsets = np.linspace(-1.5, 1.5, 7) + rng.uniform(-0.3, 0.3)
      for i, d in enumerate(offsets):
        n = int(round(n_opt * math.exp(d)))
        loss = l_opt + CURVATURE * (math.log(n) - math.log(n_opt)) ** 2 + NOISE * rng.standard_normal()
        runs.append({"method": method, "size": f"s{i}", "num_params": n, "budget": float(c), "loss": loss,
                     "stderr": NOISE})
  return runs


# ---- isoflop_fit


def test_isoflop_fit_exact_parabola():
  a, b, c = 0.1, -3.0, 25.0  # minimum at ln N = 15, loss 2.5
  x = np.array([13.0, 14.0, 15.5, 16.0, 17.5])
  fit = scaling.isoflop_fit(x, a * x**2 + b * x + c)
  assert fit["valid"] and not fit["extrapolated"] and fit["reason"] == ""
  assert fit["a"] == pytest.approx(a, rel=1e-9)
  assert fit["log_n_opt"] == pytest.approx(15.0, rel=1e-9)
  assert fit["n_opt"] == pytest.approx(math.exp(15.0), rel=1e-8)
  assert fit["loss_opt"] == pytest.approx(2.5, rel=1e-9)


def test_isoflop_fit_flags_no_minimum_and_extrapolation():
  x = np.array([13.0, 14.0, 15.0, 16.0])
  concave = scaling.isoflop_fit(x, -0.1 * (x - 14.5) ** 2 + 3.0)
  assert not concave["valid"] and concave["a"] < 0 and "no minimum" in concave["reason"]
  assert math.isnan(concave["n_opt"])
  outside = scaling.isoflop_fit(x, 0.1 * (x - 18.0) ** 2 + 3.0)  # minimum beyond the largest model
  assert not outside["valid"] and outside["extrapolated"] and "extrapolated" in outside["reason"]
  assert outside["log_n_opt"] == pytest.approx(18.0, rel=1e-8)


def test_isoflop_fit_needs_three_sizes():
  with pytest.raises(ValueError, match="at least 3"):
    scaling.isoflop_fit([1.0, 2.0], [3.0, 2.0])
  with pytest.raises(ValueError, match="distinct"):
    scaling.isoflop_fit([1.0, 1.0, 2.0], [3.0, 2.9, 2.0])


# ---- power laws and gaps


def test_power_law_fit_exact():
  x = np.geomspace(1e12, 1e18, 6)
  fit = scaling.power_law_fit(x, 2.5 * x**-0.3)
  assert fit["alpha"] == pytest.approx(-0.3, abs=1e-10)
  assert fit["A"] == pytest.approx(2.5, rel=1e-6)
  assert fit["se_alpha"] < 1e-10 and fit["r2"] == pytest.approx(1.0)
  two = scaling.power_law_fit(x[:2], 2.5 * x[:2] ** -0.3)
  assert two["alpha"] == pytest.approx(-0.3, abs=1e-10)
  assert math.isnan(two["se_alpha"]) and math.isnan(two["se_log_A"])
  with pytest.raises(ValueError):
    scaling.power_law_fit([1.0, 2.0], [1.0, -1.0])


def test_power_law_fit_standard_error_matches_scatter():
  """Over many noisy data sets the reported SE of alpha matches the spread of the estimates."""
  rng = np.random.default_rng(1)
  x = np.geomspace(1.0, 1e4, 8)
  fits = [scaling.power_law_fit(x, 3.0 * x**0.4 * np.exp(0.05 * rng.standard_normal(x.size))) for _ in range(400)]
  alphas = np.array([f["alpha"] for f in fits])
  ses = np.array([f["se_alpha"] for f in fits])
  assert abs(alphas.mean() - 0.4) < 3 * alphas.std() / math.sqrt(alphas.size)
  assert np.sqrt(np.mean(ses**2)) == pytest.approx(alphas.std(), rel=0.15)


def test_power_law_fit_with_offset():
  x = np.geomspace(1e2, 1e6, 9)
  fit = scaling.power_law_fit(x, 1.7 + 5.0 * x**-0.4, offset=True)
  assert fit["E"] == pytest.approx(1.7, abs=1e-3)
  assert fit["alpha"] == pytest.approx(-0.4, abs=1e-3)
  assert scaling.evaluate_law(fit, 1e3) == pytest.approx(1.7 + 5.0 * 1e3**-0.4, rel=1e-4)


def test_compute_gap_and_param_ratio_of_exact_laws():
  ref = {"A": 20.0, "alpha": -0.05}
  method = {"A": 20.0 * 7.0**0.05, "alpha": -0.05}  # the reference's law at C / 7
  losses = np.array([3.0, 2.5])
  np.testing.assert_allclose(scaling.compute_gap(method, ref, losses), 7.0, rtol=1e-9)
  nref, nmethod = {"A": 1e-2, "alpha": 0.5}, {"A": 1e-2 / 2.0, "alpha": 0.5}
  np.testing.assert_allclose(scaling.param_ratio(nref, nmethod, [1e16, 1e18]), 2.0, rtol=1e-12)
  np.testing.assert_allclose(scaling.param_ratio_at_loss(nref, nmethod, ref, method, losses), 2.0 / 7.0**0.5,
                             rtol=1e-9)
  matched = scaling.gap_at_matched_loss(method, ref, [2.6, 3.2], [2.4, 2.9])
  assert matched["gap"] == pytest.approx(7.0, rel=1e-9)
  assert (matched["loss_lo"], matched["loss_hi"]) == (2.6, 2.9)
  apart = scaling.gap_at_matched_loss(method, ref, [3.0, 3.2], [2.4, 2.9])
  assert math.isnan(apart["gap"]) and apart["note"]


def test_non_embedding_params_formula():
  # D=32, 2 layers, r=4, cond 32: 4096 + 8192 + (128 + 32) + 64 + (32 * 192 + 192) per block.
  assert scaling.non_embedding_params(32, 2, 4, 32) == 2 * 18848
  assert scaling.non_embedding_params(64, 1, 4, 32) == 12 * 64**2 + 5 * 64 + 2 * 64 + 32 * 6 * 64 + 6 * 64


# ---- analyze


def test_analyze_recovers_planted_laws_gap_and_param_ratio():
  result = scaling_analysis.analyze(_synthetic_runs(), reference="ar")
  json.dumps(result, allow_nan=False)  # JSON-able, without NaN
  for method in ("ar", "replaid"):
    info = result["methods"][method]
    assert all(e["isoflop_fit"]["valid"] for e in info["budgets"])
    for law, alpha in ((info["loss_law"], ALPHA_L), (info["params_law"], ALPHA_N)):
      err = abs(law["alpha"] - alpha)
      assert err < 0.02 and err < 3 * law["se_alpha"] + 1e-4, (method, law)
  comp = result["comparisons"]["replaid"]
  assert comp["gap_at_matched_loss"]["gap"] == pytest.approx(GAP, rel=0.1)
  assert all(g == pytest.approx(GAP, rel=0.15) for g in comp["gap_at_method_optima"]["gap"])
  assert comp["param_ratio_at_budget"]["geomean"] == pytest.approx(PARAM_RATIO, rel=0.1)
  assert comp["param_ratio_at_matched_loss"] == pytest.approx(PARAM_RATIO / GAP**0.5, rel=0.1)
  assert "ar" not in result["comparisons"]


def test_analyze_reports_instead_of_failing(tmp_path):
  runs = [r for r in _synthetic_runs() if r["method"] == "replaid"]
  one_budget = [dict(r, method="tiny") for r in runs if r["budget"] == BUDGETS[0]]
  concave = [dict(r, method="bad", loss=3.0 - 0.1 * (math.log(r["num_params"]) - 12) ** 2) for r in runs]
  two_points = [dict(r, method="few") for r in runs[:2]]
  result = scaling_analysis.analyze(runs + one_budget + concave + two_points, reference="ar")
  json.dumps(result, allow_nan=False)
  assert any("'ar' is absent" in n for n in result["notes"])
  assert result["methods"]["tiny"]["loss_law"] is None and "at least 2" in result["methods"]["tiny"]["note"]
  assert not any(e["isoflop_fit"]["valid"] for e in result["methods"]["bad"]["budgets"])
  assert "at least 3" in result["methods"]["few"]["budgets"][0]["isoflop_fit"]["reason"]
  assert result["comparisons"] == {}
  assert "no minimum" in scaling_report.markdown_tables(result)
  paths = scaling_report.plot(result, runs + one_budget + concave + two_points, str(tmp_path))
  assert all(os.path.getsize(p) > 0 for p in paths)


# ---- the sweep scripts


def _fwd_flops(seq_len, width, layers, vocab, embed_dim, mlp_ratio):
  """RePlaid forward FLOPs per sequence: blocks, d_e -> D input and self-conditioning, D -> V head, prior, x_hat."""
  L, D, V, E = seq_len, width, vocab, embed_dim
  block = 6 * L * D * D + 4 * L * L * D + 2 * L * D * D + 4 * L * D * mlp_ratio * D
  return layers * block + 4 * L * E * D + 2 * L * D * V + 4 * L * V * E


def test_isoflop_generator(tmp_path):
  isoflop = _load("isoflop")
  config = os.path.join(REPO, "tests", "scaling_test_config.py")
  budgets = [1e12, 3e12]
  runs = isoflop.generate(config, ["replaid"], budgets, ["XS", "S"], str(tmp_path / "sweep"))
  assert len(runs) == 4
  module = isoflop.load_config_module(config)
  for r in runs:
    width, layers, _ = module.SIZES[r["size"]]
    fwd = _fwd_flops(64, width, layers, 512, 16, 4)
    assert r["fwd_flops_per_seq"] == pytest.approx(fwd, rel=1e-12)
    assert r["num_steps"] == int(r["budget"] // (3 * fwd * 8))
    assert r["non_embedding_params"] == layers * (12 * width**2 + 5 * width + 2 * width + 32 * 6 * width + 6 * width)
    assert f"--config.train.num_steps={r['num_steps']}" in r["command"]
    assert f"--config=tests/scaling_test_config.py:{r['size']}" in r["command"]
    assert "--config.objective=replaid" in r["command"]
    assert r["workdir"] == str(tmp_path / "sweep" / "runs" / r["name"])
  steps = {(r["budget"], r["size"]): r["num_steps"] for r in runs}
  for b in budgets:
    assert steps[(b, "S")] < steps[(b, "XS")]
  assert steps[(3e12, "XS")] > steps[(1e12, "XS")]
  with open(tmp_path / "sweep" / "sweep.json", encoding="utf-8") as f:
    assert json.load(f) == runs
  lines = (tmp_path / "sweep" / "commands.sh").read_text().splitlines()
  assert sum(line.startswith("python launch/train.py") for line in lines) == 4


def test_isoflop_method_overrides(tmp_path):
  isoflop = _load("isoflop")
  config = os.path.join(REPO, "tests", "scaling_test_config.py")
  runs = isoflop.generate(config, ["replaid", "short:replaid:data.seq_len=32:diffusion.selfcond_fraction=0"], [1e12],
                          ["XS"], str(tmp_path), extra=["--config.train.batch_size=16"], vocab_size=1000)
  base, short = runs
  assert short["method"] == "short" and short["name"].startswith("short-")
  assert "--config.diffusion.selfcond_fraction=0" in short["command"]
  assert "--config.train.batch_size=16" in base["command"] and base["batch_size"] == 16
  assert base["fwd_flops_per_seq"] == pytest.approx(_fwd_flops(64, 32, 2, 1000, 16, 4))
  assert short["fwd_flops_per_seq"] == pytest.approx(_fwd_flops(32, 32, 2, 1000, 16, 4))
  with pytest.raises(ValueError):
    isoflop.parse_method("bad name:replaid")
  with pytest.raises(ValueError, match="budget"):
    isoflop.parse_override("train.num_steps=5")
  with pytest.raises(ValueError, match="unique"):
    isoflop.generate(config, ["replaid", "replaid"], [1e12], ["XS"], str(tmp_path))


def test_isoflop_append_samples_other_sizes_per_budget(tmp_path):
  isoflop = _load("isoflop")
  config = os.path.join(REPO, "tests", "scaling_test_config.py")
  out = str(tmp_path / "sweep")
  first = isoflop.generate(config, ["replaid"], [1e12], ["XS", "S"], out)
  both = isoflop.generate(config, ["replaid"], [1e12, 3e12], ["S"], out, append=True)
  assert both[:2] == first  # the old runs are kept, in order, once
  assert [(r["budget"], r["size"]) for r in both[2:]] == [(3e12, "S")]
  with open(os.path.join(out, "sweep.json"), encoding="utf-8") as f:
    assert json.load(f) == both
  lines = (tmp_path / "sweep" / "commands.sh").read_text().splitlines()
  assert sum(line.startswith("python launch/train.py") for line in lines) == 3
  # The same name with a changed setup would mix two experiments under one label.
  with pytest.raises(ValueError, match="another command"):
    isoflop.generate(config, ["replaid"], [1e12], ["S"], out, extra=["train.batch_size=16"], append=True)
  assert isoflop.read_sweep(out) == both
  replaced = isoflop.generate(config, ["replaid"], [3e12], ["XS"], out)  # without append: a new sweep
  assert isoflop.read_sweep(out) == replaced and len(replaced) == 1


def test_isoflop_fit_window_stays_local():
  # A bowl in ln N at small sizes, then a flat plateau the parabola cannot follow.
  log_n = np.log([1e4, 3e4, 1e5, 3e5, 1e6, 3e6])
  losses = [3.3, 3.0, 3.2, 4.7, 4.72, 4.71]
  assert scaling_analysis.fit_window(losses, 0) == (0, 6)
  assert scaling_analysis.fit_window(losses, 3) == (0, 3)
  assert scaling_analysis.fit_window([5, 4, 3, 2, 1], 3) == (2, 5)  # clamped at the end
  assert scaling_analysis.fit_window([5, 4, 3, 2, 1], 4) == (1, 5)
  with pytest.raises(ValueError, match="at least 3"):
    scaling_analysis.fit_window(losses, 2)
  runs = [{"method": "m", "size": f"s{i}", "num_params": float(np.exp(x)), "budget": 1e12, "loss": y}
          for i, (x, y) in enumerate(zip(log_n, losses))]
  every = scaling_analysis.analyze(runs, reference="m")["methods"]["m"]["budgets"][0]
  local = scaling_analysis.analyze(runs, reference="m", window=3)["methods"]["m"]["budgets"][0]
  assert local["fit_sizes"] == ["s0", "s1", "s2"] and every["fit_sizes"] == [f"s{i}" for i in range(6)]
  assert local["isoflop_fit"]["valid"]
  expected = scaling.isoflop_fit(log_n[:3], losses[:3])
  assert local["isoflop_fit"]["n_opt"] == pytest.approx(expected["n_opt"])
  assert 1e4 < local["isoflop_fit"]["n_opt"] < 1e5
  assert not every["isoflop_fit"]["valid"] or abs(math.log(every["isoflop_fit"]["n_opt"] / 3e4)) > 1.0


def test_a_budget_flat_within_noise_gives_no_optimum():
  runs = [{"method": "m", "size": f"s{i}", "num_params": n, "budget": 1e12, "loss": y, "stderr": 0.03}
          for i, (n, y) in enumerate(((1e4, 4.73), (3e4, 4.72), (1e5, 4.75)))]
  fit = scaling_analysis.analyze(runs, reference="m")["methods"]["m"]["budgets"][0]["isoflop_fit"]
  assert not fit["valid"] and fit["reason"].startswith("flat within noise") and fit["a"] > 0
  assert scaling_analysis.analyze(runs, reference="m", min_z=0)["methods"]["m"]["budgets"][0]["isoflop_fit"]["valid"]
  sharp = [dict(r, stderr=0.003) for r in runs]  # the same losses measured ten times more precisely
  assert scaling_analysis.analyze(sharp, reference="m")["methods"]["m"]["budgets"][0]["isoflop_fit"]["valid"]
  assert scaling_analysis.flat_within_noise([3.0, 2.0, 3.1], [float("nan")] * 3, 2.0) == ""  # no stderr: no check


def test_an_optimum_at_the_edge_of_the_sampled_sizes_is_not_bracketed():
  # Convex through the three points with its vertex between the first two, yet the best run is the smallest:
  # nothing was sampled on the vertex's left.
  runs = [{"method": "m", "size": s, "num_params": n, "budget": 1e12, "loss": y, "stderr": 0.01}
          for s, n, y in (("a", 5e4, 3.385), ("b", 1.5e5, 3.544), ("c", 4.5e5, 4.564))]
  fit = scaling_analysis.analyze(runs, reference="m")["methods"]["m"]["budgets"][0]["isoflop_fit"]
  assert 5e4 < fit["n_opt"] < 4.5e5 and not fit["valid"]
  assert fit["reason"] == "not bracketed: the best run (a) is the smallest size fitted; add smaller models"
  assert "largest" in scaling_analysis.unbracketed([3.0, 2.9, 2.8], ["a", "b", "c"])
  assert scaling_analysis.unbracketed([3.0, 2.8, 2.9], ["a", "b", "c"]) == ""


def test_grid_table_marks_the_best_run_and_the_sizes_left_out_of_the_fit():
  analyze = _load("analyze")
  losses = {"XS": 3.3, "S": 3.0, "M": 3.2, "L": 4.7}
  runs = [{"method": m, "size": size, "num_params": n, "budget": 1e12, "loss": losses[size] + d, "stderr": 0.01}
          for m, d in (("ar", 0.0), ("mdlm", 0.5)) for n, size in ((1e4, "XS"), (3e4, "S"), (1e5, "M"), (3e5, "L"))]
  runs = [r for r in runs if not (r["method"] == "mdlm" and r["size"] == "L")]
  table = analyze.grid_table(runs, scaling_analysis.analyze(runs, reference="ar", window=3))
  rows = [line.split(" | ") for line in table.splitlines()[2:]]
  assert [r[1] for r in rows] == ["XS", "S", "M", "L"]
  assert rows[1][3] == "**3.000 ± 0.010**" and rows[1][4] == "**3.500 ± 0.010** |"
  assert rows[3][3] == "(4.700 ± 0.010)" and rows[3][4] == " |"  # outside ar's window; mdlm has no L run
  assert rows[0][3] == "3.300 ± 0.010"


def test_run_sweep_skips_done_and_records_failures(tmp_path):
  run = _load("run")
  sweep = []
  for name, code in (("ok", "import json,os,sys; d=sys.argv[1]; os.makedirs(d); print('trained');"
                              "json.dump({'nats_per_token': 3.0}, open(os.path.join(d, 'final.json'), 'w'))"),
                     ("bad", "import sys; print('boom'); sys.exit(3)"),
                     ("done", "import sys; sys.exit(5)")):
    workdir = tmp_path / "runs" / name
    sweep.append({"name": name, "workdir": str(workdir), "train_flops": 1.0,
                  "command": ["python", "-c", code, str(workdir / "eval")]})
  os.makedirs(tmp_path / "runs" / "done" / "eval")
  (tmp_path / "runs" / "done" / "eval" / "final.json").write_text("{}")
  (tmp_path / "sweep.json").write_text(json.dumps(sweep))
  status = run.run_sweep(str(tmp_path), parallel=2, poll_s=0.05)
  assert status["ok"]["status"] == "done" and status["done"]["status"] == "done"
  assert status["bad"]["status"] == "failed" and status["bad"]["returncode"] == 3
  assert "trained" in (tmp_path / "logs" / "ok.log").read_text()
  assert "boom" in (tmp_path / "logs" / "bad.log").read_text()
  assert not (tmp_path / "logs" / "done.log").exists()
  assert json.loads((tmp_path / "status.json").read_text())["bad"]["status"] == "failed"
  again = run.run_sweep(str(tmp_path), parallel=1, poll_s=0.05)  # resumes: only the failed run is retried
  assert again["bad"]["status"] == "failed"
  assert again["ok"] == status["ok"] and again["ok"]["seconds"] > 0  # a finished run keeps its record
  assert again["done"]["note"] == "final.json exists"


def test_analyze_script_end_to_end(tmp_path):
  analyze = _load("analyze")
  sweep = []
  for i, r in enumerate(_synthetic_runs(seed=2)):
    name = f"{r['method']}-{i}"
    workdir = tmp_path / "runs" / name
    sweep.append({"name": name, "method": r["method"], "size": r["size"], "budget": r["budget"],
                  "non_embedding_params": r["num_params"], "workdir": str(workdir)})
    if i != 3:  # one run never finished
      os.makedirs(workdir / "eval")
      (workdir / "eval" / "final.json").write_text(json.dumps({"nats_per_token": r["loss"], "stderr": r["stderr"]}))
  (tmp_path / "sweep.json").write_text(json.dumps(sweep))
  analyze.analyze_sweep(str(tmp_path), reference="ar")
  out = tmp_path / "analysis"
  result = json.loads((out / "analysis.json").read_text())
  tables = (out / "tables.md").read_text()
  assert result["missing_runs"] == ["ar-3"]
  for method in ("ar", "replaid"):
    for key, alpha in (("loss_law", ALPHA_L), ("params_law", ALPHA_N)):
      fitted = result["methods"][method][key]["alpha"]
      assert abs(fitted - alpha) < 0.02
      assert f"{fitted:.4g}" in tables
  assert result["comparisons"]["replaid"]["gap_at_matched_loss"]["gap"] == pytest.approx(GAP, rel=0.1)
  assert (out / "isoflop.png").stat().st_size > 0 and (out / "laws.png").stat().st_size > 0


def test_compare_ranks_runs_at_equal_compute_with_errors_of_the_difference(tmp_path):
  compare = _load("compare")
  sweeps = []
  for d, runs in (("main", [("replaid", 4.0, 0.03), ("ar", 3.1, 0.01), ("replaid", 4.5, 0.03)]),
                  ("abl", [("nosc", 4.1, 0.04), ("frozenemb", 4.6, 0.02)])):
    sweep = []
    for i, (method, loss, se) in enumerate(runs):
      workdir = tmp_path / d / f"{method}-{i}"
      os.makedirs(workdir / "eval")
      (workdir / "eval" / "final.json").write_text(json.dumps({"nats_per_token": loss, "stderr": se}))
      budget = 2e12 if (d, i) == ("main", 2) else 1e12  # a run at another budget is left out
      sweep.append({"name": f"{method}-{i}", "method": method, "size": "S", "budget": budget,
                    "non_embedding_params": 1000, "workdir": str(workdir)})
    (tmp_path / d / "sweep.json").write_text(json.dumps(sweep))
    sweeps.append(str(tmp_path / d))
  result = compare.compare(sweeps, budget=1e12, size="S", reference="replaid")
  assert [r["method"] for r in result["rows"]] == ["ar", "replaid", "nosc", "frozenemb"]
  nosc = result["rows"][2]
  assert nosc["diff_to_reference"] == pytest.approx(0.1) and nosc["diff_stderr"] == pytest.approx(0.05)
  assert nosc["z"] == pytest.approx(2.0)
  assert "| frozenemb | 4.6000 ± 0.0200 | +0.6000 ± 0.0361 | +16.6 |" in compare.markdown(result)


def test_paired_comparison_uses_per_sequence_differences(tmp_path):
  compare = _load("compare")
  rng = np.random.default_rng(0)
  difficulty = rng.normal(4.0, 0.5, 400)  # what the sequences share: most of the variance
  sweep = []
  for method, shift in (("replaid", 0.0), ("nosc", 0.05), ("frozenemb", 0.2)):
    workdir = tmp_path / method
    os.makedirs(workdir / "eval")
    per = difficulty + shift + rng.normal(0, 0.05, difficulty.size)
    (workdir / "eval" / "final.json").write_text(json.dumps({"nats_per_token": 9.0, "stderr": 1.0, "step": 7}))
    np.save(workdir / "eval" / "validation_validation_step7_per_sequence.npy", per)
    protocol = {"complete": True, "tokens_sha256": "ab" * 32, "key": "fold_in(key(seed), 5)", "seed": 0}
    (workdir / "eval" / "validation_validation_step7.json").write_text(json.dumps(
        {"split": "validation", "per_sequence_file": "validation_validation_step7_per_sequence.npy",
         "protocol": protocol}))
    sweep.append({"name": method, "method": method, "size": "S", "budget": 1e12, "non_embedding_params": 1000,
                  "workdir": str(workdir)})
  (tmp_path / "sweep.json").write_text(json.dumps(sweep))
  paired = compare.compare([str(tmp_path)], budget=1e12, size="S", reference="replaid", paired=True)
  rows = {r["method"]: r for r in paired["rows"]}
  ref = np.load(tmp_path / "replaid" / "eval" / "validation_validation_step7_per_sequence.npy")
  nosc = np.load(tmp_path / "nosc" / "eval" / "validation_validation_step7_per_sequence.npy")
  assert rows["replaid"]["loss"] == pytest.approx(ref.mean())  # the eval binary's numbers, not final.json's
  assert rows["nosc"]["diff_to_reference"] == pytest.approx((nosc - ref).mean())
  assert rows["nosc"]["diff_stderr"] == pytest.approx((nosc - ref).std(ddof=1) / math.sqrt(ref.size))
  unpaired_se = math.hypot(rows["nosc"]["stderr"], rows["replaid"]["stderr"])
  assert rows["nosc"]["diff_stderr"] < 0.2 * unpaired_se and rows["nosc"]["z"] > 5  # 0.05 resolved only when paired
  assert "paired over the same 400 sequences" in compare.markdown(paired)
  # Results on different tokens cannot be paired; a run without a per-sequence result names the command to run.
  path = tmp_path / "nosc" / "eval" / "validation_validation_step7.json"
  res = json.loads(path.read_text())
  res["protocol"]["tokens_sha256"] = "cd" * 32
  path.write_text(json.dumps(res))
  with pytest.raises(SystemExit, match="same tokens"):
    compare.compare([str(tmp_path)], budget=1e12, size="S", reference="replaid", paired=True)
  os.remove(path)
  with pytest.raises(SystemExit, match="launch/eval.py --workdir="):
    compare.compare([str(tmp_path)], budget=1e12, size="S", reference="replaid", paired=True)


def test_best_run_gaps_invert_the_reference_law():
  ref_law = {"A": 10.0, "alpha": -0.1, "E": 0.0}
  info = {"budgets": [{"budget": 1e12, "sizes": ["a", "b"], "losses": [3.0, 2.5]}]}
  (row,) = scaling_analysis.best_run_gaps(info, ref_law, [2.0, 3.0])
  c_ref = (2.5 / 10.0) ** (1 / -0.1)
  assert row["size"] == "b" and row["reference_flops"] == pytest.approx(c_ref)
  assert row["gap"] == pytest.approx(1e12 / c_ref) and not row["extrapolated"]
