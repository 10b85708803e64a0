""" Bad input and faults, in tables; to add a case, add a row.

BAD_INPUT: a train.py command line (and, where needed, a file it names) that must stop before training with
    exit status 2 and one line on stderr saying what is wrong and how to fix it.
LIBRARY: a call of the library (GMixup, SAM, gmix_step) with a bad argument, or SAM used where it cannot
    work: one clear exception at the call.

Bad data (columns, classes, unreadable images) lives in tests/test_data.py, damaged checkpoints and exact
resume in tests/test_resume.py.
"""
import pytest
import torch
from timm.optim import create_optimizer_v2

from helpers import SMALL_RUN, assert_bad_input
from timm_gmix import GMixup, gmix_step

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
    'weight decay negative': (['--weight-decay', '-1'], '--weight-decay'),
    'workers negative': (['--workers', '-1'], '--workers', '-1'),
    'epochs zero': (['--epochs', '0'], '--epochs'),
    'batch size zero': (['-b', '0'], '--batch-size'),
    'grad accum zero': (['--grad-accum-steps', '0'], '--grad-accum-steps'),
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
