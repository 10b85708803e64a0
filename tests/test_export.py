""" The exported model: loadable with timm's local-dir: and predicting bit for bit as trained, a config.json
that describes this model and not the ImageNet weights of its architecture, a model card stating the run, and
the Hub upload through timm's push_to_hf_hub (Hub client stubbed) holding the same files. """
import json
from pathlib import Path

import huggingface_hub
import pytest
import timm
import torch
from timm.models import _hub

from timm_gmix.training import export
from timm_gmix.training.args import parse_args
from timm_gmix.training.errors import UsageError
from timm_gmix.training.export import check_push_to_hub, export_model, push_to_hub

DG_ARGS = ['--model', 'resnet10t', '--opt', 'gmix_sam', '--rho', '0.1', '--mixup', '0.8', '--mixup-mode', 'dg',
           '--gmix-ratio', '0.25', '--lam-mode', 'pair']
DATA_CONFIG = {'input_size': (3, 32, 32), 'interpolation': 'bilinear', 'mean': (0.5, 0.5, 0.5),
               'std': (0.25, 0.25, 0.25), 'crop_pct': 1.0, 'crop_mode': 'center'}
CARD = {'dataset': 'digits', 'num_train': 108, 'num_val': 36, 'label_names': ['zero', 'one', 'two'],
        'final': {'loss': 0.5, 'top1': 87.5, 'top5': 100.0}, 'best_metric': 91.25, 'best_epoch': 2,
        'eval_metric': 'top1', 'epochs_trained': 4}
# The ImageNet metadata of the architecture's published weights, none of which describes the trained model.
IMAGENET_FIELDS = {'tag': 'c3_in1k', 'hf_hub_id': 'timm/resnet10t.c3_in1k', 'url': 'https://example.org/w.pth',
                   'paper_ids': 'arXiv:2110.00476', 'paper_name': 'ResNet strikes back', 'license': 'apache-2.0',
                   'origin_url': 'https://github.com/huggingface/pytorch-image-models', 'notes': ('ImageNet-1k',),
                   'label_names': ['tench', 'goldfish', 'great white shark'], 'test_input_size': (3, 224, 224),
                   'test_crop_pct': 0.95}


@pytest.fixture
def trained_model():
    """ A small timm model with trained-looking weights and BatchNorm statistics, carrying ImageNet metadata. """
    torch.manual_seed(0)
    model = timm.create_model('resnet10t', num_classes=3)
    with torch.no_grad():
        for buffer in model.buffers():
            if buffer.is_floating_point():
                buffer.uniform_(0.5, 1.5)
    model.pretrained_cfg = {**model.pretrained_cfg, **IMAGENET_FIELDS}
    return model.eval()


def test_export_loads_with_local_dir_and_predicts_identically(trained_model, tmp_path):
    args = parse_args(DG_ARGS)
    source_cfg = trained_model.pretrained_cfg
    folder = export_model(trained_model, tmp_path / 'run' / 'model', args, DATA_CONFIG, CARD)
    assert folder == tmp_path / 'run' / 'model'
    assert sorted(p.name for p in (tmp_path / 'run').iterdir()) == ['model']
    assert sorted(p.name for p in folder.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    assert trained_model.pretrained_cfg is source_cfg  # the caller's model is left as it was

    loaded = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), trained_model(x))

    config = json.loads((folder / 'config.json').read_text())
    assert {k: v for k, v in config.items() if k != 'pretrained_cfg'} == {
        'architecture': 'resnet10t', 'num_classes': 3, 'num_features': 512, 'global_pool': 'avg',
        'label_names': ['zero', 'one', 'two'], 'model_args': {'num_classes': 3, 'in_chans': 3, 'global_pool': 'avg'}}
    assert config['pretrained_cfg'] == {
        'input_size': [3, 32, 32], 'fixed_input_size': False, 'interpolation': 'bilinear', 'crop_pct': 1.0,
        'crop_mode': 'center', 'mean': [0.5, 0.5, 0.5], 'std': [0.25, 0.25, 0.25], 'num_classes': 3,
        'pool_size': None, 'first_conv': 'conv1.0', 'classifier': 'fc', 'custom_load': False}
    assert loaded.pretrained_cfg['label_names'] == ['zero', 'one', 'two']


def test_model_card_states_the_run(trained_model, tmp_path):
    args = parse_args([*DG_ARGS, '--pretrained', '--push-to-hub', 'someone/digits-dg'])
    folder = export_model(trained_model, tmp_path / 'run' / 'model', args, DATA_CONFIG, CARD)
    readme = (folder / 'README.md').read_text()
    front_matter, body = readme.split('---\n')[1:]
    assert front_matter == ('tags:\n- image-classification\n- timm\n- g-mix\npipeline_tag: image-classification\n'
                            'library_name: timm\nlicense: apache-2.0\n')  # from the pretrained weights
    details = body[body.index('## Model Details\n'):body.index('\n## Model Usage')].splitlines()[1:]
    assert details == [
        '- **Base architecture:** resnet10t',
        '- **Starting weights:** timm/resnet10t.c3_in1k',
        '- **Data:** digits: 108 training / 36 validation images',
        '- **Classes:** 3 (zero, one, two)',
        '- **Optimizer:** gmix_sam: SAM over sgd, rho 0.1',
        '- **Mixing:** DG-Mix (Decomposed G-Mix), mixup alpha 0.8, cutmix alpha 0.0, lam mode pair, gamma 0.25 '
        '(flagging the largest sharpness sensitivities)',
        '- **Epochs trained:** 4',
        '- **Final validation:** top-1 87.50%, top-5 100.00%, loss 0.5000',
        '- **Best validation:** top-1 91.25% at epoch 3']
    assert body.startswith('# Model card for digits-dg\n')
    assert ('Xingyu Li and Bo Tang, "G-Mix: A Generalized Mixup Learning Framework Towards Flat Minima", IEEE '
            'Transactions on Artificial Intelligence, 2025 (arXiv:2308.03236)') in body
    assert "model = timm.create_model('hf-hub:someone/digits-dg', pretrained=True)\n" in body


def test_model_card_of_a_baseline_from_scratch(trained_model, tmp_path):
    args = parse_args(['--model', 'resnet10t', '--opt', 'gmix_sam', '--asam'])
    card = {**CARD, 'final': None, 'label_names': None}
    folder = export_model(trained_model, tmp_path / 'model', args, DATA_CONFIG, card)
    config = json.loads((folder / 'config.json').read_text())
    assert 'label_names' not in config and 'label_names' not in config['pretrained_cfg']  # not ImageNet's
    readme = (folder / 'README.md').read_text()
    for line in ('license: other\n', '- **Classes:** 3\n', '- **Starting weights:** random initialization\n',
                 '- **Optimizer:** gmix_sam: ASAM over sgd, rho 2.0\n', '- **Mixing:** none\n'):
        assert line in readme
    assert 'Final validation' not in readme


def test_usage_of_the_card_loads_the_export(trained_model, tmp_path):
    """ The card's usage code, run on the exported folder, gives the model and its preprocessing. """
    folder = export_model(trained_model, tmp_path / 'model', parse_args(DG_ARGS), DATA_CONFIG, CARD)
    readme = (folder / 'README.md').read_text()
    code = readme.split('```python\n')[1].split('```')[0].replace('<this folder>', str(folder))
    scope = {}
    exec(code, scope)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(scope['model'](x), trained_model(x))
    assert [type(t).__name__ for t in scope['transform'].transforms][-1] == 'Normalize'
    assert scope['transform'].transforms[-1].std.tolist() == [0.25, 0.25, 0.25]


def test_export_replaces_an_older_export_only_when_complete(trained_model, tmp_path, monkeypatch):
    args = parse_args(DG_ARGS)
    folder = export_model(trained_model, tmp_path / 'model', args, DATA_CONFIG, CARD)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def killed(*a, **k):
        raise KeyboardInterrupt('killed while saving')

    monkeypatch.setattr(export, 'save_for_hf', killed)
    with pytest.raises(KeyboardInterrupt):
        export_model(trained_model, folder, args, DATA_CONFIG, {**CARD, 'epochs_trained': 5})
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    monkeypatch.undo()
    export_model(trained_model, folder, args, DATA_CONFIG, {**CARD, 'epochs_trained': 5})
    assert '- **Epochs trained:** 5' in (folder / 'README.md').read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ['model']


class FakeHfApi:
    """ The Hub client as timm's push_to_hf_hub calls it, recording the upload instead of sending it. """
    uploads = []

    def __init__(self, token=None, library_name=None, library_version=None):
        self.token = token

    def create_repo(self, repo_id, private=False, exist_ok=False):
        return huggingface_hub.RepoUrl(f'https://huggingface.co/{repo_id}')

    def file_exists(self, repo_id, filename, revision=None):
        return False

    def upload_folder(self, repo_id, folder_path, revision=None, create_pr=False, commit_message=''):
        files = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
        FakeHfApi.uploads.append({'repo_id': repo_id, 'files': files, 'commit_message': commit_message})
        return 'commit'


def test_push_uploads_the_export_with_timm(trained_model, tmp_path, monkeypatch):
    monkeypatch.setattr(_hub, 'HfApi', FakeHfApi)
    FakeHfApi.uploads = []
    args = parse_args([*DG_ARGS, '--push-to-hub', 'someone/digits-dg'])
    folder = export_model(trained_model, tmp_path / 'model', args, DATA_CONFIG, CARD)
    assert push_to_hub(trained_model, folder, args, DATA_CONFIG, CARD) == 'commit'
    (upload,) = FakeHfApi.uploads
    assert upload['repo_id'] == 'someone/digits-dg'
    assert upload['files'] == {p.name: p.read_bytes() for p in folder.iterdir()}  # the same three files, byte for byte
    assert sorted(upload['files']) == ['README.md', 'config.json', 'model.safetensors']


def test_failed_upload_is_one_line(trained_model, tmp_path, monkeypatch):
    class Unreachable(FakeHfApi):
        def create_repo(self, repo_id, private=False, exist_ok=False):
            raise ConnectionError('Name or service not known')

    monkeypatch.setattr(_hub, 'HfApi', Unreachable)
    args = parse_args([*DG_ARGS, '--push-to-hub', 'someone/digits-dg'])
    with pytest.raises(UsageError) as error:
        push_to_hub(trained_model, tmp_path / 'model', args, DATA_CONFIG, CARD)
    assert str(error.value) == (f'the upload to someone/digits-dg failed (Name or service not known); the model is '
                                f'saved in {tmp_path / "model"}: upload it with `hf upload someone/digits-dg '
                                f'{tmp_path / "model"}`')


def test_push_to_hub_is_checked_before_training(monkeypatch):
    args = parse_args(['--push-to-hub', 'someone/digits-dg'])
    monkeypatch.setattr(huggingface_hub, 'get_token', lambda: 'hf_token')
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', False)
    check_push_to_hub(args)

    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    with pytest.raises(UsageError) as error:
        check_push_to_hub(args)
    assert str(error.value) == ('--push-to-hub someone/digits-dg needs the Hub, but HF_HUB_OFFLINE is set: unset '
                                'HF_HUB_OFFLINE, or drop --push-to-hub')
    check_push_to_hub(parse_args([]))  # offline without --push-to-hub is fine

    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', False)
    monkeypatch.setattr(huggingface_hub, 'get_token', lambda: None)
    with pytest.raises(UsageError) as error:
        check_push_to_hub(args)
    assert str(error.value) == ('--push-to-hub someone/digits-dg needs a Hugging Face token: run `huggingface-cli '
                                'login` or set HF_TOKEN, or drop --push-to-hub')
