""" gmix_step: what each pass sees, the G-Mix / BG-Mix / DG-Mix updates against hand computations,
sharpness sensitivity and flagging, non-finite steps, GradScaler, clipping, accumulation. """
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import Mixup
from timm.optim import create_optimizer_v2

from timm_gmix import GMixup, gmix_step

LR = 0.1
MIX = dict(mixup_alpha=1.0, label_smoothing=0.1, num_classes=10)


class Recorder(nn.Module):
    """ Wraps a model and records the input of every forward pass. """

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.model(x)


class RecordingLoss:
    """ Per-example cross-entropy that records the targets of every call. """

    def __init__(self):
        self.targets = []

    def __call__(self, logits, target):
        self.targets.append(target.clone())
        return F.cross_entropy(logits, target, reduction='none')


class Gate(nn.Module):
    """ Multiplies its input by `bad` on the forward calls listed in `poison` (counted from 1). """

    def __init__(self, bad=float('nan')):
        super().__init__()
        self.calls, self.poison, self.bad = 0, set(), bad

    def forward(self, x):
        self.calls += 1
        return x * (self.bad if self.calls in self.poison else 1.0)


def sam(model, base='momentum', momentum=0.0, weight_decay=0.0, lr=LR, rho=0.05, **options):
    """ SAM around plain SGD (timm's 'momentum'): with momentum 0 the update is -lr * g'. """
    return create_optimizer_v2(model, opt='gmix_sam', base=base, lr=lr, momentum=momentum,
                               weight_decay=weight_decay, rho=rho, **options)


def gmixup(mode, gamma=0.5, lam_mode='batch', **kwargs):
    return GMixup(mode=mode, lam_mode=lam_mode, gmix_ratio=gamma, **(MIX | kwargs))


def step(textbook, model, opt, x, y, mixup_fn=None, seed=0, **kwargs):
    """ gmix_step on copies of the batch (mixing works in place), with every RNG seeded. """
    textbook.seed_all(seed)
    return gmix_step(model, opt, x.clone(), y.clone(), mixup_fn=mixup_fn, **kwargs)


def timm_mixed(textbook, x, y, seed=0, lam_mode='batch'):
    """ The mixed batch, reproduced with timm's own Mixup and the same seed. """
    textbook.seed_all(seed)
    return Mixup(mode=lam_mode, **MIX)(x.clone(), y.clone())


def snapshot(model, opt):
    return copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()['state'])


def assert_unchanged(model, opt, snap):
    weights, state = snap
    for n, t in model.state_dict().items():
        assert torch.equal(t, weights[n]), n
    now = opt.state_dict()['state']
    assert now.keys() == state.keys()
    for i in state:
        for k, v in state[i].items():
            assert torch.equal(now[i][k], v), (i, k)
    assert all(p.grad is None for p in model.parameters())


def changed(model, weights):
    return any(not torch.equal(p, weights[n]) for n, p in model.named_parameters())


# ----------------------------------------------------------------------------------------------
# What each pass sees


@pytest.mark.parametrize('lam_mode', ['batch', 'elem'])
def test_g_ascent_and_descent_see_the_same_mixed_batch(lam_mode, make_mlp, make_batch, textbook):
    model, loss = Recorder(make_mlp()), RecordingLoss()
    x, y = make_batch(8)
    step(textbook, model, sam(model), x, y, gmixup('g', lam_mode=lam_mode), seed=3, loss_fn=loss)
    x_mixed, t_mixed = timm_mixed(textbook, x, y, seed=3, lam_mode=lam_mode)
    assert len(model.inputs) == 2 and len(loss.targets) == 2
    for seen_x, seen_t in zip(model.inputs, loss.targets):
        assert torch.equal(seen_x, x_mixed) and torch.equal(seen_t, t_mixed)


@pytest.mark.parametrize('gamma', [0.25, 0.5, 1.0])
@pytest.mark.parametrize('lam_mode', ['batch', 'elem'])
@pytest.mark.parametrize('mode', ['bg', 'dg'])
def test_bg_dg_make_three_passes(mode, lam_mode, gamma, make_mlp, make_batch, textbook):
    """ Ascent and sensitivity on the mixed batch; descent on B - |F| + |clean examples needed|. """
    model, loss = Recorder(make_mlp()), RecordingLoss()
    x, y = make_batch(8)
    result = step(textbook, model, sam(model), x, y, gmixup(mode, gamma, lam_mode), seed=4, loss_fn=loss)
    assert len(model.inputs) == 3 and len(loss.targets) == 3
    assert torch.equal(model.inputs[0], model.inputs[1]) and torch.equal(loss.targets[0], loss.targets[1])
    flagged = set(result.flagged.nonzero().squeeze(1).tolist())
    needed = flagged if mode == 'bg' else flagged | {7 - i for i in flagged}
    assert len(model.inputs[2]) == 8 - len(flagged) + len(needed)


# ----------------------------------------------------------------------------------------------
# The properties of section 3.2


@pytest.mark.parametrize('lam_mode', ['batch', 'elem'])
@pytest.mark.parametrize('mode', ['bg', 'dg'])
def test_gamma_zero_is_g(mode, lam_mode, make_cnn, make_batch, textbook):
    x, y = make_batch(8)
    models = {m: make_cnn() for m in ('g', mode)}
    results = {}
    for m, model in models.items():
        opt = sam(model, base='sgd', momentum=0.9, weight_decay=1e-3)
        for seed in (0, 1):
            results[m] = step(textbook, model, opt, x, y, gmixup(m, gamma=0.0, lam_mode=lam_mode), seed=seed)
    assert not results[mode].flagged.any() and results[mode].sensitivity.shape == (8,)
    reference = models['g'].state_dict()
    for n, t in models[mode].state_dict().items():
        assert torch.equal(t, reference[n]), n


def test_gamma_one_descends_on_the_clean_batch(float64, make_mlp, make_batch, textbook, check_params):
    """ With a per-batch lam and gamma = 1, bg and dg both take e from the mixed batch and the descent
    gradient from the clean batch with its smoothed one-hot targets. """
    x, y = make_batch(8, dtype=torch.float64)
    model = make_mlp(dtype=torch.float64)
    w = textbook.params_of(model)
    x_mixed, t_mixed = timm_mixed(textbook, x, y, seed=5)
    _, g = textbook.loss_and_grads(model, w, x_mixed, t_mixed)
    clean_targets = textbook.smoothed_one_hot(y, MIX['label_smoothing'])
    _, g_clean = textbook.loss_and_grads(model, textbook.add(w, textbook.perturbation(w, g, 0.05)), x, clean_targets)
    expected = textbook.sgd_step(w, g_clean, {}, LR)

    for mode in ('bg', 'dg'):
        model = make_mlp(dtype=torch.float64)
        result = step(textbook, model, sam(model), x, y, gmixup(mode, gamma=1.0), seed=5)
        assert result.flagged.all()
        # dg weighs the clean pairs by lam and 1 - lam, which the package keeps in float32
        check_params(model, expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize('gamma', [0.25, 0.5])
@pytest.mark.parametrize('lam_mode', ['batch', 'elem'])
@pytest.mark.parametrize('mode', ['bg', 'dg'])
def test_partial_flagging_matches_the_textbook_loss(mode, lam_mode, gamma, float64, make_mlp, make_batch, textbook,
                                                     check_params):
    """ Descent loss at w + e = (1/B) [sum over unflagged of l(xt_i, yt_i) + sum over flagged of
    l(x_i, y_i) (bg) or lam_i l(x_i, y_i) + (1 - lam_i) l(x_p(i), y_p(i)) (dg)], p(i) = B-1-i. """
    n = 8
    x, y = make_batch(n, seed=9)
    model = make_mlp()
    w = textbook.params_of(model)
    result = step(textbook, model, sam(model), x, y, gmixup(mode, gamma, lam_mode), seed=8)
    flagged = result.flagged.tolist()
    assert 0 < sum(flagged) < n

    x_mixed, t_mixed = timm_mixed(textbook, x, y, seed=8, lam_mode=lam_mode)
    textbook.seed_all(8)  # timm's own lam for the same draw
    lam = torch.as_tensor(getattr(Mixup(mode=lam_mode, **MIX), f'_mix_{lam_mode}')(x.clone())).flatten().expand(n)
    clean_t = textbook.smoothed_one_hot(y, MIX['label_smoothing'])

    def descent_loss(params):
        mixed = textbook.per_example_loss(model, params, x_mixed, t_mixed)
        clean = textbook.per_example_loss(model, params, x, clean_t)
        terms = [mixed[i] if not flagged[i] else clean[i] if mode == 'bg'
                 else lam[i] * clean[i] + (1 - lam[i]) * clean[n - 1 - i] for i in range(n)]
        return sum(terms) / n

    _, g = textbook.loss_and_grads(model, w, x_mixed, t_mixed)
    g_descent = textbook.grad_of(descent_loss, textbook.add(w, textbook.perturbation(w, g, 0.05)))
    check_params(model, textbook.sgd_step(w, g_descent, {}, LR), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize('gamma, batch_size, k', [
    (0.3, 10, 3), (0.25, 8, 2), (0.5, 8, 4), (0.7, 10, 7), (0.07, 100, 7), (0.01, 8, 1), (0.0, 8, 0), (1.0, 8, 8),
])
@pytest.mark.parametrize('flag', ['largest', 'smallest'])
def test_sensitivity_and_flags(flag, gamma, batch_size, k, float64, make_cnn, make_batch, textbook):
    """ s_i = l(w + e) - l(w) per mixed example, recomputed by hand; the top (bottom) k are flagged. """
    x, y = make_batch(batch_size, seed=batch_size, dtype=torch.float64)
    model = make_cnn(dtype=torch.float64)
    twin, w = copy.deepcopy(model), textbook.params_of(model)
    result = step(textbook, model, sam(model), x, y, gmixup('dg', gamma, 'elem', gmix_flag=flag), seed=6)

    x_mixed, t_mixed = timm_mixed(textbook, x, y, seed=6, lam_mode='elem')
    loss_w = textbook.per_example_loss(twin, w, x_mixed, t_mixed)
    _, g = textbook.loss_and_grads(twin, w, x_mixed, t_mixed)
    w_e = textbook.add(w, textbook.perturbation(w, g, 0.05))
    sensitivity = textbook.per_example_loss(twin, w_e, x_mixed, t_mixed) - loss_w

    torch.testing.assert_close(result.loss, loss_w.mean(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(result.sensitivity, sensitivity, rtol=1e-8, atol=1e-12)
    assert int(result.flagged.sum()) == k
    order = torch.argsort(sensitivity, descending=flag == 'largest')
    assert set(result.flagged.nonzero().squeeze(1).tolist()) == set(order[:k].tolist())
    assert torch.equal(result.mixes_two_classes, y != y.flip(0))


# ----------------------------------------------------------------------------------------------
# Non-finite values skip the step


@pytest.mark.parametrize('bad', [float('nan'), float('inf')], ids=['nan', 'inf'])
@pytest.mark.parametrize('use_scaler', [False, True], ids=['fp32', 'scaler'])
@pytest.mark.parametrize('mode, poisoned_pass', [('g', 1), ('g', 2), ('dg', 1), ('dg', 3)],
                         ids=['g-ascent', 'g-descent', 'dg-ascent', 'dg-descent'])
def test_non_finite_pass_skips_the_step(mode, poisoned_pass, use_scaler, bad, make_mlp, make_batch, textbook):
    gate = Gate(bad)
    model = nn.Sequential(gate, make_mlp())
    opt = sam(model, base='sgd', momentum=0.9, weight_decay=1e-3)
    scaler = torch.amp.GradScaler('cpu', init_scale=2. ** 10) if use_scaler else None
    x, y = make_batch(8)

    def run(seed):
        return step(textbook, model, opt, x, y, gmixup(mode), seed=seed, scaler=scaler)

    assert not run(0).skipped  # momentum buffers now exist
    snap = snapshot(model, opt)
    gate.poison = {gate.calls + poisoned_pass}
    assert run(1).skipped
    assert_unchanged(model, opt, snap)
    if scaler is not None:
        assert scaler.get_scale() == 2. ** 9

    result = run(2)
    assert not result.skipped and changed(model, snap[0])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if scaler is not None:
        assert scaler.get_scale() == 2. ** 9


@pytest.mark.parametrize('poisoned_pass', [1, 2], ids=['ascent', 'descent'])
def test_scaler_overflow_resets_growth_like_gradscaler(poisoned_pass, make_mlp, make_batch, textbook):
    """ An overflow, in either pass, is what GradScaler counts as one: the scale backs off and the run
    of good steps towards growth restarts (with growth_interval=2: 1024 -> 512, then 512 stays). """
    gate = Gate()
    model = nn.Sequential(gate, make_mlp())
    opt = sam(model)
    scaler = torch.amp.GradScaler('cpu', init_scale=2. ** 10, growth_interval=2)
    x, y = make_batch(8)
    seen = []
    for seed, poison in enumerate([False, True, False]):
        gate.poison = {gate.calls + poisoned_pass} if poison else set()
        step(textbook, model, opt, x, y, seed=seed, scaler=scaler)
        seen.append((scaler.get_scale(), scaler.state_dict()['_growth_tracker']))
    assert seen == [(1024., 1), (512., 0), (512., 1)]


def test_fp16_through_accelerate_skips_and_checkpoints_the_scale(make_mlp, make_batch, textbook, tmp_path):
    """ Accelerate's fp16 path, with a CPU GradScaler where Accelerate puts its CUDA one (on CPU it makes
    none): the scaled passes give the unscaled update, a descent overflow skips the step and backs the scale
    off, and the scale is saved and restored with the training state. """
    from accelerate import Accelerator

    def prepared(scaler):
        accelerator = Accelerator()
        accelerator.scaler = scaler  # before prepare, which hands it to the prepared optimizer
        torch.manual_seed(0)
        gate = Gate()
        model = nn.Sequential(gate, make_mlp())
        model, opt = accelerator.prepare(model, sam(model, base='sgd', momentum=0.9))
        return accelerator, gate, model, opt

    accelerator, gate, model, opt = prepared(torch.amp.GradScaler('cpu', init_scale=2. ** 10))
    fp32_accelerator, _, twin, twin_opt = prepared(None)
    x, y = make_batch(8)
    for seed in range(2):
        assert not step(textbook, model, opt, x, y, gmixup('g'), seed, accelerator=accelerator).skipped
        step(textbook, twin, twin_opt, x, y, gmixup('g'), seed, accelerator=fp32_accelerator)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q)

    snap = snapshot(model, opt)
    gate.poison = {gate.calls + 2}
    assert step(textbook, model, opt, x, y, gmixup('g'), 2, accelerator=accelerator).skipped
    assert_unchanged(model, opt, snap)
    assert accelerator.scaler.get_scale() == 2. ** 9

    accelerator.save_state(str(tmp_path / 'checkpoint'))
    restored, _, _, _ = prepared(torch.amp.GradScaler('cpu', init_scale=2. ** 16))
    restored.load_state(str(tmp_path / 'checkpoint'))
    assert restored.scaler.get_scale() == 2. ** 9


# ----------------------------------------------------------------------------------------------
# GradScaler, clipping, plain optimizers, accumulation, Accelerate


@pytest.mark.parametrize('clip_grad', [None, 0.05])
@pytest.mark.parametrize('mode', ['g', 'dg'])
def test_grad_scaler_gives_the_unscaled_update(mode, clip_grad, make_mlp, make_batch, textbook, check_params):
    x, y = make_batch(8)
    models = [make_mlp(), make_mlp()]
    scaler = torch.amp.GradScaler('cpu', init_scale=2. ** 10)
    for model, use_scaler in zip(models, (False, True)):
        opt = sam(model, base='sgd', momentum=0.9, weight_decay=1e-3)
        for seed in (0, 1):
            result = step(textbook, model, opt, x, y, gmixup(mode), seed=seed, clip_grad=clip_grad,
                          scaler=scaler if use_scaler else None)
            assert not result.skipped
    assert scaler.get_scale() == 2. ** 10
    check_params(models[1], dict(models[0].named_parameters()), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('mode', ['bg', 'dg'])
def test_bg_dg_need_sam(mode, make_mlp, make_batch):
    model = make_mlp()
    x, y = make_batch(8)
    x_before, weights = x.clone(), copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match='SAM'):
        gmix_step(model, create_optimizer_v2(model, opt='sgd', lr=LR), x, y, mixup_fn=gmixup(mode))
    assert torch.equal(x, x_before) and not changed(model, weights)


@pytest.mark.parametrize('use_mixup', [False, True], ids=['plain', 'timm-mixup'])
def test_plain_optimizer_makes_a_plain_step(use_mixup, make_mlp, make_batch, textbook, check_params):
    """ opt='sgd' (timm: Nesterov momentum 0.9, no weight decay on 1-d params): one pass per step. """
    x, y = make_batch(8, dtype=torch.float64)
    inner = make_mlp(dtype=torch.float64)
    model = Recorder(inner)
    w, bufs = textbook.params_of(inner), {}
    opt = create_optimizer_v2(model, opt='sgd', lr=LR, momentum=0.9, weight_decay=5e-3)
    for seed in (0, 1):
        inputs, targets = timm_mixed(textbook, x, y, seed) if use_mixup else (x, y)
        _, g = textbook.loss_and_grads(inner, w, inputs, targets)
        w = textbook.sgd_step(w, g, bufs, LR, 0.9, 5e-3, nesterov=True)
        mixup_fn = Mixup(**MIX) if use_mixup else None
        assert not step(textbook, model, opt, x, y, mixup_fn, seed=seed).skipped
    assert len(model.inputs) == 2
    check_params(inner, w)


@pytest.mark.parametrize('optimizer', ['plain', 'sam'])
def test_clip_grad_norm(optimizer, make_mlp, make_batch, textbook, check_params):
    """ With momentum 0 the update is -lr * g * clip / ||g|| (g at w + e for SAM). """
    x, y = make_batch(8, dtype=torch.float64)
    model = make_mlp(dtype=torch.float64)
    w, clip = textbook.params_of(model), 1e-3
    _, g = textbook.loss_and_grads(model, w, x, y)
    if optimizer == 'sam':
        _, g = textbook.loss_and_grads(model, textbook.add(w, textbook.perturbation(w, g, 0.05)), x, y)
    norm = torch.sqrt(sum((t ** 2).sum() for t in g.values()))
    assert norm > 10 * clip
    expected = {n: w[n] - LR * clip * g[n] / norm for n in w}

    opt = sam(model) if optimizer == 'sam' else create_optimizer_v2(model, opt='momentum', lr=LR, momentum=0.)
    step(textbook, model, opt, x, y, clip_grad=clip)
    check_params(model, expected, rtol=1e-5, atol=1e-12)
    applied = torch.sqrt(sum(((p - w[n]) ** 2).sum() for n, p in model.named_parameters())) / LR
    assert float(applied.detach()) == pytest.approx(clip, rel=1e-5)


@pytest.mark.parametrize('mode', [None, 'g', 'bg', 'dg'])
def test_accumulation_equals_the_whole_batch(mode, float64, make_mlp, make_batch, textbook, check_params):
    x, y = make_batch(8, dtype=torch.float64)
    models, results = [make_mlp(), make_mlp()], []
    for model, accum_steps in zip(models, (1, 2)):
        opt = sam(model, base='sgd', momentum=0.9, weight_decay=1e-3)
        for seed in (0, 1):
            mixup_fn = gmixup(mode, lam_mode='elem') if mode else None
            results.append(step(textbook, model, opt, x, y, mixup_fn, seed=seed, accum_steps=accum_steps))
    check_params(models[1], dict(models[0].named_parameters()))
    if mode in ('bg', 'dg'):
        for whole, accumulated in zip(results[:2], results[2:]):
            assert torch.equal(whole.flagged, accumulated.flagged)
            torch.testing.assert_close(whole.sensitivity, accumulated.sensitivity, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize('mode', ['g', 'dg'])
def test_accelerator_gives_the_same_update(mode, accelerator, make_mlp, make_batch, textbook, check_params):
    x, y = make_batch(8)
    plain, wrapped = make_mlp(), make_mlp()
    plain_opt = sam(plain, base='sgd', momentum=0.9)
    wrapped, wrapped_opt = accelerator.prepare(wrapped, sam(wrapped, base='sgd', momentum=0.9))
    for seed in (0, 1):
        step(textbook, plain, plain_opt, x, y, gmixup(mode), seed=seed)
        step(textbook, wrapped, wrapped_opt, x, y, gmixup(mode), seed=seed, accelerator=accelerator)
    check_params(accelerator.unwrap_model(wrapped), dict(plain.named_parameters()), rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match='GradScaler'):
        gmix_step(wrapped, wrapped_opt, x, y, accelerator=accelerator, scaler=torch.amp.GradScaler('cpu'))


def test_agc_leaves_the_classifier_head_alone_as_timm_does():
    """ timm's train.py clips with `model_parameters(model, exclude_head='agc' in clip_mode)`: adaptive clipping
    of every parameter but the head's weight and bias. The reference is that timm loop on a copy of a timm ResNet;
    the two sides make the same passes, summed in another order (the mean against a sum / B), hence the float32
    tolerance. At clip 0.01 the head's gradient would be cut to a small fraction if it were clipped. """
    import timm
    from timm.models import model_parameters
    from timm.utils import dispatch_clip_grad
    torch.manual_seed(0)
    model = timm.create_model('resnet10t', num_classes=10).train()
    reference = copy.deepcopy(model)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    opt = create_optimizer_v2(model, opt='momentum', lr=LR, momentum=0., weight_decay=0.)
    ref_opt = create_optimizer_v2(reference, opt='momentum', lr=LR, momentum=0., weight_decay=0.)
    F.cross_entropy(reference(x), y).backward()
    unclipped_head = reference.fc.weight.grad.clone()
    dispatch_clip_grad(model_parameters(reference, exclude_head=True), 0.01, mode='agc')
    assert torch.equal(reference.fc.weight.grad, unclipped_head)
    ref_opt.step()
    w_fc = model.fc.weight.detach().clone()
    assert not gmix_step(model, opt, x, y, clip_grad=0.01, clip_mode='agc').skipped
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close((w_fc - model.fc.weight) / LR, unclipped_head, rtol=1e-4, atol=1e-6)


def test_accumulation_under_batchnorm_normalizes_each_micro_batch_by_itself(make_cnn, make_batch):
    """ With BatchNorm in training mode, accum_steps=K gives the gradient of K micro-batches each normalized over
    its own rows (timm's --grad-accum-steps: each loader batch by itself), not the whole batch's. """
    x, y = make_batch(8)
    model = make_cnn().train()
    reference, whole = copy.deepcopy(model), copy.deepcopy(model)
    loss = sum(F.cross_entropy(reference(xc), yc, reduction='sum') for xc, yc in zip(x.split(4), y.split(4))) / 8
    grads = torch.autograd.grad(loss, list(reference.parameters()))
    whole_grads = torch.autograd.grad(F.cross_entropy(whole(x), y), list(whole.parameters()))
    expected = [p.detach() - LR * g for p, g in zip(model.parameters(), grads)]
    opt = create_optimizer_v2(model, opt='momentum', lr=LR, momentum=0., weight_decay=0.)
    assert not gmix_step(model, opt, x, y, accum_steps=2).skipped
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-7)
    assert max(float((g - h).abs().max()) for g, h in zip(grads, whole_grads)) > 1e-3
