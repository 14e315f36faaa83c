"""`gptlab speedrun`: every stage of the recipe runs on a slice of the embedded default mixture, the report
compares the models on the same test questions, and a rerun reuses finished stages (only what changed and
what depends on it runs again, including an edit of the mixture file)."""

import json
from pathlib import Path

from gptlab.cli import main
from gptlab.train.metrics import read_metrics
from gptlab.speedrun import STAGES

DEFAULT_MIXTURE = Path(__file__).resolve().parents[1] / "gptlab" / "mixtures" / "default.toml"

TINY = {"max-bytes": 300000, "vocab-size": 1000, "pretrain-steps": 6, "sft-steps": 6, "sft-conversations": 300,
        "pref-prompts": 40, "pref-val-prompts": 20, "rm-steps": 3, "rl-steps": 2, "rl-gold-per-task": 1,
        "dpo-steps": 3, "eval-per-task": 1, "eval-max-tokens": 24}


def speedrun_args(run, **changes) -> list[str]:
    options = {**TINY, **{k.replace("_", "-"): v for k, v in changes.items()}, "run-dir": run}
    return ["speedrun", "--preset", "cpu", *(x for k, v in options.items() for x in (f"--{k}", str(v)))]


def test_speedrun_whole_recipe_then_resume(tmp_path, capsys):
    run = tmp_path / "run"
    mixture = tmp_path / "mixture.toml"  # the default mixture, as a file this test can edit at the end
    mixture.write_text(DEFAULT_MIXTURE.read_text(encoding="utf-8"), encoding="utf-8")

    def args(**changes):
        return speedrun_args(run, mixture=mixture, **changes)

    assert main(args()) == 0
    meta = json.loads((run / "data" / "meta.json").read_text())
    assert meta["complete"] and meta["vocab_size"] == 1000 and meta["splits"]["train"]["tokens"] > 50_000
    out = capsys.readouterr().out
    for source in ("shakespeare", "treebank", "bbcnews", "wikipedia", "python", "facts"):  # the stats table
        assert source in out

    state = json.loads((run / "speedrun.json").read_text())["stages"]
    assert list(state) == list(STAGES)
    for name in ("pretrain", "sft", "rl", "dpo"):
        assert (run / name / "model" / "model.safetensors").is_file()
    assert (run / "rm" / "model" / "reward_head.safetensors").is_file()

    report = (run / "report.md").read_text()
    header = next(line for line in report.splitlines() if line.startswith("| task |"))
    assert header == "| task | base qa 3-shot | base assistant 3-shot | sft | rl | dpo |"
    for task in ("arithmetic", "calculator", "extraction", "identity", "knowledge", "sentiment", "spelling",
                 "syllogism", "word_problems"):
        assert f"| {task} |" in report
    assert "base < SFT <= RL" in report and "Reward model held-out pairwise accuracy" in report
    probe = json.loads((run / "rl" / "rl.json").read_text())["probe"]  # the cpu preset probes before RL
    assert set(probe) == {"arithmetic", "calculator", "extraction", "identity", "knowledge", "sentiment",
                          "spelling", "syllogism", "word_problems"} and "RL trained on " in report
    assert (run / "gold.png").read_bytes()[:4] == b"\x89PNG"
    for name in ("base", "sft", "rl", "dpo"):  # every model answered the same test questions
        gold = json.loads((run / "eval" / f"{name}.json").read_text())["gold"]
        assert {t: r["n"] for t, r in gold[0]["tasks"].items()} == {t: 1 for t in gold[0]["tasks"]}

    # a rerun with the same options redoes nothing; changing DPO's steps reruns DPO and the evaluation only
    mtimes = {name: (run / name / "model" / "model.safetensors").stat().st_mtime_ns
              for name in ("pretrain", "sft", "rl", "dpo")}
    assert main(args()) == 0
    assert {n: (run / n / "model" / "model.safetensors").stat().st_mtime_ns for n in mtimes} == mtimes
    assert json.loads((run / "speedrun.json").read_text())["stages"] == state
    assert main(args(dpo_steps=4)) == 0
    after = {n: (run / n / "model" / "model.safetensors").stat().st_mtime_ns for n in mtimes}
    assert [n for n in mtimes if after[n] != mtimes[n]] == ["dpo"]
    rerun = json.loads((run / "speedrun.json").read_text())["stages"]
    assert [s for s in STAGES if rerun[s] != state[s]] == ["dpo", "eval"]
    assert json.loads((run / "dpo" / "dpo.json").read_text())["config"]["num_steps"] == 4
    # new options start the stage afresh instead of resuming the old run's checkpoint at step 3
    steps = [r["step"] for r in read_metrics(run / "dpo" / "metrics.jsonl") if "train/loss" in r]
    assert steps == [1, 2, 3, 4]
    # --pref-sample-prompts reaches both preference stages (and reruns them, not SFT or RL)
    assert main(args(dpo_steps=4, pref_sample_prompts=7)) == 0
    last = json.loads((run / "speedrun.json").read_text())["stages"]
    assert [s for s in STAGES if last[s] != rerun[s]] == ["rm", "dpo", "eval"]
    assert json.loads((run / "rm" / "model" / "reward.json").read_text())["config"]["sample_prompts"] == 7
    assert json.loads((run / "dpo" / "dpo.json").read_text())["config"]["sample_prompts"] == 7
    # the mixture file edited in place: a new comment changes nothing; a new weight makes every stage stale
    # down the chain (run here up to SFT, to keep the test short: the later stages are left as they were)
    options = {"dpo_steps": 4, "pref_sample_prompts": 7}
    mixture.write_text("# edited\n" + mixture.read_text(encoding="utf-8"), encoding="utf-8")
    assert main(args(**options)) == 0
    assert json.loads((run / "speedrun.json").read_text())["stages"] == last
    mixture.write_text(mixture.read_text(encoding="utf-8").replace("weight = 0.5", "weight = 0.4"), encoding="utf-8")
    assert main(args(stages="tokenizer,data,pretrain,sft", **options)) == 0
    edited = json.loads((run / "speedrun.json").read_text())["stages"]
    assert [s for s in STAGES if edited[s] != last[s]] == ["tokenizer", "data", "pretrain", "sft"]


def test_speedrun_rejects_unknown_stage(tmp_path, capsys):
    assert main(["speedrun", "--stages", "pretrain,finetune", "--run-dir", str(tmp_path)]) == 2
    assert "finetune" in capsys.readouterr().err


def test_speedrun_stops_after_the_selected_stages(tmp_path, capsys):
    """`--stages tokenizer,data` prepares the data and stops (how a GPU machine without the mixture's
    packages gets its run dir); selecting a stage whose input never ran is a clear error."""
    run = tmp_path / "run"
    assert main(speedrun_args(run, stages="tokenizer,data")) == 0
    assert list(json.loads((run / "speedrun.json").read_text())["stages"]) == ["tokenizer", "data"]
    assert (run / "data" / "meta.json").is_file() and not (run / "pretrain").exists()
    capsys.readouterr()
    assert main(speedrun_args(run, stages="sft")) == 2
    assert "stage 'pretrain' has not run in this run dir" in capsys.readouterr().err
