""" timm's training losses as per-example losses: `loss_fn(logits, target) -> (N,)`, whose mean is the
value of timm's loss on the batch (G-Mix weighs and ranks examples by their own loss). """
from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F

from timm_gmix.step import cross_entropy_per_example


def binary_cross_entropy_per_example(
        logits: torch.Tensor, target: torch.Tensor, smoothing: float = 0.1, target_threshold: Optional[float] = None,
        sum_classes: bool = False, pos_weight: Optional[float] = None, num_classes: Optional[int] = None,
) -> torch.Tensor:
    """ timm's BinaryCrossEntropy per example: its mean equals BinaryCrossEntropy(smoothing, target_threshold,
    sum_classes=sum_classes, pos_weight=pos_weight)(logits, target). Class indices are one-hot encoded
    over `num_classes` (default: the logits' width) with `smoothing`; soft targets (mixed) are taken as
    they are. The loss of an example is the mean over classes, or the sum with `sum_classes`. """
    if target.shape != logits.shape:
        num_classes = num_classes or logits.shape[-1]
        off_value = smoothing / num_classes
        target = torch.full((len(target), num_classes), off_value, device=logits.device, dtype=logits.dtype)\
            .scatter_(1, target.long().view(-1, 1), 1. - smoothing + off_value)
    if target_threshold is not None:
        target = target.gt(target_threshold).to(dtype=target.dtype)
    if pos_weight is not None:
        pos_weight = torch.as_tensor(pos_weight, device=logits.device)
    loss = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight, reduction='none')
    return loss.sum(-1) if sum_classes else loss.mean(-1)


def jsd_cross_entropy_per_example(
        logits: torch.Tensor, target: torch.Tensor, num_splits: int, alpha: float = 12, smoothing: float = 0.1,
) -> torch.Tensor:
    """ timm's JsdCrossEntropy per row of a split-major batch (K = `num_splits` blocks of B rows, block 0 the
    clean views, row j * B + i view j of example i; targets repeated per block, as collated for --aug-splits):
    each example's loss (cross-entropy of its clean view plus alpha times the mean KL divergence of its K
    views' predictions from their mixture) on each of its K rows, so the mean equals
    JsdCrossEntropy(num_splits, alpha, smoothing)(logits, target). All K views of an example must be in the
    same call, in this layout: a micro-batch cut from a split-major batch by rows does not qualify. """
    split_size = len(logits) // num_splits
    if split_size * num_splits != len(logits):
        raise ValueError(f'{len(logits)} rows are not {num_splits} equal augmentation splits')
    probs = F.softmax(logits, dim=1).view(num_splits, split_size, -1)
    # clamped as in timm, so that a near-zero mixture probability does not explode the divergence
    log_mixture = probs.mean(0).clamp(1e-7, 1).log()
    kl = F.kl_div(log_mixture.expand_as(probs), probs, reduction='none').sum(-1)  # (K, B)
    loss = cross_entropy_per_example(logits[:split_size], target[:split_size], smoothing) + alpha * kl.mean(0)
    return loss.repeat(num_splits)


def create_loss(args, num_classes: int):
    """ The per-example training loss timm's train.py would choose: JSD + cross-entropy with --jsd-loss
    (--aug-splits views), binary cross-entropy with --bce-loss, else cross-entropy; --smoothing applies to
    class-index targets (mixed targets come smoothed from the mixing function, as in timm). """
    if args.jsd_loss:
        return partial(jsd_cross_entropy_per_example, num_splits=args.aug_splits, smoothing=args.smoothing)
    if args.bce_loss:
        return partial(binary_cross_entropy_per_example, smoothing=args.smoothing,
                       target_threshold=args.bce_target_thresh, sum_classes=args.bce_sum,
                       pos_weight=args.bce_pos_weight, num_classes=num_classes)
    return partial(cross_entropy_per_example, smoothing=args.smoothing)
