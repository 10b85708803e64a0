""" Checkpoints in train.py: an interrupted run (between epochs, mid-epoch, during a save or the final
export) resumes as if never stopped, with worker processes; a damaged, incomplete or mismatched checkpoint
is one clear line; non-finite steps are skipped, counted and stop the run with the truth about what is on
disk; the best checkpoints are kept as timm keeps them. """
import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
from accelerate import Accelerator
from safetensors.torch import load_file

from helpers import DG_MIX, SMALL_RUN, assert_same, read_summary, train_main, train_module
from timm_gmix.training.checkpoint import LAST, RECOVERY, RunLock, load_state, newest_state, save_state
from timm_gmix.training.errors import main_guard

# DG-Mix (numpy's RNG draws lam), random crops and flips drawn in 2 worker processes, random erasing on the
# device (the main process's RNG), warmup then cosine (the scheduler's state), EMA, recovery points every 2
# updates, a full step every 3 with LookSAM's reused direction (SAM's update count and g_v): everything a resume
# has to restore.
RUN = [*SMALL_RUN, *DG_MIX, '--workers', '2', '--epochs', '3', '--sched', 'cosine', '--warmup-epochs', '1',
       '--lr', '0.05', '--model-ema', '--recovery-interval', '2', '--sam-interval', '3', '--sam-reuse', '0.5',
       '--reprob', '0.25']
STEPS_PER_EPOCH = 6  # 108 images in batches of 16, the last one dropped
META = {'model': 'resnet10t', 'num_classes': 10, 'opt': 'gmix_sam', 'sam_base': 'sgd'}


class Interrupted(Exception):
    """ Stands in for the process being killed at that point. """


def file_digests(folder) -> dict:
    """ SHA-256 of every file under `folder`, by relative path. """
    folder = Path(folder)
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob('*')) if p.is_file()}


def checkpoint_contents(folder) -> dict:
    """ Every file of a training state, loaded: weights, optimizer, RNG states, scheduler, train state, EMA. """
    return {p.name: load_file(p) if p.suffix == '.safetensors' else
            p.read_text() if p.suffix == '.json' else torch.load(p, weights_only=False)
            for p in sorted(Path(folder).iterdir())}


def read_manifest_position(folder):
    return json.loads((Path(folder) / 'checkpoint.json').read_text())['position']


def run_files(run_dir) -> list:
    return sorted(p.name for p in Path(run_dir).iterdir() if p.name != '.lock')


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp('uninterrupted')
    train_main([*RUN, '--output', output, '--experiment', 'run'])
    return output / 'run'


# ----------------------------------------------------------------------------------------------
# Exact resume


def stop_after_saving(monkeypatch, folder, position):
    """ The run is stopped right after the state `folder` (last or recovery) at `position` is complete. """
    train = train_module()
    save = train.save_state

    def save_then_stop(accelerator, path, meta):
        saved = save(accelerator, path, meta)
        if Path(path).name == folder and tuple(meta['position']) == position:
            raise Interrupted(f'stopped after saving {folder} at {position}')
        return saved

    monkeypatch.setattr(train, 'save_state', save_then_stop)


def kill_saving(monkeypatch, position):
    """ The run is killed while it writes last/ at `position`: its weights file is half written. """
    train = train_module()
    save = train.save_state

    def save_killed(accelerator, path, meta):
        if Path(path).name == LAST and tuple(meta['position']) == position:
            accelerator.save_state(str(path) + '.tmp')
            weights = Path(str(path) + '.tmp') / 'model.safetensors'
            weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
            raise Interrupted(f'killed while saving {position}')
        return save(accelerator, path, meta)

    monkeypatch.setattr(train, 'save_state', save_killed)


def kill_exporting(monkeypatch):
    """ The run is killed while it exports the final model/ (after every epoch was checkpointed). """
    train = train_module()
    export = train.export_model

    def export_killed(model, folder, *args, **kwargs):
        if Path(folder).name == 'model':
            raise Interrupted('killed while exporting')
        return export(model, folder, *args, **kwargs)

    monkeypatch.setattr(train, 'export_model', export_killed)


# name: (how the first run ends, the summary rows it leaves)
INTERRUPTIONS = {
    'stopped after epoch 0': (lambda patch: stop_after_saving(patch, LAST, (1, 0)), [0]),
    'stopped mid-epoch 1': (lambda patch: stop_after_saving(patch, RECOVERY, (1, 4)), [0]),
    'killed while saving epoch 1': (lambda patch: kill_saving(patch, (2, 0)), [0, 1]),
    'killed while exporting': (kill_exporting, [0, 1, 2]),
}


def test_uninterrupted_schedule_and_folder(uninterrupted):
    """ Warmup for epoch 0, then cosine over 3 epochs: the LR logged after each epoch is the next one's.
    The recovery point of the last epoch is gone once last/ supersedes it. """
    rows = read_summary(uninterrupted)
    assert [int(row['epoch']) for row in rows] == [0, 1, 2]
    expected = [0.05 * (1 + math.cos(math.pi * t / 3)) / 2 for t in (1, 2)] + [0.0]
    assert [float(row['lr']) for row in rows] == pytest.approx(expected, abs=1e-12)
    assert {row['train_flagged_frac'] for row in rows} == {'0.5'}
    assert run_files(uninterrupted) == sorted(['args.yaml', 'summary.csv', 'last', 'checkpoint-0', 'checkpoint-1',
                                               'checkpoint-2', 'model', 'model_best', 'model_best.safetensors'])


@pytest.mark.parametrize('interruption', sorted(INTERRUPTIONS))
def test_resume_continues_as_if_never_stopped(interruption, uninterrupted, tmp_path, monkeypatch, capsys):
    interrupt, rows_left = INTERRUPTIONS[interruption]
    run_dir = tmp_path / 'run'
    argv = [*RUN, '--output', tmp_path, '--experiment', 'run']
    with monkeypatch.context() as patch:
        interrupt(patch)
        with pytest.raises(Interrupted):
            train_main(argv)
    assert [int(row['epoch']) for row in read_summary(run_dir)] == rows_left

    capsys.readouterr()
    train_main([*argv[:-4], '--resume', run_dir])  # the same command, --resume instead of --output/--experiment
    assert 'resumed from' in capsys.readouterr().out
    # summary.csv was trimmed to the checkpoint and continued: the same rows, values and LRs.
    assert read_summary(run_dir) == read_summary(uninterrupted)
    assert run_files(run_dir) == run_files(uninterrupted)
    # Weights, optimizer (momentum buffers, LR), scheduler, train state, EMA and RNG states, bit for bit.
    assert_same(checkpoint_contents(run_dir / LAST), checkpoint_contents(uninterrupted / LAST))
    for folder in ('model', 'model_best'):
        assert_same(load_file(run_dir / folder / 'model.safetensors'),
                    load_file(uninterrupted / folder / 'model.safetensors'))


def test_a_finished_run_is_not_trained_again(uninterrupted, tmp_path, capsys):
    run_dir = tmp_path / 'run'
    shutil.copytree(uninterrupted, run_dir)
    before = file_digests(run_dir)
    with pytest.raises(SystemExit) as exit_info:
        main_guard(lambda: train_main([*RUN, '--resume', run_dir]))
    assert exit_info.value.code == 2
    assert 'already trained all 3 epochs' in capsys.readouterr().err
    assert file_digests(run_dir) == before


# ----------------------------------------------------------------------------------------------
# Run folders


def test_runs_never_share_a_folder(tmp_path, capsys):
    """ Without --experiment every run gets a new timestamped folder; an --experiment that holds a run, or a
    run folder in use by another process, is one line and nothing in it changes. """
    argv = [*SMALL_RUN, '--opt', 'sgd', '--epochs', '1', '--output', tmp_path]
    train_main(argv)
    train_main(argv)
    first, second = sorted(p for p in tmp_path.iterdir())
    assert first.name.endswith('-resnet10t-32') and second.name.startswith(first.name[:8])
    assert read_summary(first) and read_summary(second) and first != second

    before = file_digests(first)
    for argv_more, expected in ((['--experiment', first.name], 'already holds a run'),):
        with pytest.raises(SystemExit):
            main_guard(lambda: train_main([*argv, *argv_more]))
        assert expected in capsys.readouterr().err
    lock = RunLock(first)
    try:
        with pytest.raises(SystemExit):
            main_guard(lambda: train_main([*argv[:-2], '--epochs', '2', '--resume', first]))
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and 'in use' in err, err
    finally:
        lock.release()
    assert file_digests(first) == before


def test_resume_from_an_older_checkpoint_starts_a_new_folder(uninterrupted, tmp_path):
    """ Rewinding to checkpoint-0 of a finished run leaves that run as it was and trains epochs 1-2 anew in a
    new folder, which then holds the uninterrupted run's rows. """
    source = tmp_path / 'source'
    shutil.copytree(uninterrupted, source)
    before = file_digests(source)
    train_main([*RUN, '--output', tmp_path, '--resume', source / 'checkpoint-0'])
    assert file_digests(source) == before
    [rewound] = [p for p in tmp_path.iterdir() if p.name != 'source']
    assert read_summary(rewound) == read_summary(uninterrupted)


# ----------------------------------------------------------------------------------------------
# Checkpoints as timm keeps them


def test_checkpoint_hist_keeps_the_best_and_model_best_loads_in_timm(tmp_path):
    run_dir = tmp_path / 'run'
    train_main([*SMALL_RUN, '--opt', 'sgd', '--epochs', '3', '--lr', '0.05', '--checkpoint-hist', '2',
                '--output', tmp_path, '--experiment', 'run'])
    rows = read_summary(run_dir)
    ranked = sorted(rows, key=lambda r: (-float(r['eval_top1']), int(r['epoch'])))
    kept = sorted(int(r['epoch']) for r in ranked[:2])
    assert sorted(p.name for p in run_dir.glob('checkpoint-*')) == [f'checkpoint-{e}' for e in kept]
    best = int(ranked[0]['epoch'])
    weights = load_file(run_dir / f'checkpoint-{best}' / 'model.safetensors')
    model = timm.create_model('resnet10t', num_classes=10)
    timm.models.load_checkpoint(model, str(run_dir / 'model_best.safetensors'))
    assert_same({k: v for k, v in model.state_dict().items()}, weights)
    exported = timm.create_model(f'local-dir:{run_dir / "model_best"}', pretrained=True)
    assert_same(exported.state_dict(), weights)
    # The kept checkpoints are hard links to what last/ held, not second copies.
    assert (run_dir / f'checkpoint-{int(rows[-1]["epoch"])}').exists() == (int(rows[-1]['epoch']) in kept)


# ----------------------------------------------------------------------------------------------
# Interrupted saves, damaged, incomplete and mismatched checkpoints


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


def test_interrupted_save_keeps_the_previous_state(prepared, tmp_path, monkeypatch):
    accelerator, model, counter = prepared
    counter.value = 1
    save_state(accelerator, tmp_path / LAST, {**META, 'position': (1, 0)})
    saved_weights, saved_files = model.weight.detach().clone(), file_digests(tmp_path / LAST)

    with torch.no_grad():
        model.weight.add_(1.0)
    counter.value = 2
    save = Accelerator.save_state

    def killed(self, output_dir=None, **kwargs):
        save(self, output_dir, **kwargs)
        raise Interrupted('killed after writing the temporary folder, before verifying it')

    with monkeypatch.context() as patch:
        patch.setattr(Accelerator, 'save_state', killed)
        with pytest.raises(Interrupted):
            save_state(accelerator, tmp_path / LAST, {**META, 'position': (2, 0)})
    assert file_digests(tmp_path / LAST) == saved_files
    load_state(accelerator, tmp_path / LAST, META)
    assert torch.equal(model.weight, saved_weights) and counter.value == 1


def truncate(path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


# name: (what is done to the copied run's last/, the words of the one line)
DAMAGE = {
    'truncated weights': (lambda last: truncate(last / 'model.safetensors'), 'model.safetensors'),
    'truncated optimizer': (lambda last: truncate(last / 'optimizer.bin'), 'optimizer.bin'),
    'missing RNG state': (lambda last: (last / 'random_states_0.pkl').unlink(), 'random_states_0.pkl is missing'),
    'missing manifest': (lambda last: (last / 'checkpoint.json').unlink(), 'checkpoint.json is missing'),
}


@pytest.mark.parametrize('damage', sorted(DAMAGE))
def test_resume_from_a_damaged_checkpoint_is_one_line(damage, uninterrupted, tmp_path, capsys):
    """ One line on stderr naming the file, exit status 2, nothing written or removed. """
    run_dir = tmp_path / 'run'
    shutil.copytree(uninterrupted, run_dir)
    shutil.rmtree(run_dir / 'model')  # so that resuming would export, not refuse a finished run
    do, expected = DAMAGE[damage]
    do(run_dir / LAST)
    before = file_digests(run_dir)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main_guard(lambda: train_main([*RUN, '--resume', run_dir]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith('error: ') and expected in err, err
    assert file_digests(run_dir) == before


@pytest.mark.parametrize('flags, expected', [
    (['--model', 'resnet14t'], '--model resnet10t, not resnet14t'),
    (['--opt', 'sgd', '--mixup-mode', 'batch', '--sam-interval', '1', '--sam-reuse', '0'], '--opt gmix_sam, not sgd'),
])
def test_resume_with_another_model_or_optimizer_says_so(flags, expected, uninterrupted, tmp_path, capsys):
    run_dir = tmp_path / 'run'
    shutil.copytree(uninterrupted, run_dir)
    shutil.rmtree(run_dir / 'model')
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main_guard(lambda: train_main([*RUN, *flags, '--resume', run_dir]))
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err


# ----------------------------------------------------------------------------------------------
# Non-finite steps and divergence


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
    start of epoch 2 stop the run, which says that last/ of epoch 1 is intact, and it is; the run resumes. """
    run_dir = tmp_path / 'run'
    argv = [*RUN, '--max-bad-steps', '2', '--recovery-interval', '0', '--output', tmp_path, '--experiment', 'run']
    epoch1, epoch2 = STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH
    with monkeypatch.context() as patch:
        poison_steps(patch, {epoch1 + 2, epoch1 + 4, epoch2 + 1, epoch2 + 2})
        with pytest.raises(SystemExit, match=f'2 steps in a row had a non-finite .* in epoch 3; '
                                             f'{run_dir / LAST} \\(after epoch 2\\) is intact'):
            train_main(argv)
    rows = read_summary(run_dir)
    assert [(row['epoch'], row['train_skipped']) for row in rows] == [('0', '0'), ('1', '2')]
    assert all(math.isfinite(float(row['train_loss'])) for row in rows)
    assert read_manifest_position(run_dir / LAST) == [2, 0]

    capsys.readouterr()
    train_main([*argv[:-4], '--resume', run_dir])
    assert 'resumed from' in capsys.readouterr().out
    rows = read_summary(run_dir)
    assert [(row['epoch'], row['train_skipped']) for row in rows] == [('0', '0'), ('1', '2'), ('2', '0')]


def test_divergence_never_replaces_a_good_checkpoint(tmp_path):
    """ lr 1e6 after a warmup epoch: the steps that would make the weights non-finite are rolled back and
    counted, the run stops, and every state on disk is finite. """
    run_dir = tmp_path / 'run'
    with pytest.raises(SystemExit) as stop:
        train_main([*SMALL_RUN, '--opt', 'sgd', '--epochs', '3', '--warmup-epochs', '1', '--lr', '1e6',
                    '--output', tmp_path, '--experiment', 'run'])
    message = str(stop.value)
    state = newest_state(run_dir)
    assert (f'{state} (after epoch 1) is intact' if state else 'no checkpoint was written yet') in message
    for weights in run_dir.rglob('*.safetensors'):
        assert all(torch.isfinite(t).all() for t in load_file(weights).values()), weights


# ----------------------------------------------------------------------------------------------
# The command line decides on resume


def schedule(lr, sched='cosine', epochs=10):
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    optimizer = timm.optim.create_optimizer_v2(model, opt='gmix_sam', lr=lr, momentum=0.9, weight_decay=1e-4)
    scheduler, _ = timm.scheduler.create_scheduler_v2(optimizer, sched=sched, num_epochs=epochs, warmup_epochs=0,
                                                     patience_epochs=0, decay_rate=0.5)
    return optimizer, scheduler


@pytest.mark.filterwarnings('ignore:PlateauLRScheduler is deprecated')
@pytest.mark.parametrize('new_lr', [0.1, 0.02])
def test_a_resumed_schedule_is_the_command_lines(new_lr):
    """ Cosine: the loaded schedule and group values give way to the command line's, stepped to the position.
    Plateau: the lr its metrics reduced to is kept, unless --lr changed. """
    from timm_gmix.training.resume import CommandLineSettings, step_to
    saved_opt, saved_sched = schedule(0.1, epochs=10)
    for group in saved_opt.param_groups:
        group['weight_decay'] = 0.5  # changed by hand: the command line's 1e-4 must come back
    fresh_opt, fresh_sched = schedule(new_lr, epochs=20)
    settings = CommandLineSettings(fresh_opt, fresh_sched)
    fresh_opt.load_state_dict(saved_opt.state_dict())
    fresh_sched.load_state_dict(saved_sched.state_dict())
    settings.apply(fresh_opt, fresh_sched, lr_changed=new_lr != 0.1)
    step_to(fresh_sched, 5, 0)
    expected = new_lr * (1 + math.cos(math.pi * 5 / 20)) / 2
    assert [g['lr'] for g in fresh_opt.param_groups] == pytest.approx([expected] * len(fresh_opt.param_groups))
    assert {g['weight_decay'] for g in fresh_opt.param_groups} <= {0.0, 1e-4}

    saved_opt, saved_sched = schedule(0.1, sched='plateau')
    for metric in (1.0, 1.0, 1.0):  # no improvement: patience 0 halves the lr
        saved_sched.step(1, metric)
    reduced = saved_opt.param_groups[0]['lr']
    assert reduced < 0.1
    fresh_opt, fresh_sched = schedule(new_lr, sched='plateau')
    settings = CommandLineSettings(fresh_opt, fresh_sched)
    fresh_opt.load_state_dict(saved_opt.state_dict())
    fresh_sched.load_state_dict(saved_sched.state_dict())
    settings.apply(fresh_opt, fresh_sched, lr_changed=new_lr != 0.1)
    step_to(fresh_sched, 3, 0)
    assert fresh_opt.param_groups[0]['lr'] == (reduced if new_lr == 0.1 else new_lr)
