"""The score pass's losses: cross-entropy, and the supervised contrastive loss over the global batch (GPS)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from spt_dist.distributed import world_size


def supervised_contrastive_loss(features: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """SupCon (Khosla et al. 2020) on L2-normalised features [n, d]: every other sample with the same label
    (the image's other views included) is a positive of an anchor; the mean over anchors."""
    z = F.normalize(features.float(), dim=1)
    logits = z @ z.T / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()  # numerical stability; cancels out
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    log_prob = logits - torch.logsumexp(logits.masked_fill(self_mask, float("-inf")), dim=1, keepdim=True)
    mean_log_prob_pos = (log_prob * positives).sum(1) / positives.sum(1).clamp(min=1)
    return -mean_log_prob_pos.mean()


def global_batch_contrastive_loss(features: torch.Tensor, labels: torch.Tensor, views: int,
                                  temperature: float) -> torch.Tensor:
    """The contrastive loss of the global batch, as this rank's share of it.

    Features of all ranks are gathered; only this rank's own slice keeps its autograd graph. The engine then
    averages the ranks' gradients, so the loss is multiplied by the world size: the average of the ranks'
    partial gradients times W is the full gradient of the global loss. The gathered features are put in the
    sequence's order (view-major, samples in global order) so the loss is the same on any world size.
    """
    world = world_size()
    if world == 1:
        return supervised_contrastive_loss(features, labels, temperature)
    rank = dist.get_rank()
    gathered_f = [torch.empty_like(features) for _ in range(world)]
    gathered_l = [torch.empty_like(labels) for _ in range(world)]
    dist.all_gather(gathered_f, features.detach().contiguous())
    dist.all_gather(gathered_l, labels.contiguous())
    gathered_f[rank] = features
    # Each rank's tensor is [views x m]; reorder to [views x (world x m)].
    f = torch.cat([t.view(views, -1, t.shape[-1]) for t in gathered_f], dim=1).reshape(-1, features.shape[-1])
    y = torch.cat([t.view(views, -1) for t in gathered_l], dim=1).reshape(-1)
    return supervised_contrastive_loss(f, y, temperature) * world
