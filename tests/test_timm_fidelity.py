""" A timm user's command line means what it means in timm: every flag of timm's train.py with its
defaults (or refused with one line where it cannot apply), timm's own YAML files, --data-dir and the
positional DIR, timm's lr rule, and --grad-accum-steps as global batch b x K. """
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import SMALL_RUN, read_summary, train_main
from helpers.image_data import make_image_folder

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from timm_gmix.training.args import NOT_APPLICABLE, PLUGIN_FLAGS, build_parser, parse_args, resolve_lr  # noqa: E402

TIMM = json.loads((Path(__file__).parent / 'helpers' / 'timm_train_flags.json').read_text())['flags']


def test_every_timm_flag_is_accepted_with_timms_default():
    actions = {a.dest: a for a in build_parser()._actions}
    for flag in TIMM:
        action = actions[flag['dest']]
        assert set(flag['options']) <= set(action.option_strings), flag['dest']
        assert action.default == flag['default'], flag['dest']
    accepted = 1 + len(TIMM) - len(NOT_APPLICABLE)  # -c/--config is timm's too
    assert (1 + len(TIMM), accepted) == (173, 150)
    ours = set(actions) - {f['dest'] for f in TIMM} - {'help', 'config'}
    assert ours == set(PLUGIN_FLAGS)


def test_timms_own_args_yaml_loads(tmp_path):
    """ The args.yaml of a timm run holds every flag at its value: it loads as a preset (refused flags at
    their defaults pass), and a timm hparams file with a few keys does too. """
    everything = {f['dest']: f['default'] for f in TIMM}
    everything.update(model='resnet10t', dataset='digits', img_size=32, epochs=1, batch_size=16, workers=0,
                      train_num_samples=64, lr=0.05, warmup_epochs=0)
    (tmp_path / 'args.yaml').write_text(yaml.safe_dump(everything))
    args = parse_args(['-c', str(tmp_path / 'args.yaml')])
    assert (args.model, args.opt, args.model_ema_decay, args.kd_temperature) == ('resnet10t', 'sgd', 0.9998, 4.0)

    recipe = tmp_path / 'recipe.yaml'  # the shape of timm's hparams files: a few keys, timm's names
    recipe.write_text('aa: rand-m7-mstd0.5-inc1\nmixup: 0.1\ncutmix: 1.0\nsched: cosine\nopt: lamb\n'
                      'lr: 8.0e-3\nwarmup_epochs: 5\nbce_loss: true\nsmoothing: 0.0\nmodel_ema: false\n')
    args = parse_args(['-c', str(recipe), '--opt', 'gmix_sam', '--sam-base', 'lamb', '--mixup-mode', 'dg'])
    assert (args.opt, args.sam_base, args.bce_loss, args.cutmix) == ('gmix_sam', 'lamb', True, 1.0)


@pytest.mark.parametrize('how', ['--data-dir', 'positional'])
def test_data_dir_and_positional_dir_train_on_that_folder(how, tmp_path):
    folder = make_image_folder(tmp_path / 'images')
    where = ['--data-dir', folder] if how == '--data-dir' else [folder]
    train_main([*where, '--model', 'resnet10t', '--img-size', '32', '-b', '8', '--epochs', '1', '--workers', '0',
                '--lr', '0.05', '--warmup-epochs', '0', '--output', tmp_path / 'out', '--experiment', 'run'])
    args = yaml.safe_load((tmp_path / 'out' / 'run' / 'args.yaml').read_text())
    assert args['data_dir'] == str(folder) and args['dataset'] == ''
    assert read_summary(tmp_path / 'out' / 'run')[0]['epoch'] == '0'


@pytest.mark.parametrize('flags, processes, expected', [
    (['--opt', 'sgd', '-b', '16'], 1, 0.1 * 16 / 256),
    (['--opt', 'sgd', '-b', '16', '--grad-accum-steps', '4'], 2, 0.1 * 128 / 256),
    (['--opt', 'adamw', '-b', '64', '--lr-base', '0.004'], 1, 0.004 * (64 / 256) ** 0.5),
    (['--opt', 'gmix_sam', '--sam-base', 'lamb', '-b', '64'], 1, 0.1 * (64 / 256) ** 0.5),
    (['--opt', 'sgd', '-b', '64', '--lr-base-scale', 'sqrt', '--lr-base-size', '128'], 1, 0.1 * 0.5 ** 0.5),
    (['--opt', 'sgd', '-b', '64', '--lr', '0.3'], 4, 0.3),
])
def test_lr_follows_timms_lr_base_rule(flags, processes, expected):
    args = parse_args(['--dataset', 'digits', *flags])
    assert resolve_lr(args, processes) == pytest.approx(expected, rel=1e-12)


def test_grad_accum_steps_is_timms_global_batch(tmp_path):
    """ -b 8 --grad-accum-steps 2 is one G-Mix update per two loader batches, equal to the update on the
    whole batch of 16 (-b 16): same examples, same augmentation (drawn per example), same lam. test_vit has
    LayerNorm, not BatchNorm, so micro-batches do not change the normalization. """
    base = [*SMALL_RUN, '--model', 'test_vit', '--train-num-samples', '96', '--epochs', '1',
            '--opt', 'gmix_sam', '--mixup', '0.8', '--mixup-mode', 'g', '--lr', '0.05', '--output', tmp_path]
    train_main([*base, '-b', '16', '--experiment', 'whole'])
    train_main([*base, '-b', '8', '--grad-accum-steps', '2', '--experiment', 'accum'])
    whole, accumulated = (load_file(tmp_path / name / 'last' / 'model.safetensors') for name in ('whole', 'accum'))
    for name, weights in whole.items():
        torch.testing.assert_close(accumulated[name], weights, rtol=1e-5, atol=1e-6, msg=name)
    [row_whole], [row_accum] = read_summary(tmp_path / 'whole'), read_summary(tmp_path / 'accum')
    assert float(row_accum['train_loss']) == pytest.approx(float(row_whole['train_loss']), rel=1e-5)
