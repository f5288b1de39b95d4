"""The benchmark: chip peaks by device kind, the cost arithmetic, one real timed run, the launch scripts."""

import glob
import json
import math
import os
import subprocess
import sys

import pytest

from configs import tiny
from replaid_jax import benchmark
from replaid_jax import chips
from replaid_jax import cost_estimate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("kind, name", [
    ("TPU v4", "tpu-v4"),
    ("TPU v5 lite", "tpu-v5e"),
    ("TPU v5e", "tpu-v5e"),
    ("TPU v5p", "tpu-v5p"),
    ("TPU v5", "tpu-v5p"),
    ("TPU v6 lite", "tpu-v6e"),
    ("NVIDIA A100-SXM4-80GB", "a100"),
    ("NVIDIA A100-SXM4-40GB", "a100"),
    ("NVIDIA H100 80GB HBM3", "h100"),
    ("NVIDIA H200", "h200"),
])
def test_chip_lookup_by_device_kind(kind, name):
  assert chips.chip_for_kind(kind).name == name


def test_unknown_kinds_have_no_chip():
  assert chips.chip_for_kind("cpu") is None
  assert chips.chip_for_kind("NVIDIA GeForce GTX 1080") is None


def test_peaks_are_the_dense_per_chip_figures():
  peaks = {c.name: c.bf16 for c in chips.CHIPS}
  assert peaks == {"tpu-v4": 275e12, "tpu-v5e": 197e12, "tpu-v5p": 459e12, "tpu-v6e": 918e12, "a100": 312e12,
                   "h100": 989e12, "h200": 989e12}


def test_resolve_peak_auto_table_name_number_and_measured():
  never = lambda: pytest.fail("measured where the table has the chip")  # pylint: disable=unnecessary-lambda-assignment
  p = chips.resolve_peak("auto", device_kind="TPU v5 lite", platform="tpu", num_devices=8, measure=never)
  assert p["flops_per_s"] == 8 * 197e12 and p["chip"] == "tpu-v5e" and "table" in p["source"]
  p = chips.resolve_peak("auto", device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_devices=2,
                             compute_dtype="float32", measure=never)
  assert p["per_device"] == 495e12 and "TF32" in p["source"]
  p = chips.resolve_peak("a100", device_kind="cpu", platform="cpu", num_devices=4, measure=never)
  assert p["flops_per_s"] == 4 * 312e12
  p = chips.resolve_peak("2.5e11", device_kind="cpu", platform="cpu", num_devices=2, measure=never)
  assert p["flops_per_s"] == 5e11 and p["source"].startswith("given")
  p = chips.resolve_peak("auto", device_kind="cpu", platform="cpu", num_devices=1, measure=lambda: 1.5e11)
  assert p["flops_per_s"] == 1.5e11 and p["source"].startswith("measured")
  with pytest.raises(ValueError, match="unknown chip"):
    chips.resolve_peak("v9", device_kind="cpu", platform="cpu", num_devices=1, measure=never)
  with pytest.raises(ValueError, match="positive"):
    chips.check_peak_spec("0")


def test_estimate_matches_a_hand_computation():
  w = cost_estimate.Workload("w", fwd_flops=1e9, batch=10, steps=100, selfcond_fraction=0.25)
  assert w.protocol_flops == 3e12  # 3 x 1e9 x 10 x 100
  assert w.executed_flops == pytest.approx(3.25e12)  # + 1e9 x 10 x 0.25 per step
  chip = chips.Chip("x", bf16=1e12, fp32=None, match=("x",), price=2.0, price_source="assumed")
  e = cost_estimate.estimate(w, chip, num_chips=4, mfu=0.5)
  seconds = 3.25e12 / (0.5 * 1e12 * 4)  # 1.625 s on 4 chips
  assert e["wall_hours"] == pytest.approx(seconds / 3600)
  assert e["chip_hours"] == pytest.approx(4 * seconds / 3600)
  assert e["dollars"] == pytest.approx(4 * seconds / 3600 * 2.0)


def test_protocol_workloads_spend_their_budgets():
  ws = {(w.name, w.budget): w for w in cost_estimate.protocol_workloads()}
  w = ws[("slimpajama:66M", 1e19)]
  assert w.batch == 256 and w.protocol_flops <= 1e19 < w.protocol_flops + 3 * w.fwd_flops * w.batch
  assert ws[("owt_base", None)].steps == 1_000_000 and ws[("owt_base", None)].batch == 512
  table = cost_estimate.estimate_table(mfu=0.4, num_chips=8)
  assert table.count("slimpajama:231M") == len(cost_estimate.PROTOCOL_BUDGETS) and "40%" in table


def test_tiny_benchmark_reports_finite_positive_figures():
  r = benchmark.run(tiny.get_config(), config_name="configs/tiny.py", steps=2, warmup=1, peak="1e11")
  for key in ("tokens_per_s", "flops_per_s", "flops_per_s_no_selfcond", "mfu", "compile_seconds", "steps_per_s"):
    assert math.isfinite(r[key]) and r[key] > 0, key
  for key in ("median", "mean", "min", "max"):
    assert r["step_seconds"][key] > 0
  assert len(r["step_seconds"]["all"]) == 2 and r["steps"] == 2
  f = r["flops"]
  assert f["per_step_analytic"] > f["per_step_analytic_no_selfcond"] > 0
  assert f["forward_per_sequence_xla"] > 0 and 0.5 < f["xla_to_analytic"] < 2
  assert r["peak"]["flops_per_s"] == 1e11 * r["num_devices"]
  assert r["memory"]["bytes"] > 0 and r["memory"]["source"]
  assert r["num_params"] > 0 and r["batch_size"] == 8 and r["seq_len"] == 32 and r["vocab_size"] == 512
  assert math.isfinite(r["final_loss"])
  assert benchmark.summary_line(r) and "MFU" in benchmark.summary_table(r)
  # Two estimator draws per sequence compute twice the rows: the step's analytic FLOPs double, the data do not.
  cd = tiny.get_config()
  cd.train.draws_per_sequence = 2
  r2 = benchmark.run(cd, steps=1, warmup=0, peak="1e11", xla_flops=False)
  assert r2["flops"]["per_step_analytic"] == pytest.approx(2 * f["per_step_analytic"], rel=1e-9)
  assert r2["batch_size"] == 8


def test_forward_only_benchmark():
  r = benchmark.run(tiny.get_config(), steps=1, warmup=0, peak="1e11", forward_only=True, xla_flops=False)
  assert r["mode"] == "forward" and r["flops"]["per_step_analytic"] == 8 * r["flops"]["forward_per_sequence_analytic"]
  assert r["tokens_per_s"] > 0 and r["flops"]["forward_per_sequence_xla"] is None


@pytest.mark.parametrize("script", sorted(p for p in glob.glob(os.path.join(REPO, "launch", "tpu", "*")) +
                                          glob.glob(os.path.join(REPO, "launch", "gpu", "*")) if not p.endswith(".py")),
                         ids=os.path.basename)
def test_launch_scripts_parse(script):
  subprocess.run(["bash", "-n", script], check=True)
  with open(script, encoding="utf-8") as f:
    text = f.read()
  assert "set -euo pipefail" in text and text.startswith("#!")


def test_launch_scripts_exist():
  names = {os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "launch", "*", "*"))}
  for name in ("tpu/create.sh", "tpu/setup.sh", "tpu/run.sh", "tpu/delete.sh", "gpu/single_node.sh",
               "gpu/slurm.sbatch"):
    assert os.path.join("launch", name) in names


def _launch(tmp_path, *args):
  proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


@pytest.mark.slow
def test_compare_torch_times_both_sides_of_the_same_shape(tmp_path):
  pytest.importorskip("torch")
  out = tmp_path / "cmp.json"
  text = _launch(tmp_path, "launch/compare_torch.py", "--config=configs/tiny.py", "--rounds=2", "--steps=1",
                 "--warmup=1", f"--json_out={out}")
  r = json.loads(out.read_text())
  assert len(r["rounds"]) == 2 and "replaid_jax / PyTorch" in text
  for row in r["rounds"]:
    assert row["torch_tokens_per_s"] > 0 and row["jax_tokens_per_s"] > 0
    assert row["ratio"] == pytest.approx(row["jax_tokens_per_s"] / row["torch_tokens_per_s"])
  assert r["ratio_median"] > 0 and r["matmul_flops_per_s"] > 0
  # Like for like: the PyTorch model is the denoiser plus the embedding table and two schedule endpoints.
  torch_params, den = r["params"]["torch"], r["params"]["replaid_jax_denoiser"]
  assert torch_params == den + 512 * 16 + 2, (torch_params, den)


def test_compare_torch_refuses_more_than_one_draw_per_sequence():
  """The PyTorch reference draws once per sequence: K draws would time unequal work, so it ends with one line."""
  pytest.importorskip("torch")
  proc = subprocess.run([sys.executable, "launch/compare_torch.py", "--config=configs/tiny.py",
                         "--config.train.draws_per_sequence=2"], capture_output=True, text=True, cwd=REPO, timeout=300)
  assert proc.returncode == 2 and "train.draws_per_sequence=1 (got 2)" in proc.stderr, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_gpu_check_smoke_run_writes_every_section(tmp_path):
  out = tmp_path / "check.json"
  _launch(tmp_path, "launch/gpu/check.py", "--config=configs/tiny.py", "--quick", f"--out={out}")
  r = json.loads(out.read_text())
  assert r["train_step"]["largest_batch"] == 8 and [x["batch_size"] for x in r["train_step"]["rows"]] == [4, 8]
  assert all(x["tokens_per_s"] > 0 and 0 < x["mfu"] for x in r["train_step"]["rows"])
  assert r["forward"]["batch_size"] == 8
  agree = r["bf16_vs_fp32"]
  assert len(agree["fp32"]) == len(agree["bf16"]) == 4 and agree["finite"] and agree["passed"]
  assert agree["max_relative_difference"] <= agree["tolerance"]
  assert agree["fp32"][0] == pytest.approx(agree["bf16"][0], rel=0.05)
  assert r["sampler"]["step_over_forward"] > 0 and r["sampler"]["steps"] == 4


@pytest.mark.slow
def test_profile_step_attributes_xla_op_time_to_classes(tmp_path):
  out = tmp_path / "prof"
  text = _launch(tmp_path, "launch/profile_step.py", "--config=configs/tiny.py", "--steps=2", f"--out={out}")
  r = json.loads((out / "profile.json").read_text())
  assert r["ms_per_step_total"] > 0 and "ms of XLA ops per step" in text
  assert sum(c["share"] for c in r["classes"].values()) == pytest.approx(1.0)
  assert r["classes"]["matmul (forward)"]["ms"] > 0 and r["classes"]["matmul (backward)"]["ms"] > 0
  assert sum(op["ms"] for op in r["ops"]) == pytest.approx(r["ms_per_step_total"])
  assert any("transpose(jvp" in op["origin"] for op in r["ops"] if op["class"] == "matmul (backward)")
