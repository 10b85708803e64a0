""" train.py's command line: every flag of timm's train.py with timm's name, meaning and default, the
plugin's own flags, YAML presets, and the checks that turn bad input into one clear line before
training starts.

`-c/--config file.yaml` sets defaults (keys are flag names with underscores, as in timm's hparams files
and the `args.yaml` a timm run writes); flags on the command line override it. Unlike timm, an unknown key
is an error, and YAML values get the same type and choice checks as flags.

A few timm flags cannot apply to the SAM step (`NOT_APPLICABLE`): they are accepted at their defaults, so
timm's own `args.yaml` files load, and refused with one line when set.
"""
import argparse
import math
from pathlib import Path

import torch
import yaml
from timm.optim import list_optimizers
from timm.utils import ParseKwargs

from ..guard import GUARDS
from ..mixup import FLAG_CHOICES, GMIX_MODES, TIMM_MODES, check_mixing
from ..sam import DEFAULT_RHO, DEFAULT_RHO_ADAPTIVE, PERTURBATIONS, check_options, is_sam, registry_name
from .device_data import check_device_data
from .errors import UsageError, reason

_NAFLEX = 'NaFlex variable-resolution batches are not supported: the SAM step mixes and perturbs fixed-size image batches'
_KD = 'knowledge distillation is not supported with the G-Mix step'
_SCHEDULED = 'scheduled-resolution batches are not supported: every batch has --img-size'
NOT_APPLICABLE = {
    **dict.fromkeys(('naflex_loader', 'naflex_train_seq_lens', 'naflex_max_seq_len', 'naflex_patch_sizes',
                     'naflex_patch_size_probs', 'naflex_loss_scale', 'naflex_patchify_channels_first'), _NAFLEX),
    **dict.fromkeys(('kd_model_name', 'kd_distill_type', 'kd_loss_type', 'distill_loss_weight', 'task_loss_weight',
                     'kd_temperature', 'kd_student_feature_dim', 'kd_teacher_feature_dim',
                     'kd_token_distill_type'), _KD),
    **dict.fromkeys(('train_img_sizes', 'train_batch_sizes', 'train_size_probs', 'train_size_schedule',
                     'train_size_schedule_spread', 'train_size_random_mix', 'variable_batch_loss_scale'), _SCHEDULED),
}
# The plugin's own flags (the rest of the parser is timm's).
PLUGIN_FLAGS = ('train_subset', 'sam_base', 'rho', 'asam', 'sync_ascent', 'sam_interval', 'sam_reuse', 'sam_perturb',
                'lam_mode', 'gmix_ratio', 'gmix_flag',
                'mixed_precision', 'export_ema', 'max_bad_steps', 'step_guard', 'log_with', 'push_to_hub',
                'skip_bad_images', 'device_data')
TRACKERS = ('tensorboard', 'wandb', 'mlflow', 'all')


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    """ timm's train.py parser (same flags, defaults and meanings), plus the plugin's flags. """
    parser = _Parser(description='timm-style training with G-Mix, BG-Mix and DG-Mix on Accelerate')
    parser.add_argument('-c', '--config', default='', metavar='FILE', help='YAML preset; flags override it')
    parser.add_argument('data', nargs='?', metavar='DIR', const=None, help='path to dataset (same as --data-dir)')

    group = parser.add_argument_group('Dataset')
    group.add_argument('--data-dir', metavar='DIR',
                       help='image folder DIR/<split>/<class>/<image>; torch/: the root; hfds/: cache')
    group.add_argument('--dataset', metavar='NAME', default='',
                       help='"" (image folder in --data-dir), "digits" (built in), "hfds/<Hub name or folder>", '
                            '"torch/<name>" (timm\'s torchvision datasets: torch/fashion_mnist, torch/cifar10, ...), '
                            'or a folder with the data (save_to_disk, parquet, csv, images)')
    group.add_argument('--train-split', metavar='NAME', default='train')
    group.add_argument('--val-split', metavar='NAME', default='validation')
    group.add_argument('--train-num-samples', type=int, default=None, metavar='N',
                       help='train on the first N examples of the training split')
    group.add_argument('--val-num-samples', type=int, default=None, metavar='N',
                       help='validate on the first N examples of the validation split')
    group.add_argument('--dataset-download', action='store_true',
                       help='torch/ datasets: download into --data-dir if not there, as in timm (hfds/: always)')
    group.add_argument('--class-map', default='', metavar='FILENAME',
                       help='text file with one class name per line (its line number is the label)')
    group.add_argument('--input-img-mode', default=None, help='PIL mode the images are converted to (L, RGB)')
    group.add_argument('--input-key', '--image-column', default=None, help='column of the images (default: image or img)')
    group.add_argument('--target-key', '--label-column', default=None, help='column of the labels (default: label)')
    group.add_argument('--dataset-trust-remote-code', action='store_true')
    group.add_argument('--train-subset', type=float, default=None,
                       help='train on this fraction (0-1] of the training split (the same examples for every --seed)')
    group.add_argument('--device-data', action='store_true',
                       help='decode the training split once onto the device and augment it there per example '
                            '(no loader workers; for small images)')

    group = parser.add_argument_group('Model')
    group.add_argument('--model', default='resnet50', metavar='MODEL')
    group.add_argument('--pretrained', action='store_true')
    group.add_argument('--pretrained-path', default=None, help='local weights to start from (head adapted)')
    group.add_argument('--initial-checkpoint', default='', metavar='PATH', help='load these weights after creation')
    group.add_argument('--resume', default='', metavar='PATH', help='a run folder, or one of its checkpoint folders')
    group.add_argument('--no-resume-opt', action='store_true', help='resume the model but not the optimizer state')
    group.add_argument('--num-classes', type=int, default=None, metavar='N', help='default: read from the data')
    group.add_argument('--gp', default=None, metavar='POOL', help='global pool type')
    group.add_argument('--img-size', type=int, default=None, metavar='N')
    group.add_argument('--in-chans', type=int, default=None, metavar='N')
    group.add_argument('--input-size', default=None, nargs=3, type=int, metavar='N', help='c h w')
    group.add_argument('--crop-pct', default=None, type=float, metavar='N')
    group.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN')
    group.add_argument('--std', type=float, nargs='+', default=None, metavar='STD')
    group.add_argument('--interpolation', default='', metavar='NAME')
    group.add_argument('-b', '--batch-size', type=int, default=128, metavar='N', help='per process')
    group.add_argument('-vb', '--validation-batch-size', type=int, default=None, metavar='N')
    group.add_argument('--channels-last', action='store_true')
    group.add_argument('--fuser', default='', help="TorchScript fuser ('', 'te', 'old', 'nvfuser')")
    group.add_argument('--grad-accum-steps', type=int, default=1, metavar='N',
                       help='loader batches per update (global batch b x N x processes), as in timm')
    group.add_argument('--grad-checkpointing', action='store_true')
    group.add_argument('--fast-norm', action='store_true')
    group.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs)
    group.add_argument('--head-init-scale', default=None, type=float)
    group.add_argument('--head-init-bias', default=None, type=float)
    group.add_argument('--torchcompile-mode', default=None)
    scripting = group.add_mutually_exclusive_group()
    scripting.add_argument('--torchscript', action='store_true')
    scripting.add_argument('--torchcompile', nargs='?', default=None, const='inductor', help='backend (inductor)')

    group = parser.add_argument_group('Device')
    group.add_argument('--device', default='cuda', help='cuda (Accelerate picks the device) or cpu')
    group.add_argument('--amp', action='store_true', help='mixed precision with --amp-dtype')
    group.add_argument('--amp-dtype', default='float16', choices=('float16', 'bfloat16'))
    group.add_argument('--mixed-precision', default=None, choices=('no', 'fp16', 'bf16'), help="Accelerate's name")
    group.add_argument('--model-dtype', default=None, choices=('float32', 'float16', 'bfloat16'))
    group.add_argument('--no-ddp-bb', action='store_true', help="DDP without buffer broadcast")
    group.add_argument('--synchronize-step', action='store_true')
    group.add_argument('--local_rank', default=0, type=int, help='set by launchers; Accelerate reads its own')
    group.add_argument('--device-modules', default=None, nargs='+', help='modules to import for a device backend')

    group = parser.add_argument_group('Optimizer')
    group.add_argument('--opt', default='sgd', metavar='OPTIMIZER', help='any timm optimizer; gmix_sam for G-Mix')
    group.add_argument('--opt-eps', default=None, type=float)
    group.add_argument('--opt-betas', default=None, type=float, nargs='+')
    group.add_argument('--momentum', type=float, default=0.9)
    group.add_argument('--weight-decay', type=float, default=2e-5)
    group.add_argument('--clip-grad', type=float, default=None)
    group.add_argument('--clip-mode', default='norm', choices=('norm', 'value', 'agc'))
    group.add_argument('--layer-decay', type=float, default=None)
    group.add_argument('--layer-decay-min-scale', type=float, default=0)
    group.add_argument('--layer-decay-no-opt-scale', type=float, default=None)
    group.add_argument('--opt-kwargs', nargs='*', default={}, action=ParseKwargs)
    group.add_argument('--sam-base', default='sgd', help='the optimizer SAM wraps (timm registry name)')
    group.add_argument('--rho', type=float, default=None, help='SAM radius (default 0.05, ASAM 2.0)')
    group.add_argument('--asam', action='store_true', help='adaptive SAM')
    group.add_argument('--sync-ascent', action='store_true',
                       help='all-reduce the ascent gradient (default: each replica perturbs by its own)')
    group.add_argument('--sam-interval', type=int, default=1, metavar='K',
                       help='the full SAM/G-Mix step on every K-th update, one pass on the mixed batch in between')
    group.add_argument('--sam-reuse', type=float, default=0.0, metavar='ALPHA',
                       help='LookSAM: the one-pass updates add the reused sharpness direction, scaled by ALPHA')
    group.add_argument('--sam-perturb', default='gradient', choices=PERTURBATIONS,
                       help="momentum: MSAM's perturbation from the base optimizer's momentum (one pass for G-Mix)")

    group = parser.add_argument_group('Learning rate schedule')
    group.add_argument('--sched', default='cosine', metavar='SCHEDULER')
    group.add_argument('--sched-on-updates', action='store_true')
    group.add_argument('--lr', type=float, default=None, help='default: --lr-base scaled by the global batch')
    group.add_argument('--lr-base', type=float, default=0.1)
    group.add_argument('--lr-base-size', type=int, default=256)
    group.add_argument('--lr-base-scale', default='', choices=('', 'linear', 'sqrt'))
    group.add_argument('--lr-noise', type=float, nargs='+', default=None)
    group.add_argument('--lr-noise-pct', type=float, default=0.67)
    group.add_argument('--lr-noise-std', type=float, default=1.0)
    group.add_argument('--lr-cycle-mul', type=float, default=1.0)
    group.add_argument('--lr-cycle-decay', type=float, default=0.5)
    group.add_argument('--lr-cycle-limit', type=int, default=1)
    group.add_argument('--lr-k-decay', type=float, default=1.0)
    group.add_argument('--warmup-lr', type=float, default=1e-5)
    group.add_argument('--min-lr', type=float, default=0)
    group.add_argument('--epochs', type=int, default=300)
    group.add_argument('--epoch-repeats', type=float, default=0., help='passes over the training split per epoch')
    group.add_argument('--start-epoch', default=None, type=int)
    group.add_argument('--decay-milestones', default=[90, 180, 270], type=int, nargs='+')
    group.add_argument('--decay-epochs', type=float, default=90)
    group.add_argument('--warmup-epochs', type=int, default=5)
    group.add_argument('--warmup-prefix', action='store_true')
    group.add_argument('--cooldown-epochs', type=int, default=0)
    group.add_argument('--patience-epochs', type=int, default=10)
    group.add_argument('--decay-rate', '--dr', type=float, default=0.1)

    group = parser.add_argument_group('Augmentation, regularization and mixing')
    group.add_argument('--no-aug', action='store_true')
    group.add_argument('--train-crop-mode', default=None)
    group.add_argument('--scale', type=float, nargs='+', default=[0.08, 1.0])
    group.add_argument('--ratio', type=float, nargs='+', default=[3. / 4., 4. / 3.])
    group.add_argument('--hflip', type=float, default=0.5)
    group.add_argument('--vflip', type=float, default=0.)
    group.add_argument('--color-jitter', type=float, default=0.4)
    group.add_argument('--color-jitter-prob', type=float, default=None)
    group.add_argument('--grayscale-prob', type=float, default=None)
    group.add_argument('--gaussian-blur-prob', type=float, default=None)
    group.add_argument('--aa', default=None, help='AutoAugment policy, e.g. rand-m9-mstd0.5')
    group.add_argument('--aug-repeats', type=float, default=0, help='repeated augmentation (per process)')
    group.add_argument('--aug-splits', type=int, default=0, help='AugMix splits (0, or >= 2)')
    group.add_argument('--jsd-loss', action='store_true', help='Jensen-Shannon divergence + CE, with --aug-splits')
    group.add_argument('--bce-loss', action='store_true')
    group.add_argument('--bce-sum', action='store_true')
    group.add_argument('--bce-target-thresh', type=float, default=None)
    group.add_argument('--bce-pos-weight', type=float, default=None)
    group.add_argument('--reprob', type=float, default=0.)
    group.add_argument('--remode', default='pixel', choices=('const', 'rand', 'pixel'))
    group.add_argument('--recount', type=int, default=1)
    group.add_argument('--resplit', action='store_true')
    group.add_argument('--mixup', type=float, default=0.0, help='mixup alpha, on if > 0')
    group.add_argument('--cutmix', type=float, default=0.0, help='cutmix alpha, on if > 0')
    group.add_argument('--cutmix-minmax', type=float, nargs='+', default=None)
    group.add_argument('--mixup-prob', type=float, default=1.0)
    group.add_argument('--mixup-switch-prob', type=float, default=0.5)
    group.add_argument('--mixup-mode', default='batch', choices=TIMM_MODES + GMIX_MODES,
                       help='timm: batch, pair, elem; G-Mix: g, bg, dg')
    group.add_argument('--mixup-off-epoch', default=0, type=int)
    group.add_argument('--smoothing', type=float, default=0.1)
    group.add_argument('--train-interpolation', default='random')
    group.add_argument('--drop', type=float, default=0.0)
    group.add_argument('--drop-connect', type=float, default=None, help='deprecated alias of --drop-path')
    group.add_argument('--drop-path', type=float, default=None)
    group.add_argument('--drop-block', type=float, default=None)
    group.add_argument('--lam-mode', default='batch', choices=TIMM_MODES, help='lam granularity of g/bg/dg')
    group.add_argument('--gmix-ratio', type=float, default=0.5, help='gamma: fraction flagged by bg/dg')
    group.add_argument('--gmix-flag', default='largest', choices=FLAG_CHOICES,
                       help='flag the largest (default) or smallest sharpness sensitivities')

    group = parser.add_argument_group('Batch norm')
    group.add_argument('--bn-momentum', type=float, default=None)
    group.add_argument('--bn-eps', type=float, default=None)
    group.add_argument('--sync-bn', action='store_true')
    group.add_argument('--dist-bn', default='reduce', choices=('reduce', 'broadcast', ''))
    group.add_argument('--split-bn', action='store_true')

    group = parser.add_argument_group('Model EMA')
    group.add_argument('--model-ema', action='store_true')
    group.add_argument('--model-ema-force-cpu', action='store_true')
    group.add_argument('--model-ema-decay', type=float, default=0.9998)
    group.add_argument('--model-ema-warmup', action='store_true')
    group.add_argument('--export-ema', action='store_true', help='export the EMA weights as the final model')

    group = parser.add_argument_group('Run')
    group.add_argument('--seed', type=int, default=42)
    group.add_argument('--worker-seeding', default='all', choices=('all', 'part'))
    group.add_argument('--log-interval', type=int, default=50, help='updates between progress logs')
    group.add_argument('--val-interval', type=int, default=1, help='epochs between validation and checkpoints')
    group.add_argument('--train-batches-per-epoch', '--train-steps-per-epoch', type=int, default=None,
                       help='loader batches per epoch (default: one pass over the data)')
    group.add_argument('--recovery-interval', type=int, default=0, help='updates between recovery checkpoints')
    group.add_argument('--checkpoint-hist', type=int, default=10, help='best checkpoints kept')
    group.add_argument('-j', '--workers', type=int, default=4)
    group.add_argument('--save-images', action='store_true')
    group.add_argument('--pin-mem', action='store_true')
    group.add_argument('--no-prefetcher', action='store_true',
                       help='as in timm: float batches normalized in the loader workers, not uint8 batches normalized '
                            'on the device')
    group.add_argument('--output', default='', metavar='PATH', help='runs go to OUTPUT/EXPERIMENT (./output/train)')
    group.add_argument('--experiment', default='', metavar='NAME', help='default: <date-time>-<model>-<img size>')
    group.add_argument('--eval-metric', default='top1', choices=('top1', 'top5', 'loss'))
    group.add_argument('--tta', type=int, default=0)
    group.add_argument('--use-multi-epochs-loader', action='store_true',
                       help='accepted: loader workers are always kept between epochs (timm\'s loader default)')
    group.add_argument('--log-wandb', action='store_true', help='same as --log-with wandb')
    group.add_argument('--wandb-project', default=None)
    group.add_argument('--wandb-tags', default=[], nargs='+')
    group.add_argument('--wandb-resume-id', default='')
    group.add_argument('--log-with', default=None, choices=TRACKERS, nargs='+', help="Accelerate's trackers")
    group.add_argument('--max-bad-steps', type=int, default=10, help='stop after this many non-finite steps in a row')
    group.add_argument('--step-guard', default='skip', choices=GUARDS,
                       help='skip: a non-finite loss or gradient skips the update (as a GradScaler does); undo: also '
                            'undo an update that leaves weights or optimizer state non-finite (costs a copy of both)')
    group.add_argument('--push-to-hub', default=None, metavar='REPO', help='upload the exported model after training')
    group.add_argument('--skip-bad-images', action='store_true',
                       help='replace an unreadable image by the next readable one (counted) instead of stopping')

    group = parser.add_argument_group('Not applicable here (refused when set)')
    group.add_argument('--train-img-sizes', type=int, nargs='+', default=None)
    group.add_argument('--train-batch-sizes', type=int, nargs='+', default=None)
    group.add_argument('--train-size-probs', type=float, nargs='+', default=None)
    group.add_argument('--train-size-schedule', default='constant', choices=('constant', 'progressive'))
    group.add_argument('--train-size-schedule-spread', type=float, default=0.65)
    group.add_argument('--train-size-random-mix', type=float, default=0.1)
    group.add_argument('--variable-batch-loss-scale', default='none', choices=('none', 'sqrt', 'linear'))
    group.add_argument('--naflex-loader', action='store_true')
    group.add_argument('--naflex-train-seq-lens', type=int, nargs='+', default=[128, 256, 576, 784, 1024])
    group.add_argument('--naflex-max-seq-len', type=int, default=576)
    group.add_argument('--naflex-patch-sizes', type=int, nargs='+', default=None)
    group.add_argument('--naflex-patch-size-probs', type=float, nargs='+', default=None)
    group.add_argument('--naflex-loss-scale', default='linear', choices=('none', 'sqrt', 'linear'))
    group.add_argument('--naflex-patchify-channels-first', action='store_true')
    group.add_argument('--kd-model-name', default=None)
    group.add_argument('--kd-distill-type', default='logit', choices=('logit', 'feature', 'token'))
    group.add_argument('--kd-loss-type', default='kl')
    group.add_argument('--distill-loss-weight', default=None, type=float)
    group.add_argument('--task-loss-weight', default=None, type=float)
    group.add_argument('--kd-temperature', default=4.0, type=float)
    group.add_argument('--kd-student-feature-dim', default=None, type=int)
    group.add_argument('--kd-teacher-feature-dim', default=None, type=int)
    group.add_argument('--kd-token-distill-type', default='soft', choices=('soft', 'hard'))
    return parser


def _flag(action) -> str:
    return max(action.option_strings, key=len) if action.option_strings else action.dest


def _config_value(action, value, path):
    """ A YAML value through the flag's type, count and choice checks (argparse skips them for defaults);
    strings are converted by the flag's type, as argparse does (PyYAML reads 1e-3 as a string). """
    where = f'{action.dest}: {value!r} in {path}'
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise UsageError(f'{where} must be true or false')
        return value
    if action.dest in ('model_kwargs', 'opt_kwargs'):
        if not isinstance(value, dict):
            raise UsageError(f'{where} must be a mapping of argument names to values')
        return value
    if value is None:
        return value
    many = action.nargs in ('+', '*') or isinstance(action.nargs, int)
    if isinstance(value, (list, tuple)) and not many:
        raise UsageError(f'{where} must be a single value, not a list')
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if isinstance(action.nargs, int) and len(items) != action.nargs:
        raise UsageError(f'{where} must be a list of {action.nargs} values')
    kind = {int: 'an integer', float: 'a number'}.get(action.type)
    for i, item in enumerate(items):
        if kind and isinstance(item, str):
            try:
                items[i] = item = action.type(item)
            except ValueError:
                raise UsageError(f'{where} must be {kind}') from None
        if kind and (isinstance(item, bool) or not isinstance(item, (int, float)) or
                     (action.type is int and not isinstance(item, int))):
            raise UsageError(f'{where} must be {kind}')
        if action.choices is not None and item not in action.choices:
            raise UsageError(f'{where} is not one of {", ".join(map(repr, action.choices))}')
    return items if many and isinstance(value, (list, tuple)) else items[0]


def load_config(path: str, parser: argparse.ArgumentParser) -> dict:
    """ Read a YAML preset: every key must be a flag of `parser` (with underscores), every value must pass
    that flag's checks. """
    if not Path(path).is_file():
        raise UsageError(f'config file {path} does not exist: check the path given to -c/--config')
    try:
        cfg = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        raise UsageError(f'config file {path} is not valid YAML ({reason(e)}): fix or remove it')
    if not isinstance(cfg, dict):
        raise UsageError(f'config file {path} must be a mapping of flag names to values')
    actions = {a.dest: a for a in parser._actions}
    cfg.pop('config', None)  # timm's args.yaml records the file it was read from
    unknown = sorted(set(cfg) - set(actions))
    if unknown:
        raise UsageError(f'unknown key(s) {", ".join(unknown)} in {path}: keys are train.py flag names '
                         f'with underscores (see python train.py --help)')
    return {key: _config_value(actions[key], value, path) for key, value in cfg.items()}


def parse_args(argv=None, default_config=None) -> argparse.Namespace:
    """ Parse the command line over an optional YAML preset, then check the combination. `default_config` is
    the preset used when the command line names no config and no data at all (the built-in digits). """
    parser = build_parser()
    pre = parser.parse_args(argv)
    config = pre.config or (default_config if not (pre.dataset or pre.data_dir or pre.data) else '')
    if config:
        parser.set_defaults(**load_config(config, parser))
    args = parser.parse_args(argv)
    args.config = str(config)
    if args.data and not args.data_dir:
        args.data_dir = args.data  # timm's positional DIR
    if args.drop_connect is not None and args.drop_path is None:
        args.drop_path = args.drop_connect
    if args.log_wandb:
        args.log_with = sorted(set(args.log_with or []) | {'wandb'})
    check_args(args, parser)
    return args


def mixing_enabled(args) -> bool:
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


def mixed_precision(args):
    """ Accelerate's precision from --mixed-precision or timm's --amp/--amp-dtype; None (neither given)
    leaves it to `accelerate launch --mixed_precision` / the Accelerate config, which an explicit 'no' would
    silently override. """
    amp = ('bf16' if args.amp_dtype == 'bfloat16' else 'fp16') if args.amp else None
    if args.mixed_precision is not None:
        return args.mixed_precision
    return amp


def resolve_lr(args, num_processes: int) -> float:
    """ --lr, or timm's rule: --lr-base * (global batch / --lr-base-size), square root for adaptive optimizers
    (by name: 'ada', 'lamb'; for gmix_sam, the optimizer it wraps). The global batch is b x K x processes. """
    if args.lr:  # timm treats 0 as unset too
        return args.lr
    global_batch = args.batch_size * args.grad_accum_steps * num_processes
    ratio = global_batch / args.lr_base_size
    scale = args.lr_base_scale
    if not scale:
        name = f'{args.opt} {args.sam_base}' if is_sam(args.opt) else args.opt
        scale = 'sqrt' if any(o in name.lower() for o in ('ada', 'lamb')) else 'linear'
    return args.lr_base * (ratio ** 0.5 if scale == 'sqrt' else ratio)


def _positive(args, *names):
    for name in names:
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UsageError(f'--{name.replace("_", "-")} must be a positive number, got {value}')


def _non_negative(args, *names):
    for name in names:
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise UsageError(f'--{name.replace("_", "-")} must be zero or positive, got {value}')


def _probability(args, *names):
    for name in names:
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and 0 <= value <= 1):
            raise UsageError(f'--{name.replace("_", "-")} must be in [0, 1], got {value}')


def _check_float_range(args, parser):
    """ Every float flag within the parameters' dtype: the optimizer turns lr, weight decay, momentum, ... into
    that dtype at the first update, and a value beyond it would stop the run there. """
    dtype = args.model_dtype or 'float32'
    largest = torch.finfo(getattr(torch, dtype)).max
    for action in parser._actions:
        values = getattr(args, action.dest, None)
        if action.type is not float or values is None:
            continue
        for value in values if isinstance(values, (list, tuple)) else [values]:
            if math.isfinite(value) and abs(value) > largest:
                raise UsageError(f'{_flag(action)} {value:g} is beyond what the parameters\' dtype holds ({dtype}, at '
                                 f'most {largest:.4g}): pass a smaller value')


MIXING_FLAGS = {'mixup_alpha': '--mixup', 'cutmix_alpha': '--cutmix', 'cutmix_minmax': '--cutmix-minmax',
                'prob': '--mixup-prob', 'switch_prob': '--mixup-switch-prob', 'label_smoothing': '--smoothing'}
SAM_FLAGS = {'rho': '--rho', 'interval': '--sam-interval', 'reuse': '--sam-reuse', 'perturb': '--sam-perturb'}


def _check_sam(args):
    """ The SAM options, by the optimizer's own rules (`timm_gmix.sam.check_options`), named as flags. """
    changed = [flag for flag, value, default in (('--sam-interval', args.sam_interval, 1),
                                                  ('--sam-reuse', args.sam_reuse, 0.0),
                                                  ('--sam-perturb', args.sam_perturb, 'gradient')) if value != default]
    if changed and not is_sam(args.opt):
        raise UsageError(f'{changed[0]} is an option of the SAM step: use --opt gmix_sam')
    rho = args.rho if args.rho is not None else (DEFAULT_RHO_ADAPTIVE if args.asam else DEFAULT_RHO)
    try:
        check_options(rho, args.sam_interval, args.sam_reuse, args.sam_perturb, names=SAM_FLAGS)
    except ValueError as e:
        raise UsageError(str(e)) from None


def check_args(args, parser=None):
    """ Raise UsageError for a value or combination that cannot train as asked. """
    parser = parser or build_parser()
    for action in parser._actions:
        if action.dest in NOT_APPLICABLE and getattr(args, action.dest) != action.default:
            raise UsageError(f'{_flag(action)} is not supported here: {NOT_APPLICABLE[action.dest]}; '
                             f'drop it (or set it to its default, {action.default!r})')
    _check_float_range(args, parser)
    for flag, name in (('--opt', args.opt), ('--sam-base', args.sam_base)):
        if registry_name(name) not in list_optimizers():
            raise UsageError(f'unknown optimizer {name!r} for {flag}: choose a name from '
                             f'timm.optim.list_optimizers() (gmix_sam for the G-Mix family)')
    if is_sam(args.sam_base):
        raise UsageError('--sam-base must be a plain optimizer (sgd, adamw, ...), not SAM itself')
    if args.mixup_mode in ('bg', 'dg') and not is_sam(args.opt):
        raise UsageError(f'--mixup-mode {args.mixup_mode} needs the SAM passes: use --opt gmix_sam')
    if args.mixup_mode in GMIX_MODES and not mixing_enabled(args):
        raise UsageError(f'--mixup-mode {args.mixup_mode} mixes examples: set --mixup and/or --cutmix above 0')
    _check_sam(args)
    _non_negative(args, 'lr', 'lr_base', 'warmup_lr', 'min_lr', 'weight_decay', 'momentum',
                  'drop', 'drop_path', 'drop_block', 'reprob', 'epoch_repeats', 'decay_epochs',
                  'decay_rate', 'color_jitter', 'layer_decay_min_scale', 'aug_repeats')
    _positive(args, 'clip_grad', 'crop_pct', 'layer_decay', 'bn_eps', 'opt_eps')
    _probability(args, 'gmix_ratio', 'hflip', 'vflip', 'model_ema_decay',
                 'color_jitter_prob', 'grayscale_prob', 'gaussian_blur_prob', 'bn_momentum')
    try:  # timm's Mixup arguments, by the mixing function's own rules, named as flags
        check_mixing(args.mixup, args.cutmix, args.cutmix_minmax, args.mixup_prob, args.mixup_switch_prob,
                     args.smoothing, names=MIXING_FLAGS)
    except ValueError as e:
        raise UsageError(str(e)) from None
    for name in ('batch_size', 'grad_accum_steps', 'epochs', 'val_interval', 'log_interval', 'lr_base_size',
                 'max_bad_steps', 'recount', 'lr_cycle_limit'):
        if getattr(args, name) < 1:
            raise UsageError(f'--{name.replace("_", "-")} must be at least 1, got {getattr(args, name)}')
    if args.checkpoint_hist < 1:
        raise UsageError(f'--checkpoint-hist must be at least 1, as in timm (the best epoch is always kept, as '
                         f'checkpoint-<epoch>/ and model_best/), got {args.checkpoint_hist}')
    for name in ('workers', 'recovery_interval', 'cooldown_epochs', 'warmup_epochs',
                 'mixup_off_epoch', 'tta', 'aug_splits', 'start_epoch', 'patience_epochs'):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise UsageError(f'--{name.replace("_", "-")} must be zero or positive, got {getattr(args, name)}')
    for name in ('validation_batch_size', 'train_num_samples', 'val_num_samples', 'train_batches_per_epoch',
                 'num_classes', 'img_size'):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f'--{name.replace("_", "-")} must be at least 1, got {getattr(args, name)}')
    if args.device_data:
        check_device_data(args)
    if args.train_subset is not None and not 0 < args.train_subset <= 1:
        raise UsageError(f'--train-subset must be in (0, 1], got {args.train_subset}')
    if mixing_enabled(args) and args.batch_size % 2:
        raise UsageError(f'mixing pairs examples, so --batch-size must be even (got {args.batch_size})')
    for name in ('scale', 'ratio'):
        lo_hi = getattr(args, name)
        if lo_hi is not None and (len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1]):
            raise UsageError(f'--{name} takes two numbers MIN MAX with 0 < MIN <= MAX, got {" ".join(map(str, lo_hi))}')
    if args.opt_betas is not None and not all(0 <= b < 1 for b in args.opt_betas):
        raise UsageError(f'--opt-betas must be in [0, 1), got {" ".join(map(str, args.opt_betas))}')
    if args.mixed_precision is not None and args.amp and mixed_precision(args) != (
            'bf16' if args.amp_dtype == 'bfloat16' else 'fp16'):
        raise UsageError(f'--amp --amp-dtype {args.amp_dtype} and --mixed-precision {args.mixed_precision} '
                         f'disagree: give one of them')
    if args.model_dtype not in (None, 'float32') and (args.amp or args.mixed_precision not in (None, 'no')):
        raise UsageError('--model-dtype float16/bfloat16 trains without mixed precision: drop --amp/--mixed-precision')
    if args.aug_splits == 1:
        raise UsageError('--aug-splits must be 0 (off) or at least 2')
    if args.jsd_loss and args.aug_splits < 2:
        raise UsageError('--jsd-loss compares the augmentation splits: set --aug-splits 2 or more')
    if args.split_bn and args.aug_splits < 2 and not args.resplit:
        raise UsageError('--split-bn needs --aug-splits 2 or more (or --resplit), as in timm')
    if args.aug_splits and args.no_aug:
        raise UsageError('--aug-splits makes augmented views: drop --no-aug')
    if args.aug_splits and mixing_enabled(args):
        raise UsageError('--aug-splits cannot be combined with --mixup/--cutmix (as in timm): drop one of them')
    if args.jsd_loss and args.bce_loss:
        raise UsageError('--jsd-loss and --bce-loss are two different losses: give one of them')
    if args.torchscript and args.sync_bn:
        raise UsageError('--sync-bn cannot be used with --torchscript (as in timm)')
    if args.device not in ('cuda', 'cpu') and not args.device.startswith('cuda:'):
        raise UsageError(f'--device {args.device}: Accelerate places each process on its device; use cuda '
                         f'(the default) or cpu')
    if args.push_to_hub is not None and '/' not in args.push_to_hub:
        raise UsageError(f'--push-to-hub {args.push_to_hub}: give a Hub repository as <user or org>/<name>')
