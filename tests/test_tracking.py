""" Tracking and summary.csv: a real offline TensorBoard run read back from its event files, the exact
summary file through new columns and resume trims, and the one-line error for a missing tracker package. """
import csv
import importlib.util
from argparse import Namespace

import pytest
import yaml
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from timm_gmix.training import tracking
from timm_gmix.training.args import parse_args
from timm_gmix.training.errors import UsageError
from timm_gmix.training.tracking import (
    log_epoch, log_step, start_tracking, tracker_names, trim_summary, write_summary)


def tracking_args(**overrides):
    args = dict(log_with=['tensorboard'], wandb_project=None, wandb_tags=[], wandb_resume_id='', model='resnet10t',
                lr=None, rho=0.05, mixup_mode='dg', opt_betas=[0.9, 0.99], model_kwargs={'drop': 0.1})
    return Namespace(**{**args, **overrides})


def read_events(folder):
    events = EventAccumulator(str(folder), size_guidance={'scalars': 0, 'tensors': 0})
    events.Reload()
    return events


def test_tensorboard_run_offline(tmp_path):
    args = tracking_args()
    # The Accelerator is built before the run folder exists, with any folder: start_tracking points it at the run.
    accelerator = Accelerator(cpu=True, log_with=tracker_names(args), project_dir=str(tmp_path / 'elsewhere'))
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    start_tracking(accelerator, args, run_dir, 'run')
    log_step(accelerator, 5, {'loss': 2.5, 'lr': 0.125, 'skipped': 0, 'flagged_two_class': 3})
    log_step(accelerator, 10, {'loss': 1.5, 'lr': 0.0625, 'skipped': 1, 'flagged_two_class': 4})
    log_epoch(accelerator, 0, {'train_loss': 2.0, 'eval_loss': 1.75, 'eval_top1': 50.0, 'lr': 0.0625})
    log_epoch(accelerator, 1, {'train_loss': 1.25, 'eval_loss': 1.0, 'eval_top1': 62.5, 'lr': 0.03125})
    accelerator.end_training()

    assert not (tmp_path / 'elsewhere').exists()
    project = run_dir / 'timm-gmix'
    scalars = read_events(project)
    logged = {tag: [(e.step, e.value) for e in scalars.Scalars(tag)] for tag in scalars.Tags()['scalars']}
    assert logged == {
        'train/loss': [(5, 2.5), (10, 1.5)], 'train/lr': [(5, 0.125), (10, 0.0625)],
        'train/skipped': [(5, 0.0), (10, 1.0)], 'train/flagged_two_class': [(5, 3.0), (10, 4.0)],
        'epoch/train_loss': [(0, 2.0), (1, 1.25)], 'epoch/eval_loss': [(0, 1.75), (1, 1.0)],
        'epoch/eval_top1': [(0, 50.0), (1, 62.5)], 'epoch/lr': [(0, 0.0625), (1, 0.03125)]}

    # The config: TensorBoard's hparams (in the sub-folder add_hparams makes), flat scalars, None left out.
    (hparams_dir,) = {p.parent for p in project.glob('*/events.out.tfevents.*')}
    content = read_events(hparams_dir).PluginTagToContent('hparams')['_hparams_/session_start_info']
    info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    hparams = {k: v.WhichOneof('kind') and getattr(v, v.WhichOneof('kind')) for k, v in info.hparams.items()}
    assert hparams == {'log_with': "['tensorboard']", 'wandb_tags': '[]', 'wandb_resume_id': '', 'model': 'resnet10t',
                       'rho': 0.05, 'mixup_mode': 'dg', 'opt_betas': '[0.9, 0.99]', 'model_kwargs': "{'drop': 0.1}"}


class RecordingWandb(GeneralTracker):
    """ Stands in for wandb's tracker: records what it is asked to log. """
    name, requires_logging_directory, main_process_only = 'wandb', False, True

    def __init__(self):
        super().__init__()
        self.logged = []

    @property
    def tracker(self):
        return self

    def store_init_configuration(self, values):
        self.config = values

    def log(self, values, step=None, **kwargs):
        self.logged.append((values, step))


def test_wandb_keeps_one_growing_step_axis(tmp_path):
    """ wandb drops a step lower than one it has seen: epoch rows and update logs go at its own step, with the
    epoch or update as a value. """
    wandb = RecordingWandb()
    accelerator = Accelerator(cpu=True, log_with=[wandb])
    start_tracking(accelerator, tracking_args(log_with=['wandb']), tmp_path, 'run')
    log_step(accelerator, 50, {'loss': 1.5})
    log_epoch(accelerator, 0, {'train_loss': 1.25, 'lr': 0.5})
    assert wandb.logged == [({'train/loss': 1.5, 'update': 50}, None),
                            ({'epoch/train_loss': 1.25, 'epoch/lr': 0.5, 'epoch': 0}, None)]
    assert wandb.config['model'] == 'resnet10t' and 'lr' not in wandb.config


def test_no_trackers_is_a_no_op(tmp_path):
    args = tracking_args(log_with=None)
    assert tracker_names(args) is None
    accelerator = Accelerator(cpu=True, log_with=tracker_names(args))
    start_tracking(accelerator, args, tmp_path, 'run')
    log_step(accelerator, 1, {'loss': 1.0})
    log_epoch(accelerator, 0, {'train_loss': 1.0})
    assert accelerator.trackers == [] and list(tmp_path.iterdir()) == []


def test_log_wandb_is_an_alias_of_log_with_wandb():
    assert parse_args(['--log-wandb', '--log-with', 'tensorboard']).log_with == ['tensorboard', 'wandb']
    assert parse_args(['--log-wandb']).log_with == ['wandb']


@pytest.mark.parametrize('name', ['tensorboard', 'wandb', 'mlflow'])
def test_missing_tracker_package_is_one_line(name, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(tracking, 'find_spec', lambda package: None if package == name else find_spec(package))
    with pytest.raises(UsageError) as error:
        tracker_names(tracking_args(log_with=['all', name]))
    assert str(error.value) == (f'--log-with {name} needs the {name} package: pip install {name} '
                                f'(or drop --log-with {name})')


def test_all_is_passed_to_accelerate_as_is(monkeypatch):
    monkeypatch.setattr(tracking, 'find_spec', lambda package: None)  # 'all' takes whatever is installed
    assert tracker_names(tracking_args(log_with=['all'])) == ['all']


# ----------------------------------------------------------------------------------------------
# summary.csv


def test_summary_has_timm_columns_and_grows_new_ones(tmp_path):
    path = tmp_path / 'summary.csv'
    path.touch()  # an empty file gets the header, as a new one does
    write_summary(path, 0, {'loss': 2.5}, {'loss': 2.0, 'top1': 25.0}, 0.1)
    write_summary(path, 1, {'loss': 2.25}, {'loss': 1.5, 'top1': 50.0}, 0.05)
    assert path.read_text() == ('epoch,train_loss,eval_loss,eval_top1,lr\n'
                                '0,2.5,2.0,25.0,0.1\n'
                                '1,2.25,1.5,50.0,0.05\n')
    # New columns (the EMA's) rewrite the file with all of them, in the row's order; earlier rows leave them empty.
    write_summary(path, 2, {'loss': 2.0, 'skipped': 1}, {'loss': 1.25, 'top1': 75.0, 'ema_top1': 62.5}, 0.025)
    write_summary(path, 3, {'loss': 1.0}, {'loss': 1.0, 'top1': 87.5}, 0.0125)
    assert path.read_text() == ('epoch,train_loss,train_skipped,eval_loss,eval_top1,eval_ema_top1,lr\n'
                                '0,2.5,,2.0,25.0,,0.1\n'
                                '1,2.25,,1.5,50.0,,0.05\n'
                                '2,2.0,1,1.25,75.0,62.5,0.025\n'
                                '3,1.0,,1.0,87.5,,0.0125\n')
    assert [p.name for p in tmp_path.iterdir()] == ['summary.csv']


def test_summary_without_eval_or_lr_as_timm(tmp_path):
    path = tmp_path / 'summary.csv'
    write_summary(path, 0, {'loss': 2.5}, {}, None)
    assert path.read_text() == 'epoch,train_loss\n0,2.5\n'


def test_trim_summary_keeps_rows_up_to_the_epoch(tmp_path):
    path = tmp_path / 'summary.csv'
    for epoch in range(4):
        write_summary(path, epoch, {'loss': 4.0 - epoch}, {'top1': 10.0 * epoch}, 0.5)
    trim_summary(path, 1)
    assert path.read_text() == 'epoch,train_loss,eval_top1,lr\n0,4.0,0.0,0.5\n1,3.0,10.0,0.5\n'
    trim_summary(path, 1)  # nothing after epoch 1: unchanged
    assert path.read_text() == 'epoch,train_loss,eval_top1,lr\n0,4.0,0.0,0.5\n1,3.0,10.0,0.5\n'
    trim_summary(path, -1)  # a run restarted from before its first epoch keeps the header only
    assert path.read_text() == 'epoch,train_loss,eval_top1,lr\n'
    trim_summary(tmp_path / 'missing.csv', 0)
    assert [p.name for p in tmp_path.iterdir()] == ['summary.csv']


# ----------------------------------------------------------------------------------------------
# train.py through the real wandb (offline) and MLflow (a local file store) trackers


def wandb_records(path):
    """ The records of an offline run's .wandb file, parsed with wandb's own protobuf schema. The file is
    LevelDB's log format under wandb's header: 32 KiB blocks of chunks (CRC, length, type: 1 whole record,
    2/3/4 its first, middle, last part). """
    import struct
    from wandb.proto import wandb_internal_pb2
    data = path.read_bytes()
    assert data[:4] == b':W&B', data[:7]
    pos, block, parts = 7, 32768, b''
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack('<IHB', data[pos:pos + 7])
        if kind == 0:  # zeros to the end of the block
            pos += block - pos % block
            continue
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            parts = b''
            yield record


@pytest.fixture(scope='module')
def tracked_run(tmp_path_factory):
    """ Two epochs of DG-Mix with --log-with all (tensorboard, wandb, mlflow: every installed tracker), wandb
    offline and MLflow in a file store, both under a temporary folder; nothing may reach a server. """
    from helpers import SMALL_RUN, run_train_py
    tmp = tmp_path_factory.mktemp('tracked')
    env = {'WANDB_MODE': 'offline', 'WANDB_DIR': str(tmp / 'wandb'), 'WANDB_CONFIG_DIR': str(tmp / 'wandb-config'),
           'WANDB_CACHE_DIR': str(tmp / 'wandb-cache'), 'WANDB_DATA_DIR': str(tmp / 'wandb-data'),
           'WANDB_CONSOLE': 'off', 'MLFLOW_TRACKING_URI': f'file:{tmp / "mlruns"}',
           'MLFLOW_ALLOW_FILE_STORE': 'true'}  # MLflow 3 refuses file stores unless told
    (tmp / 'wandb').mkdir()
    proc = run_train_py(tmp / 'out', *SMALL_RUN, '--epochs', '2', '--lr', '0.05', '--warmup-epochs', '0',
                        '--opt', 'gmix_sam', '--mixup', '0.8', '--mixup-mode', 'dg', '--log-with', 'all',
                        '--log-interval', '2', '--experiment', 'run', **env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_dir = tmp / 'out' / 'run'
    with open(run_dir / 'summary.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    args = yaml.safe_load((run_dir / 'args.yaml').read_text())
    config = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in args.items() if v is not None}
    return Namespace(tmp=tmp, run_dir=run_dir, rows=rows, config=config)


UPDATES = [2, 4, 6, 8, 10, 12]  # 6 updates per epoch, logged every 2
STEP_VALUES = ['train/loss', 'train/lr', 'train/skipped', 'train/flagged_two_class']


def read_wandb(tracked_run):
    import json
    [run_file] = (tracked_run.tmp / 'wandb').glob('wandb/offline-run-*/run-*.wandb')
    records = list(wandb_records(run_file))
    [run] = [r.run for r in records if r.WhichOneof('record_type') == 'run']
    config = {}
    for r in records:
        if r.WhichOneof('record_type') == 'config':
            config.update({item.key or '/'.join(item.nested_key): json.loads(item.value_json)
                           for item in r.config.update})
    history = [{item.key or '/'.join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
               for r in records if r.WhichOneof('record_type') == 'history']
    return run, config, history


def test_train_py_logs_to_wandb_offline(tracked_run):
    """ wandb: the run named after the run folder in project timm-gmix, the arguments as its config, every
    summary.csv column per epoch (with `epoch` as a value) and the progress every --log-interval updates (with
    `update`), all at wandb's own growing step. """
    run, config, history = read_wandb(tracked_run)
    assert (run.display_name, run.project) == ('run', 'timm-gmix')
    config.pop('_wandb', None)
    assert config == tracked_run.config
    epochs = [h for h in history if 'epoch' in h]
    assert [h['epoch'] for h in epochs] == [int(r['epoch']) for r in tracked_run.rows] == [0, 1]
    for h, row in zip(epochs, tracked_run.rows):
        assert {k: h[f'epoch/{k}'] for k in row if k != 'epoch'} == {k: float(v) for k, v in row.items() if k != 'epoch'}
    steps = [h for h in history if 'update' in h]
    assert [h['update'] for h in steps] == UPDATES
    assert all(set(STEP_VALUES) <= set(h) for h in steps)
    assert [h['_step'] for h in history] == list(range(len(history)))  # one growing axis: nothing dropped


def test_train_py_logs_to_mlflow_file_store(tracked_run, monkeypatch):
    """ MLflow: a finished run named after the run folder in experiment timm-gmix, the arguments as params (as
    text), every summary.csv column per epoch at step = epoch, the progress at step = update; the same values
    as wandb's. """
    from mlflow.tracking import MlflowClient
    monkeypatch.setenv('MLFLOW_ALLOW_FILE_STORE', 'true')
    client = MlflowClient(f'file:{tracked_run.tmp / "mlruns"}')
    experiment = client.get_experiment_by_name('timm-gmix')
    [run] = client.search_runs([experiment.experiment_id])
    assert (run.info.run_name, run.info.status) == ('run', 'FINISHED')
    assert run.data.params == {k: str(v) for k, v in tracked_run.config.items()}
    for column in tracked_run.rows[0]:
        if column != 'epoch':
            logged = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, f'epoch/{column}')]
            assert logged == [(int(r['epoch']), float(r[column])) for r in tracked_run.rows], column
    _, _, history = read_wandb(tracked_run)
    wandb_steps = [h for h in history if 'update' in h]
    for name in STEP_VALUES:
        logged = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, name))
        assert logged == [(h['update'], h[name]) for h in wandb_steps], name


def test_log_with_all_includes_tensorboard(tracked_run):
    """ --log-with all: TensorBoard's event files in the run folder hold the same progress. """
    scalars = read_events(tracked_run.run_dir / 'timm-gmix')
    assert [e.step for e in scalars.Scalars('train/loss')] == UPDATES
    assert len(scalars.Scalars('epoch/eval_top1')) == 2


def test_mlflow_without_a_store_it_can_open_is_one_line(monkeypatch):
    """ MLflow 3 logs to sqlite:///mlflow.db unless MLFLOW_TRACKING_URI says otherwise, and sqlite needs SQLAlchemy,
    which mlflow-skinny does not bring: without it, one line before training instead of MLflow's traceback after
    the model is built. """
    monkeypatch.delenv('MLFLOW_TRACKING_URI', raising=False)
    args = Namespace(log_with=['mlflow'])
    monkeypatch.setattr(tracking, 'find_spec', lambda name: None if name == 'sqlalchemy' else object())
    with pytest.raises(UsageError, match='needs the full mlflow package: pip install mlflow, or set MLFLOW_TRACKING_URI'):
        tracker_names(args)
    monkeypatch.setenv('MLFLOW_TRACKING_URI', 'file:/tmp/mlruns')
    assert tracker_names(args) == ['mlflow']
