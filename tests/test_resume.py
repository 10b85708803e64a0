""" Checkpoints in train.py: an interrupted run resumes as if never stopped, an interrupted save loses
nothing, a corrupt checkpoint is one clear line, and non-finite steps are skipped, counted and stop
the run when too many come in a row. """
import hashlib
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from accelerate import Accelerator
from safetensors.torch import load_file

from helpers import DG_MIX, SMALL_RUN, assert_same, read_summary, train_main, train_module
from timm_gmix.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from timm_gmix.config import UsageError, main_guard

# DG-Mix (numpy's RNG draws lam), random crops and flips (torch's RNG), warmup then cosine (the
# scheduler's state), EMA: everything a resume has to restore.
RUN = [*SMALL_RUN, *DG_MIX, '--epochs', '3', '--sched', 'cosine', '--warmup-epochs', '1', '--lr', '0.05',
       '--model-ema']
STEPS_PER_EPOCH = 6  # 108 images in batches of 16, the last one dropped


class Interrupted(Exception):
    """ Stands in for the process being killed at that point. """


def file_digests(folder) -> dict:
    """ SHA-256 of every file under `folder`, by relative path. """
    folder = Path(folder)
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob('*')) if p.is_file()}


def checkpoint_contents(folder) -> dict:
    """ Every file of an Accelerate checkpoint, loaded: weights, optimizer, RNG states, scheduler, train
    state and EMA (the objects registered for checkpointing). """
    return {p.name: load_file(p) if p.suffix == '.safetensors' else torch.load(p, weights_only=False)
            for p in sorted(Path(folder).iterdir())}


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp('uninterrupted')
    train_main([*RUN, '--output', output, '--experiment', 'run'])
    return output / 'run'


# ----------------------------------------------------------------------------------------------
# Exact resume


def stop_after_saving(monkeypatch, epoch):
    """ The run is stopped right after the checkpoint of `epoch` is complete. """
    train = train_module()
    save = train.save_checkpoint

    def save_then_stop(accelerator, run_dir, saved_epoch, *args, **kwargs):
        path = save(accelerator, run_dir, saved_epoch, *args, **kwargs)
        if saved_epoch == epoch:
            raise Interrupted(f'stopped after saving epoch {epoch}')
        return path

    monkeypatch.setattr(train, 'save_checkpoint', save_then_stop)


def kill_saving(monkeypatch, epoch):
    """ The run is killed while it writes the checkpoint of `epoch`: its weights file is half written. """
    save_state = Accelerator.save_state

    def save_state_killed(self, output_dir=None, **kwargs):
        location = save_state(self, output_dir, **kwargs)
        if Path(output_dir).name == f'checkpoint-{epoch}.tmp':
            weights = Path(output_dir) / 'model.safetensors'
            weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
            raise Interrupted(f'killed while saving epoch {epoch}')
        return location

    monkeypatch.setattr(Accelerator, 'save_state', save_state_killed)


# name: (how the first run ends, the summary rows it leaves)
INTERRUPTIONS = {
    'stopped after epoch 0': (lambda monkeypatch: stop_after_saving(monkeypatch, 0), [0]),
    'killed while saving epoch 1': (lambda monkeypatch: kill_saving(monkeypatch, 1), [0, 1]),
}


def test_uninterrupted_schedule(uninterrupted):
    """ Warmup for epoch 0, then cosine over 3 epochs: the LR logged after each epoch is the next one's. """
    rows = read_summary(uninterrupted)
    assert [int(row['epoch']) for row in rows] == [0, 1, 2]
    expected = [0.05 * (1 + math.cos(math.pi * t / 3)) / 2 for t in (1, 2)] + [0.0]
    assert [float(row['lr']) for row in rows] == pytest.approx(expected, abs=1e-12)
    assert {row['train_flagged_frac'] for row in rows} == {'0.5'}


@pytest.mark.parametrize('interruption', sorted(INTERRUPTIONS))
def test_resume_continues_as_if_never_stopped(interruption, uninterrupted, tmp_path, monkeypatch):
    interrupt, rows_left = INTERRUPTIONS[interruption]
    run_dir = tmp_path / 'run'
    argv = [*RUN, '--output', tmp_path, '--experiment', 'run']
    with monkeypatch.context() as patch:
        interrupt(patch)
        with pytest.raises(Interrupted):
            train_main(argv)
    assert list_checkpoints(run_dir) == [run_dir / 'checkpoint-0']
    assert [int(row['epoch']) for row in read_summary(run_dir)] == rows_left

    train_main([*argv, '--resume', run_dir])
    # summary.csv was trimmed to the checkpoint and continued: the same rows, values and LRs.
    assert read_summary(run_dir) == read_summary(uninterrupted)
    assert list_checkpoints(run_dir) == [run_dir / 'checkpoint-2']
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(p.name for p in uninterrupted.iterdir())
    # Weights, optimizer (momentum buffers, LR), scheduler, train state, EMA and RNG states, bit for bit.
    assert_same(checkpoint_contents(run_dir / 'checkpoint-2'), checkpoint_contents(uninterrupted / 'checkpoint-2'))
    assert_same(load_file(run_dir / 'model' / 'model.safetensors'),
                load_file(uninterrupted / 'model' / 'model.safetensors'))


# ----------------------------------------------------------------------------------------------
# Interrupted saves and corrupt checkpoints


class Counter:
    """ A stateful object registered for checkpointing, like train.py's TrainState. """

    def __init__(self):
        self.value = 0

    def state_dict(self):
        return {'value': self.value}

    def load_state_dict(self, state):
        self.value = state['value']


@pytest.fixture
def prepared(accelerator):
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    model, opt = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    counter = Counter()
    accelerator.register_for_checkpointing(counter)
    return accelerator, model, counter


def test_interrupted_save_keeps_the_previous_checkpoint(prepared, tmp_path, monkeypatch):
    accelerator, model, counter = prepared
    counter.value = 1
    save_checkpoint(accelerator, tmp_path, 0)
    saved_weights, saved_files = model.weight.detach().clone(), file_digests(tmp_path / 'checkpoint-0')

    with torch.no_grad():
        model.weight.add_(1.0)
    counter.value = 2
    with monkeypatch.context() as patch:
        kill_saving(patch, 1)
        with pytest.raises(Interrupted):
            save_checkpoint(accelerator, tmp_path, 1)
    assert list_checkpoints(tmp_path) == [tmp_path / 'checkpoint-0']
    assert file_digests(tmp_path / 'checkpoint-0') == saved_files

    assert load_checkpoint(accelerator, tmp_path) == tmp_path / 'checkpoint-0'
    assert torch.equal(model.weight, saved_weights) and counter.value == 1

    # The next complete save replaces the half-written one and drops the older checkpoint.
    save_checkpoint(accelerator, tmp_path, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['checkpoint-1']


def truncate(path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


DAMAGED_FILES = ['model.safetensors', 'optimizer.bin']


@pytest.mark.parametrize('damaged', DAMAGED_FILES)
def test_corrupt_checkpoint_is_a_usage_error(damaged, prepared, tmp_path):
    accelerator, model, _ = prepared
    checkpoint = save_checkpoint(accelerator, tmp_path, 0)
    truncate(checkpoint / damaged)
    with pytest.raises(UsageError) as error:
        load_checkpoint(accelerator, tmp_path)
    message = str(error.value)
    assert '\n' not in message and 'corrupt' in message and str(checkpoint) in message


@pytest.mark.parametrize('damaged', DAMAGED_FILES)
def test_train_py_resume_from_corrupt_checkpoint(damaged, uninterrupted, tmp_path, capsys):
    """ One line on stderr, exit status 2, nothing written or removed. """
    run_dir = tmp_path / 'run'
    shutil.copytree(uninterrupted, run_dir)
    truncate(run_dir / 'checkpoint-2' / damaged)
    before = file_digests(run_dir)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main_guard(lambda: train_main([*RUN, '--output', tmp_path, '--experiment', 'run', '--resume', run_dir]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith('error: ') and 'corrupt' in err, err
    assert file_digests(run_dir) == before


# ----------------------------------------------------------------------------------------------
# Non-finite steps


def poison_steps(monkeypatch, steps):
    """ Make the batches of the given steps (counted from 1 over the run) all NaN. """
    train = train_module()
    step, calls = train.gmix_step, [0]

    def poisoned(model, optimizer, inputs, *args, **kwargs):
        calls[0] += 1
        if calls[0] in steps:
            inputs = torch.full_like(inputs, float('nan'))
        return step(model, optimizer, inputs, *args, **kwargs)

    monkeypatch.setattr(train, 'gmix_step', poisoned)


def test_non_finite_steps_are_skipped_counted_and_stop_the_run(tmp_path, monkeypatch, capsys):
    """ --max-bad-steps 2: two bad steps apart in epoch 1 are skipped and counted; two in a row at the
    start of epoch 2 stop the run with the checkpoint of epoch 1 intact, and the run resumes from it. """
    run_dir = tmp_path / 'run'
    argv = [*RUN, '--max-bad-steps', '2', '--output', tmp_path, '--experiment', 'run']
    epoch1, epoch2 = STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH
    digests = {}
    train = train_module()
    save = train.save_checkpoint

    def save_and_record(accelerator, folder, epoch, *args, **kwargs):
        path = save(accelerator, folder, epoch, *args, **kwargs)
        digests[epoch] = file_digests(path)
        return path

    with monkeypatch.context() as patch:
        poison_steps(patch, {epoch1 + 2, epoch1 + 4, epoch2 + 1, epoch2 + 2})
        patch.setattr(train, 'save_checkpoint', save_and_record)
        with pytest.raises(SystemExit, match='2 steps in a row had a non-finite loss or gradient'):
            train_main(argv)
    rows = read_summary(run_dir)
    assert [(row['epoch'], row['train_skipped']) for row in rows] == [('0', '0'), ('1', '2')]
    assert all(math.isfinite(float(row['train_loss'])) for row in rows)
    assert list_checkpoints(run_dir) == [run_dir / 'checkpoint-1']
    assert file_digests(run_dir / 'checkpoint-1') == digests[1]

    capsys.readouterr()
    train_main([*argv, '--resume', run_dir])
    assert 'resumed from' in capsys.readouterr().out
    rows = read_summary(run_dir)
    assert [(row['epoch'], row['train_skipped']) for row in rows] == [('0', '0'), ('1', '2'), ('2', '0')]
