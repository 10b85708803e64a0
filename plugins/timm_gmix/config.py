""" train.py's command line: timm's flag names and meanings, the plugin's flags, YAML presets, and the
checks that turn bad input into one clear line before training starts.

`-c/--config file.yaml` sets defaults (keys are flag names with underscores); flags on the command line
override it. Unlike timm, an unknown key is an error.
"""
import argparse
import math
import sys
from pathlib import Path

import yaml
from timm.optim import list_optimizers
from timm.utils import ParseKwargs

from .mixup import GMIX_MODES, TIMM_MODES, FLAG_CHOICES
from .sam import is_sam, registry_name


class UsageError(ValueError):
    """ Bad input: train.py prints the message as one line and exits before training. """


def reason(error: Exception) -> str:
    """ The first sentence of an exception's message, to quote inside a one-line UsageError. """
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text.split('. ')[0].rstrip('.')


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def _float_pair(text):
    return tuple(float(v) for v in text.split(','))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(description='timm-style training with G-Mix, BG-Mix and DG-Mix on Accelerate')
    parser.add_argument('-c', '--config', default='', metavar='FILE', help='YAML preset; flags override it')

    group = parser.add_argument_group('Data')
    group.add_argument('--dataset', default='digits',
                       help='"digits" (built in), "hfds/<Hub name or local folder>", a folder with the data '
                            '(save_to_disk, parquet, csv, images), or "folder" with --data-dir')
    group.add_argument('--data-dir', default=None,
                       help='--dataset folder: image folder DIR/<split>/<class>/<image>; hfds/: download cache')
    group.add_argument('--train-split', default='train')
    group.add_argument('--val-split', default='validation')
    group.add_argument('--image-column', '--input-key', default='image', help='column of the images')
    group.add_argument('--label-column', '--target-key', default='label', help='column of the class labels')
    group.add_argument('--train-subset', type=float, default=None,
                       help='train on this fraction (0-1] of the training split (the same examples for every --seed)')
    group.add_argument('-j', '--workers', type=int, default=2)

    group = parser.add_argument_group('Model')
    group.add_argument('--model', default='resnet18')
    group.add_argument('--pretrained', action='store_true')
    group.add_argument('--pretrained-path', default=None, help='local .safetensors weights to start from')
    group.add_argument('--num-classes', type=int, default=None, help='default: read from the data')
    group.add_argument('--img-size', type=int, default=None)
    group.add_argument('--in-chans', type=int, default=None)
    group.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                       help='extra model arguments, e.g. img_size=32 patch_size=4 (timm)')
    group.add_argument('--drop', type=float, default=0.0)
    group.add_argument('--drop-path', type=float, default=None)
    group.add_argument('--model-ema', action='store_true')
    group.add_argument('--model-ema-decay', type=float, default=0.998)
    group.add_argument('-b', '--batch-size', type=int, default=64, help='per process')
    group.add_argument('-vb', '--validation-batch-size', type=int, default=None)

    group = parser.add_argument_group('Optimizer')
    group.add_argument('--opt', default='gmix_sam', help='any timm optimizer; gmix_sam for the G-Mix family')
    group.add_argument('--opt-eps', type=float, default=None)
    group.add_argument('--opt-betas', type=float, nargs='+', default=None)
    group.add_argument('--momentum', type=float, default=0.9)
    group.add_argument('--weight-decay', type=float, default=2e-5)
    group.add_argument('--clip-grad', type=float, default=None)
    group.add_argument('--clip-mode', default='norm', choices=('norm', 'value', 'agc'))
    group.add_argument('--layer-decay', type=float, default=None)
    group.add_argument('--sam-base', default='sgd', help='base optimizer that SAM wraps (timm registry name)')
    group.add_argument('--rho', type=float, default=None, help='SAM radius (default 0.05, ASAM 2.0)')
    group.add_argument('--asam', action='store_true', help='adaptive SAM')
    group.add_argument('--sync-ascent', action='store_true',
                       help='all-reduce the ascent gradient (default: each replica perturbs by its own)')
    group.add_argument('--grad-accum-steps', type=int, default=1)

    group = parser.add_argument_group('Schedule')
    group.add_argument('--sched', default='cosine')
    group.add_argument('--sched-on-updates', action='store_true')
    group.add_argument('--lr', type=float, default=0.05)
    group.add_argument('--epochs', type=int, default=10)
    group.add_argument('--warmup-epochs', type=int, default=1)
    group.add_argument('--warmup-lr', type=float, default=1e-5)
    group.add_argument('--min-lr', type=float, default=0.0)
    group.add_argument('--cooldown-epochs', type=int, default=0)
    group.add_argument('--decay-epochs', type=float, default=90)
    group.add_argument('--decay-rate', type=float, default=0.1)

    group = parser.add_argument_group('Augmentation and mixing')
    group.add_argument('--hflip', type=float, default=0.5)
    group.add_argument('--scale', type=float, nargs=2, default=None)
    group.add_argument('--ratio', type=float, nargs=2, default=None)
    group.add_argument('--color-jitter', type=float, default=0.4)
    group.add_argument('--aa', default=None, help='AutoAugment policy, e.g. rand-m9-mstd0.5')
    group.add_argument('--reprob', type=float, default=0.0, help='random erasing probability')
    group.add_argument('--remode', default='pixel', help='random erasing mode (timm: const, rand, pixel)')
    group.add_argument('--recount', type=int, default=1, help='random erasing count')
    group.add_argument('--interpolation', default='')
    group.add_argument('--crop-pct', type=float, default=None)
    group.add_argument('--smoothing', type=float, default=0.1)
    group.add_argument('--mixup', type=float, default=0.0, help='mixup alpha, on if > 0')
    group.add_argument('--cutmix', type=float, default=0.0, help='cutmix alpha, on if > 0')
    group.add_argument('--cutmix-minmax', type=float, nargs=2, default=None)
    group.add_argument('--mixup-prob', type=float, default=1.0)
    group.add_argument('--mixup-switch-prob', type=float, default=0.5)
    group.add_argument('--mixup-mode', default='batch', choices=TIMM_MODES + GMIX_MODES,
                       help='timm: batch, pair, elem; G-Mix: g, bg, dg')
    group.add_argument('--lam-mode', default='batch', choices=TIMM_MODES, help='lam granularity of g/bg/dg')
    group.add_argument('--gmix-ratio', type=float, default=0.5, help='gamma: fraction flagged by bg/dg')
    group.add_argument('--gmix-flag', default='largest', choices=FLAG_CHOICES,
                       help='flag the largest (default) or smallest sharpness sensitivities')

    group = parser.add_argument_group('Run')
    group.add_argument('--seed', type=int, default=42)
    group.add_argument('--output', default='output', help='runs are written to OUTPUT/EXPERIMENT')
    group.add_argument('--experiment', default='', help='default: model-opt-mode-seed')
    group.add_argument('--resume', default='', help='checkpoint folder, or a run folder to take its latest')
    group.add_argument('--amp', action='store_true', help='mixed precision with --amp-dtype (timm)')
    group.add_argument('--amp-dtype', default='float16', choices=('float16', 'bfloat16'))
    group.add_argument('--mixed-precision', default=None, choices=('no', 'fp16', 'bf16'), help="Accelerate's name")
    group.add_argument('--max-bad-steps', type=int, default=10,
                       help='stop after this many non-finite steps in a row')
    group.add_argument('--export-ema', action='store_true', help='export the EMA weights as the final model')
    return parser


def load_config(path: str, parser: argparse.ArgumentParser) -> dict:
    """ Read a YAML preset; every key must be a flag of `parser` (with underscores). """
    if not Path(path).is_file():
        raise UsageError(f'config file {path} does not exist: check the path given to -c/--config')
    try:
        cfg = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        raise UsageError(f'config file {path} is not valid YAML ({reason(e)}): fix or remove it')
    if not isinstance(cfg, dict):
        raise UsageError(f'config file {path} must be a mapping of flag names to values')
    known = {a.dest for a in parser._actions}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise UsageError(f'unknown key(s) {", ".join(unknown)} in {path}: keys are train.py flag names '
                         f'with underscores (see python train.py --help)')
    return cfg


def parse_args(argv=None) -> argparse.Namespace:
    """ Parse the command line over an optional YAML preset, then check the combination. """
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**load_config(pre.config, parser))
    args = parser.parse_args(argv)
    check_args(args)
    return args


def mixing_enabled(args) -> bool:
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


def mixed_precision(args):
    """ Accelerate's precision from --mixed-precision or timm's --amp/--amp-dtype; None (neither given)
    leaves it to `accelerate launch --mixed_precision` / the Accelerate config, which an explicit 'no' would
    silently override. """
    if args.mixed_precision is not None:
        return args.mixed_precision
    if args.amp:
        return 'bf16' if args.amp_dtype == 'bfloat16' else 'fp16'
    return None


def check_args(args):
    """ Raise UsageError for a combination that cannot train as asked. """
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
    if args.rho is not None and not (math.isfinite(args.rho) and args.rho > 0):
        raise UsageError(f'--rho must be a positive number (0.05 is usual for SAM, 2.0 for ASAM), got {args.rho}')
    if not 0.0 <= args.gmix_ratio <= 1.0:
        raise UsageError(f'--gmix-ratio (gamma) must be in [0, 1], got {args.gmix_ratio}')
    if args.batch_size < 1:
        raise UsageError(f'--batch-size must be positive, got {args.batch_size}')
    if args.grad_accum_steps < 1 or args.batch_size % args.grad_accum_steps:
        raise UsageError(f'--grad-accum-steps {args.grad_accum_steps} must divide --batch-size {args.batch_size}')
    if mixing_enabled(args) and args.batch_size % 2:
        raise UsageError(f'mixing pairs examples, so --batch-size must be even (got {args.batch_size})')
    if args.mixup_mode in ('bg', 'dg') and args.gmix_ratio > 0 and args.batch_size < 2:
        raise UsageError(f'--mixup-mode {args.mixup_mode} needs a batch of at least 2 to flag anything')
    if args.train_subset is not None and not 0 < args.train_subset <= 1:
        raise UsageError(f'--train-subset must be in (0, 1], got {args.train_subset}')
    if args.epochs < 1:
        raise UsageError(f'--epochs must be at least 1, got {args.epochs}')


def main_guard(main):
    """ Run `main`, turning UsageError into one line on stderr and exit status 2. """
    try:
        return main()
    except UsageError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
