""" The cheaper G-Mix steps: the SAM interval, LookSAM's reused direction and MSAM's momentum perturbation,
each against a hand computation (float64), their schedule, their state through undo and state_dict, and
their bad settings. """
import copy

import pytest
import torch
from timm.optim import create_optimizer_v2

from test_step import Gate, Recorder, gmixup, step
from timm_gmix import SAM, gmix_step

LR, RHO, MOMENTUM = 0.1, 0.05, 0.9


def efficient_sam(model, base='momentum', momentum=MOMENTUM, **options):
    """ SAM over SGD with heavy-ball momentum (timm's 'momentum', not Nesterov) and no weight decay. """
    return create_optimizer_v2(model, opt='gmix_sam', base=base, lr=LR, momentum=momentum, weight_decay=0.0,
                               rho=RHO, **options)


def flat(tensors):
    return torch.cat([t.flatten() for t in tensors])


def norm(d):
    return flat(d.values()).norm()


def dot(a, b):
    return (flat(a.values()) * flat(b.values())).sum()


def scaled(d, s):
    return {n: s * t for n, t in d.items()}


def passes_per_update(model, opt, batches, mixup_fn=None):
    """ Forward passes of each of a few updates, and whether each was a full step. """
    counts, full = [], []
    for x, y in batches:
        before = len(model.inputs)
        result = gmix_step(model, opt, x, y, mixup_fn)
        counts.append(len(model.inputs) - before)
        full.append(result.full_step)
        assert not result.skipped
    return counts, full


@pytest.mark.parametrize('interval', [1, 3])
@pytest.mark.parametrize('mode, full_passes', [('g', 2), ('dg', 3)])
def test_full_step_on_every_kth_update_one_pass_between(interval, mode, full_passes, make_cnn, make_batch,
                                                         textbook):
    model = Recorder(make_cnn())
    textbook.seed_all(0)
    batches = [make_batch(8, seed=s) for s in range(7)]
    counts, full = passes_per_update(model, efficient_sam(model, interval=interval), batches, gmixup(mode))
    assert full == [u % interval == 0 for u in range(7)]
    assert counts == [full_passes if f else 1 for f in full]


def test_updates_between_full_steps_are_the_base_optimizer_step(float64, make_mlp, make_batch, textbook):
    """ interval 2 without mixing: a full SAM step, then heavy-ball SGD at w, then SAM again. """
    model = make_mlp()
    opt = efficient_sam(model, interval=2)
    params, bufs = textbook.params_of(model), {}
    for u in range(3):
        x, y = make_batch(8, seed=u)
        at = params
        if u % 2 == 0:
            _, g = textbook.loss_and_grads(model, params, x, y)
            at = textbook.add(params, textbook.perturbation(params, g, RHO))
        _, g = textbook.loss_and_grads(model, at, x, y)
        params = textbook.sgd_step(params, g, bufs, LR, momentum=MOMENTUM)
        assert not gmix_step(model, opt, x, y).skipped
        torch.testing.assert_close(dict(model.named_parameters()), params, rtol=1e-10, atol=1e-12)


def test_looksam_keeps_the_orthogonal_part_and_adds_it_back(float64, make_mlp, make_batch, textbook):
    """ Full step: g_v = g_s - (<g_s, g> / <g, g>) g. One-pass update: g + alpha ||g|| / ||g_v|| g_v. """
    alpha = 0.7
    model = make_mlp()
    opt = efficient_sam(model, momentum=0.0, interval=2, reuse=alpha)
    params = textbook.params_of(model)
    x, y = make_batch(8, seed=0)
    _, g = textbook.loss_and_grads(model, params, x, y)
    _, g_s = textbook.loss_and_grads(model, textbook.add(params, textbook.perturbation(params, g, RHO)), x, y)
    g_v = {n: g_s[n] - dot(g_s, g) / dot(g, g) * g[n] for n in g}
    gmix_step(model, opt, x, y)
    names = {p: n for n, p in model.named_parameters()}
    kept = {names[p]: s['reused'] for p, s in opt.sam_state.items()}
    torch.testing.assert_close(kept, g_v, rtol=1e-10, atol=1e-14)
    assert abs(dot(kept, g)) < 1e-12 * norm(kept) * norm(g)
    params = {n: params[n] - LR * g_s[n] for n in params}

    x, y = make_batch(8, seed=1)
    _, g = textbook.loss_and_grads(model, params, x, y)
    reused = {n: g[n] + alpha * norm(g) / norm(g_v) * g_v[n] for n in g}
    result = gmix_step(model, opt, x, y)
    assert not result.full_step
    torch.testing.assert_close(dict(model.named_parameters()), {n: params[n] - LR * reused[n] for n in params},
                               rtol=1e-10, atol=1e-12)


def test_looksam_in_dg_reuses_the_part_orthogonal_to_the_mixed_gradient(float64, make_mlp, make_batch, textbook):
    """ In bg/dg the kept direction is the descent gradient (partly on clean examples) minus its projection on
    the gradient at w on the mixed batch: orthogonal to that gradient, and with it spanning the descent one. """
    model = Recorder(make_mlp())
    opt = efficient_sam(model, interval=4, reuse=0.5)
    x, y = make_batch(8, seed=0)
    textbook.seed_all(5)
    batch = gmixup('dg').mix(x.clone(), y.clone())
    _, g = textbook.loss_and_grads(model, textbook.params_of(model), batch.inputs, batch.targets)
    result = step(textbook, model, opt, x, y, gmixup('dg'), seed=5)
    assert torch.equal(model.inputs[0], batch.inputs) and result.flagged.sum() == 4
    names = {p: n for n, p in model.named_parameters()}
    kept = {names[p]: s['reused'] for p, s in opt.sam_state.items()}
    assert abs(dot(kept, g)) < 1e-12 * norm(kept) * norm(g)
    assert norm(kept) > 0


def test_momentum_perturbation_is_msam(float64, make_mlp, make_batch, textbook):
    """ No momentum before the first update, so e = 0; then e = -rho m / ||m||; one pass each update. """
    model = Recorder(make_mlp())
    opt = efficient_sam(model, perturb='momentum')
    params, bufs = textbook.params_of(model), {}
    for u in range(3):
        x, y = make_batch(8, seed=u)
        at = textbook.add(params, scaled(bufs, -RHO / norm(bufs))) if bufs else params
        _, g = textbook.loss_and_grads(model, at, x, y)
        params = textbook.sgd_step(params, g, bufs, LR, momentum=MOMENTUM)
        before = len(model.inputs)
        assert gmix_step(model, opt, x, y).full_step
        assert len(model.inputs) - before == 1
        torch.testing.assert_close(dict(model.named_parameters()), params, rtol=1e-10, atol=1e-12)


def test_momentum_perturbation_reads_adams_first_moment(make_mlp, make_batch):
    model = make_mlp()
    opt = efficient_sam(model, base='adamw', perturb='momentum')
    gmix_step(model, opt, *make_batch(8))
    w = [p.detach().clone() for p in model.parameters()]
    m = [opt.state[p]['exp_avg'] for p in model.parameters()]
    with opt.perturbed():
        moved = [p.detach() - w0 for p, w0 in zip(model.parameters(), w)]
    expected = -RHO * flat(m) / flat(m).norm()
    torch.testing.assert_close(flat(moved), expected, rtol=1e-5, atol=1e-7)
    assert all(torch.equal(p, w0) for p, w0 in zip(model.parameters(), w))


@pytest.mark.parametrize('mode', ['bg', 'dg'])
def test_momentum_perturbation_keeps_the_exact_sensitivity(mode, float64, make_cnn, make_batch, textbook):
    """ BG/DG with MSAM: s_i = l_i(w + e) - l_i(w) with e from the momentum, from two forwards without gradient,
    then the descent pass: three passes, BatchNorm statistics updated once (by the forward at w). """
    model = Recorder(make_cnn())
    opt = efficient_sam(model, perturb='momentum')
    step(textbook, model, opt, *make_batch(8, seed=0), gmixup(mode), seed=0)
    tracked = int(model.model[1].num_batches_tracked)
    bufs = {n: opt.state[p]['momentum_buffer'].clone() for n, p in model.named_parameters()}
    params = textbook.params_of(model)
    stats = copy.deepcopy(model.state_dict())
    before = len(model.inputs)
    result = step(textbook, model, opt, *make_batch(8, seed=1), gmixup(mode), seed=1)
    assert len(model.inputs) - before == 3 and int(model.model[1].num_batches_tracked) == tracked + 1
    mixed = model.inputs[before]
    assert torch.equal(mixed, model.inputs[before + 1])
    probe = Recorder(make_cnn())
    probe.load_state_dict(stats)
    textbook.seed_all(1)
    targets = gmixup(mode).mix(*[t.clone() for t in make_batch(8, seed=1)]).targets
    at_w = textbook.per_example_loss(probe, params, mixed, targets)
    at_e = textbook.per_example_loss(probe, textbook.add(params, scaled(bufs, -RHO / norm(bufs))), mixed, targets)
    torch.testing.assert_close(result.sensitivity, at_e - at_w, rtol=1e-9, atol=1e-12)


def dg_updates(model, opt, updates, make_batch, textbook):
    for u in updates:
        assert not step(textbook, model, opt, *make_batch(8, seed=u), gmixup('dg'), seed=u).skipped


@pytest.mark.parametrize('options', [dict(interval=3, reuse=0.5), dict(interval=2, perturb='momentum')])
def test_state_dict_resumes_the_schedule_bit_for_bit(options, make_cnn, make_batch, textbook):
    """ Five updates in one go equal two, a save and load into a fresh model and optimizer, and three more. """
    whole = make_cnn()
    dg_updates(whole, efficient_sam(whole, **options), range(5), make_batch, textbook)
    first = make_cnn()
    opt = efficient_sam(first, **options)
    dg_updates(first, opt, range(2), make_batch, textbook)
    saved = copy.deepcopy((first.state_dict(), opt.state_dict()))
    assert saved[1]['sam']['updates'] == 2
    resumed = make_cnn(seed=1)
    resumed.load_state_dict(saved[0])
    opt = efficient_sam(resumed, **options)
    opt.load_state_dict(saved[1])
    dg_updates(resumed, opt, range(2, 5), make_batch, textbook)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_an_undone_full_step_counts_nothing_and_keeps_the_reused_part(make_mlp, make_batch):
    gate = Gate()
    model = torch.nn.Sequential(make_mlp(), gate)
    opt = efficient_sam(model, interval=2, reuse=0.5)
    for u in range(2):
        assert not gmix_step(model, opt, *make_batch(8, seed=u)).skipped
    kept = [t.clone() for t in opt.looksam.parts()]
    gate.poison = {gate.calls + 2}  # the pass at w + e of the next (full) update
    result = gmix_step(model, opt, *make_batch(8, seed=2))
    assert result.skipped and result.full_step and opt.updates == 2
    assert all(torch.equal(a, b) for a, b in zip(kept, opt.looksam.parts()))
    assert gmix_step(model, opt, *make_batch(8, seed=2)).full_step  # the full step comes again


@pytest.mark.parametrize('options, message', [
    (dict(interval=0), 'interval must be a whole number'),
    (dict(interval=2.5), 'interval must be a whole number'),
    (dict(reuse=-0.1, interval=2), 'reuse must be a finite number'),
    (dict(reuse=0.5), 'set interval K > 1'),
    (dict(reuse=0.5, interval=2, perturb='momentum'), 'use one or the other'),
    (dict(perturb='hessian'), 'perturb must be one of gradient, momentum'),
    (dict(perturb='momentum', base='adagrad'), 'needs a base optimizer that keeps momentum'),
])
def test_bad_settings_say_what_is_wrong(options, message, make_mlp):
    base = options.pop('base', 'momentum')
    with pytest.raises(ValueError, match=message):
        efficient_sam(make_mlp(), base=base, **options)


def test_closure_step_refuses_the_cheaper_settings(make_mlp):
    opt = efficient_sam(make_mlp(), interval=2)
    assert isinstance(opt, SAM)
    with pytest.raises(ValueError, match='use gmix_step'):
        opt.step(lambda: torch.zeros(()))
