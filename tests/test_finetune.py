""" Fine-tuning offline (--pretrained-path, local-dir:), the classifier head for a new number of classes,
offline --pretrained without weights, layer-wise lr decay with gmix_sam, EMA and its export, and every
preset in configs/ building its model, optimizer and mixing function. """
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file, save_file
from timm.data import resolve_data_config

from helpers.image_data import CLASSES, make_saved_dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402
from helpers import DG_MIX, assert_bad_input, read_summary, run_train_py  # noqa: E402
from timm_gmix import GMixup, SAM  # noqa: E402
from timm_gmix.training.args import build_parser  # noqa: E402
from timm_gmix.training.factory import check_input_size, create_mixup, create_model, create_optimizer  # noqa: E402

MODEL = 'resnet10t'
HEAD = 'fc'
TINY = ['--model', MODEL, '--img-size', '32', '-b', '8', '--epochs', '1', '--workers', '0', '--warmup-epochs', '0']
# lr 0 all the way (no warmup lr): every parameter stays where it started; BatchNorm statistics still move
FROZEN = ['--lr', '0', '--lr-base', '0', '--warmup-lr', '0', '--min-lr', '0']  # timm reads --lr 0 as unset


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_saved_dataset(tmp_path_factory.mktemp('data') / 'saved')


def run(tmp_path, name, *argv):
    train.main([*map(str, argv), '--output', str(tmp_path), '--experiment', name])
    return tmp_path / name


def params(model):
    return {n: p.detach() for n, p in model.named_parameters()}


def saved_weights(num_classes, path, seed=0):
    """ A timm model with its own random weights, saved as safetensors (as a user's fine-tuned model is). """
    torch.manual_seed(seed)
    model = timm.create_model(MODEL, num_classes=num_classes)
    save_file(model.state_dict(), path)
    return model.state_dict()


def assert_starts_from(weights, checkpoint, head_kept):
    """ After a zero-lr run, each parameter equals `weights`: the body always, the head only if kept. """
    trained = load_file(checkpoint / 'model.safetensors')
    names = [n for n, _ in timm.create_model(MODEL, num_classes=len(CLASSES)).named_parameters()]
    for name in names:
        if not name.startswith(f'{HEAD}.'):
            assert torch.equal(trained[name], weights[name]), name
    assert trained[f'{HEAD}.weight'].shape[0] == len(CLASSES)
    if head_kept:
        assert torch.equal(trained[f'{HEAD}.weight'], weights[f'{HEAD}.weight'])
    else:  # a fresh head, not some rows of the saved one
        assert not any(torch.equal(trained[f'{HEAD}.weight'][0], row) for row in weights[f'{HEAD}.weight'])
    assert not torch.equal(trained['bn1.running_mean'], weights['bn1.running_mean'])  # it did train (lr 0)


@pytest.mark.parametrize('saved_classes', [10, len(CLASSES)], ids=['new_head', 'same_head'])
def test_pretrained_path_body_from_file_head_by_num_classes(saved_classes, data, tmp_path):
    """ timm drops a head whose size differs; a head of the right size is kept (timm alone would compare
    with the pretrained config's 1000 classes and drop it too). """
    weights = saved_weights(saved_classes, tmp_path / 'weights.safetensors')
    run_dir = run(tmp_path, 'ft', *TINY, *DG_MIX, *FROZEN, '--dataset', data,
                  '--pretrained-path', tmp_path / 'weights.safetensors')
    assert_starts_from(weights, run_dir / 'checkpoint-0', head_kept=saved_classes == len(CLASSES))


def test_finetune_export_and_local_dir(data, tmp_path):
    """ Fine-tune a saved 10-class model on 3 classes, reload the export with local-dir:, then fine-tune that
    folder with --pretrained: on the same classes, and on 2 coarse classes (a new head). """
    saved_weights(10, tmp_path / 'weights.safetensors')
    run_dir = run(tmp_path, 'ft', *TINY, *DG_MIX, '--lr', '0.05', '--dataset', data,
                  '--pretrained-path', tmp_path / 'weights.safetensors')
    exported = timm.create_model(f'local-dir:{run_dir / "model"}', pretrained=True).eval()
    reference = timm.create_model(MODEL, num_classes=len(CLASSES)).eval()
    reference.load_state_dict(load_file(run_dir / 'checkpoint-0' / 'model.safetensors'))
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(exported(x), reference(x), rtol=0, atol=0)

    folder = {k: v for k, v in load_file(run_dir / 'model' / 'model.safetensors').items()}
    again = run(tmp_path, 'again', *TINY, *DG_MIX, *FROZEN, '--dataset', data, '--model', f'local-dir:{run_dir / "model"}',
                '--pretrained')
    assert_starts_from(folder, again / 'checkpoint-0', head_kept=True)

    coarse = run(tmp_path, 'coarse', *TINY, *DG_MIX, *FROZEN, '--dataset', data, '--label-column', 'coarse',
                 '--model', f'local-dir:{run_dir / "model"}', '--pretrained')
    trained = load_file(coarse / 'checkpoint-0' / 'model.safetensors')
    assert trained[f'{HEAD}.weight'].shape[0] == 2
    for name, _ in reference.named_parameters():
        if not name.startswith(f'{HEAD}.'):
            assert torch.equal(trained[name], folder[name]), name



def test_bad_weights_are_one_clear_line(data, capsys, tmp_path):
    not_weights = tmp_path / 'notes.safetensors'
    not_weights.write_text('not a safetensors file')
    torch.manual_seed(0)
    save_file(timm.create_model('resnet18', num_classes=3).state_dict(), tmp_path / 'resnet18.safetensors')
    cases = [
        (['--pretrained-path', tmp_path / 'missing.safetensors'], 'does not exist'),
        (['--pretrained-path', not_weights], 'not a readable safetensors file'),
        (['--pretrained-path', tmp_path / 'resnet18.safetensors'], 'do not fit', '--model'),
        (['--model', f'local-dir:{tmp_path / "no_model"}', '--pretrained'], 'no config.json'),
    ]
    for argv, *expected in cases:
        assert_bad_input(capsys, tmp_path, [*TINY, '--dataset', data, *argv], *expected)


@pytest.mark.parametrize('model', [MODEL, f'hf-hub:timm/{MODEL}.c3_in1k'])
def test_offline_pretrained_without_local_weights(model, data, tmp_path):
    """ No network and nothing cached: one line pointing at the offline ways, not a Hub traceback. """
    proc = run_train_py(tmp_path, *TINY, '--dataset', data, '--model', model, '--pretrained',
                        HF_HUB_OFFLINE='1', HF_HOME=str(tmp_path / 'hf'))
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith('error: '), err
    assert '--pretrained-path' in err and 'local-dir:' in err, err
    assert not any(tmp_path.rglob('summary.csv'))


def test_layer_decay_with_gmix_sam(data, tmp_path):
    """ Each group's lr is the scheduled lr times its layer-decay scale, in the base optimizer SAM steps. """
    run_dir = run(tmp_path, 'ld', *TINY, *DG_MIX, '--dataset', data, '--layer-decay', '0.5', '--lr', '0.1',
                  '--sched', 'step', '--decay-epochs', '100')  # a constant lr over the run
    groups = torch.load(run_dir / 'checkpoint-0' / 'optimizer.bin', weights_only=True)['param_groups']
    scales = sorted({g['lr_scale'] for g in groups})
    assert scales == [0.5 ** k for k in range(len(scales) - 1, -1, -1)] and len(scales) >= 4
    for group in groups:
        assert group['lr'] == pytest.approx(0.1 * group['lr_scale'], rel=1e-12)


def _ema_state(checkpoint):
    """ The EMA's state in an Accelerate checkpoint (one of the registered objects). """
    for path in sorted(checkpoint.glob('custom_checkpoint_*.pkl')):
        state = torch.load(path, weights_only=False)
        if isinstance(state, dict) and any(k.startswith('module.') for k in state):
            return {k[len('module.'):]: v for k, v in state.items()}
    raise AssertionError(f'no EMA state in {checkpoint}')


@pytest.mark.parametrize('export_ema', [True, False], ids=['export_ema', 'export_live'])
def test_model_ema_is_validated_and_exported_when_chosen(export_ema, data, tmp_path):
    run_dir = run(tmp_path, 'ema', *TINY, *DG_MIX, '--lr', '0.05', '--dataset', data, '--model-ema',
                  '--model-ema-decay', '0.5', *(['--export-ema'] if export_ema else []))
    row = read_summary(run_dir)[0]
    assert {'eval_top1', 'eval_ema_top1', 'eval_ema_loss', 'eval_ema_top5'} <= set(row)
    live = load_file(run_dir / 'checkpoint-0' / 'model.safetensors')
    ema = _ema_state(run_dir / 'checkpoint-0')
    assert ema.keys() == live.keys()
    assert not torch.equal(ema[f'{HEAD}.weight'], live[f'{HEAD}.weight'])
    exported = load_file(run_dir / 'model' / 'model.safetensors')
    chosen = ema if export_ema else live
    assert exported.keys() == chosen.keys()
    for name in chosen:
        assert torch.equal(exported[name], chosen[name]), name


# train.py presets: every YAML file in configs/ except Accelerate's own config files
PRESETS = [p for p in sorted((ROOT / 'configs').glob('*.yaml'))
           if 'compute_environment' not in yaml.safe_load(p.read_text())]
DATASET_CLASSES = {'digits': 10, 'hfds/uoft-cs/cifar10': 10, 'hfds/uoft-cs/cifar100': 100, 'torch/fashion_mnist': 10}
# What the Hub datasets hold (their dataset cards): columns and splits the presets must name.
HUB_COLUMNS = {'hfds/uoft-cs/cifar10': ('img', 'label'), 'hfds/uoft-cs/cifar100': ('img', 'fine_label')}


@pytest.mark.parametrize('preset', PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_builds_without_network(preset):
    text = preset.read_text()
    assert text.startswith('# ') and len(text.split('\n# ')) >= 2, 'a preset starts with a comment saying what it is'
    assert set(yaml.safe_load(text)) <= {a.dest for a in build_parser()._actions}
    args = train.parse_args(['-c', str(preset)])
    num_classes = DATASET_CLASSES[args.dataset]
    if args.dataset in HUB_COLUMNS:
        assert (args.input_key, args.target_key) == HUB_COLUMNS[args.dataset]
        assert (args.train_split, args.val_split) == ('train', 'test')
    # The same architecture without weights: hf-hub:timm/<name> names a timm model with a pretrained tag.
    if args.model.startswith('hf-hub:timm/'):
        assert args.pretrained
        args.model = args.model[len('hf-hub:timm/'):]
        assert timm.is_model(args.model)
    args.pretrained = False
    model = create_model(args, num_classes)
    data_config = resolve_data_config(vars(args), model=model)
    assert data_config['input_size'] == (args.in_chans or 3, args.img_size, args.img_size)
    check_input_size(model, args, data_config['input_size'])
    optimizer = create_optimizer(args, model)
    if args.opt == 'gmix_sam':
        assert isinstance(optimizer, SAM) and optimizer.param_groups is optimizer.base_optimizer.param_groups
        assert optimizer.param_groups[0]['rho'] == (args.rho or 0.05)
    if args.layer_decay is not None:
        assert len({g['lr_scale'] for g in optimizer.param_groups}) > 2
    mixup = create_mixup(args, num_classes)
    assert isinstance(mixup, GMixup) and (mixup.gmix_mode or mixup.mode) == args.mixup_mode
