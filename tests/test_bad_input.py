""" Bad input and faults, in tables; to add a case, add a row.

BAD_INPUT: a train.py command line (and, where needed, a file it names) that must stop before training with
    exit status 2 and one line on stderr saying what is wrong and how to fix it.
LIBRARY: a call of the library (GMixup, SAM, gmix_step) with a bad argument, or SAM used where it cannot
    work: one clear exception at the call.
CONTINUING: a run continued, extended, recovered or cut short as a user does it, command after command on one
    run folder: training longer, a new lr, a divergence, a run stopped before its first checkpoint,
    --channels-last exports, a disk that cannot be written.

Bad data (columns, classes, unreadable images) lives in tests/test_data.py, damaged checkpoints and exact
resume in tests/test_resume.py.
"""
import errno
import json
import math
import os
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.optim import create_optimizer_v2

from helpers import ROOT, SMALL_RUN, assert_bad_input, read_summary, run_train_py, subprocess_env, train_main, \
    train_module
from timm_gmix import GMixup, gmix_step
from timm_gmix.training import export
from timm_gmix.training.errors import main_guard

FAST = [*SMALL_RUN, '--epochs', '1', '--hflip', '0', '--lr', '0.05', '--warmup-epochs', '0']
MIX = ['--mixup', '0.8']
NO_MIX = ['--opt', 'sgd', '--mixup', '0', '--mixup-mode', 'batch']  # the digits preset mixes (G-Mix)


def yaml_file(text):
    """ A -c preset holding `text` (on the built-in digits). """
    def make(tmp_path):
        path = tmp_path / 'preset.yaml'
        path.write_text('dataset: digits\n' + text)
        return ['-c', path]
    return make


# name: (flags, or a function of tmp_path returning flags; words the one line must hold)
BAD_INPUT = {
    # optimizer and method
    'unknown optimizer': (['--opt', 'sgdd'], 'unknown optimizer', 'sgdd'),
    'unknown SAM base': (['--sam-base', 'nope'], 'unknown optimizer', '--sam-base'),
    'SAM around SAM': (['--opt', 'gmix_sam', '--sam-base', 'gmix_sam'], '--sam-base', 'plain optimizer'),
    'unknown mixup mode': ([*MIX, '--mixup-mode', 'foo'], 'foo', 'choose from'),
    'bg without SAM': (['--opt', 'sgd', *MIX, '--mixup-mode', 'bg'], '--opt gmix_sam'),
    'g without mixing': (['--opt', 'gmix_sam', '--mixup', '0', '--mixup-mode', 'g'], '--mixup'),
    'odd batch with mixing': ([*MIX, '-b', '15'], 'even', '15'),
    'rho zero': (['--rho', '0'], '--rho'),
    'rho negative': (['--rho', '-0.1'], '--rho'),
    'rho nan': (['--rho', 'nan'], '--rho'),
    'SAM interval without SAM': (['--opt', 'sgd', '--sam-interval', '4'], '--sam-interval', '--opt gmix_sam'),
    'SAM interval zero': (['--opt', 'gmix_sam', '--sam-interval', '0'], '--sam-interval', 'at least 1'),
    'reuse on every step': (['--opt', 'gmix_sam', '--sam-reuse', '0.7'], '--sam-reuse', '--sam-interval K > 1'),
    'reuse negative': (['--opt', 'gmix_sam', '--sam-interval', '4', '--sam-reuse', '-1'], '--sam-reuse', 'positive'),
    'reuse with momentum': (['--opt', 'gmix_sam', '--sam-interval', '4', '--sam-reuse', '0.7', '--sam-perturb',
                             'momentum'], '--sam-reuse', '--sam-perturb momentum'),
    'momentum perturbation without momentum': (['--opt', 'gmix_sam', '--sam-base', 'adagrad', '--sam-perturb',
                                                'momentum'], 'keeps momentum', 'adagrad'),
    'unknown perturbation': (['--opt', 'gmix_sam', '--sam-perturb', 'random'], '--sam-perturb', 'random'),
    'gamma above 1': ([*MIX, '--opt', 'gmix_sam', '--mixup-mode', 'dg', '--gmix-ratio', '1.5'], '--gmix-ratio'),
    'model kwargs that a flag sets': (['--model-kwargs', 'global_pool=avg'], '--model-kwargs global_pool=', '--gp'),
    'optimizer kwargs it does not take': (['--opt-kwargs', 'foo=1'], 'does not take', '--opt-kwargs'),
    # numbers out of range
    'lr nan': (['--lr', 'nan'], '--lr', 'nan'),
    'lr negative': (['--lr', '-0.1'], '--lr', '-0.1'),
    'lr inf': (['--lr', 'inf'], '--lr'),
    'lr beyond float32': (['--lr', '1e39'], "--lr 1e+39 is beyond what the parameters' dtype holds (float32, at most "
                                            '3.403e+38): pass a smaller value'),
    'weight decay beyond float16 parameters': (['--model-dtype', 'float16', '--weight-decay', '1e5'],
                                               "--weight-decay 100000 is beyond what the parameters' dtype holds "
                                               '(float16, at most 6.55e+04): pass a smaller value'),
    'weight decay negative': (['--weight-decay', '-1'], '--weight-decay'),
    'workers negative': (['--workers', '-1'], '--workers', '-1'),
    'epochs zero': (['--epochs', '0'], '--epochs'),
    'batch size zero': (['-b', '0'], '--batch-size'),
    'grad accum zero': (['--grad-accum-steps', '0'], '--grad-accum-steps'),
    'checkpoint hist zero': (['--checkpoint-hist', '0'], '--checkpoint-hist', 'at least 1, as in timm'),
    'smoothing 1': (['--smoothing', '1'], '--smoothing'),
    'mixup prob above 1': ([*MIX, '--mixup-prob', '2'], '--mixup-prob'),
    'cutmix min above max': (['--cutmix-minmax', '0.9', '0.1'], '--cutmix-minmax', '0.9 0.1'),
    'scale min above max': (['--scale', '1.0', '0.5'], '--scale'),
    'clip grad zero': (['--clip-grad', '0'], '--clip-grad'),
    # model
    'unknown model': (['--model', 'resnet_does_not_exist'], 'unknown model'),
    'model kwargs it does not take': (['--model-kwargs', 'foo=1'], 'does not take', '--model-kwargs'),
    'image size too small': (['--model', 'test_vit', '--img-size', '30'], 'cannot take'),
    'one example per batch with BatchNorm': (['-b', '1', *NO_MIX], 'BatchNorm', '--batch-size'),
    'missing initial checkpoint': (['--initial-checkpoint', '/nonexistent/w.safetensors'], 'does not exist'),
    # data and checkpoints
    'num classes disagree': (['--num-classes', '7'], '--num-classes 7', '10 classes'),
    'batch larger than data': (['-b', '512'], 'do not fill one batch', '-b'),
    'accumulation larger than data': (['--grad-accum-steps', '64'], 'do not fill one update'),
    'missing checkpoint': (['--resume', '/nonexistent/checkpoint-3'], 'no checkpoint'),
    'torch dataset not there': (lambda tmp_path: ['--dataset', 'torch/fashion_mnist', '--data-dir', tmp_path],
                                'no Fashion-MNIST files in', 'apt-get install dataset-fashion-mnist',
                                '--data-dir /usr/share/datasets/fashion-mnist', '--dataset-download'),
    'torch dataset without a root': (['--dataset', 'torch/cifar10'], '--dataset torch/cifar10 needs --data-dir ROOT',
                                     '--dataset-download'),
    'unknown torch dataset': (['--dataset', 'torch/fashionmnist', '--data-dir', '/nonexistent'],
                              "unknown torchvision dataset 'fashionmnist'", 'torch/fashion_mnist'),
    'torch split timm does not name': (['--dataset', 'torch/mnist', '--data-dir', '/nonexistent', '--val-split',
                                        'holdout'], "split 'holdout' is not one of torch/mnist's", '--val-split'),
    # precision and devices
    'amp and mixed precision disagree': (['--amp', '--amp-dtype', 'bfloat16', '--mixed-precision', 'fp16'],
                                         'disagree'),
    'model dtype with amp': (['--model-dtype', 'bfloat16', '--amp'], '--model-dtype'),
    'unknown device': (['--device', 'tpu'], '--device'),
    # timm flags that cannot apply here, and timm's own conflicts
    'NaFlex loader': (['--naflex-loader'], '--naflex-loader', 'not supported'),
    'distillation': (['--kd-model-name', 'resnet50'], '--kd-model-name', 'not supported'),
    'distillation temperature': (['--kd-temperature', '2'], '--kd-temperature', 'not supported'),
    'scheduled resolutions': (['--train-img-sizes', '32', '48'], '--train-img-sizes', 'not supported'),
    'jsd loss without aug splits': (['--jsd-loss'], '--aug-splits'),
    'aug splits with mixing': (['--aug-splits', '3', *MIX], '--aug-splits'),
    'one aug split': (['--aug-splits', '1'], '--aug-splits'),
    'aug splits without augmentation': (['--aug-splits', '2', '--no-aug', *NO_MIX], '--no-aug'),
    # trackers and the Hub
    'push to a name without owner': (['--push-to-hub', 'mymodel'], '--push-to-hub', '<user or org>/<name>'),
    # YAML presets: the same checks as flags
    'yaml float epochs': (yaml_file('epochs: 1.5\n'), 'epochs', 'integer'),
    'yaml unknown mixup mode': (yaml_file('mixup_mode: dgg\n'), 'mixup_mode', "'dgg'"),
    'yaml unknown precision': (yaml_file('mixed_precision: fp8\n'), 'mixed_precision', "'fp8'"),
    'yaml unknown amp dtype': (yaml_file('amp_dtype: float8\n'), 'amp_dtype', "'float8'"),
    'yaml float batch size': (yaml_file('batch_size: 8.5\n'), 'batch_size', 'integer'),
    'yaml unknown clip mode': (yaml_file('clip_mode: foo\n'), 'clip_mode', "'foo'"),
    'yaml text for a number': (yaml_file('lr: fast\n'), 'lr', 'number'),
    'yaml list for a single value': (yaml_file('model: [resnet18, resnet50]\n'), 'model', 'single value'),
    'yaml text for a switch': (yaml_file('pretrained: maybe\n'), 'pretrained', 'true or false'),
    'yaml unknown key': (yaml_file('mixup_alpha: 0.4\n'), 'mixup_alpha', 'unknown key'),
    'yaml missing file': (lambda tmp_path: ['-c', tmp_path / 'none.yaml'], 'does not exist'),
    'yaml not valid': (yaml_file('model: [resnet\n'), 'not valid YAML'),
}


@pytest.mark.parametrize('case', sorted(BAD_INPUT))
def test_bad_input_is_one_clear_line_before_training(case, capsys, tmp_path):
    flags, *expected = BAD_INPUT[case]
    if callable(flags):
        flags = flags(tmp_path)
    assert_bad_input(capsys, tmp_path / 'output', [*FAST, *flags], *expected)


# ----------------------------------------------------------------------------------------------
# The library's arguments, and SAM where it cannot work


def tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 10))


def sam_in_a_plain_loop(scaler=None):
    """ The hand-written loop of any script (timm's own, a Lightning module): backward, then step. """
    def run():
        model = tiny_model()
        optimizer = create_optimizer_v2(model, opt='gmix_sam', lr=0.1)
        loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 12)), torch.arange(4))
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
    return run


def gmix_step_with(**kwargs):
    def run():
        model = tiny_model()
        gmix_step(model, create_optimizer_v2(model, opt='gmix_sam', lr=0.1), torch.randn(4, 12), torch.arange(4),
                  **kwargs)
    return run


# name: (a call, the exception it raises, words of its message)
LIBRARY = {
    'mixup alpha negative': (lambda: GMixup(mixup_alpha=-1), ValueError, 'mixup_alpha', 'positive'),
    'cutmix alpha nan': (lambda: GMixup(cutmix_alpha=float('nan')), ValueError, 'cutmix_alpha'),
    'no classes': (lambda: GMixup(num_classes=0), ValueError, 'num_classes', '1 or more'),
    'mixing probability above 1': (lambda: GMixup(prob=1.5), ValueError, 'prob', '[0, 1]'),
    'label smoothing 1': (lambda: GMixup(label_smoothing=1.0), ValueError, 'label_smoothing', '[0, 1)'),
    'cutmix min above max': (lambda: GMixup(cutmix_minmax=(0.9, 0.1)), ValueError, 'cutmix_minmax'),
    'unknown mixup mode': (lambda: GMixup(mode='dgg'), ValueError, "'dgg'"),
    'no micro-batches': (gmix_step_with(accum_steps=0), ValueError, 'accum_steps', 'from 1 to the batch size'),
    'more micro-batches than examples': (gmix_step_with(accum_steps=5), ValueError, 'accum_steps'),
    'unknown clip mode': (gmix_step_with(clip_mode='max'), ValueError, 'clip_mode', 'norm'),
    'clip at zero': (gmix_step_with(clip_grad=0.0), ValueError, 'clip_grad'),
    'rho zero': (lambda: create_optimizer_v2(tiny_model(), opt='gmix_sam', rho=0.0), ValueError, 'rho'),
    'SAM step without closure': (sam_in_a_plain_loop(), RuntimeError, 'not SAM', 'gmix_step', 'step(closure)'),
    'SAM stepped by a GradScaler': (sam_in_a_plain_loop(torch.amp.GradScaler('cpu')), RuntimeError, 'not SAM',
                                    'gmix_step'),
}


@pytest.mark.parametrize('case', sorted(LIBRARY))
def test_bad_library_call_is_one_clear_exception(case):
    call, kind, *expected = LIBRARY[case]
    with pytest.raises(kind) as raised:
        call()
    message = str(raised.value)
    assert len(message.splitlines()) == 1 and all(word in message for word in expected), message


# ----------------------------------------------------------------------------------------------
# Continuing, extending and recovering a run


class Interrupted(Exception):
    """ Stands in for a launch killed at that point. """


def run(capsys, argv, monkeypatch=None, cut=None):
    """ train.py in this process as a user runs it: (exit status, stdout, stderr with the stop message, the lr of
    each update). `cut`: the update (from 1) at which the process is killed. """
    train = train_module()
    step, lrs = train.gmix_step, []

    def recording(model, optimizer, *args, **kwargs):
        lrs.append(optimizer.param_groups[0]['lr'])
        if cut is not None and len(lrs) == cut:
            raise Interrupted(f'killed at update {cut}')
        return step(model, optimizer, *args, **kwargs)

    capsys.readouterr()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, 'gmix_step', recording)
        try:
            main_guard(lambda: train_main(argv))
            status, stop = 0, ''
        except SystemExit as e:
            status, stop = (e.code, '') if isinstance(e.code, int) else (1, e.code)
        except Interrupted:
            status, stop = 'killed', ''
    out, err = capsys.readouterr()
    return status, out, err + stop, lrs


def cosine(lr, epoch, epochs):
    """ timm's cosine schedule (no warmup, min lr 0) at `epoch`, written out. """
    return lr * (1 + math.cos(math.pi * epoch / epochs)) / 2


def position(state):
    return json.loads((Path(state) / 'checkpoint.json').read_text())['position']


def no_temporaries(run_dir):
    return not [p for p in Path(run_dir).rglob('*') if p.name.endswith(('.tmp', '.old'))]


def parse_command(message):
    """ The train.py flags of the command a stop message recommends (`python train.py ...`). """
    return shlex.split(message.split('python train.py ', 1)[1])


SGD = [*SMALL_RUN, '--opt', 'sgd', '--lr', '0.05', '--warmup-epochs', '0', '--sched', 'cosine']


def test_training_longer_follows_the_new_epochs(tmp_path, capsys):
    """ --epochs 2, then --resume RUN --epochs 3: epoch 3 trains on the 3-epoch schedule, not at lr 0. """
    run_dir = tmp_path / 'run'
    assert run(capsys, [*SGD, '--epochs', '2', '--output', tmp_path, '--experiment', 'run'])[0] == 0
    after_two = load_file(run_dir / 'last' / 'model.safetensors')
    status, out, err, lrs = run(capsys, [*SGD, '--epochs', '3', '--resume', run_dir])
    assert status == 0, err
    assert 'flags that differ from its args.yaml take effect: --epochs 3 (was 2)' in out
    assert lrs == [pytest.approx(cosine(0.05, 2, 3), abs=1e-15)] * 6
    assert [int(row['epoch']) for row in read_summary(run_dir)] == [0, 1, 2]
    assert position(run_dir / 'last') == [3, 0]
    assert any(not torch.equal(w, after_two[k]) for k, w in load_file(run_dir / 'last' / 'model.safetensors').items())


def test_a_new_lr_on_resume_takes_effect(tmp_path, capsys):
    """ --resume RUN/checkpoint-0 --lr 0.01: the rest of the run follows the cosine schedule of lr 0.01. """
    run_dir = tmp_path / 'run'
    assert run(capsys, [*SGD, '--epochs', '3', '--checkpoint-hist', '3', '--output', tmp_path,
                        '--experiment', 'run'])[0] == 0
    status, out, err, lrs = run(capsys, [*SGD, '--epochs', '3', '--lr', '0.01', '--resume', run_dir / 'checkpoint-0',
                                         '--output', tmp_path])
    assert status == 0, err
    assert '--lr 0.01 (was 0.05)' in out
    assert lrs == [pytest.approx(cosine(0.01, e, 3), abs=1e-15) for e in (1, 2) for _ in range(6)]


def test_a_divergence_names_the_last_validated_state_and_the_command_that_continues_it(tmp_path, capsys):
    """ --lr 100 after a warmup epoch: a later epoch diverges and is not saved; the message names last/ of the
    epoch before and a command at a tenth of the lr, and that command trains the run to its end. Which epoch
    overflows first, and whether the validation loss or the weights show it, depends on the CPU's rounding
    (epoch 2's validation loss here, epoch 3's weights on another machine): the test asserts what is kept. """
    run_dir = tmp_path / 'run'
    status, _, err, _ = run(capsys, [*SGD, '--epochs', '3', '--warmup-epochs', '1', '--lr', '100',
                                     '--recovery-interval', '2', '--output', tmp_path, '--experiment', 'run'])
    assert status == 1
    line = err.strip().splitlines()[-1]
    found = re.match(r'error: (the model diverged in epoch (\d) \(validation loss nan\)|the weights or optimizer '
                     r'state are not finite in epoch (\d)): not saved', line)
    assert found, line
    epoch = int(found.group(2) or found.group(3))  # 1-based, as printed
    assert epoch >= 2
    assert f'{run_dir / "last"} (after epoch {epoch - 1}) is intact' in line
    assert position(run_dir / 'last') == [epoch - 1, 0]
    assert not (run_dir / 'recovery').exists()
    assert sorted(p.name for p in run_dir.glob('checkpoint-*')) == [f'checkpoint-{e}' for e in range(epoch - 1)]
    flags = parse_command(line)
    assert flags == ['-c', str(run_dir / 'args.yaml'), '--resume', str(run_dir), '--lr', '10']

    status, out, err, lrs = run(capsys, flags)
    assert status == 0, err
    assert 'resumed from' in out and '--lr 10.0 (was 100.0)' in out
    rows = read_summary(run_dir)
    assert [int(row['epoch']) for row in rows] == [0, 1, 2] and all(math.isfinite(float(r['eval_loss'])) for r in rows)


def test_the_issue_divergence_is_not_called_intact(tmp_path, capsys):
    """ --lr 1e6 --epochs 3 --warmup-epochs 1: the blown-up epoch 2 is never saved as last/ or checkpoint-1. """
    run_dir = tmp_path / 'run'
    status, _, err, _ = run(capsys, [*SMALL_RUN, '--opt', 'sgd', '--lr', '1e6', '--epochs', '3', '--warmup-epochs',
                                     '1', '--output', tmp_path, '--experiment', 'run'])
    assert status == 1 and f'{run_dir / "last"} (after epoch 1) is intact' in err and '--lr 1e+05' in err
    assert position(run_dir / 'last') == [1, 0] and not (run_dir / 'checkpoint-1').exists()


def test_non_finite_optimizer_state_is_never_saved(tmp_path, capsys, monkeypatch):
    """ Finite weights and validation loss, but the momentum overflowed in epoch 2: a divergence, not a
    checkpoint. """
    train = train_module()
    create, validate, optimizers, validated = train.create_optimizer, train.validate, [], []
    monkeypatch.setattr(train, 'create_optimizer', lambda *a: optimizers.append(create(*a)) or optimizers[-1])

    def validate_then_overflow(*args):
        validated.append(validate(*args))
        if len(validated) == 2:
            for state in optimizers[0].state.values():
                state['momentum_buffer'].fill_(float('inf'))
        return validated[-1]

    monkeypatch.setattr(train, 'validate', validate_then_overflow)
    run_dir = tmp_path / 'run'
    status, _, err, _ = run(capsys, [*SGD, '--epochs', '3', '--output', tmp_path, '--experiment', 'run'])
    assert status == 1 and 'weights or optimizer state are not finite in epoch 2' in err, err
    assert f'{run_dir / "last"} (after epoch 1) is intact' in err
    assert position(run_dir / 'last') == [1, 0] and no_temporaries(run_dir)


@pytest.mark.parametrize('again', [[], ['--resume', 'RUN']], ids=['the same command', 'with --resume'])
def test_a_run_stopped_before_its_first_checkpoint_starts_again(again, tmp_path, capsys):
    """ A launch killed in its first epoch leaves a folder with args.yaml only; the same command, or --resume,
    starts the run again there. """
    run_dir = tmp_path / 'run'
    argv = [*SGD, '--epochs', '1', '--output', tmp_path, '--experiment', 'run']
    assert run(capsys, argv, cut=3)[0] == 'killed'
    assert sorted(p.name for p in run_dir.iterdir()) == ['.lock', 'args.yaml']
    status, out, err, lrs = run(capsys, [*argv, *[str(run_dir) if a == 'RUN' else a for a in again]])
    assert status == 0, err
    assert f'{run_dir} holds no checkpoint yet (its run stopped before the first): starting it again' in out
    assert len(lrs) == 6 and [int(row['epoch']) for row in read_summary(run_dir)] == [0]


@pytest.mark.parametrize('compile_flags', [[], ['--torchcompile', 'aot_eager']], ids=['eager', 'compiled'])
def test_channels_last_exports_and_resumes(compile_flags, tmp_path, capsys):
    """ --channels-last: model/ and model_best/ are written (contiguous) and load in timm with the trained
    weights; the run resumes and exports again. """
    run_dir = tmp_path / 'run'
    argv = [*SGD, '--channels-last', *compile_flags, '--output', tmp_path, '--experiment', 'run']
    status, _, err, _ = run(capsys, [*argv, '--epochs', '1'])
    assert status == 0, err
    trained = load_file(run_dir / 'last' / 'model.safetensors')
    for folder in ('model', 'model_best'):
        exported = timm.create_model(f'local-dir:{run_dir / folder}', pretrained=True)
        assert all(torch.equal(v, trained[k]) for k, v in exported.state_dict().items())
    status, _, err, _ = run(capsys, [*argv[:-4], '--epochs', '2', '--resume', run_dir])
    assert status == 0, err
    assert load_file(run_dir / 'model' / 'model.safetensors').keys() == trained.keys() and no_temporaries(run_dir)


def test_a_full_disk_at_the_export_names_what_is_intact(tmp_path, capsys, monkeypatch):
    """ The export of model_best after epoch 1 hits a full disk: one line naming model_best and last/ (epoch 1)
    as intact, no temporary left; --resume writes the export and goes on. """
    run_dir = tmp_path / 'run'
    save_for_hf = export.save_for_hf

    def disk_full(model, folder, **kwargs):
        save_for_hf(model, folder, **kwargs)  # half written, then the disk is full
        raise OSError(errno.ENOSPC, 'No space left on device')

    argv = [*SGD, '--epochs', '2', '--output', tmp_path, '--experiment', 'run']
    with monkeypatch.context() as patch:
        patch.setattr(export, 'save_for_hf', disk_full)
        status, _, err, _ = run(capsys, argv)
    assert status == 1
    line = err.strip().splitlines()[-1]
    assert line.startswith(f'error: could not write {run_dir / "model_best"} (No space left on device, '), line
    assert line.endswith(f'MiB free there); {run_dir / "last"} (after epoch 1) is intact'), line
    assert no_temporaries(run_dir) and not (run_dir / 'model_best').exists()
    status, _, err, _ = run(capsys, [*argv[:-4], '--resume', run_dir])
    assert status == 0, err
    assert (run_dir / 'model_best' / 'model.safetensors').is_file() and (run_dir / 'model').is_dir()


def limit_file_size():
    """ In the child process: files may not grow past 1 MiB, and writing past it fails (EFBIG) instead of
    killing the process. """
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2 ** 20, 2 ** 20))


def test_a_file_size_limit_stops_the_first_save_in_one_line_and_the_run_starts_again(tmp_path):
    """ A real failed write (the operating system refuses files above 1 MiB): the first training state cannot be
    written; one line says so and that nothing was saved yet; nothing half-written is left; the same command
    without the limit starts the run again. """
    run_dir = tmp_path / 'run'
    argv = [*SGD, '--epochs', '1', '--experiment', 'run']
    proc = run_train_py(tmp_path, *argv, preexec_fn=limit_file_size)
    assert proc.returncode == 1, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f'error: could not write {run_dir / "last"} (') and 'File too large' in line, line
    assert line.endswith('no checkpoint was written yet'), line
    assert no_temporaries(run_dir)
    proc = run_train_py(tmp_path, *argv)
    assert proc.returncode == 0, proc.stderr
    assert 'starting it again' in proc.stdout and (run_dir / 'last').is_dir()


def test_an_output_that_cannot_be_a_folder_is_one_line(tmp_path, capsys):
    blocker = tmp_path / 'file'
    blocker.write_text('not a folder')
    status, _, err, _ = run(capsys, [*SGD, '--epochs', '1', '--output', blocker / 'runs'])
    assert status == 2 and err.strip() == (f'error: cannot make a run folder in {blocker / "runs"} (Not a directory):'
                                           f' choose another --output'), err


def read_only_below(folder):
    """ Stands in for the file system of `folder` turning read-only: what would change a path below it fails with
    EROFS, whether the path exists or not, as the kernel answers. """
    folder = str(folder)

    def refusing(call):
        def refused(path, *args, **kwargs):
            if str(path).startswith(folder):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return call(path, *args, **kwargs)
        return refused
    return {name: refusing(getattr(os, name)) for name in ('mkdir', 'unlink', 'rmdir', 'replace', 'rename')}


def test_a_file_system_turned_read_only_before_the_first_save_is_one_line(tmp_path, capsys, monkeypatch):
    """ The file system turns read-only after epoch 1 trained: one line with the OS's reason, however the clean-up
    of the temporary fares; made writable, the same command trains the run again. """
    run_dir = tmp_path / 'run'
    argv = [*SGD, '--epochs', '1', '--output', tmp_path, '--experiment', 'run']
    train = train_module()
    save = train.save_state

    def turned_read_only(*args):
        for name, call in read_only_below(run_dir).items():
            monkeypatch.setattr(os, name, call)
        return save(*args)

    with monkeypatch.context() as patch:
        patch.setattr(train, 'save_state', turned_read_only)
        status, _, err, _ = run(capsys, argv)
        monkeypatch.undo()
    assert status == 1
    line = err.strip().splitlines()[-1]
    assert line.startswith(f'error: could not write {run_dir / "last"} (Read-only file system, '), line
    assert line.endswith('MiB free there); no checkpoint was written yet'), line
    status, out, err, _ = run(capsys, argv)
    assert status == 0, err
    assert 'starting it again' in out and position(run_dir / 'last') == [1, 0]


def in_a_small_file_system(folder, size, command):
    """ `command` with a tmpfs of `size` mounted on `folder`, in a user and mount namespace of its own (no root
    needed, nothing outside changes); None where the system allows no such namespace. """
    if not shutil.which('unshare') or subprocess.run(['unshare', '--user', '--map-root-user', '--mount', 'true'],
                                                     capture_output=True).returncode:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    script = f'mount -t tmpfs -o size={size} tmpfs {shlex.quote(str(folder))} && exec {shlex.join(command)}'
    return subprocess.run(['unshare', '--user', '--map-root-user', '--mount', 'sh', '-c', script], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=subprocess_env())


def test_a_disk_that_fills_at_the_first_save_says_no_space_left(tmp_path):
    """ A real full disk: 30 MiB hold the weights (20 MB) of the first state but not the optimizer's momentum,
    which torch writes with a message of its own ('unexpected pos ...'); the line gives the OS's reason. """
    output = tmp_path / 'output'
    proc = in_a_small_file_system(output, '30m', [sys.executable, str(ROOT / 'train.py'), *map(str, SGD), '--epochs',
                                                  '1', '--output', str(output), '--experiment', 'run'])
    if proc is None:
        pytest.skip('no user and mount namespaces here (unshare)')
    assert proc.returncode == 1, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f'error: could not write {output / "run" / "last"} (No space left on device, '), line
    assert line.endswith('MiB free there); no checkpoint was written yet'), line


def files_of(run_dir) -> dict:
    """ The bytes of every file of a run folder but its lock (which a refused resume takes, then drops). """
    return {p: p.read_bytes() for p in sorted(Path(run_dir).rglob('*')) if p.is_file() and p.name != '.lock'}


# name: (epochs, updates the first launch makes before it is killed, flags of the resume, its line after RUN/recovery)
MID_EPOCH_PLANS = {
    'a larger batch': (1, 2, ['-b', '32'], ' was saved in the middle of an epoch (epoch 1, update 2) with -b 16, which '
                       'cut that epoch into its updates: resume it with -b 16, or start a new run with -b 32'),
    'a smaller batch after a validated epoch': (
        2, 8, ['-b', '8'], ' was saved in the middle of an epoch (epoch 2, update 2) with -b 16, which cut that epoch '
        'into its updates: resume it with -b 16, or resume from RUN/last (after epoch 1) with -b 8'),
    'more accumulation': (1, 2, ['--grad-accum-steps', '2'], ' was saved in the middle of an epoch (epoch 1, update 2) '
                          'with --grad-accum-steps 1, which cut that epoch into its updates: resume it with '
                          '--grad-accum-steps 1, or start a new run with --grad-accum-steps 2'),
}


@pytest.mark.parametrize('case', sorted(MID_EPOCH_PLANS))
def test_a_mid_epoch_resume_with_another_epoch_plan_is_one_line_and_writes_nothing(case, tmp_path, capsys):
    """ Killed mid-epoch (--recovery-interval 1), resumed with another -b or --grad-accum-steps: the updates done
    were counted in the old batches, so the resume is refused before anything is written (args.yaml included). """
    epochs, done, flags, line = MID_EPOCH_PLANS[case]
    run_dir = tmp_path / 'run'
    argv = [*SGD, '--epochs', str(epochs), '--recovery-interval', '1']
    assert run(capsys, [*argv, '--output', tmp_path, '--experiment', 'run'], cut=done + 1)[0] == 'killed'
    before = files_of(run_dir)
    status, _, err, _ = run(capsys, [*argv, *flags, '--resume', run_dir])
    assert status == 2
    assert err.strip().splitlines()[-1] == f'error: {run_dir / "recovery"}' + line.replace('RUN', str(run_dir))
    assert files_of(run_dir) == before


# name: (epochs of the first launch, updates it makes before it is killed or None, --epochs of the resume, its line)
LOWERED_EPOCHS = {
    'a finished run': (2, None, 1, 'trained 2 epochs, more than --epochs 1 asks: pass --epochs 3 or more to train '
                                   'longer'),
    'a run stopped after epoch 2': (3, 12, 1, 'trained 2 epochs, more than --epochs 1 asks: pass --epochs 2 to export '
                                              'it as it stands, or more to train longer'),
    'a run stopped in epoch 3': (3, 14, 2, 'trained 2 epochs and 2 updates of epoch 3, more than --epochs 2 asks: pass '
                                           '--epochs 3 or more to train longer'),
}


@pytest.mark.parametrize('case', sorted(LOWERED_EPOCHS))
def test_a_resume_with_fewer_epochs_than_trained_is_one_line(case, tmp_path, capsys):
    """ --epochs lowered below what the run trained: one line with what it trained and what to pass; nothing
    is exported or written. """
    epochs, done, lowered, line = LOWERED_EPOCHS[case]
    run_dir = tmp_path / 'run'
    argv = [*SGD, '--recovery-interval', '1']
    first = run(capsys, [*argv, '--epochs', str(epochs), '--output', tmp_path, '--experiment', 'run'],
                cut=None if done is None else done + 1)
    assert first[0] == (0 if done is None else 'killed'), first[2]
    before = files_of(run_dir)
    status, _, err, _ = run(capsys, [*argv, '--epochs', str(lowered), '--resume', run_dir])
    assert status == 2
    assert err.strip().splitlines()[-1] == f'error: the run in {run_dir} {line}'
    assert files_of(run_dir) == before
