""" One complete G-Mix / BG-Mix / DG-Mix update: `gmix_step`.

    1. ascent pass at w on the mixed batch (under `no_sync`: each replica perturbs by its own gradient)
    2. e from the ascent gradient; w <- w + e
    3. bg/dg only: sensitivity forward at w + e without gradient, flag ceil(gamma * B) examples
    4. descent pass at w + e on the descent batch (the mixed batch for g)
    5. restore w by copy (also when the pass at w + e raises), unscale, clip, step the base optimizer, as the
       guard decides (`StepGuard.guarded`)

Every pass at w + e normalizes with batch statistics but leaves BatchNorm running statistics as
they were. Dropout and drop-path draw fresh masks in each pass. With an optimizer that is not SAM the
same function makes a plain step (one pass), so baselines run through the same code.

The SAM optimizer's cheaper options (see `timm_gmix.sam`) change the passes:
    interval=K          updates between the full steps make one pass on the mixed batch at w
    reuse=ALPHA         LookSAM: a full step keeps the part of its descent gradient orthogonal to the ascent
                        gradient (for bg/dg: the sharpness and the clean-example correction of the flagged
                        examples together, as one direction); a one-pass update adds it back, rescaled
    perturb='momentum'  e comes from the base optimizer's momentum, so 1 has no backward pass: G-Mix makes one
                        forward-backward at w + e (which updates BatchNorm's statistics); BG-/DG-Mix keep the
                        exact s_i from a forward at w and one at w + e, both without gradient, then step 4

The guard (`timm_gmix.guard`) keeps a bad update from leaving a bad state: by default a non-finite loss or
gradient skips the update before it is made; `guard='undo'` also undoes an update that made the weights or the
optimizer state non-finite. Host syncs: one per update on the g path and for a plain step, the guard's decision
(which every replica shares). After a non-finite ascent the pass at w + e runs at NaN weights, so that a
GradScaler sees the overflow and backs off. BG/DG add the reads that selecting the flagged examples needs.
"""
import functools
import math
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from timm.models import model_parameters
from timm.utils import dispatch_clip_grad

from .guard import GUARDS, StepGuard, all_finite
from .mixup import PARTITION_MODES, GMixup, MixedBatch
from .sam import find_sam
from .sensitivity import flag_examples

CLIP_MODES = ('norm', 'value', 'agc')  # timm's --clip-mode


def cross_entropy_per_example(logits: torch.Tensor, target: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """ Per-example cross-entropy for class indices (with label smoothing) or soft targets
    (already smoothed by the mixing function). """
    if target.ndim == 1:
        return F.cross_entropy(logits, target, reduction='none', label_smoothing=smoothing)
    return F.cross_entropy(logits, target, reduction='none')


@dataclass
class StepResult:
    """ `loss`: mean loss at w on the (mixed) batch (at w + e for G-Mix with a momentum perturbation, which makes
    no pass at w). `skipped`: no update was made (non-finite loss or gradient, or `diverged`). `diverged`: the
    gradients were finite but the update made weights or optimizer state non-finite, so it was undone (guard
    'undo' only). `full_step`: the two-pass SAM step was made (not a plain optimizer, nor SAM's one-pass updates
    between full steps). For bg/dg full steps whose update was made: per-example `sensitivity`, the `flagged` mask
    and `mixes_two_classes` (None otherwise). """
    loss: torch.Tensor
    skipped: bool
    sensitivity: Optional[torch.Tensor] = None
    flagged: Optional[torch.Tensor] = None
    mixes_two_classes: Optional[torch.Tensor] = None
    diverged: bool = False
    full_step: bool = False


@contextmanager
def frozen_bn_stats(model: torch.nn.Module):
    """ BatchNorm normalizes with batch statistics, as in training, but its running statistics stay put. """
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    for m in bns:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in bns:
            m.track_running_stats = True


class Passes:
    """ Forward and backward passes of one update over `accum_steps` micro-batches, under the accelerator's
    autocast, `no_sync` and loss scale (or a GradScaler's). A loss is the sum of weighted per-example losses over
    the whole batch size, so the micro-batches add up to the whole-batch gradient. """

    def __init__(self, model, loss_fn, accelerator, scaler, accum_steps: int, batch_size: int):
        self.model, self.loss_fn, self.accelerator, self.scaler = model, loss_fn, accelerator, scaler
        self.accum_steps, self.batch_size = accum_steps, batch_size
        self.autocast = accelerator.autocast if accelerator is not None else nullcontext
        self.no_sync = (lambda: accelerator.no_sync(model)) if accelerator is not None \
            else getattr(model, 'no_sync', nullcontext)

    def _micro_batches(self, *tensors):
        return list(zip(*(t.tensor_split(self.accum_steps) for t in tensors)))

    def _backward(self, loss):
        if self.accelerator is not None:
            self.accelerator.backward(loss)
        elif self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def gradient(self, x, y, weights=None, sync: bool = True) -> torch.Tensor:
        """ Accumulate the gradient of sum_i weights_i * l_i / B (all-reduced on the last micro-batch if `sync`);
        returns the per-example losses. """
        chunks = self._micro_batches(x, y) if weights is None else self._micro_batches(x, y, weights)
        losses = []
        for i, (xc, yc, *wc) in enumerate(chunks):
            with nullcontext() if sync and i == len(chunks) - 1 else self.no_sync():
                with self.autocast():
                    loss = self.loss_fn(self.model(xc), yc)
                self._backward((loss * wc[0] if wc else loss).sum() / self.batch_size)
            losses.append(loss.detach())
        return torch.cat(losses)

    @torch.no_grad()
    def losses(self, x, y) -> torch.Tensor:
        """ Per-example losses without gradient. """
        with self.autocast():
            return torch.cat([self.loss_fn(self.model(xc), yc) for xc, yc in self._micro_batches(x, y)])


@dataclass
class PassResults:
    """ What the passes of one update leave besides the gradients in `.grad`: the per-example losses at w (None
    for G-Mix with a momentum perturbation, which makes no pass at w), those of the pass the gradient is from,
    whether the pass at w was finite (a 0-d bool, on the device), and for bg/dg the sensitivity and the flags. """
    loss_w: Optional[torch.Tensor]
    loss_descent: torch.Tensor
    ascent_ok: torch.Tensor
    sensitivity: Optional[torch.Tensor] = None
    flagged: Optional[torch.Tensor] = None

    @property
    def loss(self) -> torch.Tensor:
        return (self.loss_descent if self.loss_w is None else self.loss_w).mean()


def one_pass(passes: Passes, batch: MixedBatch) -> PassResults:
    """ A plain optimizer, or SAM between its full steps: one pass on the mixed batch at w. """
    losses = passes.gradient(batch.inputs, batch.targets)
    return PassResults(losses, losses, torch.ones((), dtype=torch.bool, device=losses.device))


def sam_passes(sam, optimizer, model, passes: Passes, batch: MixedBatch, mixup_fn, mode: str,
               sync_ascent: bool) -> PassResults:
    """ Steps 1-4: the gradient at w (with a momentum perturbation: only the losses at w that bg/dg need), then at
    w + e the sensitivity and flagging (bg/dg) and the descent gradient, with w restored however they end. """
    device = batch.inputs.device
    ascent_ok, grad_norm, loss_w = torch.ones((), dtype=torch.bool, device=device), None, None
    if sam.perturbation == 'gradient':
        loss_w = passes.gradient(batch.inputs, batch.targets, sync=sync_ascent)
        grad_norm = sam.grad_norm()
        ascent_ok = all_finite([loss_w, grad_norm], device)
        grad_norm = torch.where(ascent_ok, grad_norm, float('nan'))  # a NaN w + e: a GradScaler sees the overflow
    elif mode in PARTITION_MODES:  # momentum: the losses at w for the sensitivity, and BatchNorm's statistics
        loss_w = passes.losses(batch.inputs, batch.targets)
        ascent_ok = all_finite([loss_w], device)
    result = PassResults(loss_w, loss_w, ascent_ok)
    try:
        with sam.perturbed(grad_norm):
            optimizer.zero_grad(set_to_none=True)
            with frozen_bn_stats(model) if loss_w is not None else nullcontext():
                x, y, weights = batch.inputs, batch.targets, None
                if mode in PARTITION_MODES:
                    result.sensitivity = passes.losses(batch.inputs, batch.targets) - loss_w
                    result.flagged = flag_examples(result.sensitivity, mixup_fn.gmix_ratio,
                                                   mixup_fn.gmix_flag == 'largest')
                    x, y, weights = batch.descent_batch(result.flagged, mode)
                result.loss_descent = passes.gradient(x, y, weights)
    except BaseException:
        optimizer.zero_grad(set_to_none=True)
        raise
    return result


def make_update(optimizer, sam, model, params, grad_norm, full: bool, clip_grad, clip_mode: str, accelerator=None):
    """ Step 5 once the gradients are unscaled: LookSAM's reused direction, clipping, the base optimizer's step. """
    if sam is not None and sam.looksam:
        reuse_gradient(sam, full, accelerator)
        grad_norm = None  # the reused direction changed the gradient
    if clip_grad is not None:
        clip(model, params, clip_grad, clip_mode, grad_norm)
    with sam.base_step() if sam is not None else nullcontext():
        optimizer.step()


def mixed_batch(mixup_fn, inputs: torch.Tensor, targets: torch.Tensor) -> MixedBatch:
    if isinstance(mixup_fn, GMixup):
        return mixup_fn.mix(inputs, targets)
    if mixup_fn is not None:
        return MixedBatch.unmixed(*mixup_fn(inputs, targets))
    return MixedBatch.unmixed(inputs, targets)


_GUARDS = weakref.WeakKeyDictionary()  # optimizer -> its StepGuard, so the copies outlive one step


def gmix_step(
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        mixup_fn: Optional[Callable] = None,
        loss_fn: Callable = cross_entropy_per_example,
        accelerator=None,
        scaler: Optional[torch.amp.GradScaler] = None,
        clip_grad: Optional[float] = None,
        clip_mode: str = 'norm',
        sync_ascent: bool = False,
        accum_steps: int = 1,
        guard: str = 'skip',
) -> StepResult:
    """ Make one complete update of `model` from a raw batch.

    Args:
        optimizer: SAM (`opt='gmix_sam'`), possibly in Lookahead and/or Accelerate's wrapper; any other
            optimizer makes a plain step
        mixup_fn: `GMixup` (its mode picks g/bg/dg), timm's `Mixup`, or None (plain SAM)
        loss_fn: per-example loss `loss_fn(logits, targets) -> (B,)`
        accelerator: runs the passes under its autocast, `no_sync` and GradScaler
        scaler: a GradScaler, for use without an accelerator (with one, its own scaler is used)
        clip_grad, clip_mode: as timm's `--clip-grad`/`--clip-mode`, applied to unscaled gradients (`agc` leaves
            the classifier head out, as timm does)
        sync_ascent: all-reduce the ascent gradient too (the perturbation then uses the global norm)
        accum_steps: split the batch in this many micro-batches; the gradient adds up to the whole batch's
            (BatchNorm in training mode normalizes each micro-batch over its own rows)
        guard: 'skip' or 'undo' (see `timm_gmix.guard`)
    """
    check_step_arguments(len(inputs), clip_grad, clip_mode, accum_steps, guard)
    if accelerator is not None:
        if scaler is not None:
            raise ValueError('pass a GradScaler only without an accelerator: the accelerator brings its own')
        if accelerator.gradient_accumulation_steps > 1:
            raise ValueError('use gmix_step(accum_steps=K) rather than Accelerator(gradient_accumulation_steps)')
        scaler = accelerator.scaler
    stepper = getattr(optimizer, 'optimizer', optimizer) if accelerator is not None else optimizer
    sam = find_sam(stepper)
    mode = getattr(mixup_fn, 'gmix_mode', None) or 'g'
    if mode in PARTITION_MODES and sam is None:
        raise ValueError(f'mixup mode {mode!r} needs the SAM optimizer (--opt gmix_sam)')

    batch = mixed_batch(mixup_fn, inputs, targets)
    passes = Passes(model, loss_fn, accelerator, scaler, accum_steps, len(batch.inputs))
    step_guard = _GUARDS.setdefault(stepper, StepGuard())
    step_guard.save_buffers(model)
    full = sam is not None and sam.is_full_step()
    if full:
        result = sam_passes(sam, stepper, model, passes, batch, mixup_fn, mode, sync_ascent)
    else:
        result = one_pass(passes, batch)

    if scaler is not None:
        scaler.unscale_(stepper)
    params = [p for group in stepper.param_groups for p in group['params'] if p.grad is not None]
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    update = functools.partial(make_update, stepper, sam, model, params, grad_norm, full, clip_grad, clip_mode,
                               accelerator if not sync_ascent else None)
    checks = [result.ascent_ok, all_finite([grad_norm, result.loss_descent], grad_norm.device)]
    made, diverged = step_guard.guarded(guard, stepper, update, checks, accelerator, model.buffers(),
                                        weights=sam.saved_w if full else None)
    if made and sam is not None:
        sam.count_update()
    if scaler is not None:
        scaler.update()
    stepper.zero_grad(set_to_none=True)
    step = StepResult(loss=result.loss, skipped=not made, diverged=diverged, full_step=full)
    if made and result.sensitivity is not None:
        step.sensitivity, step.flagged, step.mixes_two_classes = result.sensitivity, result.flagged, \
            batch.mixes_two_classes
    return step


def check_step_arguments(batch_size: int, clip_grad, clip_mode: str, accum_steps, guard: str):
    """ ValueError for a gmix_step argument that cannot work. """
    if not (isinstance(accum_steps, int) and 1 <= accum_steps <= batch_size):
        raise ValueError(f'accum_steps must be a whole number from 1 to the batch size ({batch_size}), '
                         f'got {accum_steps!r}')
    if clip_mode not in CLIP_MODES:
        raise ValueError(f'unknown clip_mode {clip_mode!r}: choose one of {", ".join(CLIP_MODES)}')
    if clip_grad is not None and not (isinstance(clip_grad, (int, float)) and math.isfinite(clip_grad) and clip_grad > 0):
        raise ValueError(f'clip_grad must be a positive number, or None for no clipping, got {clip_grad!r}')
    if guard not in GUARDS:
        raise ValueError(f'unknown guard {guard!r}: choose one of {", ".join(GUARDS)}')


def clip(model: torch.nn.Module, params: List[torch.Tensor], clip_grad: float, clip_mode: str,
         norm: Optional[torch.Tensor] = None):
    """ timm's clipping of the (unscaled) gradients `params`; `norm`: their total norm, when it is known already.
    `agc` clips every parameter of `model` but its classifier head (timm's `exclude_head='agc' in clip_mode`). """
    if clip_mode == 'norm':
        if norm is None:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        torch.nn.utils.clip_grads_with_norm_(params, clip_grad, norm)
    elif clip_mode == 'agc':
        body = [p for p in model_parameters(model, exclude_head=True) if p.grad is not None]
        dispatch_clip_grad(body, clip_grad, mode=clip_mode)
    else:
        dispatch_clip_grad(params, clip_grad, mode=clip_mode)


def reuse_gradient(sam, full: bool, accelerator=None):
    """ LookSAM: keep g_v on a full step (averaged over processes, since each perturbed by its own gradient at
    w), add it on a one-pass update. """
    if not full:
        sam.looksam.add_to(sam.gradients())
        return
    sam.looksam.keep_orthogonal_part(sam.gradients())
    if accelerator is not None and accelerator.num_processes > 1:
        g_v = sam.looksam.parts()
        for t in g_v:
            torch.distributed.all_reduce(t)
        torch._foreach_div_(g_v, float(accelerator.num_processes))
