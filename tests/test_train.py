""" train.py end to end on the built-in digits, YAML configs, and bad input. """
import math
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402
from helpers import assert_bad_input, read_summary, run_train_py  # noqa: E402

# A small, fast run: a tenth of the digits, a small timm CNN with BatchNorm.
FAST = ['--model', 'resnet10t', '--img-size', '32', '--train-subset', '0.1', '-b', '16', '--epochs', '1',
        '--workers', '0', '--hflip', '0', '--lr', '0.05', '--warmup-epochs', '0']


def test_one_epoch_end_to_end(tmp_path):
    proc = run_train_py(tmp_path, *FAST, '--opt', 'gmix_sam', '--mixup', '0.8', '--mixup-mode', 'g',
                        '--experiment', 'run', OMP_NUM_THREADS='2')
    assert proc.returncode == 0, proc.stderr
    assert 'Validation top-1 accuracy:' in proc.stdout
    run_dir = tmp_path / 'run'
    rows = read_summary(run_dir)
    assert len(rows) == 1
    assert list(rows[0])[:7] == ['epoch', 'train_loss', 'train_skipped', 'eval_loss', 'eval_top1', 'eval_top5', 'lr']
    assert 0.0 <= float(rows[0]['eval_top1']) <= 100.0
    saved_args = yaml.safe_load((run_dir / 'args.yaml').read_text())
    assert saved_args['opt'] == 'gmix_sam' and saved_args['mixup_mode'] == 'g'
    assert (run_dir / 'checkpoint-0' / 'model.safetensors').is_file()

    # The exported folder loads with timm's local-dir: and predicts as the checkpointed weights do.
    exported = timm.create_model(f'local-dir:{run_dir / "model"}', pretrained=True).eval()
    reference = timm.create_model('resnet10t', num_classes=10).eval()
    from safetensors.torch import load_file
    reference.load_state_dict(load_file(run_dir / 'checkpoint-0' / 'model.safetensors'))
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(exported(x), reference(x), rtol=0, atol=0)


def test_yaml_config_with_command_line_override(tmp_path):
    config = tmp_path / 'preset.yaml'
    config.write_text(yaml.safe_dump({'dataset': 'digits', 'model': 'resnet10t', 'img_size': 32, 'train_subset': 0.1,
                                      'batch_size': 16, 'epochs': 3, 'workers': 0, 'opt': 'sgd', 'mixup': 0.0}))
    train.main(['-c', str(config), '--epochs', '1', '--output', str(tmp_path), '--experiment', 'cfg'])
    args = yaml.safe_load((tmp_path / 'cfg' / 'args.yaml').read_text())
    assert args['model'] == 'resnet10t' and args['opt'] == 'sgd'
    assert args['epochs'] == 1  # the flag wins over the file
    assert len(read_summary(tmp_path / 'cfg')) == 1


@pytest.mark.parametrize('config', sorted(p.name for p in (ROOT / 'configs').glob('digits*.yaml')))
def test_digits_presets_parse(config):
    args = train.parse_args(['-c', str(ROOT / 'configs' / config)])
    assert args.dataset == 'digits'



@pytest.mark.parametrize('sharded', ['FSDP', 'DEEPSPEED'])
def test_sharded_training_is_refused(sharded, capsys, tmp_path, monkeypatch):
    """ Accelerate builds neither on CPU, so the launcher's choice is simulated where train.py reads it. """
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    class ShardedAccelerator(Accelerator):
        distributed_type = property(lambda self: DistributedType[sharded])

    monkeypatch.setattr(train, 'Accelerator', ShardedAccelerator)
    assert_bad_input(capsys, tmp_path, FAST, 'not supported', '--multi_gpu')


def test_labels_out_of_range(capsys, tmp_path):
    import datasets
    from PIL import Image
    images = [Image.new('RGB', (8, 8), (i * 20, 0, 0)) for i in range(8)]
    split = datasets.Dataset.from_dict({'image': images, 'label': [0, 1, 2, 3, 0, 1, 2, -1]},
                                       features=datasets.Features({'image': datasets.Image(),
                                                                   'label': datasets.Value('int64')}))
    datasets.DatasetDict(train=split, validation=split).save_to_disk(tmp_path / 'data')
    capsys.readouterr()
    assert_bad_input(capsys, tmp_path, [*FAST, '--dataset', str(tmp_path / 'data'), '-b', '4'], 'labels', '-1')


@pytest.mark.parametrize('mode', ['bg', 'dg'])
@pytest.mark.parametrize('gamma', [0.25, 0.5])
def test_one_epoch_bg_dg_logs_flagging(tmp_path, mode, gamma):
    train.main([*FAST, '--opt', 'gmix_sam', '--mixup', '0.8', '--mixup-mode', mode, '--gmix-ratio', str(gamma),
                '--output', str(tmp_path), '--experiment', 'run'])
    (row,) = read_summary(tmp_path / 'run')
    # Every batch of 16 flags exactly ceil(gamma * 16) examples.
    assert float(row['train_flagged_frac']) == gamma
    flagged = (108 // 16) * math.ceil(gamma * 16)  # a tenth of the 1,078 training digits, full batches
    assert 0 <= int(row['train_flagged_two_class']) <= flagged
    assert float(row['train_sens_flagged']) >= float(row['train_sens_unflagged'])


@pytest.mark.parametrize('flags, expected', [
    ([], None), (['--amp'], 'fp16'), (['--amp', '--amp-dtype', 'bfloat16'], 'bf16'),
    (['--mixed-precision', 'no'], 'no'), (['--amp', '--amp-dtype', 'bfloat16', '--mixed-precision', 'bf16'], 'bf16'),
])
def test_precision_flags(flags, expected):
    from timm_gmix.training.args import mixed_precision
    assert mixed_precision(train.parse_args(flags)) == expected


def test_launcher_precision_reaches_train_py(tmp_path, capsys, monkeypatch):
    # What `accelerate launch --mixed_precision bf16` sets; train.py must not override it with 'no'.
    monkeypatch.setenv('ACCELERATE_MIXED_PRECISION', 'bf16')
    train.main([*FAST, '--opt', 'gmix_sam', '--mixup', '0.8', '--mixup-mode', 'dg', '--output', str(tmp_path)])
    assert 'precision bf16' in capsys.readouterr().out


def test_train_py_logs_to_tensorboard_offline(tmp_path):
    """ --log-with tensorboard: the config, every summary.csv column per epoch and the progress every
    --log-interval updates, in event files inside the run folder. """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    train.main([*FAST, '--epochs', '2', '--opt', 'gmix_sam', '--mixup', '0.8', '--mixup-mode', 'dg',
                '--log-with', 'tensorboard', '--log-interval', '2', '--output', str(tmp_path), '--experiment', 'tb'])
    events = EventAccumulator(str(tmp_path / 'tb' / 'timm-gmix'), size_guidance={'scalars': 0})
    events.Reload()
    rows = read_summary(tmp_path / 'tb')
    for column in rows[0]:
        if column != 'epoch':
            logged = [(e.step, e.value) for e in events.Scalars(f'epoch/{column}')]
            assert logged == [(int(r['epoch']), pytest.approx(float(r[column]), rel=1e-6)) for r in rows], column
    # 6 updates per epoch, logged at updates 2, 4, 6 of each epoch
    assert [e.step for e in events.Scalars('train/loss')] == [2, 4, 6, 8, 10, 12]
    assert {'train/lr', 'train/skipped', 'train/flagged_two_class'} <= set(events.Tags()['scalars'])
