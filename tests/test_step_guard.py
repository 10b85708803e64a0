""" gmix_step never leaves a bad state behind: w comes back when the pass at w + e raises, a non-finite loss or
gradient skips the update (guard 'skip', the default), an update that makes weights or optimizer state
non-finite is undone bit for bit (guard 'undo'), a normal step is the per-parameter computation (to float32 rounding), SAM
reuses its buffers, and the g path reads one value on the host. """
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import Mixup
from timm.optim import create_optimizer_v2
from torch.overrides import TorchFunctionMode

from timm_gmix import GMixup, find_sam, gmix_step
from timm_gmix.guard import all_finite
from timm_gmix.training.checkpoint import all_finite as checkpoint_finite

LR = 0.1
MIX = dict(mixup_alpha=1.0, label_smoothing=0.1, num_classes=10)


class RaiseOnCall(nn.Module):
    """ Raises on the forward call numbered `call` (from 1), as an out-of-memory error would. """

    def __init__(self, call):
        super().__init__()
        self.calls, self.call = 0, call

    def forward(self, x):
        self.calls += 1
        if self.calls == self.call:
            raise torch.OutOfMemoryError('out of memory (test)')
        return x


def make_opt(model, name, lr=LR):
    """ 'sam/<base>' is SAM around timm's <base>; any other name is timm's optimizer itself. """
    kwargs = dict(lr=lr, weight_decay=1e-3)
    if name.startswith('sam/'):
        return create_optimizer_v2(model, opt='gmix_sam', base=name[4:], rho=0.05, momentum=0.9, **kwargs)
    return create_optimizer_v2(model, opt=name, momentum=0.9, **kwargs)


def set_lr(opt, lr):
    for group in opt.param_groups:
        group['lr'] = lr


def snapshot(model, opt):
    groups = [{k: v for k, v in g.items() if k != 'params'} for g in opt.param_groups]
    return copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()['state']), groups


def assert_same(snap, other, groups_too=True, **tolerance):
    """ Bit for bit, or to `tolerance` (assert_close's rtol, atol) when the two sides ran different kernels. """
    (weights, state, groups), (weights2, state2, groups2) = snap, other
    assert weights.keys() == weights2.keys() and state.keys() == state2.keys()
    assert groups == groups2 or not groups_too

    def same(a, b, what):
        if tolerance:
            torch.testing.assert_close(a, b, **tolerance, msg=str(what))
        else:
            assert torch.equal(a, b), what

    for n in weights:
        same(weights[n], weights2[n], n)
    for i in state:
        assert state[i].keys() == state2[i].keys(), i
        for k, v in state[i].items():
            if torch.is_tensor(v):
                same(v, state2[i][k], (i, k))
            else:
                assert v == state2[i][k], (i, k)


def twins(make_mlp, name, steps, batches):
    """ Two identical models and optimizers, both `steps` steps in. """
    pairs = []
    for _ in range(2):
        model = make_mlp()
        opt = make_opt(model, name)
        for x, y in batches[:steps]:
            assert not gmix_step(model, opt, x, y).skipped
        pairs.append((model, opt))
    return pairs


# ----------------------------------------------------------------------------------------------
# An exception at w + e


@pytest.mark.parametrize('mode, call', [(None, 2), ('g', 2), ('dg', 2), ('dg', 3)],
                         ids=['sam-descent', 'g-descent', 'dg-sensitivity', 'dg-descent'])
def test_exception_at_w_plus_e_restores_w(mode, call, make_mlp, make_batch, textbook):
    batches = [make_batch(8, seed=s) for s in range(3)]
    (model, opt), (twin, twin_opt) = twins(make_mlp, 'sam/sgd', 1, batches)
    raiser = RaiseOnCall(call)
    wrapped = nn.Sequential(raiser, model)
    mixup_fn = GMixup(mode=mode, gmix_ratio=0.5, **MIX) if mode else None
    before = snapshot(model, opt)

    textbook.seed_all(1)
    with pytest.raises(torch.OutOfMemoryError):
        gmix_step(wrapped, opt, batches[1][0].clone(), batches[1][1], mixup_fn=mixup_fn)
    assert raiser.calls == call
    assert_same(snapshot(model, opt), before)
    assert not find_sam(opt).is_perturbed
    assert all(p.grad is None for p in model.parameters())

    # The caller goes on from w: the same steps as a twin that never failed, bit for bit.
    for seed, (x, y) in enumerate(batches[1:], start=1):
        for m, o in ((wrapped, opt), (twin, twin_opt)):
            textbook.seed_all(seed)
            assert not gmix_step(m, o, x.clone(), y, mixup_fn=mixup_fn).skipped  # mixing is in place
    assert_same(snapshot(model, opt), snapshot(twin, twin_opt))


def test_sam_perturbed_restores_on_exception(make_mlp, make_batch):
    model = make_mlp()
    sam = make_opt(model, 'sam/sgd')
    x, y = make_batch(8)
    F.cross_entropy(model(x), y).backward()
    w = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match='boom'):
        with sam.perturbed():
            assert sam.is_perturbed and any(not torch.equal(p, w[n]) for n, p in model.named_parameters())
            raise RuntimeError('boom')
    assert not sam.is_perturbed
    for n, p in model.named_parameters():
        assert torch.equal(p, w[n]), n


def test_perturb_at_w_plus_e_raises(make_mlp, make_batch):
    """ A second perturb would save w + e as w. """
    model = make_mlp()
    sam = make_opt(model, 'sam/sgd')
    F.cross_entropy(model(make_batch(8)[0]), make_batch(8)[1]).backward()
    w = copy.deepcopy(model.state_dict())
    sam.perturb()
    with pytest.raises(RuntimeError, match='restore'):
        sam.perturb()
    sam.restore()
    for n, p in model.named_parameters():
        assert torch.equal(p, w[n]), n


# ----------------------------------------------------------------------------------------------
# A non-finite update is undone (guard 'undo'), and left as made by the default guard


@pytest.mark.parametrize('name, steps, lr, loss_scale', [
    ('sam/sgd', 0, 1e38, 100.), ('sam/sgd', 2, 1e38, 100.), ('sgd', 2, 1e38, 100.),
    ('sam/sgd', 2, float('inf'), 1.), ('sam/adamw', 2, float('inf'), 1.), ('sgd', 0, float('inf'), 1.),
    ('adamw', 0, float('inf'), 1.), ('adamw', 2, float('inf'), 1.), ('lookahead_sam', 5, float('inf'), 1.),
])
def test_non_finite_update_is_undone(name, steps, lr, loss_scale, make_mlp, make_batch):
    """ Finite gradients, an update that overflows float32 (lr 1e38 on gradients of 100 x the loss; Adam's
    update is at most about lr, so an infinite lr): the step is undone, weights, optimizer state (momentum,
    Adam moments and step count, Lookahead's step count and the slow weights its 6th step makes) and group
    values bit for bit; the next step equals a twin's that never diverged. """
    batches = [make_batch(8, seed=s) for s in range(steps + 1)]
    (model, opt), (twin, twin_opt) = twins(make_mlp, name, steps, batches)
    before = snapshot(model, opt)

    set_lr(opt, lr)
    x, y = batches[steps]
    result = gmix_step(model, opt, x, y, guard='undo',
                       loss_fn=lambda out, t: loss_scale * F.cross_entropy(out, t, reduction='none'))
    assert result.skipped and result.diverged
    set_lr(opt, LR)
    assert_same(snapshot(model, opt), before)
    assert all(p.grad is None for p in model.parameters())

    for m, o in ((model, opt), (twin, twin_opt)):
        result = gmix_step(m, o, *batches[steps])
        assert not result.skipped and not result.diverged
    assert_same(snapshot(model, opt), snapshot(twin, twin_opt))


def test_diverged_step_updates_the_scaler_as_a_finite_gradient_step(make_mlp, make_batch):
    """ The scaled gradients were finite, so the scale does not back off; the scaler is updated once and the
    next step runs (no second unscale_ before update). """
    model = make_mlp()
    opt = make_opt(model, 'sam/sgd')
    scaler = torch.amp.GradScaler('cpu', init_scale=2. ** 10, growth_interval=100)
    x, y = make_batch(8)
    assert not gmix_step(model, opt, x, y, scaler=scaler, guard='undo').skipped
    set_lr(opt, float('inf'))
    assert gmix_step(model, opt, x, y, scaler=scaler, guard='undo').diverged
    assert (scaler.get_scale(), scaler.state_dict()['_growth_tracker']) == (2. ** 10, 2)
    set_lr(opt, LR)
    assert not gmix_step(model, opt, x, y, scaler=scaler, guard='undo').skipped
    assert (scaler.get_scale(), scaler.state_dict()['_growth_tracker']) == (2. ** 10, 3)


@pytest.mark.parametrize('guard', ['skip', 'undo'])
def test_non_finite_gradient_is_skipped_not_diverged(guard, make_mlp, make_batch):
    model = make_mlp()
    opt = make_opt(model, 'sam/sgd')
    x, y = make_batch(8)
    before = snapshot(model, opt)
    result = gmix_step(model, opt, x * float('nan'), y, guard=guard)
    assert result.skipped and not result.diverged
    assert_same(snapshot(model, opt), before)


@pytest.mark.parametrize('name', ['sam/sgd', 'sgd'])
def test_the_default_guard_makes_an_update_from_finite_gradients(name, make_mlp, make_batch):
    """ Guard 'skip' decides before the update, on the losses and gradients: an lr that makes the update
    overflow is not caught there (that is what 'undo' pays for); the next update, at non-finite weights, is
    skipped and leaves them as they are. """
    model = make_mlp()
    opt = make_opt(model, name)
    x, y = make_batch(8)
    set_lr(opt, 1e38)
    result = gmix_step(model, opt, x, y, loss_fn=lambda out, t: 100. * F.cross_entropy(out, t, reduction='none'))
    assert not result.skipped and not all(torch.isfinite(p).all() for p in model.parameters())
    before = snapshot(model, opt)
    assert gmix_step(model, opt, x, y).skipped
    assert_same(snapshot(model, opt), before)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_finite(dtype):
    """ Any NaN, inf or -inf is caught; large finite tensors (sum |x| beyond float16's range, x^2 beyond
    float32's: Adam's exp_avg_sq) are finite. The same for the check before a checkpoint is saved, which also
    takes values that are not tensors. """
    cpu = torch.device('cpu')
    large = torch.full((100,), 6e4 if dtype == torch.float16 else 1e30, dtype=dtype)
    assert bool(all_finite([large, torch.empty(0, dtype=dtype), torch.arange(3)], cpu))
    assert checkpoint_finite([large, torch.empty(0, dtype=dtype), torch.arange(3), 7])
    for bad in (float('nan'), float('inf'), -float('inf')):
        tensor = torch.zeros(5, dtype=dtype)
        tensor[3] = bad
        assert not bool(all_finite([large, tensor], cpu)), bad
        assert not checkpoint_finite([large, 7, tensor]), bad


# ----------------------------------------------------------------------------------------------
# A normal step is the per-parameter computation


def reference_step(model, base, x, y, rho=None, adaptive=False):
    """ SAM (rho given) or a plain step, parameter by parameter, op for op as the package computed it
    before its foreach version; the loss as gmix_step's: sum of per-example losses / B. """
    def loss():
        return (F.cross_entropy(model(x), y, reduction='none') * torch.ones(len(x))).sum() / len(x)

    loss().backward()
    if rho is not None:
        params = [p for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([(p.abs() * p.grad) if adaptive else p.grad for p in params])
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p in params:
                e = p.grad * (rho / (norm + 1e-12))
                if adaptive:
                    e.mul_(p.square())
                p.add_(e)
        base.zero_grad(set_to_none=True)
        loss().backward()
        with torch.no_grad():
            for p, w in zip(params, saved):
                p.copy_(w)
    base.step()
    base.zero_grad(set_to_none=True)


@pytest.mark.parametrize('name, adaptive', [
    ('sam/sgd', False), ('sam/sgd', True), ('sam/adamw', False), ('sgd', False), ('adamw', False),
], ids=['sam', 'asam', 'sam-adamw', 'sgd', 'adamw'])
def test_normal_steps_are_the_per_parameter_computation(name, adaptive, make_mlp, make_batch):
    """ The package's foreach perturbation and restore against SAM written parameter by parameter. The two run
    different kernels (foreach against per-tensor, whose vectorized paths round differently from one CPU to
    another: seen on an AMD EPYC for AdamW), so they agree to float32 rounding over three steps, not bit for bit;
    a wrong perturbation or a w not restored would be off by about rho or lr. """
    model, reference = make_mlp(), make_mlp()
    rho = 0.5 if adaptive else 0.05
    kwargs = dict(lr=LR, weight_decay=1e-3, momentum=0.9)
    if name.startswith('sam/'):
        opt = create_optimizer_v2(model, opt='gmix_sam', base=name[4:], rho=rho, adaptive=adaptive, **kwargs)
        base = create_optimizer_v2(reference, opt=name[4:], **kwargs)
    else:
        opt, base = create_optimizer_v2(model, opt=name, **kwargs), create_optimizer_v2(reference, opt=name, **kwargs)
        rho = None
    for seed in range(3):
        x, y = make_batch(8, seed=seed)
        assert not gmix_step(model, opt, x, y).skipped
        reference_step(reference, base, x, y, rho, adaptive)
    assert_same(snapshot(model, opt), snapshot(reference, base), groups_too=False,  # SAM's add rho, adaptive
                rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# Buffers kept between steps, and host reads


class CountCalls(TorchFunctionMode):
    """ Counts calls of the given torch functions and Tensor methods made from Python. """

    def __init__(self, funcs):
        super().__init__()
        self.funcs, self.count = funcs, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += func in self.funcs
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize('adaptive', [False, True], ids=['sam', 'asam'])
def test_sam_allocates_its_copy_of_w_once(adaptive, make_mlp, make_batch):
    """ The first perturb allocates one buffer per parameter; later ones none, until a parameter changes
    dtype; restore gives w back exactly each time. """
    model = make_mlp()
    sam = create_optimizer_v2(model, opt='gmix_sam', base='sgd', lr=LR, adaptive=adaptive)
    x, y = make_batch(8)
    allocations = []
    for dtype in (torch.float32, torch.float32, torch.float64, torch.float64):
        model.to(dtype)
        w = copy.deepcopy(model.state_dict())
        F.cross_entropy(model(x.to(dtype)), y).backward()
        with CountCalls({torch.empty_like, torch.Tensor.clone, torch.clone}) as counter:
            sam.perturb()
            sam.restore()
        allocations.append(counter.count)
        sam.zero_grad(set_to_none=True)
        assert all(torch.equal(p, w[n]) for n, p in model.named_parameters())
    n = len(list(model.parameters()))
    assert allocations == [n, 0, n, 0]


@pytest.mark.parametrize('name, guard, expected', [
    ('sam/sgd', 'undo', 'n n 0 0'), ('sgd', 'undo', 'n n 0 0'), ('sam/sgd', 'skip', 'n 0 0 0'), ('sgd', 'skip', '0 0 0 0'),
])
def test_guard_buffers_are_allocated_once(name, guard, expected, make_mlp, make_batch):
    """ 'undo': buffers for w (step 1: SAM's own copy, or the guard's) and for the momentum (step 2, the first with a
    momentum to save), then none. 'skip' keeps no copy of weights or state: SAM's copy of w only. """
    model = make_mlp()
    opt = make_opt(model, name)
    allocations = []
    for seed in range(4):
        with CountCalls({torch.empty_like}) as counter:
            assert not gmix_step(model, opt, *make_batch(8, seed=seed), guard=guard).skipped
        allocations.append(counter.count)
    n = len(list(model.parameters()))
    assert allocations == [n if a == 'n' else 0 for a in expected.split()]


HOST_READS = {torch.Tensor.__bool__, torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__int__,
              torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.numpy}


@pytest.mark.parametrize('name, mixup, kwargs', [
    ('sam/sgd', 'g', {}),
    ('sam/sgd', 'g', dict(guard='undo')),
    ('sam/sgd', 'g', dict(clip_grad=1.0, accum_steps=2)),
    ('sam/sgd', None, dict(clip_grad=0.1, clip_mode='value')),
    ('lookahead_sam', 'timm', dict(scaler=True)),
    ('sgd', 'timm', dict(clip_grad=1.0)),
], ids=['g', 'g-undo', 'g-clip-accum', 'sam-clip-value', 'lookahead-timm-mixup-scaler', 'plain-sgd'])
def test_g_path_reads_one_value_on_the_host(name, mixup, kwargs, make_mlp, make_batch):
    """ One host read per update (the skip decision), on a good step and on a skipped one. (Optimizers may
    read their own CPU tensors, as Adam its step count: no device sync, but counted here, so SGD.) """
    model = make_mlp()
    opt = make_opt(model, name)
    mixup_fn = {'g': GMixup(mode='g', **MIX), 'timm': Mixup(**MIX), None: None}[mixup]
    if kwargs.get('scaler'):
        kwargs = kwargs | dict(scaler=torch.amp.GradScaler('cpu', init_scale=2. ** 10))
    x, y = make_batch(8)
    for bad in (1.0, float('nan')):
        with CountCalls(HOST_READS) as counter:
            result = gmix_step(model, opt, x * bad, y, mixup_fn=mixup_fn, **kwargs)
        assert result.skipped == (bad != 1.0)
        assert counter.count == 1


@pytest.mark.parametrize('guard', ['skip', 'undo'])
@pytest.mark.parametrize('opt', ['gmix_sam', 'sgd'])
def test_a_skipped_step_leaves_batchnorm_statistics_as_they_were(opt, guard, make_cnn, make_batch):
    """ The ascent pass updates BatchNorm's running statistics before the step is known to be skipped: a NaN
    batch must not leave NaN statistics behind (they are saved in every checkpoint). """
    model = make_cnn()
    optimizer = create_optimizer_v2(model, opt=opt, lr=0.1, momentum=0.9)
    x, y = make_batch(8)
    assert not gmix_step(model, optimizer, x, y, guard=guard).skipped
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = gmix_step(model, optimizer, torch.full_like(x, float('nan')), y, guard=guard)
    assert result.skipped and not result.diverged
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
