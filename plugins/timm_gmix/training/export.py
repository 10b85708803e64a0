""" The exported model (timm's `save_for_hf` folder with a model card) and its upload to the Hugging Face Hub.

An export is what `timm.models.save_for_hf` writes (config.json, model.safetensors), loadable with
`timm.create_model('local-dir:<folder>', pretrained=True)`, plus a README.md model card. Its config.json
describes this model: the architecture's published-weights metadata (tag, Hub id, paper, license, label names)
is left out; classes and preprocessing are this run's.

`--push-to-hub` goes through timm's own `push_to_hf_hub`, which saves the model itself (it takes a model, not
a folder). Both paths get the same model metadata, save arguments and card, so the upload holds the same
config.json, model.safetensors and README.md as the export (timm keeps a README the repository already has).
"""
import copy
from contextlib import contextmanager
from pathlib import Path

import huggingface_hub
from timm.models import push_to_hf_hub, save_for_hf
from timm.models._hub import generate_readme  # the card writer push_to_hf_hub uses: both paths write one card

from ..mixup import GMIX_MODES
from ..sam import DEFAULT_RHO, DEFAULT_RHO_ADAPTIVE, is_sam
from .args import mixing_enabled
from .checkpoint import writing
from .errors import UsageError, reason

# pretrained_cfg keys that describe a model's architecture and inputs: everything else in an architecture's
# pretrained_cfg (tag, hf_hub_id, url, paper_ids, license, label_names, test-time sizes...) is about the
# published weights it was built from.
MODEL_CFG_KEYS = ('architecture', 'input_size', 'min_input_size', 'fixed_input_size', 'interpolation', 'crop_pct',
                  'crop_mode', 'mean', 'std', 'num_classes', 'pool_size', 'first_conv', 'classifier')
CITATION = ('Xingyu Li and Bo Tang, "G-Mix: A Generalized Mixup Learning Framework Towards Flat Minima", '
            'IEEE Transactions on Artificial Intelligence, 2025 (arXiv:2308.03236)')
BIBTEX = """@article{li2025gmix,
  title={G-Mix: A Generalized Mixup Learning Framework Towards Flat Minima},
  author={Li, Xingyu and Tang, Bo},
  journal={IEEE Transactions on Artificial Intelligence},
  year={2025},
  note={arXiv:2308.03236}
}"""
METHOD_NAMES = {'g': 'G-Mix', 'bg': 'BG-Mix (Binary G-Mix)', 'dg': 'DG-Mix (Decomposed G-Mix)'}


def _starting_weights(args, source_cfg: dict) -> str:
    if args.pretrained_path:
        return f'{args.pretrained_path} (classifier adapted to the classes)'
    if args.initial_checkpoint:
        return args.initial_checkpoint
    if args.pretrained:
        if args.model.startswith(('hf-hub:', 'local-dir:')):
            return args.model
        return source_cfg.get('hf_hub_id') or source_cfg.get('url') or args.model
    return 'random initialization'


def _optimizer(args) -> str:
    if not is_sam(args.opt):
        return args.opt
    rho = args.rho if args.rho is not None else DEFAULT_RHO_ADAPTIVE if args.asam else DEFAULT_RHO
    text = f'{args.opt}: {"ASAM" if args.asam else "SAM"} over {args.sam_base}, rho {rho}'
    if args.sam_perturb == 'momentum':
        text += ", perturbation from the base optimizer's momentum (MSAM)"
    if args.sam_interval > 1:
        text += f', full step every {args.sam_interval} updates'
    if args.sam_reuse:
        text += f', LookSAM reuse alpha {args.sam_reuse}'
    return text


def _mixing(args) -> str:
    if not mixing_enabled(args):
        return 'none'
    alphas = f'mixup alpha {args.mixup}, cutmix alpha {args.cutmix}'
    if args.mixup_mode not in GMIX_MODES:
        return f'timm Mixup/CutMix, mode {args.mixup_mode}, {alphas}'
    text = f'{METHOD_NAMES[args.mixup_mode]}, {alphas}, lam mode {args.lam_mode}'
    if args.mixup_mode != 'g':
        text += f', gamma {args.gmix_ratio} (flagging the {args.gmix_flag} sharpness sensitivities)'
    return text


def _metric(name: str, value: float) -> str:
    return f'loss {value:.4f}' if name == 'loss' else f'{name.replace("top", "top-")} {value:.2f}%'


def model_card(model, args, card: dict) -> dict:
    """ The model card, as timm's `generate_readme` takes it, for `model` trained with `args`.

    `card` (train.py fills it):
        dataset: the data's name or folder;  num_train, num_val: image counts;  label_names: class names or None
        final: validation metrics of the exported weights ({'top1', 'top5', 'loss', ...}) or None
        best_metric, best_epoch (0-based), eval_metric: the best validated epoch by --eval-metric (or None)
        epochs_trained: epochs completed
        starting_weights, license (optional): override what is derived from `args` and the architecture
    """
    source = model.pretrained_cfg
    names = card.get('label_names')
    classes = f'{model.num_classes}' + (f' ({", ".join(map(str, names))})' if names else '')
    details = {
        'Base architecture': source.get('architecture', args.model),
        'Starting weights': card.get('starting_weights') or _starting_weights(args, source),
        'Data': f'{card["dataset"]}: {card["num_train"]} training / {card["num_val"]} validation images',
        'Classes': classes,
        'Optimizer': _optimizer(args),
        'Mixing': _mixing(args),
        'Epochs trained': card['epochs_trained'],
    }
    if card.get('final'):
        details['Final validation'] = ', '.join(_metric(k, card['final'][k]) for k in ('top1', 'top5', 'loss')
                                                if k in card['final'])
    if card.get('best_epoch') is not None:
        details['Best validation'] = (f'{_metric(card["eval_metric"], card["best_metric"])} at epoch '
                                      f'{card["best_epoch"] + 1}')
    # weights derived from published ones keep their license; other weights' license is the trainer's to set
    license_ = card.get('license') or (source.get('license') if args.pretrained else None) or 'other'
    local = "timm.create_model('local-dir:<this folder>', pretrained=True)"
    load = (f"model = timm.create_model('hf-hub:{args.push_to_hub}', pretrained=True)\n# or from a copy of this "
            f"folder: {local}" if args.push_to_hub else f'model = {local}')
    return {
        'tags': ['image-classification', 'timm', 'g-mix'],
        'license': license_,
        'description': (f'A {details["Base architecture"]} image classifier trained on {card["dataset"]} with '
                        f'timm-gmix, the training code of: {CITATION}.'),
        'details': details,
        'usage': (f'```python\nimport timm\n\n{load}\nmodel.eval()\n'
                  f'transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))\n```\n'),
        'citation': BIBTEX,
    }


def _model_name(folder: Path, args) -> str:
    """ The card's title: the Hub repository's name (as timm's push titles it), else the run folder's. """
    return args.push_to_hub.split('/')[-1] if args.push_to_hub else folder.resolve().parent.name


def _contiguous(model):
    """ `model`, or a copy of it with contiguous weights where some are not (--channels-last): safetensors
    writes only contiguous tensors, and the model being trained keeps its layout. """
    if all(t.is_contiguous() for t in model.state_dict().values()):
        return model
    model = copy.deepcopy(model)
    for t in model.state_dict(keep_vars=True).values():
        t.data = t.data.contiguous()
    return model


@contextmanager
def _describing_this_model(model, label_names):
    """ The model as timm saves it: contiguous, with `pretrained_cfg` reduced to MODEL_CFG_KEYS (timm copies the
    architecture's pretrained_cfg into config.json and can add to it, not take away), and the model config
    with its class names. The caller's model is left as it was. """
    model = _contiguous(model)
    source = model.pretrained_cfg
    model.pretrained_cfg = {k: source[k] for k in MODEL_CFG_KEYS if k in source}
    try:
        yield model, {'label_names': list(label_names)} if label_names else {}
    finally:
        model.pretrained_cfg = source


def export_model(model, folder, args, data_config: dict, card: dict) -> Path:
    """ Write `model` to `folder` as config.json, model.safetensors (timm's `save_for_hf`) and a README.md model
    card (see `model_card` for `card`). Written to `<folder>.tmp`, which replaces an older `folder` only once
    complete. `data_config`: the resolved preprocessing (input_size, mean, std, crop_pct, interpolation). """
    folder = Path(folder)
    readme = generate_readme(model_card(model, args, card), _model_name(folder, args))
    with writing(folder) as tmp, _describing_this_model(model, card.get('label_names')) as (saved, model_config):
        save_for_hf(saved, tmp, model_config=model_config, model_args=args.model_kwargs, safe_serialization=True,
                    data_config=data_config)
        (tmp / 'README.md').write_text(readme, encoding='utf-8')
    return folder


def check_push_to_hub(args):
    """ Before training: --push-to-hub needs the Hub reachable by configuration and a token. """
    if not args.push_to_hub:
        return
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise UsageError(f'--push-to-hub {args.push_to_hub} needs the Hub, but HF_HUB_OFFLINE is set: unset '
                         f'HF_HUB_OFFLINE, or drop --push-to-hub')
    if huggingface_hub.get_token() is None:
        raise UsageError(f'--push-to-hub {args.push_to_hub} needs a Hugging Face token: run `huggingface-cli '
                         f'login` or set HF_TOKEN, or drop --push-to-hub')


def push_to_hub(model, folder, args, data_config: dict, card: dict):
    """ Upload `model` to the Hub repository --push-to-hub with timm's `push_to_hf_hub`, as `export_model` wrote
    it to `folder` (same arguments): the same config.json, model.safetensors and README.md. """
    try:
        with _describing_this_model(model, card.get('label_names')) as (saved, model_config):
            return push_to_hf_hub(saved, args.push_to_hub, commit_message='Add model trained with timm-gmix',
                                  model_config=model_config, model_card=model_card(model, args, card),
                                  model_args=args.model_kwargs, safe_serialization=True, data_config=data_config)
    except Exception as e:  # the Hub client raises HTTP, connection and OS errors of several kinds
        raise UsageError(f'the upload to {args.push_to_hub} failed ({reason(e)}); the model is saved in {folder}: '
                         f'upload it with `hf upload {args.push_to_hub} {folder}`') from e
