""" torch.compile: a compiled model makes G-Mix, BG-Mix and DG-Mix steps without recompiling on every pass, and
train.py --torchcompile trains and exports a model that loads with local-dir:. CPU, with the aot_eager backend
(autograd traced as inductor would, without inductor's slow CPU code generation). """
import numpy as np
import pytest
import timm
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from timm.optim import create_optimizer_v2

from timm_gmix import GMixup, gmix_step

from helpers import DG_MIX, SMALL_RUN, read_summary, train_main

STEPS = 6


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """ Dynamo caches compiled code per code object across tests: each test starts from none. """
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize('mode', ['g', 'bg', 'dg'])
def test_compiled_model_stops_compiling_after_the_first_steps(mode, make_cnn, make_batch):
    """ The graphs a step needs are compiled once: the ascent pass (BatchNorm tracking its statistics), the
    pass at w + e (statistics frozen), for bg/dg the sensitivity forward without gradient, and for dg the
    descent batch of another size (recompiled once, with a dynamic batch size). From the third step on nothing
    is compiled. Each step has fresh data and a fresh mixing coefficient. """
    model = make_cnn().train()
    counter = CompileCounterWithBackend('aot_eager')
    compiled = torch.compile(model, backend=counter)
    optimizer = create_optimizer_v2(model, opt='gmix_sam', base='sgd', lr=0.1, momentum=0.9, rho=0.05)
    mixup_fn = GMixup(mixup_alpha=1.0, label_smoothing=0.1, num_classes=10, mode=mode, gmix_ratio=0.5)
    np.random.seed(0)
    compilations = []
    for seed in range(STEPS):
        x, y = make_batch(8, seed=seed)
        assert not gmix_step(compiled, optimizer, x, y, mixup_fn).skipped
        compilations.append(counter.frame_count)
    assert compilations[1:] == [compilations[1]] * (STEPS - 1), compilations
    assert compilations[-1] == {'g': 2, 'bg': 3, 'dg': 4}[mode], compilations


def test_compiled_step_equals_the_eager_step(make_cnn, make_batch, check_params):
    """ Compiling changes how the passes run, not what they compute: two DG-Mix steps match eager mode. """
    models = [make_cnn().train(), make_cnn().train()]
    for model, compile_it in zip(models, (False, True)):
        runner = torch.compile(model, backend='aot_eager') if compile_it else model
        optimizer = create_optimizer_v2(model, opt='gmix_sam', base='sgd', lr=0.1, momentum=0.9, rho=0.05)
        mixup_fn = GMixup(mixup_alpha=1.0, label_smoothing=0.1, num_classes=10, mode='dg', gmix_ratio=0.5)
        np.random.seed(0)
        for seed in range(2):
            assert not gmix_step(runner, optimizer, *make_batch(8, seed=seed), mixup_fn).skipped
    check_params(models[1], dict(models[0].named_parameters()), rtol=1e-5, atol=1e-6)
    for (n, a), b in zip(models[0].named_buffers(), models[1].buffers()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=n)


def test_train_py_torchcompile_trains_and_exports(tmp_path):
    """ One DG-Mix epoch through Accelerate's dynamo plugin; the exported model is the plain timm model (not the
    compiled wrapper) and loads with local-dir:. """
    train_main([*SMALL_RUN, *DG_MIX, '--epochs', '1', '--torchcompile', 'aot_eager',
                '--output', str(tmp_path), '--experiment', 'run'])
    rows = read_summary(tmp_path / 'run')
    assert len(rows) == 1 and rows[0]['train_skipped'] == '0' and float(rows[0]['train_flagged_frac']) == 0.5
    for folder in ('model', 'model_best'):
        model = timm.create_model(f'local-dir:{tmp_path / "run" / folder}', pretrained=True)
        assert type(model).__name__ == 'ResNet' and model.num_classes == 10
