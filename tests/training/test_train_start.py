"""How `siclip train` starts and ends as a user meets it: a start that fails leaves nothing that blocks the
corrected command, the held-out set is counted in samples (an empty last shard is skipped), and `--json`
sums the run up in one line. Real `siclip train` runs on small real shards."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from siclip_testing import siclip
from train_helpers import make_root

SMALL_MODEL = ['image.image_size=16', 'image.patch_size=8', 'image.width=32', 'image.depth=2', 'image.heads=2',
               'image.share_attention=[[1, 2]]', 'text.width=32', 'text.depth=2', 'text.heads=2',
               'text.share_attention=[[1, 2]]', 'text.context_length=16', 'embed_dim=16']


def config(tmp_path: Path, name: str, body: str = "", teacher: str = "none", steps: int = 2) -> Path:
    """A small one-stage config; `teacher` other than none adds an ICL term that needs it."""
    path = tmp_path / f"{name}.toml"
    loss = "clip_web = 1.0\nclip_synthetic = 0.0\n" + ("icl = 1.0\n" if teacher != "none" else "")
    path.write_text(f"model_set = {json.dumps(SMALL_MODEL)}\nbatch_size = 8\nworkers = 0\nsynthetic_captions = 0\n"
                    f"checkpoint_every = 2\n{body}\n[[stages]]\nname = 'one'\nsteps = {steps}\nlr = 1e-3\n"
                    f"teacher = '{teacher}'\n[stages.loss]\n{loss}")
    return path


def train(root, cfg: Path, out: str, *extra, check=True, env=None):
    return siclip("train", "--data", root.root, "--config", cfg, "--out", out, *extra, check=check, env=env)


@pytest.mark.parametrize("resume", [False, True])
def test_a_start_that_fails_after_its_config_is_resolved_leaves_nothing_and_the_corrected_command_trains(
        tmp_path, resume):
    root = make_root(tmp_path / "data", [16, 16, 16])
    flags = ["--resume"] if resume else []
    broken = tmp_path / "broken-teacher"  # a model folder by its look, so the failure comes when it loads
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "clip"}')
    bad = train(root, config(tmp_path, "bad", teacher=str(broken)), "run", *flags, check=False)
    assert bad.returncode == 2 and "does not load" in bad.stderr.strip().splitlines()[-1], bad.stderr[-2000:]
    assert not (root.runs / "run").exists(), "a failed start wrote the run folder"
    res = train(root, config(tmp_path, "good"), "run", *flags)
    assert "train: done: 2 steps" in res.stderr
    saved = json.loads((root.runs / "run" / "config.json").read_text())
    assert saved["stages"][0]["teacher"] == "none"


def test_a_folder_whose_start_died_before_its_first_step_starts_afresh_with_the_new_config(tmp_path):
    root = make_root(tmp_path / "data", [16, 16, 16])
    env = {**os.environ, "SICLIP_FAILPOINT": "run-folder-written"}  # a real SIGKILL before the first step
    res = train(root, config(tmp_path, "first", "val_shards = 1"), "run", check=False, env=env)
    assert res.returncode == -signal.SIGKILL
    run = root.runs / "run"
    assert (run / "config.json").is_file() and not (run / "checkpoints").exists()
    for flags in ([], ["--resume"]):  # changed config, with and without --resume
        res = train(root, config(tmp_path, "second", "val_shards = 0\nseed = 5"), "run", *flags, check=False,
                    env=env)
        assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
        assert "holds a start that failed before its first step (no checkpoint, no metrics): starting it afresh" \
            in res.stderr
        assert json.loads((run / "config.json").read_text())["seed"] == 5
        assert json.loads((run / "data.json").read_text())["val_shards"] == []
    res = train(root, config(tmp_path, "third", "seed = 6"), "run")
    assert "starting it afresh" in res.stderr and "train: done: 2 steps" in res.stderr


def test_a_run_with_a_checkpoint_keeps_its_config_and_its_held_out_shards(tmp_path):
    root = make_root(tmp_path / "data", [16, 16, 16, 16])
    first = config(tmp_path, "first", "val_samples = 16", steps=4)
    train(root, first, "run", "--max-steps", "2")
    res = train(root, config(tmp_path, "changed", "val_samples = 16\nseed = 5", steps=4), "run", check=False)
    assert res.returncode == 2 and "already holds a run; pass --resume" in res.stderr
    res = train(root, config(tmp_path, "changed", "val_samples = 16\nseed = 5", steps=4), "run", "--resume",
                check=False)
    assert res.returncode == 2 and "differs from the run's in seed" in res.stderr
    res = train(root, config(tmp_path, "other", "val_shards = 2", steps=4), "run", "--resume", check=False)
    assert res.returncode == 2 and "holds out ['00002', '00003'], but the run held out ['00003']" in res.stderr
    # val_shards naming the same shard as val_samples chose: the same run, resumed
    res = train(root, config(tmp_path, "same", "val_shards = ['00003']", steps=4), "run", "--resume")
    assert "resuming from step-000002" in res.stderr and "train: done: 2 steps" in res.stderr


def test_a_first_checkpoint_that_cannot_fit_the_budget_stops_the_start_before_anything_is_written(tmp_path):
    from siclip.manifests.storage import StorageBudget, write_storage

    root = make_root(tmp_path / "data", [16, 16, 16])
    write_storage(root, budget_bytes=StorageBudget.load(root).used_bytes + 100_000, reserve_bytes=0)
    res = train(root, config(tmp_path, "c"), "run", check=False)
    assert res.returncode == 3 and "stopped at the budget: checkpoint step-000002 needs about" in res.stderr
    assert "no checkpoint was kept: rerun once space is freed" in res.stderr
    assert not (root.runs / "run").exists()
    write_storage(root, budget_bytes=10**9, reserve_bytes=0)
    assert "train: done: 2 steps" in train(root, config(tmp_path, "c"), "run").stderr


def test_an_empty_last_shard_is_skipped_by_val_samples_and_an_explicit_empty_hold_out_is_refused(tmp_path):
    # 303 rows at 50 per shard: the seventh shard held the 3 rows that failed, so no sample
    root = make_root(tmp_path / "data", [50] * 6 + [0], captions=2)
    res = train(root, config(tmp_path, "c", "val_shards = 1"), "run", check=False)
    assert res.returncode == 2 and ("val_shards = 1 holds out 00006, which hold no samples: nothing to evaluate"
                                    in res.stderr), res.stderr[-2000:]
    assert not (root.runs / "run").exists()
    both = train(root, config(tmp_path, "c", "val_shards = 1\nval_samples = 10"), "run", check=False)
    assert both.returncode == 2 and "val_samples = 10 and val_shards = 1 both choose the held-out shards" in both.stderr

    # the shipped tiny config, shortened: it holds out the last 100 samples, skipping the empty shard, and evaluates
    sets = ["workers=0", "stages.0.epochs=0", "stages.0.steps=2", f"model_set={json.dumps(SMALL_MODEL)}"]
    res = siclip("train", "--data", root.root, "--config", "tiny", "--out", "tiny", "--json",
                 *[a for s in sets for a in ("--set", s)])
    assert "2 held out (100 samples: 00004 … 00005)" in res.stderr
    run = root.runs / "tiny"
    assert json.loads((run / "data.json").read_text())["val_shards"] == ["00004", "00005"]

    # --json: one line on stdout that sums the run up
    (line,) = res.stdout.strip().splitlines()
    out = json.loads(line)
    assert out["status"] == "done" and out["steps"] == 2 and out["step"] == out["total_steps"] == 2
    assert out["samples_per_s"] > 0
    last = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x][-1]
    assert out["loss"] == last["loss"] and out["terms"] == last["terms"] and set(out["terms"]) >= {"clip_web", "pm"}
    assert out["eval"]["samples"] == 100 and out["eval"]["step"] == 2 and 0 <= out["eval"]["i2t_r1"] <= 1
    paths = out["paths"]
    assert Path(paths["run"]) == run and Path(paths["final_model"]) == run / "final"
    assert Path(paths["metrics"]) == run / "metrics.jsonl" and Path(paths["config"]).is_file()
    assert paths["plots"] and all(Path(p).is_file() and Path(p).parent == run / "plots" for p in paths["plots"])

    # a rerun of a finished run still answers in one line
    again = json.loads(siclip("train", "--data", root.root, "--config", "tiny", "--out", "tiny", "--json", "--resume",
                              *[a for s in sets for a in ("--set", s)]).stdout)
    assert again["status"] == "finished" and again["steps"] == 0 and again["eval"] == out["eval"]
