""" Shared fixtures: tiny seeded models, batches, and the textbook math the tests compare against.

The textbook helpers are written out here from the definitions (SAM/ASAM, SGD with momentum and
weight decay, soft-target cross-entropy); they never call timm_gmix.
"""
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate.state import AcceleratorState
from torch.func import functional_call

import timm_gmix  # noqa: F401  (registers the optimizer with timm)

# The models here are tiny: one thread avoids thread-pool overhead that otherwise dominates (ms per op).
torch.set_num_threads(1)

NUM_CLASSES = 10
IMG = (3, 4, 4)


def _make_cnn(seed=0, dtype=None):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, NUM_CLASSES),
    ).to(dtype or torch.get_default_dtype())


def _make_mlp(seed=0, dtype=None):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(int(np.prod(IMG)), 16), nn.Tanh(), nn.Linear(16, NUM_CLASSES),
    ).to(dtype or torch.get_default_dtype())


def _make_batch(batch_size=8, seed=0, dtype=None, img=IMG):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, *img, generator=g).to(dtype or torch.get_default_dtype())
    y = torch.randint(0, NUM_CLASSES, (batch_size,), generator=g)
    return x, y


def seed_all(seed=0):
    """ Seed everything a step may draw from (timm's Mixup uses np.random). """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """ Accelerate keeps process-wide state: each test that builds an Accelerator gets a fresh one. """
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.fixture
def make_cnn():
    """ Factory: tiny CNN with BatchNorm. """
    return _make_cnn


@pytest.fixture
def make_mlp():
    """ Factory: tiny MLP without BatchNorm or dropout. """
    return _make_mlp


@pytest.fixture
def make_batch():
    """ Factory: (x, y) with x of shape (B, 3, 4, 4) and labels in [0, 10). """
    return _make_batch


@pytest.fixture
def float64():
    """ Run the test with float64 as torch's default dtype (timm's one-hot targets follow it). """
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield torch.float64
    torch.set_default_dtype(old)


# ----------------------------------------------------------------------------------------------
# Textbook math


def soft_ce(logits, target):
    """ Per-example cross-entropy with class indices or soft targets, written out. """
    logp = torch.log_softmax(logits, dim=-1)
    if target.ndim == 1:
        target = F.one_hot(target, logits.shape[-1]).to(logp.dtype)
    return -(target * logp).sum(-1)


def smoothed_one_hot(y, smoothing=0.0, num_classes=NUM_CLASSES, dtype=None):
    off = smoothing / num_classes
    t = torch.full((len(y), num_classes), off, dtype=dtype or torch.get_default_dtype())
    t[torch.arange(len(y)), y] = 1.0 - smoothing + off
    return t


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def per_example_loss(model, params, x, target):
    return soft_ce(functional_call(model, params, (x,)), target)


def loss_and_grads(model, params, x, target, weights=None, denom=None):
    """ sum_i w_i * l_i / denom (default: mean) and its gradient with respect to `params`. """
    params = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
    losses = per_example_loss(model, params, x, target)
    weights = torch.ones_like(losses) if weights is None else weights.to(losses.dtype)
    loss = (losses * weights).sum() / (len(losses) if denom is None else denom)
    grads = torch.autograd.grad(loss, list(params.values()))
    return loss.detach(), dict(zip(params, grads))


def grad_of(loss_fn, params):
    """ Gradient of `loss_fn(params)` (a scalar) with respect to the dict `params`. """
    params = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
    return dict(zip(params, torch.autograd.grad(loss_fn(params), list(params.values()))))


def perturbation(params, grads, rho, adaptive=False):
    """ SAM: e = rho g / ||g||; ASAM: e = rho w^2 g / || |w| g ||, norms over all parameters. """
    if adaptive:
        norm = torch.sqrt(sum(((params[n].abs() * g) ** 2).sum() for n, g in grads.items()))
        return {n: rho * params[n] ** 2 * g / norm for n, g in grads.items()}
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads.values()))
    return {n: rho * g / norm for n, g in grads.items()}


def add(a, b):
    return {n: a[n] + b[n] for n in a}


def sgd_step(params, grads, bufs, lr, momentum=0.0, weight_decay=0.0, nesterov=False):
    """ torch.optim.SGD's update, with timm's parameter groups: no weight decay on 1-d params. """
    new = {}
    for n, p in params.items():
        d = grads[n] + (weight_decay * p if p.ndim > 1 else 0.0)
        if momentum:
            bufs[n] = d.clone() if n not in bufs else momentum * bufs[n] + d
            d = d + momentum * bufs[n] if nesterov else bufs[n]
        new[n] = p - lr * d
    return new


@pytest.fixture
def textbook():
    return SimpleNamespace(
        soft_ce=soft_ce, smoothed_one_hot=smoothed_one_hot, params_of=params_of,
        per_example_loss=per_example_loss, loss_and_grads=loss_and_grads, grad_of=grad_of, perturbation=perturbation,
        add=add, sgd_step=sgd_step, seed_all=seed_all,
    )


def assert_params(model, expected, exact=False, rtol=1e-10, atol=1e-12):
    for n, p in model.named_parameters():
        if exact:
            assert torch.equal(p.detach(), expected[n]), n
        else:
            torch.testing.assert_close(p.detach(), expected[n], rtol=rtol, atol=atol, msg=lambda m, n=n: f'{n}: {m}')


@pytest.fixture
def check_params():
    """ check_params(model, {name: tensor}, exact=False, rtol, atol). """
    return assert_params


@pytest.fixture
def accelerator():
    """ A CPU Accelerator (fresh, by `fresh_accelerator_state`). """
    from accelerate import Accelerator
    return Accelerator(cpu=True)
