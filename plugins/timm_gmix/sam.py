""" Sharpness-Aware Minimization around any optimizer in timm's registry.

SAM (Foret et al., 2021) and ASAM (Kwon et al., 2021):
    e = rho * g / ||g||                            (SAM)
    e = rho * |w|^2 * g / || |w| * g ||            (ASAM, `adaptive=True`)
then the base optimizer steps with the gradient taken at w + e.

`import timm_gmix` registers it as `sam` (alias `gmix_sam`), so
`timm.optim.create_optimizer_v2(model, opt='gmix_sam', base='adamw', rho=0.05)` builds it with
timm's parameter groups (no weight decay on norms and biases, layer-decay `lr_scale`).

`perturb` and `restore` are foreach operations (one per device and dtype) on buffers for w kept between
steps (`TensorCopy`): after the first step SAM allocates nothing, ASAM only its temporary w^2.
"""
import math
from contextlib import contextmanager
from typing import Dict, Iterable, List, Optional, Tuple

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


def group_by_device_and_dtype(
        tensors: Iterable[torch.Tensor]) -> Dict[Tuple[torch.device, torch.dtype], List[torch.Tensor]]:
    """ Foreach kernels take their fast path only on lists of one device and dtype. """
    groups = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    return groups


class TensorCopy:
    """ An exact copy of a list of tensors that `restore()` copies back into them. The buffers are kept
    between saves: allocated on the first and again only when the tensors' shapes, strides, dtypes or
    devices change. Each copy is one foreach operation per device and dtype. """

    def __init__(self):
        self._layout = None
        self._sources: List[List[torch.Tensor]] = []
        self._buffers: List[List[torch.Tensor]] = []

    @torch.no_grad()
    def save(self, tensors: Iterable[torch.Tensor]):
        tensors = list(tensors)
        layout = [(t.device, t.dtype, t.shape, t.stride()) for t in tensors]
        self._sources = list(group_by_device_and_dtype(tensors).values())
        if layout != self._layout:
            self._layout = layout
            self._buffers = [[torch.empty_like(t) for t in group] for group in self._sources]
        for buffers, sources in zip(self._buffers, self._sources):
            torch._foreach_copy_(buffers, sources)

    @torch.no_grad()
    def restore(self):
        """ Copy the saved values back into the tensors they were saved from. """
        for sources, buffers in zip(self._sources, self._buffers):
            torch._foreach_copy_(sources, buffers)


class SAM(torch.optim.Optimizer):
    """ SAM wrapper sharing its `param_groups` with the base optimizer.

    A step is: gradient at w, `perturb()`, gradient at w + e, `restore()`, `step()`; or, so that w comes
    back however the pass at w + e ends, `with sam.perturbed(): ...` around that pass.
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
        self.saved_w = TensorCopy()  # w at the last perturb(): kept after restore() so a step can be undone
        self.is_perturbed = False  # the parameters are at w + e

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
        """ Save w and move to w + e. Pass `grad_norm` when it was already computed (to check it).
        The gradient is spent: each `p.grad` holds e afterwards. """
        if self.is_perturbed:
            raise RuntimeError('SAM.perturb() called at w + e: restore() w first')
        grad_norm = self.grad_norm() if grad_norm is None else grad_norm
        self.saved_w.save(p for group in self.param_groups for p in group['params'])
        for group in self.param_groups:
            scale = group['rho'] / (grad_norm + 1e-12)
            with_grad = [p for p in group['params'] if p.grad is not None]
            for (device, _), params in group_by_device_and_dtype(with_grad).items():
                e = [p.grad for p in params]
                torch._foreach_mul_(e, scale.to(device))
                if group['adaptive']:
                    torch._foreach_mul_(e, torch._foreach_pow(params, 2))
                torch._foreach_add_(params, e)
        self.is_perturbed = True

    @torch.no_grad()
    def restore(self):
        """ Copy the saved w back (subtracting e would drift, and DDP replicas would diverge). """
        if self.is_perturbed:
            self.saved_w.restore()
            self.is_perturbed = False

    @contextmanager
    def perturbed(self, grad_norm: Optional[torch.Tensor] = None):
        """ At w + e inside the block; back at w when it ends, by an exception too (out of memory in the
        pass at w + e must not leave a caller who goes on training from w + e). """
        self.perturb(grad_norm)
        try:
            yield
        finally:
            self.restore()

    def step(self, closure=None):
        if closure is None:
            return self.base_optimizer.step()
        closure = torch.enable_grad()(closure)
        loss = closure()
        with self.perturbed():
            self.zero_grad()
            closure()
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
