""" What train.py builds from its arguments: the timm model (random, Hub, local file or local folder
weights) with timm's model flags, the optimizer (timm's factory, with SAM's arguments for gmix_sam) and the
mixing function.

Each takes train.py's parsed arguments, so a preset can be checked without running it.
"""
from pathlib import Path

import timm
import torch
from timm.optim import create_optimizer_v2, optimizer_kwargs

from .args import mixing_enabled
from .errors import UsageError, reason
from ..mixup import GMixup
from ..sam import is_sam


MODEL_KWARG_FLAGS = {'drop_rate': '--drop', 'drop_path_rate': '--drop-path', 'drop_block_rate': '--drop-block',
                     'global_pool': '--gp', 'bn_momentum': '--bn-momentum', 'bn_eps': '--bn-eps',
                     'scriptable': '--torchscript', 'in_chans': '--in-chans'}  # num_classes: from the data


def create_model(args, num_classes: int):
    """ The timm model: random init, or pretrained weights (`--pretrained` from the Hub, `--pretrained-path`
    file, `local-dir:` folder). timm replaces the classifier head by a fresh one when `num_classes` differs
    from the weights'; the rest of the network starts from the weights. """
    pretrained = args.pretrained or args.pretrained_path is not None
    in_chans = args.in_chans if args.in_chans is not None else (args.input_size or [None])[0]
    kwargs = dict(num_classes=num_classes, drop_rate=args.drop, drop_path_rate=args.drop_path,
                  drop_block_rate=args.drop_block, global_pool=args.gp, bn_momentum=args.bn_momentum,
                  bn_eps=args.bn_eps, scriptable=args.torchscript or None, in_chans=in_chans)
    for name in kwargs.keys() & args.model_kwargs.keys():
        flag = MODEL_KWARG_FLAGS.get(name)
        raise UsageError(f'--model-kwargs {name}= is set by ' + (f'the flag {flag}: use {flag} instead' if flag else
                         'train.py itself: drop it from --model-kwargs'))
    kwargs.update(args.model_kwargs)
    if args.initial_checkpoint and not Path(args.initial_checkpoint).is_file():
        raise UsageError(f'--initial-checkpoint {args.initial_checkpoint} does not exist: give a weights file')
    if args.model.startswith('local-dir:') and not (Path(args.model[len('local-dir:'):]) / 'config.json').is_file():
        raise UsageError(f'--model {args.model}: no config.json in that folder; give a folder that train.py '
                         f'exported (OUTPUT/EXPERIMENT/model) or that timm.models.save_for_hf wrote')
    if args.pretrained_path is not None:
        kwargs['pretrained_cfg_overlay'] = weights_file_cfg(args.model, args.pretrained_path)
    weights = args.pretrained_path or 'pretrained weights'
    try:
        model = timm.create_model(args.model, pretrained=pretrained, **kwargs)
        if args.initial_checkpoint:
            timm.models.load_checkpoint(model, args.initial_checkpoint)
        return model
    except TypeError as e:  # a keyword the architecture does not take (--model-kwargs, --gp, --bn-*, ...)
        raise UsageError(f'model {args.model} does not take these arguments ({reason(e)}): check --model-kwargs '
                         f'and the model flags') from e
    except RuntimeError as e:
        if args.initial_checkpoint and 'state_dict' in str(e):
            raise UsageError(f'--initial-checkpoint {args.initial_checkpoint} does not fit {args.model} '
                             f'({reason(e)}): pass weights saved from the same architecture') from e
        if 'Unknown model' in str(e):
            raise UsageError(f'unknown model {args.model!r}: pick a name from timm.list_models(), '
                             f'hf-hub:<repo> or local-dir:<folder>')
        if not pretrained:
            raise
        if args.pretrained_path is not None or args.model.startswith('local-dir:'):
            raise UsageError(f'{weights} do not fit {args.model} ({reason(e)}): '
                             f'pass the --model that the weights were saved from')
        raise UsageError(f'could not load {weights} for {args.model} ({reason(e)}); '
                         f'offline, pass --pretrained-path <file>.safetensors or --model local-dir:<folder>')
    except (OSError, ValueError) as e:
        if not pretrained:
            raise
        raise UsageError(f'could not get {weights} for {args.model} ({reason(e)}); '
                         f'offline, pass --pretrained-path <file>.safetensors or --model local-dir:<folder>')


def weights_file_cfg(model_name: str, path) -> dict:
    """ timm's `pretrained_cfg_overlay` for a local weights file.

    timm keeps a file's classifier only when `num_classes` equals the pretrained config's (1000 for most
    models), so a head saved with the very number of classes being trained would be dropped too. The
    overlay gives the file's own number of classes: a head that fits is loaded, one that does not is
    replaced by a fresh one. """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f'--pretrained-path {path} does not exist: give a .safetensors file')
    overlay = dict(file=str(path))
    if path.suffix != '.safetensors':
        return overlay
    from safetensors import SafetensorError, safe_open
    try:
        pretrained_cfg = timm.models.get_pretrained_cfg(model_name)
    except Exception:  # hf-hub: / local-dir: names: timm's own rule applies
        pretrained_cfg = None
    classifiers = getattr(pretrained_cfg, 'classifier', None) or ()
    try:
        with safe_open(str(path), 'pt') as f:
            keys = set(f.keys())
            for name in (classifiers,) if isinstance(classifiers, str) else classifiers:
                if f'{name}.weight' in keys:
                    overlay.update(num_classes=f.get_slice(f'{name}.weight').get_shape()[0], label_offset=0)
                    break
    except (SafetensorError, OSError) as e:
        raise UsageError(f'--pretrained-path {path} is not a readable safetensors file ({reason(e)}): '
                         f'save weights with safetensors.torch.save_file(model.state_dict(), path)')
    return overlay


def configure_model(model, args):
    """ timm's model flags applied after creation, before Accelerate wraps the model: head init, gradient
    checkpointing, fast norm, jit fuser, split and synchronized BatchNorm, dtype, channels-last, TorchScript. """
    from timm.layers import convert_splitbn_model, convert_sync_batchnorm, set_fast_norm
    from timm.utils import set_jit_fuser

    if args.head_init_scale is not None or args.head_init_bias is not None:
        head = model.get_classifier()
        with torch.no_grad():
            if args.head_init_scale is not None:
                head.weight.mul_(args.head_init_scale)
                head.bias.mul_(args.head_init_scale)
            if args.head_init_bias is not None:
                head.bias.fill_(args.head_init_bias)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(enable=True)
    if args.fast_norm:
        set_fast_norm()
    if args.fuser:
        set_jit_fuser(args.fuser)
    if args.split_bn:
        model = convert_splitbn_model(model, max(args.aug_splits, 2))
    if args.sync_bn:
        model = convert_sync_batchnorm(model)
    if args.model_dtype:
        model.to(dtype=getattr(torch, args.model_dtype))
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.torchscript:
        model = torch.jit.script(model)
    return model


def check_input_size(model, args, input_size):
    """ One tiny forward before training, so a size the model cannot take is one clear line; and a batch
    BatchNorm cannot normalize (one example) is refused before it fails mid-training. """
    if args.batch_size < 2 and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise UsageError(f'model {args.model} has BatchNorm, which needs at least 2 examples per batch and process: '
                         f'raise --batch-size (-b {args.batch_size})')
    model.eval()
    dtype = next(model.parameters()).dtype
    try:
        with torch.no_grad():
            model(torch.zeros(2, *input_size, dtype=dtype))
    except (RuntimeError, AssertionError, ValueError) as e:
        raise UsageError(f'model {args.model} cannot take {input_size[1]}x{input_size[2]} images '
                         f'({reason(e)}): change --img-size or pass --model-kwargs img_size=N')


def create_optimizer(args, model):
    """ timm's optimizer factory with train.py's flags (layer decay included); for gmix_sam also the base
    optimizer, rho and ASAM. """
    sam_args = dict(base=args.sam_base, rho=args.rho, adaptive=args.asam, interval=args.sam_interval,
                    reuse=args.sam_reuse, perturb=args.sam_perturb) if is_sam(args.opt) else {}
    try:
        return create_optimizer_v2(model, **optimizer_kwargs(args), **args.opt_kwargs, **sam_args)
    except TypeError as e:
        raise UsageError(f'optimizer {args.opt} does not take these arguments ({reason(e)}): check --opt-kwargs') from e
    except ValueError as e:
        raise UsageError(f'--opt {args.opt}: {reason(e)}') from e


def create_mixup(args, num_classes: int):
    """ The mixing function (timm's Mixup with the G-Mix modes), or None when mixing is off. """
    if not mixing_enabled(args):
        return None
    return GMixup(
        mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
        prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
        lam_mode=args.lam_mode, gmix_ratio=args.gmix_ratio, gmix_flag=args.gmix_flag,
        label_smoothing=args.smoothing, num_classes=num_classes)
