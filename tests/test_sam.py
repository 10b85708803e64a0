""" The SAM optimizer: its update against the textbook, timm's registry and param groups,
Accelerate and the LR schedule, state_dict, argument checks, BatchNorm statistics. """
import copy
import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.optim import Lookahead, create_optimizer_v2
from timm.scheduler import create_scheduler_v2

import timm_gmix
from timm_gmix import SAM, GMixup, gmix_step

LR, MOMENTUM, WD = 0.1, 0.9, 5e-3


def make_sam(model, opt='gmix_sam', **kwargs):
    kwargs = dict(lr=LR, momentum=MOMENTUM, weight_decay=WD, base='sgd', rho=0.05, adaptive=False) | kwargs
    return create_optimizer_v2(model, opt=opt, **kwargs)


def make_opt(model, name):
    """ SAM for a name with 'sam' in it, else timm's plain optimizer (the control). """
    if 'sam' in name:
        return make_sam(model, opt=name)
    return create_optimizer_v2(model, opt=name, lr=LR, momentum=MOMENTUM, weight_decay=WD)


def textbook_sam_steps(tb, model, batches, rho, adaptive):
    """ SAM/ASAM around timm's 'sgd' (Nesterov momentum, no weight decay on 1-d params), by hand. """
    w, bufs = tb.params_of(model), {}
    for x, y in batches:
        _, g = tb.loss_and_grads(model, w, x, y)
        _, g_at_w_e = tb.loss_and_grads(model, tb.add(w, tb.perturbation(w, g, rho, adaptive)), x, y)
        w = tb.sgd_step(w, g_at_w_e, bufs, LR, MOMENTUM, WD, nesterov=True)
    return w


def batches(make_batch, n, dtype=torch.float64, batch_size=8):
    return [make_batch(batch_size, seed=100 + i, dtype=dtype) for i in range(n)]


def state_tensors(opt):
    return {(i, k): v for i, s in opt.state_dict()['state'].items() for k, v in s.items()}


# ----------------------------------------------------------------------------------------------
# The update


@pytest.mark.parametrize('adaptive, rho', [(False, 0.05), (True, 0.5)], ids=['sam', 'asam'])
def test_step_matches_textbook(adaptive, rho, make_mlp, make_batch, textbook, check_params):
    model = make_mlp(dtype=torch.float64)
    data = batches(make_batch, 2)  # two steps, so the momentum buffer is exercised too
    expected = textbook_sam_steps(textbook, model, data, rho, adaptive)
    opt = make_sam(model, rho=rho, adaptive=adaptive)
    for x, y in data:
        assert not gmix_step(model, opt, x, y).skipped
    check_params(model, expected)


@pytest.mark.parametrize('adaptive', [False, True], ids=['sam', 'asam'])
def test_step_closure_equals_gmix_step(adaptive, make_mlp, make_batch, check_params):
    model = make_mlp(dtype=torch.float64)
    twin = copy.deepcopy(model)
    opt, twin_opt = make_sam(model, adaptive=adaptive), make_sam(twin, adaptive=adaptive)
    for x, y in batches(make_batch, 2):
        gmix_step(model, opt, x, y)

        def closure():
            loss = F.cross_entropy(twin(x), y)
            loss.backward()
            return loss

        twin_opt.zero_grad()
        twin_opt.step(closure)
    check_params(twin, dict(model.named_parameters()))


# ----------------------------------------------------------------------------------------------
# timm's registry and parameter groups


@pytest.mark.parametrize('name', ['gmix_sam', 'sam', 'GMIX_SAM'])
def test_registry_builds_sam(name, make_mlp):
    opt = make_sam(make_mlp(), opt=name)
    assert type(opt) is SAM
    assert isinstance(opt.base_optimizer, torch.optim.SGD)
    assert opt.base_optimizer.defaults['nesterov'] is True  # timm's 'sgd'


def test_get_optimizer_info():
    for name in ('gmix_sam', 'sam'):
        info = timm.optim.get_optimizer_info(name)
        assert info.opt_class is SAM and info.name == 'sam'
    assert 'sam' in timm.optim.list_optimizers()


def test_lookahead_gmix_sam_steps(make_mlp, make_batch):
    model = make_mlp()
    opt = make_sam(model, opt='lookahead_gmix_sam')
    assert isinstance(opt, Lookahead) and isinstance(opt._base_optimizer, SAM)
    assert timm_gmix.find_sam(opt) is opt._base_optimizer
    before = copy.deepcopy(model.state_dict())
    for x, y in batches(make_batch, 7, dtype=torch.float32):  # past Lookahead's k=6 sync
        assert not gmix_step(model, opt, x, y).skipped
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all() and not torch.equal(p, before[n]), n


def test_base_adamw(make_mlp, make_batch):
    model = make_mlp()
    opt = make_sam(model, base='adamw', lr=1e-3, weight_decay=0.05, betas=(0.9, 0.99), eps=1e-7)
    assert isinstance(opt.base_optimizer, torch.optim.AdamW)
    assert 'momentum' not in opt.param_groups[0]
    assert opt.param_groups[0]['betas'] == (0.9, 0.99) and opt.param_groups[0]['eps'] == 1e-7
    before = [p.detach().clone() for p in model.parameters()]
    assert not gmix_step(model, opt, *make_batch(8)).skipped
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_param_groups_shared_with_weight_decay(make_cnn):
    model = make_cnn()
    opt = make_sam(model, weight_decay=0.05)
    assert opt.param_groups is opt.base_optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    seen = []
    for group in opt.param_groups:
        assert group['rho'] == 0.05 and group['adaptive'] is False
        for p in group['params']:
            seen.append(names[id(p)])
            assert group['weight_decay'] == (0.0 if p.ndim <= 1 else 0.05), names[id(p)]
    assert sorted(seen) == sorted(names.values())
    assert {g['weight_decay'] for g in opt.param_groups} == {0.0, 0.05}


def test_layer_decay_lr_scale():
    torch.manual_seed(0)
    vit = timm.create_model('test_vit', num_classes=10)
    opt = make_sam(vit, lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    assert opt.param_groups is opt.base_optimizer.param_groups
    scales = [g['lr_scale'] for g in opt.param_groups]
    assert max(scales) == 1.0 and len(set(scales)) > 2
    assert sum(len(g['params']) for g in opt.param_groups) == len(list(vit.parameters()))
    scheduler, _ = create_scheduler_v2(opt, sched='cosine', num_epochs=10, warmup_epochs=0)
    scheduler.step(2)
    expected = 0.5 * 1e-3 * (1 + math.cos(math.pi * 2 / 10))
    for g in opt.base_optimizer.param_groups:
        assert g['lr'] == pytest.approx(expected * g['lr_scale'], rel=1e-12)


# ----------------------------------------------------------------------------------------------
# Accelerate and the LR schedule


def cosine_lr(epoch, base_lr=LR, num_epochs=10):
    return 0.5 * base_lr * (1 + math.cos(math.pi * epoch / num_epochs))


def test_scheduler_reaches_base_after_accelerate_prepare(accelerator, make_mlp):
    model = make_mlp()
    model, opt = accelerator.prepare(model, make_sam(model))
    sam = opt.optimizer
    assert isinstance(sam, SAM) and sam.param_groups is sam.base_optimizer.param_groups
    scheduler, num_epochs = create_scheduler_v2(opt, sched='cosine', num_epochs=10, warmup_epochs=0)
    assert num_epochs == 10
    scheduler.step(3)
    for g in sam.base_optimizer.param_groups:
        assert g['lr'] == pytest.approx(cosine_lr(3), rel=1e-12) and g['lr'] != LR

    opt.load_state_dict(opt.state_dict())  # a resume: the base replaces its group dicts
    assert sam.param_groups is sam.base_optimizer.param_groups
    scheduler.step(5)
    for g in sam.base_optimizer.param_groups:
        assert g['lr'] == pytest.approx(cosine_lr(5), rel=1e-12)


# ----------------------------------------------------------------------------------------------
# state_dict


@pytest.mark.parametrize('name, steps', [('gmix_sam', 2), ('lookahead_sgd', 6), ('lookahead_gmix_sam', 6)])
def test_state_dict_round_trip(name, steps, make_mlp, make_batch):
    """ Save after `steps` steps, load into a fresh model and optimizer, continue: same weights as
    never stopping. (Lookahead keeps slow weights from its k=6-th step on: they must survive too.) """
    first, then = batches(make_batch, steps), batches(make_batch, steps + 1)[1:]
    model = make_mlp(dtype=torch.float64)
    opt = make_opt(model, name)
    for x, y in first:
        gmix_step(model, opt, x, y)
    saved_opt, saved_model = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    assert {k for _, k in state_tensors(opt)} >= {'momentum_buffer'}
    assert len(saved_opt['state']) == len(list(model.parameters()))

    resumed = make_mlp(seed=1, dtype=torch.float64)
    resumed_opt = make_opt(resumed, name)
    resumed.load_state_dict(saved_model)
    resumed_opt.load_state_dict(saved_opt)
    sam = timm_gmix.find_sam(resumed_opt)
    assert sam is None or sam.param_groups is sam.base_optimizer.param_groups
    for x, y in then:
        gmix_step(model, opt, x, y)
        gmix_step(resumed, resumed_opt, x, y)
    for (n, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize('name', ['lookahead_sgd', 'lookahead_gmix_sam'])
def test_lookahead_slow_weights_are_in_state_dict(name, make_mlp, make_batch):
    """ timm's Lookahead keeps its slow weights in `base.state`; around SAM that is `SAM.state`,
    which `SAM.state_dict()` must not leave out (lookahead_sgd is the control). """
    model = make_mlp()
    opt = make_opt(model, name)
    for x, y in batches(make_batch, 6, dtype=torch.float32):
        gmix_step(model, opt, x, y)
    assert 'lookahead_slow_buff' in {k for _, k in state_tensors(opt)}


# ----------------------------------------------------------------------------------------------
# Argument checks


@pytest.mark.parametrize('rho', [0, 0.0, -0.05, float('nan'), float('inf')])
def test_bad_rho_raises(rho, make_mlp):
    with pytest.raises(ValueError, match='rho'):
        make_sam(make_mlp(), rho=rho)


@pytest.mark.parametrize('base', ['sam', 'gmix_sam', 'lookahead_sam'])
def test_sam_cannot_wrap_sam(base, make_mlp):
    with pytest.raises(ValueError, match='SAM'):
        make_sam(make_mlp(), base=base)


def test_default_rho(make_mlp):
    assert make_sam(make_mlp(), rho=None).param_groups[0]['rho'] == 0.05
    assert make_sam(make_mlp(), rho=None, adaptive=True).param_groups[0]['rho'] == 2.0


# ----------------------------------------------------------------------------------------------
# BatchNorm running statistics


@pytest.mark.parametrize('mode', [None, 'g', 'bg', 'dg'])
def test_bn_stats_come_from_the_ascent_pass_only(mode, make_cnn, make_batch):
    model = make_cnn()
    reference = copy.deepcopy(model).train()
    x, y = make_batch(8)
    mix_args = dict(mixup_alpha=1.0, num_classes=10, mode=mode, gmix_ratio=0.5)

    ascent_batch = x.clone()
    if mode is not None:
        np.random.seed(7)
        ascent_batch = GMixup(**mix_args).mix(ascent_batch, y.clone()).inputs
        assert not torch.equal(ascent_batch, x)
    with torch.no_grad():
        reference(ascent_batch)

    np.random.seed(7)
    mixup_fn = GMixup(**mix_args) if mode is not None else None
    assert not gmix_step(model, make_sam(model), x.clone(), y, mixup_fn=mixup_fn).skipped
    buffers = dict(model.named_buffers())
    assert buffers['1.num_batches_tracked'] == 1
    for n, b in reference.named_buffers():
        assert torch.equal(buffers[n], b), n
