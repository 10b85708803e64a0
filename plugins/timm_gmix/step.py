""" One complete G-Mix / BG-Mix / DG-Mix update: `gmix_step`.

    1. ascent pass at w on the mixed batch (under `no_sync`: each replica perturbs by its own gradient)
    2. e from the ascent gradient; w <- w + e
    3. bg/dg only: sensitivity forward at w + e without gradient, flag ceil(gamma * B) examples
    4. descent pass at w + e on the descent batch (the mixed batch for g)
    5. restore w by copy (also when the pass at w + e raises), unscale, clip, step the base optimizer
    6. undo the step (BatchNorm statistics, weights, optimizer state) bit for bit, unless the loss and gradient of both
       passes and the weights and optimizer state after the step are finite

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

Host syncs: one per update on the g path and for a plain step, reading the skip decision after the step.
Every check before it stays on the device, as GradScaler's found-inf does: the step is always made (after
a non-finite ascent the pass at w + e runs at NaN weights) and undone where a check failed. BG/DG add the
reads that selecting the flagged examples needs.
"""
import math
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional

import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from timm.utils import dispatch_clip_grad

from .mixup import GMixup, MixedBatch
from .sam import TensorCopy, find_sam, grouped
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
    gradients were finite but the update made weights or optimizer state non-finite, so it was undone.
    `full_step`: the two-pass SAM step was made (not a plain optimizer, nor SAM's one-pass updates between
    full steps). For bg/dg full steps: per-example `sensitivity`, the `flagged` mask and `mixes_two_classes`
    (None when the pass at w was not finite). """
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


def optimizer_states(optimizer) -> List[dict]:
    """ The state of an optimizer and of those it wraps (timm's Lookahead keeps its slow weights in its
    base's state; SAM shares its base's and keeps LookSAM's g_v in its own `sam_state`). """
    states = []
    while optimizer is not None:
        for state in (optimizer.state, getattr(optimizer, 'sam_state', None)):
            if state is not None and all(state is not s for s in states):
                states.append(state)
        optimizer = getattr(optimizer, '_base_optimizer', None) or getattr(optimizer, 'base_optimizer', None)
    return states


def tensors_in(states: Iterable[dict]) -> List[torch.Tensor]:
    """ The tensors in optimizer states ({parameter: {name: value}}). """
    return [v for state in states for s in state.values() for v in s.values() if torch.is_tensor(v)]


def all_finite(tensors: Iterable[torch.Tensor], device: torch.device) -> torch.Tensor:
    """ A 0-d bool on `device`: every floating-point element is finite. Per tensor, sum |x| (in float32 or
    wider) is NaN or inf when an element is, and otherwise only past 3.4e38, far beyond trainable values
    (max |x| has no such bound but is several times slower on CPU). Tensors on another kind of device are
    left out: reading them would wait for the accelerator (Adam's CPU step counts beside CUDA parameters). """
    flags = [torch.ones((), dtype=torch.bool, device=device)]
    for group, in grouped(tensors):
        if group[0].device.type == device.type and group[0].is_floating_point():
            norms = torch._foreach_norm(group, 1, dtype=torch.promote_types(group[0].dtype, torch.float32))
            flags.append(torch.stack(norms).isfinite().all().to(device))
    return torch.stack(flags).all()


def update_is_finite(optimizer: torch.optim.Optimizer, device: torch.device, buffers=()) -> torch.Tensor:
    """ A 0-d bool on `device`: the parameters, the optimizer state and `buffers` (the model's: BatchNorm
    statistics overflow too) are finite. """
    params = [p for group in optimizer.param_groups for p in group['params']]
    return all_finite(params + tensors_in(optimizer_states(optimizer)) + list(buffers), device)


class UndoableStep:
    """ Saves what a step changes, so that it can be undone bit for bit: the model's buffers (BatchNorm
    statistics, which the ascent pass updates: `save_buffers` before it), the parameters, every tensor and
    value in the optimizer's state (Lookahead's slow weights included) and the values of its parameter groups
    (Lookahead counts its steps there). Its buffers are kept between steps. """

    def __init__(self):
        self._model_buffers = TensorCopy()
        self._own_weights = TensorCopy()
        self._weights = self._own_weights
        self._state_tensors = TensorCopy()
        self._states = []
        self._groups = []

    def save_buffers(self, model: torch.nn.Module):
        """ Call before the first pass of the step. """
        self._model_buffers.save(model.buffers())

    def save(self, optimizer: torch.optim.Optimizer, weights: Optional[TensorCopy] = None):
        """ Call just before the step. `weights`: an exact copy of the parameters already made (SAM's w),
        used instead of making one. """
        if weights is None:
            self._own_weights.save(p for group in optimizer.param_groups for p in group['params'])
        self._weights = self._own_weights if weights is None else weights
        self._states = [(state, {p: dict(s) for p, s in state.items()}) for state in optimizer_states(optimizer)]
        self._state_tensors.save(tensors_in(saved for _, saved in self._states))
        self._groups = [(g, {k: v for k, v in g.items() if k != 'params'}) for g in optimizer.param_groups]

    def undo(self):
        self._model_buffers.restore()
        self._weights.restore()
        self._state_tensors.restore()  # into the tensors the state held before: put them back below
        for state, saved in self._states:
            state.clear()
            state.update(saved)
        for group, saved in self._groups:
            for k in set(group) - set(saved) - {'params'}:
                del group[k]
            group.update(saved)


_UNDO = weakref.WeakKeyDictionary()  # optimizer -> its UndoableStep, so the buffers outlive one step


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
) -> StepResult:
    """ Make one complete update of `model` from a raw batch.

    Args:
        optimizer: SAM (`opt='gmix_sam'`), possibly in Lookahead and/or Accelerate's wrapper; any other
            optimizer makes a plain step
        mixup_fn: `GMixup` (its mode picks g/bg/dg), timm's `Mixup`, or None (plain SAM)
        loss_fn: per-example loss `loss_fn(logits, targets) -> (B,)`
        accelerator: runs the passes under its autocast, `no_sync` and GradScaler
        scaler: a GradScaler, for use without an accelerator (with one, its own scaler is used)
        clip_grad, clip_mode: as timm's `--clip-grad`/`--clip-mode`, applied to unscaled gradients
        sync_ascent: all-reduce the ascent gradient too (the perturbation then uses the global norm)
        accum_steps: split the batch in this many micro-batches; the update equals the whole-batch one
    """
    if not (isinstance(accum_steps, int) and 1 <= accum_steps <= len(inputs)):
        raise ValueError(f'accum_steps must be a whole number from 1 to the batch size ({len(inputs)}), '
                         f'got {accum_steps!r}')
    if clip_mode not in CLIP_MODES:
        raise ValueError(f'unknown clip_mode {clip_mode!r}: choose one of {", ".join(CLIP_MODES)}')
    if clip_grad is not None and not (isinstance(clip_grad, (int, float)) and math.isfinite(clip_grad) and clip_grad > 0):
        raise ValueError(f'clip_grad must be a positive number, or None for no clipping, got {clip_grad!r}')
    if accelerator is not None:
        if scaler is not None:
            raise ValueError('pass a GradScaler only without an accelerator: the accelerator brings its own')
        if accelerator.gradient_accumulation_steps > 1:
            raise ValueError('use gmix_step(accum_steps=K) rather than Accelerator(gradient_accumulation_steps)')
        scaler = accelerator.scaler
    stepper = getattr(optimizer, 'optimizer', optimizer) if accelerator is not None else optimizer
    sam = find_sam(stepper)
    mode = getattr(mixup_fn, 'gmix_mode', None) or 'g'
    if mode in ('bg', 'dg') and sam is None:
        raise ValueError(f'mixup mode {mode!r} needs the SAM optimizer (--opt gmix_sam)')

    if isinstance(mixup_fn, GMixup):
        batch = mixup_fn.mix(inputs, targets)
    elif mixup_fn is not None:
        batch = MixedBatch.unmixed(*mixup_fn(inputs, targets))
    else:
        batch = MixedBatch.unmixed(inputs, targets)

    autocast = accelerator.autocast if accelerator is not None else nullcontext
    no_sync = (lambda: accelerator.no_sync(model)) if accelerator is not None \
        else getattr(model, 'no_sync', nullcontext)
    batch_size = len(batch.inputs)

    def backward(loss):
        if accelerator is not None:
            accelerator.backward(loss)
        elif scaler is not None:
            scaler.scale(loss).backward()
        else:
            loss.backward()

    def micro_batches(*tensors):
        return list(zip(*(t.tensor_split(accum_steps) for t in tensors)))

    def forward_backward(x, y, weights, sync: bool):
        """ Gradient of sum_i weights_i * l_i / B over micro-batches, all-reduced on the last if `sync`;
        returns the per-example losses. """
        chunks = micro_batches(x, y, weights)
        losses = []
        for i, (xc, yc, wc) in enumerate(chunks):
            with (nullcontext() if sync and i == len(chunks) - 1 else no_sync()):
                with autocast():
                    loss = loss_fn(model(xc), yc)
                backward((loss * wc).sum() / batch_size)
            losses.append(loss.detach())
        return torch.cat(losses)

    @torch.no_grad()
    def forward(x, y):
        with autocast():
            return torch.cat([loss_fn(model(xc), yc) for xc, yc in micro_batches(x, y)])

    def all_agree(flags: torch.Tensor) -> List[bool]:
        """ The one host read of a step. A flag is true only where it is true on every replica: replicas
        must take the same branch, or the next all-reduce waits forever. """
        if accelerator is not None and accelerator.num_processes > 1:
            flags = accelerator.reduce(flags.float(), reduction='sum') == accelerator.num_processes
        return flags.tolist()

    undo = _UNDO.setdefault(stepper, UndoableStep())
    undo.save_buffers(model)
    ones = torch.ones(batch_size, device=batch.inputs.device)
    full = sam is not None and sam.is_full_step()
    sensitivity = flagged = None
    ascent_ok = torch.ones((), dtype=torch.bool, device=ones.device)
    if not full:  # a plain optimizer, or SAM between its full steps: one pass on the mixed batch
        loss_e = loss_w = forward_backward(batch.inputs, batch.targets, ones, sync=True)
    else:
        if sam.perturbation == 'gradient':
            loss_w = forward_backward(batch.inputs, batch.targets, ones, sync=sync_ascent)
            grad_norm = sam.grad_norm()
            ascent_ok = torch.isfinite(loss_w).all() & torch.isfinite(grad_norm)
            # Decided without a host read: after a non-finite ascent the NaN norm makes all of w + e NaN, so
            # the descent gradient overflows too (a GradScaler backs off) and the step is undone below.
            grad_norm = torch.where(ascent_ok, grad_norm, float('nan'))
        elif mode in ('bg', 'dg'):  # momentum: the losses at w for the sensitivity, and BatchNorm's statistics
            loss_w, grad_norm = forward(batch.inputs, batch.targets), None
            ascent_ok = torch.isfinite(loss_w).all()
        else:  # momentum, g: the one pass is at w + e, and updates BatchNorm's statistics
            loss_w = grad_norm = None
        try:
            with sam.perturbed(grad_norm):
                stepper.zero_grad(set_to_none=True)
                with frozen_bn_stats(model) if loss_w is not None else nullcontext():
                    if mode in ('bg', 'dg'):
                        sensitivity = forward(batch.inputs, batch.targets) - loss_w
                        flagged = flag_examples(sensitivity, mixup_fn.gmix_ratio, mixup_fn.gmix_flag == 'largest')
                        x, y, weights = batch.descent_batch(flagged, mode)
                    else:  # g: the mixed batch again (descent_batch would read `flagged` on the host)
                        x, y, weights = batch.inputs, batch.targets, ones
                    loss_e = forward_backward(x, y, weights, sync=True)
        except BaseException:
            stepper.zero_grad(set_to_none=True)
            raise

    if scaler is not None:
        scaler.unscale_(stepper)
    # Saved before LookSAM changes its g_v; the step is made whatever the checks say (deciding first would cost a
    # host read) and undone if any failed.
    undo.save(stepper, sam.saved_w if full else None)
    if sam is not None and sam.reuse:
        reuse_gradient(sam, full, accelerator if not sync_ascent else None)
    params = [p for group in stepper.param_groups for p in group['params'] if p.grad is not None]
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    descent_ok = torch.isfinite(grad_norm) & torch.isfinite(loss_e).all()
    if clip_grad is not None:
        if clip_mode == 'norm':
            torch.nn.utils.clip_grads_with_norm_(params, clip_grad, grad_norm)
        else:
            dispatch_clip_grad(params, clip_grad, mode=clip_mode)
    with sam.base_step() if sam is not None else nullcontext():
        stepper.step()
    update_ok = update_is_finite(stepper, ones.device, model.buffers())
    ascent_ok, descent_ok, update_ok = all_agree(torch.stack([ascent_ok, descent_ok, update_ok]))
    result = StepResult(loss=(loss_e if loss_w is None else loss_w).mean(),
                        skipped=not (ascent_ok and descent_ok and update_ok),
                        diverged=ascent_ok and descent_ok and not update_ok, full_step=full)
    if sensitivity is not None and ascent_ok:
        result.sensitivity, result.flagged, result.mixes_two_classes = sensitivity, flagged, batch.mixes_two_classes
    if result.skipped:
        undo.undo()
    elif sam is not None:
        sam.count_update()
    if scaler is not None:
        scaler.update()
    stepper.zero_grad(set_to_none=True)
    return result


def reuse_gradient(sam, full: bool, accelerator=None):
    """ LookSAM: keep g_v on a full step (averaged over processes, since each perturbed by its own gradient at
    w), add it on a one-pass update. """
    if not full:
        sam.add_reused_part()
        return
    sam.keep_orthogonal_part()
    if accelerator is not None and accelerator.num_processes > 1:
        g_v = sam.reused_parts()
        for t in g_v:
            torch.distributed.all_reduce(t)
        torch._foreach_div_(g_v, float(accelerator.num_processes))
