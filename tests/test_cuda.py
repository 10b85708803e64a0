""" The step on a CUDA GPU: fp16 through Accelerate's real GradScaler, bf16, channels-last, torch.compile with
inductor, two-pass BatchNorm semantics, and the host syncs of one update. Skipped without a GPU; run them with
`python -m pytest -m cuda tests/test_cuda.py` (benchmarks/gpu_check.sh does). """
import warnings

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import GradScalerKwargs
from torch._dynamo.testing import CompileCounterWithBackend

from timm_gmix import GMixup, gmix_step

from test_step import Gate, assert_unchanged, gmixup, sam, snapshot, step

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')]

CUDA = torch.device('cuda')


@pytest.fixture(autouse=True)
def full_float32():
    """ float32 convolutions and matmuls without TF32, so that the float32 runs are exact references. """
    flags = [(torch.backends.cudnn, 'allow_tf32'), (torch.backends.cuda.matmul, 'allow_tf32')]
    saved = [getattr(module, name) for module, name in flags]
    for module, name in flags:
        setattr(module, name, False)
    yield
    for (module, name), value in zip(flags, saved):
        setattr(module, name, value)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def on_gpu(batch):
    return tuple(t.to(CUDA) for t in batch)


def weights(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def relative_difference(a: dict, b: dict) -> float:
    """ ||a - b|| / ||b||, over all tensors of two {name: tensor} taken together. """
    diff = sum(((a[n].float() - b[n].float()) ** 2).sum() for n in b)
    return float((diff / sum((t.float() ** 2).sum() for t in b.values())).sqrt())


def updates(textbook, model, opt, x, y, seeds=(0, 1), **kwargs) -> dict:
    """ The change of the weights over G-Mix steps, none of which is skipped. """
    before = weights(model)
    for seed in seeds:
        assert not step(textbook, model, opt, x, y, gmixup('g'), seed, **kwargs).skipped
    return {n: p.detach() - before[n] for n, p in model.named_parameters()}


def fp32_update(textbook, model, x, y, make_opt=sam, seeds=(0, 1)) -> dict:
    """ The reference: float32, without an accelerator. """
    return updates(textbook, model, make_opt(model), x, y, seeds=seeds)


def accelerated(mixed_precision, make_model, make_opt=sam):
    """ Gate + model prepared by an Accelerator; fp16's GradScaler starts at 2**10, far from an overflow. """
    scaler = GradScalerKwargs(init_scale=2. ** 10)
    accelerator = Accelerator(mixed_precision=mixed_precision, kwargs_handlers=[scaler])
    torch.manual_seed(0)
    gate = Gate()
    model = torch.nn.Sequential(gate, make_model())
    model, opt = accelerator.prepare(model, make_opt(model))
    return accelerator, gate, model, opt


@pytest.mark.parametrize('poisoned_pass', [1, 2], ids=['ascent', 'descent'])
def test_fp16_overflow_in_either_pass_skips_and_lowers_the_scale(poisoned_pass, make_mlp, make_batch, textbook):
    """ Accelerate's CUDA GradScaler: a good step keeps the scale, a non-finite forward (what an fp16 overflow
    gives) in the ascent or the descent pass skips the step, leaves weights and optimizer state as they were,
    and halves the scale. """
    accelerator, gate, model, opt = accelerated('fp16', make_mlp)
    assert isinstance(accelerator.scaler, torch.amp.GradScaler) and accelerator.scaler.get_scale() == 2. ** 10
    x, y = on_gpu(make_batch(8))
    updates(textbook, model, opt, x, y, seeds=(0,), accelerator=accelerator)
    assert accelerator.scaler.get_scale() == 2. ** 10
    snap = snapshot(model, opt)
    gate.poison = {gate.calls + poisoned_pass}
    assert step(textbook, model, opt, x, y, gmixup('g'), 1, accelerator=accelerator).skipped
    assert_unchanged(model, opt, snap)
    assert accelerator.scaler.get_scale() == 2. ** 9


@pytest.mark.parametrize('mixed_precision, tolerance', [('fp16', 1e-2), ('bf16', 5e-2)])
def test_mixed_precision_update_is_the_fp32_update(mixed_precision, tolerance, make_mlp, make_batch, textbook):
    """ Two G-Mix steps under fp16 autocast with the real GradScaler, or under bf16 autocast, change the
    weights as float32 does, within fp16's (bf16's) rounding: relative difference of the updates below 1e-2
    (5e-2). The weights stay float32 and nothing is skipped. """
    x, y = on_gpu(make_batch(8))
    expected = fp32_update(textbook, make_mlp().to(CUDA), x, y)
    accelerator, _, model, opt = accelerated(mixed_precision, make_mlp)
    update = updates(textbook, model, opt, x, y, accelerator=accelerator)
    update = {n.removeprefix('1.'): u for n, u in update.items()}  # the Gate is module 0
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert relative_difference(update, expected) < tolerance


@pytest.mark.parametrize('options', [dict(interval=2, reuse=0.7), dict(perturb='momentum')], ids=['looksam', 'msam'])
def test_fp16_cheaper_steps_are_the_fp32_ones(options, make_mlp, make_batch, textbook):
    """ The SAM interval with LookSAM's reuse (a full step, a one-pass update that adds g_v, a full step) and
    MSAM's momentum perturbation under fp16 with the real GradScaler: g_v and the added direction are taken from
    unscaled gradients, so the updates are float32's within fp16's rounding. """
    def make_opt(model):
        return sam(model, momentum=0.9, **options)

    x, y = on_gpu(make_batch(8))
    expected = fp32_update(textbook, make_mlp().to(CUDA), x, y, make_opt, seeds=(0, 1, 2))
    accelerator, _, model, opt = accelerated('fp16', make_mlp, make_opt)
    update = updates(textbook, model, opt, x, y, seeds=(0, 1, 2), accelerator=accelerator)
    update = {n.removeprefix('1.'): u for n, u in update.items()}
    assert relative_difference(update, expected) < 1e-2


def test_channels_last_gives_the_contiguous_update(make_cnn, make_batch, textbook):
    """ A channels-last model fed channels-last inputs makes the same two updates as the contiguous one
    (float32: relative difference below 1e-4, summation order only), and its weights stay channels-last
    (perturb, restore and the undo buffers write in place). """
    x, y = on_gpu(make_batch(8))
    expected = fp32_update(textbook, make_cnn().to(CUDA), x, y)
    model = make_cnn().to(CUDA, memory_format=torch.channels_last)
    update = updates(textbook, model, sam(model), x.contiguous(memory_format=torch.channels_last), y)
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert relative_difference(update, expected) < 1e-4


@pytest.mark.parametrize('mode', ['g', 'dg'])
def test_inductor_compiles_the_step_once(mode, make_cnn, make_batch, textbook):
    """ torch.compile with inductor: after the first two steps (the graphs of each pass, and dg's descent
    batch of another size), later steps compile nothing. """
    model = make_cnn().to(CUDA).train()
    counter = CompileCounterWithBackend('inductor')
    compiled = torch.compile(model, backend=counter)
    opt = sam(model, base='sgd', momentum=0.9)
    compilations = []
    for seed in range(5):
        x, y = on_gpu(make_batch(8, seed=seed))
        assert not step(textbook, compiled, opt, x, y, gmixup(mode), seed).skipped
        compilations.append(counter.frame_count)
    assert compilations[1:] == [compilations[1]] * 4, compilations


@pytest.mark.parametrize('mode', ['g', 'dg'])
def test_bn_stats_come_from_the_ascent_pass_only(mode, make_cnn, make_batch):
    """ As on the CPU (test_sam): after one step BatchNorm's running statistics are those of one training
    forward on the mixed batch, the ascent pass; the passes at w + e leave them alone. """
    model = make_cnn().to(CUDA)
    reference = make_cnn().to(CUDA).train()
    x, y = on_gpu(make_batch(8))
    mix_args = dict(mixup_alpha=1.0, num_classes=10, mode=mode, gmix_ratio=0.5)
    np.random.seed(7)
    ascent_batch = GMixup(**mix_args).mix(x.clone(), y.clone()).inputs
    with torch.no_grad():
        reference(ascent_batch)
    np.random.seed(7)
    assert not gmix_step(model, sam(model), x.clone(), y.clone(), GMixup(**mix_args)).skipped
    buffers = dict(model.named_buffers())
    assert buffers['1.num_batches_tracked'] == 1
    for n, b in reference.named_buffers():
        torch.testing.assert_close(buffers[n], b, msg=n)


@pytest.mark.parametrize('options', [{}, dict(interval=2, reuse=0.7), dict(perturb='momentum')],
                         ids=['sam', 'looksam', 'msam'])
def test_g_step_reads_the_device_once(options, make_cnn, make_batch, textbook):
    """ One G-Mix update (SAM around SGD with momentum, mixed batch, BatchNorm) makes exactly 1 host sync:
    reading the skip decision after the step (`all_agree` in guard.py); so do the full and the one-pass updates
    of LookSAM, and MSAM's. Counted with `torch.cuda.set_sync_debug_mode('warn')`, which warns at every
    synchronizing CUDA call (a read of a device value, a blocking host-to-device copy), after two warm-up
    steps. """
    model = make_cnn().to(CUDA).train()
    opt = sam(model, base='sgd', momentum=0.9, **options)
    mixup_fn = gmixup('g')
    x, y = on_gpu(make_batch(8))
    for seed in (0, 1):
        assert not step(textbook, model, opt, x, y, mixup_fn, seed).skipped
    for seed in (2, 3):
        textbook.seed_all(seed)
        inputs, targets = x.clone(), y.clone()
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter('always')
            torch.cuda.set_sync_debug_mode('warn')
            try:
                result = gmix_step(model, opt, inputs, targets, mixup_fn)
            finally:
                torch.cuda.set_sync_debug_mode('default')
        assert not result.skipped
        syncs = [f'{w.filename}:{w.lineno}' for w in seen if 'called a synchronizing' in str(w.message)]
        assert len(syncs) == 1, syncs
