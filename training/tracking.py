"""A run tracked as the field tracks runs: the records of metrics.jsonl also go to the trackers Accelerate drives
(`report_to`: tensorboard, wandb, mlflow, …), through its `log_with`, `init_trackers`, `log` and `end_training`.

TensorBoard writes under the run folder (`RUN/tracking/PROJECT/`); the others keep their own settings (wandb's
`WANDB_MODE`, `WANDB_DIR`, …). A resumed run goes on in the same tracker run where the tracker allows it:
TensorBoard's folder, with the steps after the checkpoint purged as metrics.jsonl's are; wandb's run id, kept in
`RUN/tracking/wandb-run-id`.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

from siclip.manifests.errors import SiclipError

# what to install for each tracker Accelerate knows
PACKAGES = {"tensorboard": "tensorboard (pip install 'siclip[tracking]')", "wandb": "wandb", "mlflow": "mlflow",
            "comet_ml": "comet_ml", "aim": "'aim<4'", "clearml": "clearml", "dvclive": "dvclive",
            "swanlab": "swanlab", "trackio": "trackio"}
TRACKING_DIR = "tracking"


def check_trackers(names: list[str]) -> None:
    """Every name is a tracker Accelerate knows and can start here; else one line naming what to install
    (Accelerate itself would drop a tracker whose package is missing without a word)."""
    if not names:
        return
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise SiclipError(f"report_to {name!r} is not a tracker Accelerate knows; one of "
                              f"{', '.join(sorted(LOGGER_TYPE_TO_CLASS))}")
    available = {str(t) for t in get_available_trackers()}
    for name in names:
        if name not in available:
            raise SiclipError(f"report_to {name!r} needs the {name} package, which is not installed: "
                              f"pip install {PACKAGES.get(name, name)}")


def tracker_settings(names: list[str], run_path: Path) -> dict:
    """The Accelerator's keyword arguments for `report_to`: none when it is empty."""
    if not names:
        return {}
    from accelerate.utils import ProjectConfiguration

    return {"log_with": list(names),
            "project_config": ProjectConfiguration(project_dir=str(run_path), logging_dir=str(run_path / TRACKING_DIR))}


def start_tracking(accelerator, run, project: str, config: dict, step: int) -> None:
    """Start the trackers (main process) for the run's records from `step` on, and send every record
    `run.append_metrics` writes from now on to them as well."""
    if not accelerator.log_with:
        return
    names = {str(t) for t in accelerator.log_with}
    init = {}
    if "tensorboard" in names and step:  # events after the checkpoint are replaced, as metrics.jsonl's lines are
        init["tensorboard"] = {"purge_step": step + 1}
    if "wandb" in names:
        init["wandb"] = {"name": run.name, "id": _wandb_run_id(run.path / TRACKING_DIR), "resume": "allow"}
    if "mlflow" in names:
        init["mlflow"] = {"run_name": run.name}
    accelerator.init_trackers(project, config=flat_config(config), init_kwargs=init)
    if accelerator.is_main_process:
        run.on_record = lambda record: accelerator.log(tracked_values(record), step=record["step"])


def _wandb_run_id(folder: Path) -> str:
    """The run's wandb id: made at its first start, read back on every later one (so --resume continues it)."""
    path = folder / "wandb-run-id"
    if path.is_file():
        return path.read_text().strip()
    folder.mkdir(parents=True, exist_ok=True)
    run_id = secrets.token_hex(4)
    path.write_text(run_id + "\n")
    return run_id


def tracked_values(record: dict, prefix: str = "") -> dict:
    """A metrics.jsonl record as trackers take it: nested tables flattened to `terms/clip_web`, `eval/i2t_r1`,
    numbers only (the step is the tracker's own axis; names and empty values stay in metrics.jsonl)."""
    out = {}
    for key, value in record.items():
        if not prefix and key == "step":
            continue
        if isinstance(value, dict):
            out.update(tracked_values(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = value
    return out


def flat_config(config: dict, prefix: str = "") -> dict:
    """The resolved config as hyperparameters: dotted keys as `--set` spells them (`stages.0.loss.fd`), values
    that are not scalars written as JSON (TensorBoard takes only scalars and strings)."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_config(value, f"{name}."))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, item in enumerate(value):
                out.update(flat_config(item, f"{name}.{i}."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = json.dumps(value)
    return out
