"""A run tracked as the field tracks runs: the records of metrics.jsonl go to TensorBoard and wandb through
Accelerate's trackers (a resumed run goes on in the same tracker run), precision = "auto" takes the mixed precision
Accelerate was given, and `siclip train --help` names the multi-GPU command, which runs, and every config key.
Real `siclip train` runs on small real shards."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shlex
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from siclip_testing import REPO, siclip
from train_helpers import make_root, small_config


def train(root, cfg: Path, out: str, *extra, check=True, env=None):
    return siclip("train", "--data", root.root, "--config", cfg, "--out", out, *extra, check=check, env=env)


def records(run: Path) -> tuple[dict, dict]:
    """metrics.jsonl's step records and eval records, by step."""
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in lines if "loss" in r}, {r["step"]: r["eval"] for r in lines if "eval" in r}


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard would show from the event files in `folder`: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def assert_tracked(scalars: dict, run: Path) -> None:
    """Each step's loss, loss term and held-out recall in the event files, once per step, equal metrics.jsonl's."""
    logged, evals = records(run)
    assert [s for s, _ in scalars["loss"]] == sorted(logged), "a step missing, or logged twice"
    for tag, value in (("loss", lambda r: r["loss"]), ("terms/clip_web", lambda r: r["terms"]["clip_web"]),
                       ("lr", lambda r: r["lr"])):
        assert [v for _, v in scalars[tag]] == pytest.approx([value(logged[s]) for s in sorted(logged)], rel=1e-6)
    assert [s for s, _ in scalars["eval/i2t_r1"]] == sorted(evals)
    assert [v for _, v in scalars["eval/i2t_r1"]] == pytest.approx([evals[s]["i2t_r1"] for s in sorted(evals)])


def test_tensorboard_gets_every_record_of_metrics_jsonl_and_a_resumed_run_goes_on_in_the_same_folder(tmp_path):
    root = make_root(tmp_path / "data", [16, 16, 16])
    cfg = small_config(tmp_path / "c.toml", 'val_shards = 1\neval_every = 3\ncheckpoint_every = 3\n'
                                            'report_to = ["tensorboard"]', steps=6)
    # killed after step 5: steps 4 and 5 went to metrics.jsonl and to TensorBoard after the checkpoint of step 3
    killed = train(root, cfg, "run", check=False, env={**os.environ, "SICLIP_FAILPOINT": "logged:step-000005"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert "resuming from step-000003" in train(root, cfg, "run", "--resume").stderr
    run = root.runs / "run"
    assert sorted(records(run)[0]) == [1, 2, 3, 4, 5, 6]
    scalars = tensorboard_scalars(run / "tracking" / "siclip")
    assert_tracked(scalars, run)  # step 4 once: the killed run's later events are purged as its metrics lines are
    assert {"temperature", "grad_norm", "samples_per_s", "eval/t2i_r1"} <= set(scalars)


def test_a_record_reaches_the_trackers_as_numbers_under_flat_names():
    from siclip.training.tracking import tracked_values

    record = {"step": 4, "epoch": 0.5, "stage": "one", "loss": 2.0, "terms": {"clip_web": 1.5, "pm": 0.5},
              "grad_norm": None, "no_synthetic": 0,
              "eval": {"i2t_r1": 0.25, "zeroshot": {"shapes": {"top1": 0.5, "classes": 2}, "imagenet": {"acc1": 0.1}}}}
    assert tracked_values(record) == {
        "epoch": 0.5, "loss": 2.0, "terms/clip_web": 1.5, "terms/pm": 0.5, "no_synthetic": 0, "eval/i2t_r1": 0.25,
        "eval/zeroshot/shapes/top1": 0.5, "eval/zeroshot/shapes/classes": 2, "eval/zeroshot/imagenet/acc1": 0.1}


def wandb_records(path: Path):
    """The records of a wandb run file (`run-ID.wandb`): LevelDB's log format (32 KiB blocks of chunks, each
    checksum, length, type) after a 7-byte header, each record a protobuf `Record`."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, chunk = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):  # a block's zero padding
            pos += left
            continue
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            chunk = b""
            yield record


def test_wandb_offline_gets_every_record_and_a_resumed_run_keeps_its_run_id(tmp_path):
    root = make_root(tmp_path / "data", [16, 16, 16])
    cfg = small_config(tmp_path / "c.toml", 'val_shards = 1\nreport_to = "wandb"\ntracking_project = "tiny-clip"',
                       steps=3)
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb"), "WANDB_SILENT": "true"}
    train(root, cfg, "run", "--max-steps", "2", env=env)
    res = train(root, cfg, "run", "--resume", "--json", env=env)
    assert json.loads(res.stdout)["status"] == "done", "wandb wrote to stdout, where --json's one line goes"
    run = root.runs / "run"
    run_id = (run / "tracking" / "wandb-run-id").read_text().strip()
    files = sorted((tmp_path / "wandb" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert [f.name for f in files] == [f"run-{run_id}.wandb"] * 2, "the resumed run is not the same wandb run"
    runs, history, config = [], {}, {}
    for record in (r for f in files for r in wandb_records(f)):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            runs.append((record.run.run_id, record.run.project, record.run.display_name))
        elif kind == "history":
            history[record.history.step.num] = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                                                for i in record.history.item}
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in record.config.update})
    assert runs == [(run_id, "tiny-clip", "runs/run")] * 2
    logged, evals = records(run)
    assert sorted(history) == sorted(logged) == [1, 2, 3]
    for step, r in logged.items():
        assert history[step]["loss"] == r["loss"] and history[step]["terms/clip_web"] == r["terms"]["clip_web"]
        assert history[step]["lr"] == r["lr"] and history[step]["grad_norm"] == r["grad_norm"]
    assert {k: history[3][f"eval/{k}"] for k in evals[3]} == evals[3]
    assert config["batch_size"] == 8 and config["stages.0.steps"] == 3 and config["mixed_precision"] == "no"


def missing_tracker() -> str:
    """A tracker Accelerate knows whose package this environment lacks."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    names = [n for n in sorted(LOGGER_TYPE_TO_CLASS) if importlib.util.find_spec(n) is None]
    assert names, "every tracker's package is installed here"
    return names[0]


def test_a_tracker_that_is_unknown_or_not_installed_stops_the_start_in_one_line(tmp_path):
    root = make_root(tmp_path / "data", [16, 16])
    missing = missing_tracker()
    for value, says in (("tensorbord", "report_to 'tensorbord' is not a tracker Accelerate knows; one of aim, "),
                        (f"tensorboard,{missing}", f"report_to {missing!r} needs the {missing} package, which is not "
                                                    f"installed: pip install "),
                        ("[1]", "report_to must be a list of tracker names")):
        res = train(root, small_config(tmp_path / "c.toml"), "run", "--set", f"report_to={value}", check=False)
        assert res.returncode == 2 and res.stderr.strip().splitlines()[-1].startswith("siclip train: error: ")
        assert says in res.stderr.strip().splitlines()[-1], res.stderr[-2000:]
        assert not (root.runs / "run").exists()


def test_precision_auto_takes_the_mixed_precision_accelerate_was_given_and_a_named_one_wins(tmp_path):
    root = make_root(tmp_path / "data", [16, 16])
    cfg = small_config(tmp_path / "c.toml")
    plain = {k: v for k, v in os.environ.items() if k != "ACCELERATE_MIXED_PRECISION"}
    given = {**plain, "ACCELERATE_MIXED_PRECISION": "bf16"}  # what `accelerate launch --mixed_precision bf16` sets
    for out, sets, env, precision, why in (
            ("given", [], given, "bf16", "Accelerate's: ACCELERATE_MIXED_PRECISION=bf16"),
            ("named", ["--set", "precision=no"], given, "no", "precision = 'no' in the config"),
            ("plain", [], plain, "no", "siclip's for this device")):  # this CPU: fp32
        res = train(root, cfg, out, *sets, env=env)
        assert f"train: mixed precision {precision}, {why}" in res.stderr
        assert json.loads((root.runs / out / "data.json").read_text())["precision"] == precision


def test_train_help_names_the_multi_gpu_command_and_every_config_key():
    from siclip.training.config import LossWeights, StageConfig, TrainConfig

    text = " ".join(siclip("train", "--help").stdout.split())
    assert "accelerate launch --multi_gpu --num_processes 2 -m siclip train --data DATA --config paper" in text
    keys = ([f.name for f in dataclasses.fields(TrainConfig) if f.name != "stages"]
            + [f"stages.N.{f.name}" for f in dataclasses.fields(StageConfig) if f.name != "loss"]
            + [f"stages.N.loss.{f.name}" for f in dataclasses.fields(LossWeights)])
    listed = text.split("each explained in docs/config.md): ")[1].split(", ")
    assert listed == keys and "report_to" in listed and "precision" in listed


def test_the_multi_gpu_command_of_the_help_runs_two_processes_with_the_launchers_precision_and_tracking(tmp_path):
    root = make_root(tmp_path / "data", [16, 16, 16])
    cfg = small_config(tmp_path / "c.toml", "val_shards = 1", steps=2)
    line = next(ln.strip() for ln in siclip("train", "--help").stdout.splitlines() if ln.strip().startswith(
        "accelerate launch"))
    words = [{"DATA": str(root.root), "paper": str(cfg), "RUN": "two"}.get(w, w) for w in shlex.split(line)]
    # the command as the help gives it, with the launcher's precision flag, on this machine's CPU
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--mixed_precision", "bf16",
           *words[2:], "--set", "report_to=tensorboard"]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
           "HF_HOME": str(tmp_path / "hf")}  # no accelerate config file of this machine's
    env.pop("ACCELERATE_MIXED_PRECISION", None)
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    run = root.runs / "two"
    data = json.loads((run / "data.json").read_text())
    assert data["processes"] == 2 and data["precision"] == "bf16"
    assert_tracked(tensorboard_scalars(run / "tracking" / "siclip"), run)
