""" Sharpness-Aware Minimization around any optimizer in timm's registry.

SAM (Foret et al., 2021) and ASAM (Kwon et al., 2021):
    e = rho * g / ||g||                            (SAM)
    e = rho * |w|^2 * g / || |w| * g ||            (ASAM, `adaptive=True`)
then the base optimizer steps with the gradient taken at w + e.

`import timm_gmix` registers it as `sam` (alias `gmix_sam`), so
`timm.optim.create_optimizer_v2(model, opt='gmix_sam', base='adamw', rho=0.05)` builds it with
timm's parameter groups (no weight decay on norms and biases, layer-decay `lr_scale`).
"""
import math
from typing import Optional

import torch
from timm.optim import OptimInfo, create_optimizer_v2, get_optimizer_info
from timm.optim._optim_factory import default_registry

DEFAULT_RHO = 0.05
DEFAULT_RHO_ADAPTIVE = 2.0


def registry_name(opt: str) -> str:
    """ The registry entry timm builds for `opt`: it keeps only the last `_`-separated part
    ('gmix_sam' -> 'sam', 'lookahead_gmix_sam' -> Lookahead around 'sam'). """
    return opt.lower().split('_')[-1]


def is_sam(opt: str) -> bool:
    return registry_name(opt) == 'sam'


class SAM(torch.optim.Optimizer):
    """ SAM wrapper sharing its `param_groups` with the base optimizer.

    A step is: gradient at w, `perturb()`, gradient at w + e, `restore()`, `step()`.
    `step()` alone steps the base optimizer (that is what GradScaler and Lookahead call);
    `step(closure)` runs the whole sequence with a closure that computes the loss and its gradient.
    `state_dict`/`load_state_dict` are the base optimizer's.

    Args:
        params: parameters or parameter groups (as built by timm's optimizer factory)
        base: name of the base optimizer in timm's registry ('sgd', 'adamw', 'lamb', ...)
        rho: neighbourhood radius, default 0.05 (SAM) or 2.0 (ASAM)
        adaptive: ASAM, the scale-invariant neighbourhood
        **base_kwargs: lr, weight_decay, momentum, betas, ... for the base optimizer
    """

    def __init__(self, params, base: str = 'sgd', rho: Optional[float] = None, adaptive: bool = False,
                 **base_kwargs):
        if rho is None:
            rho = DEFAULT_RHO_ADAPTIVE if adaptive else DEFAULT_RHO
        if not (isinstance(rho, (int, float)) and math.isfinite(rho) and rho > 0):
            raise ValueError(f'rho must be a positive finite number, got {rho!r}')
        if is_sam(base):
            raise ValueError(f'SAM cannot wrap itself: choose a plain base optimizer, not {base!r}')
        if not get_optimizer_info(registry_name(base)).has_momentum:
            base_kwargs.pop('momentum', None)  # timm hands SAM a momentum for whichever base it wraps
        self.base_optimizer = create_optimizer_v2(params, opt=base, **base_kwargs)
        # Registering the base's own group dicts makes every change (LR schedule, layer decay) seen by both.
        super().__init__(self.base_optimizer.param_groups, dict(rho=rho, adaptive=adaptive))
        self._link_base()
        self._saved = {}  # w during a step, keyed by parameter

    def _link_base(self):
        # One set of groups and one state: LR schedules reach the base, and what a wrapper such as
        # Lookahead keeps in `state` lands in the base's state_dict.
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    @torch.no_grad()
    def grad_norm(self) -> torch.Tensor:
        """ ||g|| (SAM) or || |w| * g || (ASAM) over every parameter that has a gradient. """
        grads = [
            (p.abs() * p.grad) if group['adaptive'] else p.grad
            for group in self.param_groups for p in group['params'] if p.grad is not None
        ]
        if not grads:
            raise RuntimeError('SAM found no gradients: run the backward pass of the ascent loss first')
        return torch.nn.utils.get_total_norm(grads)

    @torch.no_grad()
    def perturb(self, grad_norm: Optional[torch.Tensor] = None):
        """ Save w and move to w + e. Pass `grad_norm` when it was already computed (to check it). """
        grad_norm = self.grad_norm() if grad_norm is None else grad_norm
        for group in self.param_groups:
            scale = group['rho'] / (grad_norm + 1e-12)
            for p in group['params']:
                if p.grad is None:
                    continue
                self._saved[p] = p.detach().clone()
                e = p.grad * scale.to(p.device)
                if group['adaptive']:
                    e.mul_(p.square())
                p.add_(e)

    @torch.no_grad()
    def restore(self):
        """ Copy the saved w back (subtracting e would drift, and DDP replicas would diverge). """
        for p, w in self._saved.items():
            p.copy_(w)
        self._saved.clear()

    def step(self, closure=None):
        if closure is None:
            return self.base_optimizer.step()
        closure = torch.enable_grad()(closure)
        loss = closure()
        self.perturb()
        self.zero_grad()
        closure()
        self.restore()
        self.base_optimizer.step()
        return loss

    def state_dict(self):
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict):
        self.base_optimizer.load_state_dict(state_dict)
        # The base replaces its groups and state on load: re-link, or the LR schedule stops reaching it.
        self._link_base()


def find_sam(optimizer) -> Optional[SAM]:
    """ The SAM inside an optimizer wrapped by Accelerate (`.optimizer`) and/or timm's Lookahead. """
    while optimizer is not None and not isinstance(optimizer, SAM):
        optimizer = getattr(optimizer, 'optimizer', None) or getattr(optimizer, '_base_optimizer', None)
    return optimizer


def register_sam():
    """ Register SAM with timm's optimizer registry as `sam` (see `registry_name`), with the alias `gmix_sam`. """
    default_registry.register(OptimInfo(
        name='sam',
        opt_class=SAM,
        description='Sharpness-Aware Minimization (ASAM with adaptive=True) around a base optimizer',
        has_eps=True,
        has_momentum=True,
        has_betas=True,
    ))
    default_registry.register_alias('gmix_sam', 'sam')
