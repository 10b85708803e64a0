""" Scaling out and down: two processes through Accelerate's DDP on CPU (gloo), bf16, gradient
accumulation in train.py, and the GradScaler contract of `gmix_step` (unscale exactly once).

The two-process checks run tests/scripts/ddp_worker.py under `accelerate launch`, once per precision,
and compare what each rank saved. """
import json

import pytest
import timm
import torch
import torch.nn as nn
from timm.data.loader import fast_collate
from timm.optim import create_optimizer_v2

from helpers import DG_MIX, ROOT, SCRIPTS, SMALL_RUN, accelerate_launch, assert_same, read_summary
from timm_gmix import GMixup, gmix_step
from timm_gmix.training.args import parse_args
from timm_gmix.training.data import load_splits
from timm_gmix.training.loader import DeviceNormalize, with_transforms

WORKER_STEPS = 3  # ddp_worker.STEPS
# Worker scenarios by launch precision; dg and g use a CNN with BatchNorm and different data per rank.
LAUNCHES = {'no': ('dg', 'sync', 'looksam'), 'bf16': ('g',)}


@pytest.fixture(scope='module')
def worker(tmp_path_factory):
    """ worker(precision) -> [rank 0 results, rank 1 results]; one launch per precision per module. """
    launched = {}

    def results(mixed_precision):
        if mixed_precision not in launched:
            out = tmp_path_factory.mktemp(f'ddp-{mixed_precision}')
            proc = accelerate_launch(SCRIPTS / 'ddp_worker.py', out, *LAUNCHES[mixed_precision],
                                     mixed_precision=mixed_precision)
            ranks = [torch.load(out / f'rank{r}.pt', weights_only=True) for r in range(2)] \
                if proc.returncode == 0 else None
            launched[mixed_precision] = proc, ranks
        proc, ranks = launched[mixed_precision]
        assert proc.returncode == 0, proc.stderr[-4000:]
        return ranks

    return results


@pytest.mark.parametrize('mixed_precision', sorted(LAUNCHES))
def test_launch_makes_two_cpu_processes(worker, mixed_precision):
    for rank in worker(mixed_precision):
        assert rank['meta'] == {'num_processes': 2, 'mixed_precision': mixed_precision,
                                'distributed_type': 'DistributedType.MULTI_CPU'}


@pytest.mark.parametrize('mixed_precision, scenario', [('no', 'dg'), ('bf16', 'g')])
def test_ranks_hold_bit_identical_weights(worker, mixed_precision, scenario):
    """ Each rank perturbs by its own ascent gradient (no_sync) on its own data, yet after the
    all-reduced descent and the restore-by-copy every parameter is identical on both ranks. BatchNorm
    running statistics follow DDP's rule (rank 0's are broadcast at the next forward, as train.py's
    validation makes): after that forward, every parameter and buffer is identical. """
    rank0, rank1 = (rank[scenario] for rank in worker(mixed_precision))
    assert not torch.equal(rank0['losses'], rank1['losses'])  # the ranks did see different batches
    assert rank0['after_steps'].keys() == rank1['after_steps'].keys() == rank0['init'].keys()
    for name, weights in rank0['after_steps'].items():
        if not name.endswith(('running_mean', 'running_var')):
            assert torch.equal(weights, rank1['after_steps'][name]), name
    for name, weights in rank0['after_eval'].items():
        assert torch.equal(weights, rank1['after_eval'][name]), name
        assert not torch.equal(weights, rank0['init'][name]), f'{name} did not change'
    # BatchNorm counts the ascent pass of each step only: the passes at w + e leave it as it was.
    assert int(rank0['after_eval']['1.num_batches_tracked']) == WORKER_STEPS
    # bf16 is really used inside the model (Accelerate casts the model's outputs back to float32).
    expected_dtype = {'no': 'torch.float32', 'bf16': 'torch.bfloat16'}[mixed_precision]
    assert rank0['compute_dtypes'] == rank1['compute_dtypes'] == [expected_dtype]


def test_looksam_ranks_reuse_one_direction_and_stay_identical(worker):
    """ Each rank keeps g_v from its own ascent gradient; averaged over the ranks, the one-pass update that adds
    it leaves every parameter identical on both ranks. """
    rank0, rank1 = (rank['looksam'] for rank in worker('no'))
    assert rank0['reused'] and all(torch.equal(a, b) for a, b in zip(rank0['reused'], rank1['reused']))
    assert any(t.abs().sum() > 0 for t in rank0['reused'])
    for name, weights in rank0['after_steps'].items():
        if not name.endswith(('running_mean', 'running_var')):
            assert torch.equal(weights, rank1['after_steps'][name]), name


def test_sync_ascent_equals_one_process_on_the_whole_batch(worker):
    """ float64 MLP, plain SAM: two halves with sync_ascent give the whole-batch update; without it each
    replica perturbs by its own half's gradient, which is a different (m-sharpness) update. """
    for rank in worker('no'):
        result = rank['sync']
        for name, reference in result['reference'].items():
            torch.testing.assert_close(result['sync_ascent'][name], reference, rtol=1e-10, atol=1e-12, msg=name)
        largest_gap = max((result['no_sync_ascent'][n] - w).abs().max() for n, w in result['reference'].items())
        assert largest_gap > 1e-4
    rank0, rank1 = (rank['sync'] for rank in worker('no'))
    for variant in ('sync_ascent', 'no_sync_ascent'):
        for name, weights in rank0[variant].items():
            assert torch.equal(weights, rank1[variant][name]), (variant, name)


FLAG_COLUMNS = ['train_flagged_frac', 'train_sens_flagged', 'train_sens_unflagged', 'train_flagged_two_class']


def test_train_py_on_two_processes_counts_each_validation_example_once(tmp_path):
    """ 359 validation images do not fill whole batches of 2 x 16: gather_for_metrics must drop the
    padding, so the logged accuracy is that of one process on the whole validation split. """
    argv = [*SMALL_RUN, *DG_MIX, '--epochs', '1', '--output', str(tmp_path), '--experiment', 'ddp']
    proc = accelerate_launch(ROOT / 'train.py', *argv)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert '2 process(es)' in proc.stdout
    run_dir = tmp_path / 'ddp'
    [row] = read_summary(run_dir)
    assert [c for c in row if c.startswith('train_')] == ['train_loss', 'train_skipped', *FLAG_COLUMNS]
    assert row['train_skipped'] == '0'
    # 108 images, 16 per process: 3 steps on each of the 2 ranks, 8 of 16 flagged in each batch.
    assert float(row['train_flagged_frac']) == 0.5
    assert 0 <= int(row['train_flagged_two_class']) <= 3 * 2 * 8

    model = timm.create_model(f'local-dir:{run_dir / "model"}', pretrained=True).eval()
    args = parse_args(argv, default_config=ROOT / 'configs' / 'digits.yaml')
    train_split, val_split, _ = load_splits(args)
    _, val_set, data_config = with_transforms(train_split, val_split, args, model)
    assert len(val_set) == 359 and len(val_set) % (2 * 16)
    to_model = DeviceNormalize(args, data_config, torch.device('cpu'), training=False)
    correct, loss_sum = 0, 0.0
    with torch.no_grad():
        for x, y in torch.utils.data.DataLoader(val_set, batch_size=128, collate_fn=fast_collate):
            logits = model(to_model(x))
            correct += int((logits.argmax(-1) == y).sum())
            loss_sum += float(nn.functional.cross_entropy(logits, y, reduction='sum'))
    assert float(row['eval_top1']) == pytest.approx(100 * correct / len(val_set), rel=1e-9)
    assert float(row['eval_loss']) == pytest.approx(loss_sum / len(val_set), rel=1e-6)


# ----------------------------------------------------------------------------------------------
# Kill and resume on two processes


def test_two_processes_killed_mid_run_resume_bit_for_bit(tmp_path):
    """ Two processes with 2 loader workers each are killed (SIGKILL, whatever they were doing) once a
    mid-epoch recovery point of epoch 1 exists; the same command with --resume ends with the uninterrupted
    run's state, rows and model, bit for bit. """
    argv = [*SMALL_RUN, *DG_MIX, '--workers', '2', '--epochs', '3', '--warmup-epochs', '1', '--recovery-interval', '1',
            '--output', tmp_path]
    assert accelerate_launch(ROOT / 'train.py', *argv, '--experiment', 'whole').returncode == 0
    run_dir = tmp_path / 'killed'
    proc = accelerate_launch(ROOT / 'train.py', *argv, '--experiment', 'killed',
                             kill_when=lambda: position(run_dir / 'recovery') >= [1, 1])
    assert proc.returncode != 0, 'the run ended before it was killed'
    resumed = accelerate_launch(ROOT / 'train.py', *argv[:-2], '--resume', run_dir)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert read_summary(run_dir) == read_summary(tmp_path / 'whole')
    assert (run_dir / 'last' / 'model.safetensors').read_bytes() == \
        (tmp_path / 'whole' / 'last' / 'model.safetensors').read_bytes()
    assert_same(*(torch.load(folder / 'last' / 'optimizer.bin', weights_only=True) for folder in (run_dir, tmp_path / 'whole')))
    assert (run_dir / 'model' / 'model.safetensors').read_bytes() == \
        (tmp_path / 'whole' / 'model' / 'model.safetensors').read_bytes()


def position(folder) -> list:
    try:
        return json.loads((folder / 'checkpoint.json').read_text())['position']
    except (OSError, ValueError):
        return [-1, -1]


# ----------------------------------------------------------------------------------------------
# GradScaler: gmix_step unscales exactly once per step, after the descent pass


class CountingScaler(torch.amp.GradScaler):
    """ A GradScaler that counts `unscale_` calls per `update`. """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.unscales, self.unscales_per_step = 0, []

    def unscale_(self, optimizer):
        self.unscales += 1
        return super().unscale_(optimizer)

    def update(self, new_scale=None):
        self.unscales_per_step.append(self.unscales)
        self.unscales = 0
        return super().update(new_scale)


def test_second_unscale_in_one_step_raises():
    """ The torch behaviour that makes "unscale once" a rule: a second unscale_ raises, while stepping
    on still-scaled gradients raises nothing (so missing the unscale would go unnoticed). """
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler('cpu', init_scale=2. ** 10)
    scaler.scale(model(torch.ones(1, 4)).sum()).backward()
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match='unscale_'):
        scaler.unscale_(opt)
    opt.step()  # nothing stops a step on gradients that were (or were not) unscaled


@pytest.mark.parametrize('clip_grad', [None, 0.05])
@pytest.mark.parametrize('mode', ['g', 'dg'])
def test_gmix_step_unscales_once_per_step(mode, clip_grad, make_mlp, make_batch, textbook, check_params):
    """ One unscale_ per step, whatever the passes and clipping; and the update is the unscaled one. """
    x, y = make_batch(8)
    models = [make_mlp(), make_mlp()]
    scaler = CountingScaler('cpu', init_scale=2. ** 12)
    for model, step_scaler in zip(models, (None, scaler)):
        opt = create_optimizer_v2(model, opt='gmix_sam', base='sgd', lr=0.1, momentum=0.9, rho=0.05)
        for seed in (0, 1, 2):
            textbook.seed_all(seed)
            mixup_fn = GMixup(mixup_alpha=1.0, mode=mode, gmix_ratio=0.5, num_classes=10)
            result = gmix_step(model, opt, x.clone(), y.clone(), mixup_fn, clip_grad=clip_grad, scaler=step_scaler)
            assert not result.skipped
    assert scaler.unscales_per_step == [1, 1, 1]
    assert scaler.get_scale() == 2. ** 12
    check_params(models[1], dict(models[0].named_parameters()), rtol=1e-5, atol=1e-7)
