""" train.py does what timm's train.py does where the other tests did not look, with timm's own classes as the
reference: Lookahead's slow weights are what is validated, saved and exported; the EMA lives on the training
device, warms up at timm's steps and gets --dist-bn; the logged lr is the mean over parameter groups; TF32 and
cuDNN autotuning on CUDA. """
import pytest
import torch
from timm.optim import Lookahead
from timm.utils import ModelEmaV3

from helpers import ROOT, SMALL_RUN, accelerate_launch, read_summary, train_main, train_module

FAST = [*SMALL_RUN, '--epochs', '1', '--lr', '0.05', '--warmup-epochs', '0']


def find_lookahead(optimizer):
    """ timm's Lookahead in an optimizer as timm's factory builds it: outside SAM, or SAM's base. """
    while not isinstance(optimizer, Lookahead):
        optimizer = getattr(optimizer, 'base_optimizer')
    return optimizer


def assert_at_slow_weights(lookahead, where):
    """ Every parameter equals its slow weights, as timm's Lookahead leaves it after update_slow. """
    state = lookahead._base_optimizer.state
    params = [p for group in lookahead.param_groups for p in group['params']]
    assert all('lookahead_slow_buff' in state[p] for p in params), where  # 13 updates: one sync at the 6th, 12th
    for i, p in enumerate(params):
        assert torch.equal(p.detach(), state[p]['lookahead_slow_buff']), f'{where}: parameter {i} is not the slow one'


@pytest.mark.parametrize('opt', [['--opt', 'lookahead_sgd'], ['--opt', 'lookahead_gmix_sam'],
                                 ['--opt', 'gmix_sam', '--sam-base', 'lookahead_sgd']],
                         ids=['lookahead_sgd', 'lookahead_gmix_sam', 'sam_around_lookahead'])
def test_lookahead_validates_saves_and_exports_the_slow_weights(opt, tmp_path, monkeypatch):
    """ 13 updates (108 images, batches of 8) are not a multiple of Lookahead's k=6: at the end of the epoch the
    fast weights are one update past the slow ones. As timm means it, the epoch ends with sync_lookahead, so
    validation, the checkpoint and the export all hold the slow weights. (timm's own loop sets the gradients to
    None before that call, and timm's update_slow skips parameters without a gradient.) """
    train = train_module()
    made, checked = [], []
    create_optimizer, validate, export_model = train.create_optimizer, train.validate, train.export_model

    def recording_create_optimizer(args, model):
        made.append(create_optimizer(args, model))
        return made[-1]

    def checking_validate(model, *rest):
        assert_at_slow_weights(find_lookahead(made[0]), 'validated')
        checked.append('validate')
        return validate(model, *rest)

    def checking_export(model, *rest):
        assert_at_slow_weights(find_lookahead(made[0]), 'exported')
        checked.append('export')
        return export_model(model, *rest)

    monkeypatch.setattr(train, 'create_optimizer', recording_create_optimizer)
    monkeypatch.setattr(train, 'validate', checking_validate)
    monkeypatch.setattr(train, 'export_model', checking_export)
    train_main([*FAST, '-b', '8', *opt, '--output', tmp_path, '--experiment', 'run'])
    assert checked == ['validate', 'export', 'export']  # model_best, then model


class RecordingEma(ModelEmaV3):
    """ timm's ModelEmaV3, recording where it was built and the decay of each update. """
    built, decays = [], []

    def __init__(self, model, **kwargs):
        super().__init__(model, **kwargs)
        RecordingEma.built.append({'model_device': next(model.parameters()).device, 'device': kwargs.get('device'),
                                   'ema_device': next(self.module.parameters()).device})

    def get_decay(self, step=None):
        decay = super().get_decay(step)
        RecordingEma.decays.append(decay)
        return decay


@pytest.fixture
def recording_ema(monkeypatch):
    RecordingEma.built, RecordingEma.decays = [], []
    monkeypatch.setattr(train_module(), 'ModelEmaV3', RecordingEma)
    return RecordingEma


def test_ema_warms_up_at_timms_steps(recording_ema, tmp_path):
    """ timm counts the update, then updates the EMA with step=num_updates: the first update's decay is 0 and the
    second's 1 - 2^(-2/3) = 0.37 (train.py gave 0, 0, 0.37, ...: one update behind). """
    train_main([*FAST, '--opt', 'sgd', '--model-ema', '--model-ema-warmup', '--output', tmp_path, '--experiment', 'ema'])
    reference = ModelEmaV3(torch.nn.Linear(1, 1), decay=0.9998, use_warmup=True)
    assert recording_ema.decays == [reference.get_decay(step) for step in range(1, 7)]  # 6 updates
    assert recording_ema.decays[:2] == [0.0, pytest.approx(0.370, abs=1e-3)]


@pytest.mark.parametrize('force_cpu', [False, True])
def test_ema_is_built_from_the_model_on_its_device(force_cpu, recording_ema, tmp_path):
    """ The EMA is a copy of the model once it is on the training device (on a CPU machine, the CPU: the CUDA
    test below is the one that can tell); --model-ema-force-cpu keeps it on the CPU, as timm. """
    train_main([*FAST, '--opt', 'sgd', '--model-ema', *(['--model-ema-force-cpu'] if force_cpu else []),
                '--output', tmp_path, '--experiment', 'ema'])
    [built] = recording_ema.built
    assert built['device'] == ('cpu' if force_cpu else None)
    assert built['ema_device'] == torch.device('cpu') == built['model_device']


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_ema_and_cuda_settings_on_a_gpu(recording_ema, tmp_path):
    """ On CUDA: the EMA is on the GPU with the model, and timm's TF32 matmuls and cuDNN autotuning are on. """
    flags = [(torch.backends.cuda.matmul, 'allow_tf32'), (torch.backends.cudnn, 'benchmark')]
    saved = [getattr(module, name) for module, name in flags]
    try:
        train_main([*FAST, '--opt', 'gmix_sam', '--model-ema', '--output', tmp_path, '--experiment', 'ema'])
        [built] = recording_ema.built
        assert built['model_device'].type == 'cuda' and built['ema_device'].type == 'cuda', built
        assert [getattr(module, name) for module, name in flags] == [True, True]
    finally:
        for (module, name), value in zip(flags, saved):
            setattr(module, name, value)


def test_cuda_settings_are_timms_on_cuda_only(monkeypatch):
    """ set_cuda_backends turns on TF32 matmuls and cudnn.benchmark for a CUDA device (setting the flags needs no
    GPU) and leaves them alone otherwise; main calls it with the accelerator's device. """
    train = train_module()
    flags = [(torch.backends.cuda.matmul, 'allow_tf32'), (torch.backends.cudnn, 'benchmark')]
    saved = [getattr(module, name) for module, name in flags]
    try:
        for module, name in flags:
            setattr(module, name, False)
        train.set_cuda_backends(torch.device('cpu'))
        assert [getattr(module, name) for module, name in flags] == [False, False]
        train.set_cuda_backends(torch.device('cuda', 0))
        assert [getattr(module, name) for module, name in flags] == [True, True]
    finally:
        for (module, name), value in zip(flags, saved):
            setattr(module, name, value)


def test_logged_lr_is_the_mean_over_param_groups(tmp_path, monkeypatch):
    """ timm's summary.csv and progress lr is the mean over the optimizer's parameter groups, which differ
    under --layer-decay (train.py gave group 0's). """
    train = train_module()
    made, devices, rows, steps = [], [], [], []
    create_optimizer, write_summary, log_step = train.create_optimizer, train.write_summary, train.log_step

    def mean_lr():
        lrs = [group['lr'] for group in made[0].param_groups]
        assert len(set(lrs)) > 1, lrs  # layer decay: the groups' lrs differ
        return sum(lrs) / len(lrs)

    def recording_create_optimizer(args, model):
        made.append(create_optimizer(args, model))
        return made[-1]

    def recording_write_summary(path, epoch, train_metrics, eval_metrics, lr=None):
        rows.append((lr, mean_lr()))
        return write_summary(path, epoch, train_metrics, eval_metrics, lr)

    def recording_log_step(accelerator, update, values):
        steps.append((values['lr'], mean_lr()))
        return log_step(accelerator, update, values)

    monkeypatch.setattr(train, 'create_optimizer', recording_create_optimizer)
    monkeypatch.setattr(train, 'write_summary', recording_write_summary)
    monkeypatch.setattr(train, 'log_step', recording_log_step)
    monkeypatch.setattr(train, 'set_cuda_backends', devices.append, raising=False)
    train_main([*FAST, '--epochs', '2', '--opt', 'sgd', '--layer-decay', '0.75', '--sched', 'step', '--decay-epochs', '1',
                '--log-interval', '2',
                '--output', tmp_path, '--experiment', 'lr'])
    assert len(rows) == 2 and len(steps) == 6
    for logged, mean in rows + steps:
        assert logged == mean
    assert [float(row['lr']) for row in read_summary(tmp_path / 'lr')] == [logged for logged, _ in rows]
    assert devices == [torch.device('cpu')]


DIST_BN_WORKER = '''
import sys
import torch
sys.path.insert(0, {root!r})
import train
from accelerate.state import PartialState

validate, buffers = train.validate, []

def recording_validate(model, *rest):
    module = getattr(model, 'module', model)  # DDP's module or the ModelEmaV3's copy
    buffers.append({{n: b.detach().cpu().clone() for n, b in module.named_buffers() if 'running_' in n}})
    return validate(model, *rest)

train.validate = recording_validate
train.main(sys.argv[1:])
torch.save(buffers, {out!r} + f'/rank{{PartialState().process_index}}.pt')
'''


def test_dist_bn_reaches_the_ema_as_in_timm(tmp_path):
    """ Two processes, --dist-bn reduce (the default): timm averages the BatchNorm statistics of the model and,
    when it is validated, of the EMA, so both are the same on every process when validated. """
    worker = tmp_path / 'worker.py'
    worker.write_text(DIST_BN_WORKER.format(root=str(ROOT), out=str(tmp_path)))
    proc = accelerate_launch(worker, *FAST, '--opt', 'sgd', '--model-ema', '--output', tmp_path / 'out',
                             '--experiment', 'ddp')
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(tmp_path / f'rank{r}.pt') for r in (0, 1)]
    assert [len(calls) for calls in ranks] == [2, 2]  # the model, then the EMA
    for which, (zero, one) in zip(('model', 'EMA'), zip(*ranks)):
        assert zero.keys() == one.keys() and zero, which
        for name in zero:
            assert torch.equal(zero[name], one[name]), f'{which} {name} differs between the processes'
