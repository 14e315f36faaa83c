"""The scaling lab: the fit recovers known constants (float64 reference), the backtest picks the form that
extrapolates, a micro sweep runs, resumes after a kill and keeps finished runs, the plan is fixed by the
preset, a too-small budget and bad sweep folders get clear messages."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from _pretrain_data import make_dataset
from gptlab.common import GptlabError
from gptlab.lab.scaling import (PRESETS, SweepPreset, check_budget, choose_fit, estimate_minutes, finished_runs,
                                load_state, plan_sweep, run_sweep, shape_stats)
from gptlab.train.pretrain import PretrainConfig
from gptlab.lab.scaling_fit import ScalingLaw, bootstrap_laws, fit_scaling_law, intervals, objective

REPO = Path(__file__).resolve().parents[1]
TRUE = ScalingLaw(E=1.7, A=300.0, B=800.0, alpha=0.32, beta=0.27)
SMALL_GRID = {"a": (2.0, 8.0), "b": (2.0, 8.0), "e": (0.0,), "alpha": (0.3,), "beta": (0.3,)}
MICRO = SweepPreset(shapes=((1, 64), (2, 64)), target_shape=(3, 64), token_levels=(1, 2), seq_len=32,
                    batch_size=4, vocab_size=400, max_bytes=None, lr=3e-3, base_steps=4, eval_batches=2,
                    device="cpu")


def grid_points():
    n = np.repeat(np.geomspace(5e4, 5e6, 6), 3)
    d = np.tile([1e5, 4e5, 1.6e6], 6)
    return n, d


def test_objective_gradient_matches_finite_differences():
    n, d = grid_points()
    args = (np.log(n), np.log(d), np.log(TRUE.loss(n, d) * 1.01))
    theta = np.array([5.0, 6.0, 0.3, 0.35, 0.25])
    _, grad = objective(theta, *args)
    for i in range(5):
        step = np.zeros(5)
        step[i] = 1e-6
        numeric = (objective(theta + step, *args)[0] - objective(theta - step, *args)[0]) / 2e-6
        assert grad[i] == pytest.approx(numeric, rel=1e-5, abs=1e-9)


def test_fit_recovers_known_constants():
    n, d = grid_points()
    law = fit_scaling_law(n, d, TRUE.loss(n, d), grid=SMALL_GRID)  # exact data: the constants come back
    for key, value in TRUE.to_dict().items():
        assert getattr(law, key) == pytest.approx(value, rel=1e-3), key
    noisy = TRUE.loss(n, d) * np.exp(np.random.default_rng(0).normal(0, 0.003, n.shape))
    law = fit_scaling_law(n, d, noisy, grid=SMALL_GRID)
    assert law.alpha == pytest.approx(TRUE.alpha, abs=0.05) and law.beta == pytest.approx(TRUE.beta, abs=0.05)
    # held out: 4x the compute of the largest point, predicted within 1% from noisy fits
    assert law.loss(2e7, 3.2e6) == pytest.approx(TRUE.loss(2e7, 3.2e6), rel=0.01)
    spread = intervals(bootstrap_laws(n, d, noisy, law, samples=20))
    assert spread["alpha"][0] <= law.alpha <= spread["alpha"][1]


def test_compute_optimal_allocation_minimises_loss_at_fixed_compute():
    c = 1e18
    n_opt, d_opt = TRUE.optimal(c)
    assert 6 * n_opt * d_opt == pytest.approx(c)
    best = TRUE.loss(n_opt, d_opt)
    for factor in (0.8, 1.25):  # moving along the IsoFLOP curve either way costs loss
        assert TRUE.loss(n_opt * factor, c / 6 / (n_opt * factor)) > best


def test_plan_is_fixed_by_the_preset_and_the_budget_only_checked():
    runs = plan_sweep(MICRO, 400)
    grid, target = runs[:-1], runs[-1]
    assert [r["steps"] for r in grid] == [4, 8, 4, 8] and target["role"] == "target"
    assert target["flops"] >= 4 * max(r["flops"] for r in grid) > 0.9 * target["flops"] / 4 * 4
    assert shape_stats(MICRO, 2, 64, 400)["n_params"] > shape_stats(MICRO, 1, 64, 400)["n_params"]
    cpu = plan_sweep(PRESETS["cpu"], 1024)  # the CPU preset's plan, whatever the machine
    assert len(cpu) == 19 and [r["steps"] for r in cpu[:3]] == [128, 256, 512]
    assert [r["steps"] for r in cpu[-4:-1]] == [64, 128, 256]  # the largest sizes: half the steps
    largest = max(cpu[:-1], key=lambda r: r["flops"])
    assert largest["name"] == "d3w192-256s" and 4 <= cpu[-1]["flops"] / largest["flops"] < 4.01
    seconds = {s: 1.0 for s in (*MICRO.shapes, MICRO.target_shape)}
    minutes = estimate_minutes(MICRO, runs, seconds)
    assert minutes == pytest.approx(sum(4.0 + r["steps"] + 2 / 3 for r in runs) / 60)
    with pytest.raises(GptlabError, match=r"--budget-minutes 0.1 is too small.*at least \d+ minutes.*5 runs left"):
        check_budget(0.1, minutes, runs)
    check_budget(minutes + 0.01, minutes, runs)


def test_backtest_picks_the_form_with_an_irreducible_term_when_the_runs_have_one():
    n, d = grid_points()
    loss = TRUE.loss(n, d) * np.exp(np.random.default_rng(1).normal(0, 0.002, n.shape))
    runs = [{"name": f"r{i}", "n_params": a, "tokens": b, "val_loss": c, "flops": 6 * a * b}
            for i, (a, b, c) in enumerate(zip(n, d, loss))]
    fit = choose_fit(runs, bootstrap=3, fit_grid=SMALL_GRID)
    forms = fit["backtest"]["forms"]
    assert fit["form"] == "E free" and forms["E free"]["mean_abs_error_pct"] < forms["no E"]["mean_abs_error_pct"]
    assert forms["E free"]["mean_abs_error_pct"] < 0.5 and len(fit["backtest"]["held_out"]) == 2
    assert fit["law"]["E"] > 0.5 and fit["runs"] == [r["name"] for r in runs]  # refitted on every run


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("scaling_data"))


def _sweep_command(out: Path, data_dir: Path) -> list[str]:
    script = ("import sys; from gptlab.lab.scaling import run_sweep; from test_lab_scaling import MICRO, SMALL_GRID; "
              "run_sweep(sys.argv[1], None, data_dir=sys.argv[2], preset=MICRO, bootstrap=5, fit_grid=SMALL_GRID)")
    return [sys.executable, "-c", script, str(out), str(data_dir)]


def test_micro_sweep_resumes_after_a_kill(data_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "sweep"
    proc = subprocess.Popen(_sweep_command(out, data_dir), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while time.time() < deadline:  # kill once the first run is recorded as done
        if (out / "sweep.json").is_file() and any(r["done"] for r in json.loads((out / "sweep.json").read_text())["runs"]):
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = [r for r in load_state(out)["runs"] if r["done"]]
    assert first, "the sweep recorded no finished run before it was killed"
    kept = {r["name"]: (out / "runs" / r["name"] / "model" / "model.safetensors").stat().st_mtime_ns for r in first}

    state = run_sweep(out, 60, data_dir=data_dir, preset=MICRO, bootstrap=5, fit_grid=SMALL_GRID)
    assert all(r["done"] for r in state["runs"]) and len(state["runs"]) == 5
    for name, mtime in kept.items():  # finished runs were not trained again
        assert (out / "runs" / name / "model" / "model.safetensors").stat().st_mtime_ns == mtime
    pred = state["prediction"]
    assert pred["measured"] == state["runs"][-1]["val_loss"] and np.isfinite(pred["predicted"])
    for png in ("fit.png", "isoflop.png", "frontier.png"):
        assert (out / png).stat().st_size > 1000
    deep = next(r["name"] for r in state["runs"] if (r["depth"], r["width"]) == (2, 64))
    config = json.loads((out / "runs" / deep / "model" / "gptlab.json").read_text())["model"]
    assert (config["n_layer"], config["n_embd"]) == (2, 64)  # depth and width set apart (PretrainConfig.width)
    with pytest.raises(ValueError, match="multiple of 64"):
        PretrainConfig(width=96)
    # the runs keep intermediate checkpoints for the probes across training
    assert len(list((out / "runs" / state["runs"][0]["name"] / "checkpoints").glob("step_*"))) >= 2

    assert pred["run"] == state["runs"][-1]["name"] and state["fit"]["form"] in ("E free", "no E")
    with pytest.raises(GptlabError, match="planned with --preset cpu"):  # another preset for the same folder
        run_sweep(out, None, "gpu", data_dir=data_dir)


def test_bad_sweep_folders(tmp_path, caplog):
    with pytest.raises(GptlabError, match="sweep state"):
        finished_runs(tmp_path)
    (tmp_path / "sweep.json").write_text('{"runs": 3}')
    with pytest.raises(GptlabError, match="not a gptlab sweep file"):
        finished_runs(tmp_path)
    runs = [{"name": "d1w64-5s", "role": "fit", "n_params": 1, "tokens": 1}]
    (tmp_path / "sweep.json").write_text(json.dumps({"format": 1, "runs": runs}))
    (tmp_path / "runs" / "stranger").mkdir(parents=True)
    assert finished_runs(tmp_path) == []
    assert "skipped run d1w64-5s: no model directory" in caplog.text
    assert "runs/stranger: not a run of" in caplog.text
