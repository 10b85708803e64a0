""" Experiment tracking through Accelerate's trackers (`--log-with`, timm's `--log-wandb`) and the run's
`summary.csv`.

TensorBoard writes its event files under the run folder, in RUN/<project>/; wandb and MLflow log where their
own settings say (wandb: WANDB_MODE, WANDB_DIR; MLflow: MLFLOW_TRACKING_URI, by default sqlite:///mlflow.db in the
working folder since MLflow 3, which needs the full mlflow package; a file: store needs MLFLOW_ALLOW_FILE_STORE=true).
The run is named after the run folder.
Per-epoch rows carry the summary.csv columns under `epoch/`, at step = epoch; progress every --log-interval
updates goes under `train/`, at step = the number of optimizer updates. wandb, whose step may only grow, logs
both at its own step, with `epoch` or `update` as a value.
"""
import csv
import os
from importlib.util import find_spec
from pathlib import Path

from .checkpoint import writing
from .errors import UsageError

# --log-with name -> the package its Accelerate tracker needs ('all' is every tracker that is installed)
TRACKER_PACKAGES = {'tensorboard': 'tensorboard', 'wandb': 'wandb', 'mlflow': 'mlflow'}
DEFAULT_PROJECT = 'timm-gmix'


def tracker_names(args):
    """ `Accelerator(log_with=...)` for --log-with (with --log-wandb merged in by parse_args): None for no
    tracking. A named tracker whose package is missing is a UsageError before training starts. Accelerate
    refuses tensorboard without a logging folder when it is built: pass it `project_dir` (any folder;
    `start_tracking` points the trackers at the run folder). """
    if not args.log_with:
        return None
    for name in args.log_with:
        package = TRACKER_PACKAGES.get(name)
        if package is not None and find_spec(package) is None:
            raise UsageError(f'--log-with {name} needs the {package} package: pip install {package} '
                             f'(or drop --log-with {name})')
    if 'mlflow' in args.log_with and not os.environ.get('MLFLOW_TRACKING_URI') and find_spec('sqlalchemy') is None:
        # MLflow 3's default store, sqlite:///mlflow.db, needs SQLAlchemy, which mlflow-skinny does not bring
        raise UsageError('--log-with mlflow logs to sqlite:///mlflow.db by default, which needs the full mlflow '
                         'package: pip install mlflow, or set MLFLOW_TRACKING_URI (e.g. to an MLflow server)')
    return list(args.log_with)


def _flat_config(args) -> dict:
    """ The arguments as the scalars every tracker accepts: lists and mappings as text, None left out. """
    config = {}
    for key, value in vars(args).items():
        if value is None:
            continue
        config[key] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return config


def start_tracking(accelerator, args, run_dir, experiment: str):
    """ Start the trackers of `accelerator` in `run_dir`, logging the arguments as the run's config. The run is
    named `experiment`; the project is --wandb-project (default 'timm-gmix'). Nothing without trackers. """
    if not accelerator.log_with:
        return
    # Accelerate fixes its logging folder when it is built, before the run folder exists; trackers read it
    # only when they start, here.
    accelerator.project_configuration.project_dir = str(run_dir)
    accelerator.project_configuration.logging_dir = str(run_dir)
    wandb = {'name': experiment, 'tags': list(args.wandb_tags or [])}
    if args.wandb_resume_id:
        wandb.update(id=args.wandb_resume_id, resume='must')
    accelerator.init_trackers(args.wandb_project or DEFAULT_PROJECT, config=_flat_config(args),
                              init_kwargs={'wandb': wandb, 'mlflow': {'run_name': experiment}})


def _log(accelerator, values: dict, step: int, axis: str):
    for tracker in accelerator.trackers:
        if tracker.name == 'wandb':
            # wandb has one step axis per run that must only grow: it gets the axis as a value instead
            tracker.log({**values, axis: step})
        else:
            tracker.log(values, step=step)


def log_epoch(accelerator, epoch: int, row: dict):
    """ The epoch's summary.csv columns (`row`: train_*, eval_*, lr) as `epoch/<column>` at step `epoch`. """
    _log(accelerator, {f'epoch/{k}': v for k, v in row.items()}, epoch, 'epoch')


def log_step(accelerator, update: int, values: dict):
    """ Training progress (loss, lr, skipped steps, flagged statistics) as `train/<name>` at step `update`. """
    _log(accelerator, {f'train/{k}': v for k, v in values.items()}, update, 'update')


# ----------------------------------------------------------------------------------------------
# summary.csv


def _read_summary(path: Path):
    """ (header, rows as dicts) of a summary file; ([], []) when it is missing or empty. """
    if not path.is_file():
        return [], []
    with open(path, newline='') as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def _write_summary(path: Path, header: list, rows: list):
    """ Write the whole file under a temporary name, then rename it over the old one: a full disk never leaves
    half a row. """
    with writing(path) as tmp, open(tmp, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=header, restval='')
        writer.writeheader()
        writer.writerows(rows)


def _merge_columns(header: list, columns: list) -> list:
    """ `header` with the `columns` it lacks, each placed after the column that precedes it in `columns`. """
    merged = list(header)
    for i, column in enumerate(columns):
        if column not in merged:
            merged.insert(merged.index(columns[i - 1]) + 1 if i else 0, column)
    return merged


def write_summary(path, epoch: int, train_metrics: dict, eval_metrics: dict, lr: float = None):
    """ Add the epoch's row to summary.csv with timm's `update_summary` columns: epoch, train_<k>...,
    eval_<k>..., lr. A row with new columns (the EMA's, say) adds them to the header, earlier rows leaving them
    empty. """
    path = Path(path)
    row = {'epoch': epoch, **{f'train_{k}': v for k, v in train_metrics.items()},
           **{f'eval_{k}': v for k, v in (eval_metrics or {}).items()}}
    if lr is not None:
        row['lr'] = lr
    header, rows = _read_summary(path)
    _write_summary(path, _merge_columns(header, list(row)), [*rows, row])


def trim_summary(path, last_epoch: int):
    """ Drop summary.csv rows after `last_epoch`, so a resumed run continues the file without duplicates. """
    path = Path(path)
    header, rows = _read_summary(path)
    kept = [row for row in rows if int(row['epoch']) <= last_epoch]
    if len(kept) < len(rows):
        _write_summary(path, header, kept)
