"""The command line's calibration batches for `spt_dist.score`: per global batch, this rank's micro-batches as
a list of (images, labels)."""

from spt_dist.data.transforms import build_contrastive_transform, build_transforms
from spt_dist.selection.calibration import CalibrationBatches


def calibration_batches(cfg, data, model, rank: int = 0, world: int = 1) -> list[tuple]:
    sel = cfg.selection
    transform = build_contrastive_transform(model) if sel.augmented else build_transforms(model, cfg.data)[1]
    stream = CalibrationBatches(data.train_shards, rank=rank, world=world, batch_size=sel.batch_size,
                                micro_batch_size=sel.micro_batch_size or sel.batch_size // world,
                                batches=sel.batches, transform=transform,
                                views=1, augment_seed=cfg.seed if sel.augmented else None,
                                shuffle_seed=cfg.seed if sel.shuffled else None,
                                shuffle_buffer=cfg.data.shuffle_buffer, num_classes=data.num_classes)
    return [[(micro["images"], micro["labels"]) for micro in batch] for batch in stream]
