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

Cheaper variants, options of the same optimizer that `gmix_step` carries out:
    interval=K          the two-pass step on every K-th update; the updates in between make one plain pass
    reuse=ALPHA         LookSAM (Liu et al., 2022): each full step keeps g_v, the part of the gradient at w + e
                        orthogonal to the gradient at w; each one-pass update adds ALPHA * ||g|| / ||g_v|| * g_v
    perturb='momentum'  MSAM (Becker et al., 2024): e = -rho * m / ||m|| from the base optimizer's momentum m
                        (SGD's momentum buffer, Adam's first moment): no gradient at w is needed
The update count and g_v are part of `state_dict`, so a resumed run continues the same schedule.
"""
import functools
import math
from contextlib import contextmanager
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
from timm.optim import OptimInfo, create_optimizer_v2, get_optimizer_info
from timm.optim._optim_factory import default_registry

DEFAULT_RHO = 0.05
DEFAULT_RHO_ADAPTIVE = 2.0
PERTURBATIONS = ('gradient', 'momentum')
MOMENTUM_KEYS = ('momentum_buffer', 'exp_avg')  # SGD; Adam, AdamW, LAMB, Lion, ...


def registry_name(opt: str) -> str:
    """ The registry entry timm builds for `opt`: it keeps only the last `_`-separated part
    ('gmix_sam' -> 'sam', 'lookahead_gmix_sam' -> Lookahead around 'sam'). """
    return opt.lower().split('_')[-1]


def is_sam(opt: str) -> bool:
    return registry_name(opt) == 'sam'


def grouped(first: Iterable[torch.Tensor], *others: List[torch.Tensor]) -> List[Tuple[List[torch.Tensor], ...]]:
    """ `first` and the lists paired with it element by element, split by the device and dtype of `first`'s
    tensors: foreach kernels take their fast path only on lists of one device and dtype. """
    groups = {}
    for items in zip(first, *others):
        groups.setdefault((items[0].device, items[0].dtype), []).append(items)
    return [tuple(map(list, zip(*items))) for items in groups.values()]


def dot(a: List[torch.Tensor], b: List[torch.Tensor]) -> torch.Tensor:
    """ <a, b> over two lists of tensors: a 0-d tensor on the first one's device, in float32 or wider. """
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in a), torch.float32)
    return torch.stack([torch.vdot(x.flatten().to(dtype), y.flatten().to(dtype)).to(a[0].device)
                        for x, y in zip(a, b)]).sum()


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
        self._sources = [group for group, in grouped(tensors)]
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


class ReusedDirection:
    """ LookSAM's reused sharpness direction (Liu et al., CVPR 2022), with its `alpha`:

        on a full step      g_v = g_s - (<g_s, g> / <g, g>) g     (g at w: `keep_ascent`; g_s at w + e)
        on a one-pass step  g  += alpha * ||g|| / ||g_v|| * g_v

    `state` ({parameter: {'reused': g_v}}) is shaped like an optimizer's state: SAM saves it in its state_dict, and
    the step guard undoes it with the base's. """

    def __init__(self, alpha: float):
        self.alpha = alpha
        self.state = {}
        self._ascent = {}  # parameter -> g of the current full step

    def keep_ascent(self, grads: Dict[torch.Tensor, torch.Tensor]):
        if [(p, g.shape) for p, g in self._ascent.items()] != [(p, g.shape) for p, g in grads.items()]:
            self._ascent = {p: torch.empty_like(g) for p, g in grads.items()}
        for kept, g in grouped(list(self._ascent.values()), list(grads.values())):
            torch._foreach_copy_(kept, g)

    @torch.no_grad()
    def keep_orthogonal_part(self, grads: Dict[torch.Tensor, torch.Tensor]):
        """ g_v from g_s = `grads` (unscaled) and the g that `keep_ascent` kept. """
        grads = {p: g_s for p, g_s in grads.items() if p in self._ascent}
        for p, g_s in grads.items():
            if p not in self.state or self.state[p]['reused'].shape != g_s.shape:
                self.state[p] = {'reused': torch.empty_like(g_s)}
        g_s, g = list(grads.values()), [self._ascent[p] for p in grads]
        coef = dot(g_s, g) / (dot(g, g) + 1e-30)
        for g_v, g_group, g_s_group in grouped(self.parts(grads), g, g_s):
            torch._foreach_copy_(g_v, g_group)
            torch._foreach_mul_(g_v, -coef.to(g_v[0].device))
            torch._foreach_add_(g_v, g_s_group)

    def parts(self, params: Iterable[torch.Tensor] = None) -> List[torch.Tensor]:
        """ g_v of `params` (default: every parameter that has one). """
        return [self.state[p]['reused'] for p in (self.state if params is None else params)]

    @torch.no_grad()
    def add_to(self, grads: Dict[torch.Tensor, torch.Tensor]):
        """ g += alpha * ||g|| / ||g_v|| * g_v, on the gradients (unscaled) of the parameters that have a g_v. """
        grads = {p: g for p, g in grads.items() if p in self.state}
        if not grads:
            return
        g, g_v = list(grads.values()), self.parts(grads)
        scale = self.alpha * torch.nn.utils.get_total_norm(g) / (torch.nn.utils.get_total_norm(g_v) + 1e-12)
        for g_group, g_v_group in grouped(g, g_v):
            torch._foreach_add_(g_group, torch._foreach_mul(g_v_group, scale.to(g_group[0].device)))


class SAM(torch.optim.Optimizer):
    """ SAM wrapper sharing its `param_groups` with the base optimizer.

    A step is: gradient at w, `perturb()`, gradient at w + e, `restore()`, then the base optimizer's step
    inside `base_step()` (GradScaler and Lookahead around SAM call `step()` there); or, so that w comes back
    however the pass at w + e ends, `with sam.perturbed(): ...` around that pass. `gmix_step` does all of it.
    `step(closure)` runs the whole two-pass sequence with a closure that computes the loss and its gradient.
    `step()` without a closure anywhere else raises: in a plain loop it would silently be the base's step.
    `state_dict`/`load_state_dict` are the base optimizer's, with SAM's own state under 'sam'.

    Args:
        params: parameters or parameter groups (as built by timm's optimizer factory)
        base: name of the base optimizer in timm's registry ('sgd', 'adamw', 'lamb', ...)
        rho: neighbourhood radius, default 0.05 (SAM) or 2.0 (ASAM)
        adaptive: ASAM, the scale-invariant neighbourhood
        interval: the full two-pass step on every `interval`-th update, one plain pass in between
        reuse: LookSAM's alpha, added on the one-pass updates (needs interval > 1; `looksam`); 0: none
        perturb: 'gradient' (e from the gradient at w) or 'momentum' (MSAM: e from the base's momentum)
        **base_kwargs: lr, weight_decay, momentum, betas, ... for the base optimizer
    """

    def __init__(self, params, base: str = 'sgd', rho: Optional[float] = None, adaptive: bool = False,
                 interval: int = 1, reuse: float = 0.0, perturb: str = 'gradient', **base_kwargs):
        if rho is None:
            rho = DEFAULT_RHO_ADAPTIVE if adaptive else DEFAULT_RHO
        check_options(rho, interval, reuse, perturb)
        if is_sam(base):
            raise ValueError(f'SAM cannot wrap itself: choose a plain base optimizer, not {base!r}')
        if not get_optimizer_info(registry_name(base)).has_momentum:
            base_kwargs.pop('momentum', None)  # timm hands SAM a momentum for whichever base it wraps
        self.base_optimizer = create_optimizer_v2(params, opt=base, **base_kwargs)
        if perturb == 'momentum' and not keeps_momentum(self.base_optimizer):
            raise ValueError(f'a momentum perturbation needs a base optimizer that keeps momentum, which {base!r} '
                             f'does not as set: use sgd with momentum > 0, adamw, lamb, ...')
        # Registering the base's own group dicts makes every change (LR schedule, layer decay) seen by both.
        super().__init__(self.base_optimizer.param_groups, dict(rho=rho, adaptive=adaptive))
        self._link_base()
        self.interval, self.perturbation = interval, perturb
        self.looksam = ReusedDirection(reuse) if reuse else None
        self.updates = 0  # updates made (undone ones do not count): every interval-th one is full
        self.saved_w = TensorCopy()  # w at the last perturb(): kept after restore() so a step can be undone
        self.is_perturbed = False  # the parameters are at w + e
        self._base_step_allowed = False

    @property
    def sam_state(self) -> dict:
        """ LookSAM's g_v per parameter, shaped like the base's state: saved and undone with it. """
        return self.looksam.state if self.looksam else {}

    def _link_base(self):
        # One set of groups and one state: LR schedules reach the base, and what a wrapper such as
        # Lookahead keeps in `state` lands in the base's state_dict.
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    def _params(self) -> List[torch.Tensor]:
        return [p for group in self.param_groups for p in group['params']]

    def is_full_step(self) -> bool:
        """ Whether the next update is the two-pass step: every `interval`-th update made. """
        return self.updates % self.interval == 0

    def count_update(self):
        """ Call once for each update that was made (and not undone). """
        self.updates += 1

    def gradients(self) -> Dict[torch.Tensor, torch.Tensor]:
        return {p: p.grad for p in self._params() if p.grad is not None}

    def momentum(self) -> Dict[torch.Tensor, torch.Tensor]:
        """ The base optimizer's momentum of each parameter that has one yet (none before its first step). """
        found = {}
        for p in self._params():
            state = self.state.get(p, {})
            m = next((state[k] for k in MOMENTUM_KEYS if state.get(k) is not None), None)
            if m is not None:
                found[p] = m
        return found

    @torch.no_grad()
    def norm(self, directions: Dict[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """ ||d|| (SAM) or || |w| * d || (ASAM) over parameter -> direction pairs. """
        adaptive = {p for group in self.param_groups if group['adaptive'] for p in group['params']}
        return torch.nn.utils.get_total_norm([p.abs() * d if p in adaptive else d for p, d in directions.items()])

    @torch.no_grad()
    def grad_norm(self) -> torch.Tensor:
        """ ||g|| (SAM) or || |w| * g || (ASAM) over every parameter that has a gradient. """
        grads = self.gradients()
        if not grads:
            raise RuntimeError('SAM found no gradients: run the backward pass of the ascent loss first')
        return self.norm(grads)

    @torch.no_grad()
    def perturb(self, grad_norm: Optional[torch.Tensor] = None):
        """ Save w and move to w + e, e = rho * g / ||g||. Pass `grad_norm` when it was already computed (to
        check it). The gradient is spent: each `p.grad` holds e afterwards (LookSAM keeps g). """
        grad_norm = self.grad_norm() if grad_norm is None else grad_norm
        grads = self.gradients()
        if self.looksam:
            self.looksam.keep_ascent(grads)
        self._move(grads, grad_norm, in_place=True)

    @torch.no_grad()
    def perturb_along_momentum(self):
        """ Save w and move to w + e, e = -rho * m / ||m||: MSAM's sign, against the momentum, which is along
        the coming update. Before the base optimizer's first step there is no momentum and e = 0. """
        momentum = self.momentum()
        self._move(momentum, self.norm(momentum) if momentum else None, in_place=False, sign=-1.0)

    def _move(self, directions, norm, in_place: bool, sign: float = 1.0):
        """ Save w, then w += sign * rho * d / norm (times w^2 for ASAM); `in_place` scales d itself. """
        if self.is_perturbed:
            raise RuntimeError('SAM.perturb() called at w + e: restore() w first')
        self.saved_w.save(self._params())
        for group in self.param_groups:
            moved = [p for p in group['params'] if p in directions]
            for params, in grouped(moved):
                d, scale = [directions[p] for p in params], (sign * group['rho'] / (norm + 1e-12)).to(params[0].device)
                if in_place:
                    torch._foreach_mul_(d, scale)
                e = d if in_place else torch._foreach_mul(d, scale)
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
        """ At w + e inside the block (e from the gradient, or from the momentum with perturb='momentum');
        back at w when it ends, by an exception too (out of memory in the pass at w + e must not leave a
        caller who goes on training from w + e). """
        if self.perturbation == 'momentum':
            self.perturb_along_momentum()
        else:
            self.perturb(grad_norm)
        try:
            yield
        finally:
            self.restore()

    @contextmanager
    def base_step(self):
        """ Inside the block `step()` steps the base optimizer with the gradients in place: how an update ends
        after SAM's passes (`gmix_step`), also through a GradScaler or Lookahead around SAM. """
        self._base_step_allowed = True
        try:
            yield
        finally:
            self._base_step_allowed = False

    def step(self, closure=None):
        if closure is None:
            if not self._base_step_allowed:
                raise RuntimeError(
                    'SAM.step() without a closure would be a plain base-optimizer step, not SAM: make each update '
                    'with timm_gmix.gmix_step(model, optimizer, inputs, targets, ...), or call optimizer.step(closure) '
                    'with a closure that computes the loss and calls backward() (SAM runs it at w and at w + e)')
            return self.base_optimizer.step()
        if self.interval != 1 or self.looksam or self.perturbation != 'gradient':
            raise ValueError('step(closure) makes the two-pass SAM step: use gmix_step for interval, reuse and '
                             'the momentum perturbation')
        closure = torch.enable_grad()(closure)
        loss = closure()
        with self.perturbed():
            self.zero_grad()
            closure()
        self.base_optimizer.step()
        return loss

    def state_dict(self):
        """ The base optimizer's, with SAM's update count and LookSAM's g_v (indexed as the base indexes its
        parameters) under 'sam'. """
        state = self.base_optimizer.state_dict()
        index = {p: i for i, p in enumerate(self._params())}
        state['sam'] = {'updates': self.updates,
                        'reused': {index[p]: s['reused'] for p, s in self.sam_state.items()}}
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        sam = state_dict.pop('sam', {'updates': 0, 'reused': {}})
        self.base_optimizer.load_state_dict(state_dict)
        # The base replaces its groups and state on load: re-link, or the LR schedule stops reaching it.
        self._link_base()
        params = self._params()
        self.updates = sam['updates']
        if self.looksam:
            self.looksam.state = {params[int(i)]: {'reused': g_v.to(params[int(i)])}
                                  for i, g_v in sam['reused'].items()}


OPTION_NAMES = {name: name for name in ('rho', 'interval', 'reuse', 'perturb')}


def check_options(rho, interval, reuse, perturb, names: Optional[Dict[str, str]] = None):
    """ ValueError for a SAM setting that cannot train as asked; `names` says what to call each option in the
    message (train.py passes its flags), so the rule lives here alone. """
    n = {**OPTION_NAMES, **(names or {})}
    if not (isinstance(rho, (int, float)) and math.isfinite(rho) and rho > 0):
        raise ValueError(f'{n["rho"]} must be a positive number (0.05 is usual for SAM, 2.0 for ASAM), got {rho!r}')
    if not (isinstance(interval, int) and interval >= 1):
        raise ValueError(f'{n["interval"]} must be a whole number of updates, at least 1 (1: every update is a full '
                         f'step), got {interval!r}')
    if not (isinstance(reuse, (int, float)) and math.isfinite(reuse) and reuse >= 0):
        raise ValueError(f'{n["reuse"]} must be a finite number, zero or positive (LookSAM: try 0.1 to 0.7 and '
                         f'tune it), got {reuse!r}')
    if perturb not in PERTURBATIONS:
        raise ValueError(f'{n["perturb"]} must be one of {", ".join(PERTURBATIONS)}, got {perturb!r}')
    if reuse and interval == 1:
        raise ValueError(f'{n["reuse"]} acts on the one-pass updates between full steps: set {n["interval"]} K > 1')
    if reuse and perturb == 'momentum':
        raise ValueError(f'{n["reuse"]} projects on the gradient at w of the full steps, which a momentum '
                         f'perturbation ({n["perturb"]} momentum) does not compute: use one or the other')


def keeps_momentum(optimizer: torch.optim.Optimizer) -> bool:
    """ Whether the optimizer keeps a momentum that `SAM.momentum` finds: SGD with momentum > 0, or a first
    moment (Adam-style betas with beta1 > 0). """
    groups = optimizer.param_groups
    if all('momentum' in g for g in groups):
        return all(g['momentum'] > 0 for g in groups)
    return all(g.get('betas') is not None and g['betas'][0] > 0 for g in groups)


WRAPPED = ('optimizer', '_base_optimizer', 'base_optimizer')  # what Accelerate, timm's Lookahead and SAM wrap


def find_wrapped(optimizer, is_it: Callable) -> Optional[torch.optim.Optimizer]:
    """ The first of `optimizer` and the optimizers it wraps (through Accelerate's `.optimizer`, timm's Lookahead's
    `_base_optimizer`, SAM's `base_optimizer`) for which `is_it` holds, or None. """
    while optimizer is not None and not is_it(optimizer):
        optimizer = next((getattr(optimizer, name) for name in WRAPPED if getattr(optimizer, name, None) is not None),
                         None)
    return optimizer


def find_sam(optimizer) -> Optional[SAM]:
    """ The SAM inside an optimizer wrapped by Accelerate (`.optimizer`) and/or timm's Lookahead. """
    return find_wrapped(optimizer, lambda o: isinstance(o, SAM))


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
