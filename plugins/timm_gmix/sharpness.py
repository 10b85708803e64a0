""" Flatness of a trained model: Hessian spectrum, sharpness and 1-D loss curves around its weights.

    python -m timm_gmix.sharpness --model local-dir:OUTPUT/EXP/model --dataset digits --out sharpness/

measures a train.py export on the first --num-examples of a --split of its data (the dataset flags mean what they
mean in train.py) and writes sharpness.json (every number and setting) and loss_curve.png there.

Conventions, shared by every measure:
    loss      L(w) = mean cross-entropy over all examples of `batches`, a list of (inputs, targets) on the model's
              device with targets as class indices; each measure sees the same fixed batches
    weights   w = the parameters that require grad; the model is evaluated with torch.func.functional_call at
              perturbed copies of them, so its own weights and buffers are never written
    mode      the model runs in eval mode (BatchNorm on its running statistics, no dropout); each module's
              train/eval mode is restored afterwards
    seed      random vectors come from a torch.Generator seeded with `seed` (drawn on the CPU, in the
              parameters' dtype): the same seed gives the same numbers (worst_case_sharpness draws nothing)

Measures:
    top_hessian_eigenvalue   power iteration on Hessian-vector products: the eigenvalue of largest magnitude
    hessian_trace            Hutchinson's estimator, mean of v^T H v over Rademacher vectors v
    worst_case_sharpness     max over a few normalized-gradient ascent steps of L(w + e) - L(w), ||e|| <= rho;
                             the first step is SAM's perturbation. adaptive: ASAM's ball (Kwon et al., 2021),
                             e = |w| * u with ||u|| <= rho
    average_case_sharpness   mean of L(w + e) - L(w) for plain (not filter-scaled) Gaussian e ~ N(0, sigma^2 I),
                             in antithetic pairs: each draw e is evaluated at +e and -e, which cancels the
                             first-order term (so about sigma^2 / 2 * trace(H) for small sigma)
    loss_curve               L(w + alpha * d) along one filter-normalized random direction d (Li et al., 2018):
                             d ~ N(0, 1), each filter (slice along the first dimension) of a weight tensor rescaled
                             to that filter's norm in w; 1-D tensors (biases, norm layers) get d = 0
"""
import argparse
import json
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

DEFAULTS = dict(iters=20, tol=1e-3, trace_samples=10, rho=0.05, adaptive_rho=0.5, steps=5, sigma=0.01,
                noise_samples=10, alphas=tuple(a / 10 for a in range(-10, 11)))
UNUSED_IS_ZERO = dict(allow_unused=True, materialize_grads=True)  # parameters the loss does not reach (unused heads)


@contextmanager
def _evaluating(model):
    """ The model in eval mode, each module's own mode restored after. """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _weights(model) -> dict:
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def _loss(model, batches, params: dict) -> torch.Tensor:
    """ L at `params` (the other parameters and the buffers are the model's). """
    total = sum(len(y) for _, y in batches)
    return sum(F.cross_entropy(functional_call(model, params, (x,)), y, reduction='sum') for x, y in batches) / total


def _value(model, batches, params: dict) -> float:
    with torch.no_grad():
        return _loss(model, batches, params).item()


def _shifted(weights: dict, direction: dict, scale: float = 1.0) -> dict:
    return {n: w + scale * direction[n] for n, w in weights.items()}


def _gradient(model, batches, params: dict) -> dict:
    params = {n: p.detach().requires_grad_() for n, p in params.items()}
    grads = torch.autograd.grad(_loss(model, batches, params), list(params.values()), **UNUSED_IS_ZERO)
    return dict(zip(params, grads))


def _hvp(model, batches, weights: dict, v: dict) -> dict:
    """ H v, accumulated batch by batch (each batch's graph freed before the next). Attention runs on PyTorch's
    math kernel: the fused ones have no double backward. """
    total = sum(len(y) for _, y in batches)
    params = {n: w.clone().requires_grad_() for n, w in weights.items()}
    hv = {n: torch.zeros_like(w) for n, w in weights.items()}
    with sdpa_kernel(SDPBackend.MATH):
        for x, y in batches:
            loss = F.cross_entropy(functional_call(model, params, (x,)), y, reduction='sum') / total
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=True, **UNUSED_IS_ZERO)
            grad_v = sum((g * v[n]).sum() for n, g in zip(params, grads))
            for n, h in zip(params, torch.autograd.grad(grad_v, list(params.values()), **UNUSED_IS_ZERO)):
                hv[n] += h
    return hv


def _dot(a: dict, b: dict) -> float:
    return sum((a[n] * b[n]).sum() for n in a).item()


def _norm(a: dict) -> float:
    return _dot(a, a) ** 0.5


def _scaled(a: dict, scale) -> dict:
    """ a * scale, scale a number or a dict of tensors. """
    return {n: t * (scale[n] if isinstance(scale, dict) else scale) for n, t in a.items()}


def _randn(weights: dict, generator) -> dict:
    return {n: torch.randn(w.shape, generator=generator, dtype=w.dtype).to(w.device) for n, w in weights.items()}


def _rademacher(weights: dict, generator) -> dict:
    return {n: (torch.randint(0, 2, w.shape, generator=generator) * 2 - 1).to(w.device, w.dtype)
            for n, w in weights.items()}


def top_hessian_eigenvalue(model, batches, iters: int = DEFAULTS['iters'], tol: float = DEFAULTS['tol'],
                           seed: int = 0) -> float:
    """ The Hessian's eigenvalue of largest magnitude (its top eigenvalue at a minimum), by power iteration
    from a Gaussian start: the Rayleigh quotient v^T H v, stopped after `iters` Hessian-vector products or
    once it changes by less than `tol` relative. """
    with _evaluating(model):
        weights = _weights(model)
        v = _randn(weights, torch.Generator().manual_seed(seed))
        v = _scaled(v, 1 / _norm(v))
        eigenvalue = None
        for _ in range(iters):
            hv = _hvp(model, batches, weights, v)
            previous, eigenvalue = eigenvalue, _dot(v, hv)
            v = _scaled(hv, 1 / _norm(hv))
            if previous is not None and abs(eigenvalue - previous) <= tol * abs(previous):
                break
        return eigenvalue


def hessian_trace(model, batches, samples: int = DEFAULTS['trace_samples'], seed: int = 0) -> float:
    """ Hutchinson's estimate of trace(H): the mean of v^T H v over `samples` Rademacher vectors v. """
    with _evaluating(model):
        weights = _weights(model)
        generator = torch.Generator().manual_seed(seed)
        total = 0.0
        for _ in range(samples):
            v = _rademacher(weights, generator)
            total += _dot(v, _hvp(model, batches, weights, v))
        return total / samples


def worst_case_sharpness(model, batches, rho: float = DEFAULTS['rho'], steps: int = DEFAULTS['steps'],
                         adaptive: bool = False) -> float:
    """ The largest L(w + e) - L(w) met by `steps` projected normalized-gradient ascent steps of length rho in
    the ball ||e|| <= rho, from e = 0 (so one step is SAM's e = rho g / ||g||). adaptive: the ball of ASAM,
    e = |w| * u with ||u|| <= rho, the ascent taken in u (one step is ASAM's e = rho |w|^2 g / || |w| g ||).
    Deterministic: no random start. """
    with _evaluating(model):
        weights = _weights(model)
        scale = {n: w.abs() if adaptive else torch.ones_like(w) for n, w in weights.items()}
        base = _value(model, batches, weights)
        u = {n: torch.zeros_like(w) for n, w in weights.items()}
        worst = float('-inf')
        for _ in range(steps):
            e = _scaled(u, scale)
            grad_u = _scaled(_gradient(model, batches, _shifted(weights, e)), scale)
            step = rho / _norm(grad_u)
            u = {n: u[n] + step * g for n, g in grad_u.items()}
            u = _scaled(u, min(1.0, rho / _norm(u)))  # back onto the ball
            worst = max(worst, _value(model, batches, _shifted(weights, _scaled(u, scale))) - base)
        return worst


def average_case_sharpness(model, batches, sigma: float = DEFAULTS['sigma'], samples: int = DEFAULTS['noise_samples'],
                           seed: int = 0) -> float:
    """ The mean of L(w + e) - L(w) over `samples` Gaussian draws e ~ N(0, sigma^2 I) (plain, not filter-scaled),
    each evaluated at +e and -e (antithetic: the first-order term cancels). """
    with _evaluating(model):
        weights = _weights(model)
        generator = torch.Generator().manual_seed(seed)
        base = _value(model, batches, weights)
        total = 0.0
        for _ in range(samples):
            e = _randn(weights, generator)
            total += (_value(model, batches, _shifted(weights, e, sigma)) +
                      _value(model, batches, _shifted(weights, e, -sigma))) / 2
        return total / samples - base


def filter_normalized_direction(weights: dict, generator) -> dict:
    """ Li et al.'s direction: Gaussian, each filter (slice along dim 0) scaled to the norm of the same filter of
    the weights; zero for 1-D tensors (biases and normalization parameters). """
    direction = {}
    for n, w in weights.items():
        if w.dim() <= 1:
            direction[n] = torch.zeros_like(w)
            continue
        d = torch.randn(w.shape, generator=generator, dtype=w.dtype).to(w.device)
        direction[n] = d * (_filter_norms(w) / _filter_norms(d))
    return direction


def _filter_norms(t: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(t, dim=tuple(range(1, t.dim())), keepdim=True)


def loss_curve(model, batches, alphas=DEFAULTS['alphas'], seed: int = 0) -> list:
    """ [L(w + alpha * d) for alpha in alphas], d the filter-normalized direction drawn with `seed`. """
    with _evaluating(model):
        weights = _weights(model)
        d = filter_normalized_direction(weights, torch.Generator().manual_seed(seed))
        return [_value(model, batches, _shifted(weights, d, alpha)) for alpha in alphas]


def measure(model, batches, rho: float = DEFAULTS['rho'], adaptive_rho: float = DEFAULTS['adaptive_rho'],
            sigma: float = DEFAULTS['sigma'], iters: int = DEFAULTS['iters'], tol: float = DEFAULTS['tol'],
            trace_samples: int = DEFAULTS['trace_samples'], steps: int = DEFAULTS['steps'],
            noise_samples: int = DEFAULTS['noise_samples'], alphas=DEFAULTS['alphas'], seed: int = 0) -> dict:
    """ Every measure with these settings (DEFAULTS), as a dict of numbers: loss, top_hessian_eigenvalue,
    hessian_trace, worst_case_sharpness (radius rho), adaptive_worst_case_sharpness (radius adaptive_rho in ASAM's
    |w|-scaled ball, on another scale than rho), average_case_sharpness, loss_curve (the losses at alphas). """
    with _evaluating(model):
        loss = _value(model, batches, _weights(model))
    return {
        'loss': loss,
        'top_hessian_eigenvalue': top_hessian_eigenvalue(model, batches, iters, tol, seed),
        'hessian_trace': hessian_trace(model, batches, trace_samples, seed),
        'worst_case_sharpness': worst_case_sharpness(model, batches, rho, steps),
        'adaptive_worst_case_sharpness': worst_case_sharpness(model, batches, adaptive_rho, steps, adaptive=True),
        'average_case_sharpness': average_case_sharpness(model, batches, sigma, noise_samples, seed),
        'loss_curve': loss_curve(model, batches, alphas, seed),
    }


def plot_curves(curves: dict, alphas, path, title=''):
    """ A PNG of the loss curves {label: losses} against alphas. """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, losses in curves.items():
        ax.plot(alphas, losses, label=label)
    ax.set(xlabel='alpha (filter-normalized direction)', ylabel='loss', title=title)
    ax.legend(fontsize='small')
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _parse(argv):
    parser = argparse.ArgumentParser(prog='python -m timm_gmix.sharpness', description=__doc__.split('\n')[0])
    parser.add_argument('--model', required=True, help='local-dir:<export folder> (or any timm model with weights)')
    parser.add_argument('--dataset', default='digits', help="as train.py's --dataset (digits, hfds/<name>, a folder)")
    parser.add_argument('--data-dir', default=None, help="as train.py's --data-dir")
    parser.add_argument('--split', default='validation', help='the split measured on')
    parser.add_argument('--img-size', type=int, default=None, help="default: the model's input size")
    parser.add_argument('--num-examples', type=int, default=512, help='the first N examples of the split')
    parser.add_argument('-b', '--batch-size', type=int, default=128)
    for name in ('rho', 'adaptive_rho', 'sigma'):
        parser.add_argument(f'--{name.replace("_", "-")}', type=float, default=DEFAULTS[name])
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--out', default='.', help='folder for sharpness.json and loss_curve.png')
    return parser.parse_args(argv)


def load_model(name: str):
    """ timm.create_model(name, pretrained=True); a missing or unloadable model is a UsageError. """
    import timm
    from timm_gmix.training.errors import UsageError, reason

    if name.startswith('local-dir:') and not (Path(name[len('local-dir:'):]) / 'config.json').is_file():
        raise UsageError(f'--model {name}: no config.json in {name[len("local-dir:"):]}; give the model/ folder '
                         f'that train.py exports (local-dir:OUTPUT/EXP/model)')
    try:
        return timm.create_model(name, pretrained=True)
    except Exception as e:  # timm and the Hub client raise many kinds for a model they cannot get
        raise UsageError(f'could not load --model {name} ({reason(e)}): give local-dir:<export folder> or '
                         f'hf-hub:<name>') from e


def eval_batches(model, train_argv, training: bool = False, num_examples: int = 512, batch_size: int = 128):
    """ The first `num_examples` of the validation split (`training`: of the training split, after
    --train-subset) as train.py reads the data with `train_argv`, through the model's eval transform: a list of
    (inputs, targets) batches. """
    from timm_gmix.training.args import parse_args
    from timm_gmix.training.data import load_splits
    from timm_gmix.training.errors import UsageError
    from timm_gmix.training.loader import with_transforms

    args = parse_args([*train_argv, '--no-prefetcher'])  # float batches, normalized as the model takes them
    train, val, num_classes = load_splits(args)
    if num_classes > model.num_classes:
        raise UsageError(f'the data has {num_classes} classes but the model predicts {model.num_classes}: '
                         f'measure it on the data it was trained on')
    chosen = train if training else val
    _, dataset, _ = with_transforms(train, chosen.select(range(min(num_examples, len(chosen)))), args, model)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    return list(loader)


def main(argv=None):
    """ Measure --model on the first --num-examples of --split; write sharpness.json and loss_curve.png. """
    from timm_gmix.training.errors import UsageError

    args = _parse(argv)
    model = load_model(args.model)
    data_argv = ['--dataset', args.dataset, '--val-split', args.split]
    for flag, value in (('--data-dir', args.data_dir), ('--img-size', args.img_size)):
        data_argv += [flag, str(value)] if value is not None else []
    if args.num_examples < 1:
        raise UsageError(f'--num-examples {args.num_examples}: measure on at least 1 example')
    batches = eval_batches(model, data_argv, num_examples=args.num_examples, batch_size=args.batch_size)
    if not batches:
        raise UsageError(f'split {args.split!r} of {args.dataset} is empty: choose another --split')
    settings = {k: getattr(args, k) for k in ('rho', 'adaptive_rho', 'sigma', 'seed')}
    results = measure(model, batches, **settings)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {'model': args.model, 'dataset': args.dataset, 'split': args.split,
              'num_examples': sum(len(y) for _, y in batches),
              'settings': {**DEFAULTS, **settings}, **results}
    (out / 'sharpness.json').write_text(json.dumps(record, indent=2) + '\n')
    plot_curves({args.model: results['loss_curve']}, DEFAULTS['alphas'], out / 'loss_curve.png',
                'Loss along a filter-normalized direction')
    return record


if __name__ == '__main__':
    from timm_gmix.training.errors import main_guard
    main_guard(main)
