"""The DALI backend: read, decode, crop, resize, colour and flip in a DALI pipeline.

Each epoch's pipeline reads the files with DALI's own reader (`fn.readers.file`), given this
rank's planned order (sharding.py) from the step it starts at, so no file byte passes through
Python. The per-sample augmentation (augment.py: torchvision's own parameter draws from each
slot's seed) comes in per-batch arrays through `fn.external_source`; with `data.plan_workers`
> 0 those draws run in worker processes ahead of the pipeline, so the training process only
hands over a few small arrays per batch. The DALI and torchvision loaders therefore see the
same files in the same order with the same crop windows and flips, and reshuffling and resume
are exact; the DALI graph needs no random operators. Decoding is `device="mixed"` (nvJPEG, with
the hardware decoder where one exists) when CUDA is available and the CPU otherwise
(`device_id=None`); the graph is the same.

PCA lighting is one RGB shift per image, folded into each sample's normalisation mean
(augment.py), so `crop_mirror_normalize` applies it in the same pass. Colour jitter uses DALI's
`color_twist`, which applies brightness, contrast and saturation in one fixed-order step with
contrast around mid-grey, where torchvision applies them in random order with contrast around
the image's mean grey.
"""

from __future__ import annotations

import collections
import weakref
from typing import TYPE_CHECKING

import numpy as np

from pipeline.data.augment import draw_train_params, shifted_mean, val_geometry
from pipeline.data.base import PlannedLoader
from pipeline.data.workers import start_workers

if TYPE_CHECKING:
    from pipeline.config import DataConfig
    from pipeline.data.sharding import RankPlan

READER = "Reader"


def train_params(seeds: np.ndarray, sizes: np.ndarray, cfg: DataConfig) -> np.ndarray:
    """One batch's drawn augmentation as one float32 array, a row per sample: crop x, y, w, h,
    flip, the lighting-shifted mean (×255, 3 values), and with jitter the brightness, contrast
    and saturation factors. One array per batch keeps the hand-over to DALI to one call.

    A module-level function of plain arrays, so worker processes can run it."""
    params = [draw_train_params(s, size, cfg) for s, size in zip(seeds, sizes, strict=True)]
    rows = [
        [p.crop[1], p.crop[0], p.crop[3], p.crop[2], float(p.flip)]
        + [255 * m for m in shifted_mean(cfg.mean, p.alpha)]
        + ([p.brightness, p.contrast, p.saturation] if cfg.color_jitter > 0 else [])
        for p in params
    ]
    return np.array(rows, np.float32)


def _shutdown(pool) -> None:
    pool.shutdown(wait=False, cancel_futures=True)


def _then_repeat_last(batches):
    """The batches, then the last one again for as long as DALI asks: it prefetches past the
    end of the epoch, whose length the file reader sets."""
    last = None
    for last in batches:
        yield last
    while last is not None:
        yield last


class DaliLoader(PlannedLoader):
    """Iterable of (images, labels) on `device` for one rank; see pipeline/data/__init__.py."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Worker processes that draw the augmentation ahead of the pipeline (train only),
        # forked now, while the loader is built and before DALI's threads exist.
        self._pool = None
        if self.train and self.cfg.plan_workers > 0:
            self._pool = start_workers(self.cfg.plan_workers)
            weakref.finalize(self, _shutdown, self._pool)

    def _train_batches(self, plan: RankPlan, start: int):
        """External-source feed: each planned batch's labels and drawn parameters, drawn a few
        batches ahead by the worker processes (or here, without workers)."""
        planned = (
            (np.ascontiguousarray(labels), seeds, self.sizes[ids])
            for ids, labels, seeds in plan.batches(start)
        )
        if self._pool is None:
            for labels, seeds, sizes in planned:
                yield labels, train_params(seeds, sizes, self.cfg)
            return
        ahead: collections.deque = collections.deque()
        try:
            for labels, seeds, sizes in planned:
                ahead.append((labels, self._pool.submit(train_params, seeds, sizes, self.cfg)))
                if len(ahead) > 4 * self.cfg.plan_workers:
                    labels, future = ahead.popleft()
                    yield labels, future.result()
            while ahead:
                labels, future = ahead.popleft()
                yield labels, future.result()
        finally:  # an epoch left early (preemption): nothing more to draw
            for _, future in ahead:
                future.cancel()

    def _val_batches(self, plan: RankPlan, start: int):
        """External-source feed: labels, resized size and crop position of each planned batch."""
        crop = self.cfg.val_crop
        for ids, labels, _ in plan.batches(start):
            resize, pos = [], []
            for i in ids:
                new_w, new_h, top, left = val_geometry(self.sizes[i], self.cfg.val_resize, crop)
                resize.append((new_w, new_h))
                # crop_mirror_normalize puts the window at pos · (size − crop); this pos lands
                # it on torchvision's (rounded) centre-crop corner.
                px = left / (new_w - crop) if new_w != crop else 0.0
                py = top / (new_h - crop) if new_h != crop else 0.0
                pos.append((px, py))
            resize_arr, pos_arr = np.array(resize, np.float32), np.array(pos, np.float32)
            yield np.ascontiguousarray(labels), resize_arr, pos_arr

    def _read(self, plan: RankPlan, start: int):
        """DALI's file reader over this rank's planned files from batch `start` on."""
        from nvidia.dali import fn

        ids = plan.file_ids[start * plan.batch_size :]
        return fn.readers.file(
            files=[self.files[i] for i in ids], random_shuffle=False, name=READER
        )[0]

    def _train_graph(self, plan: RankPlan, start: int, decoder: dict):
        """Graph: sliced decode of the drawn crop, resize, colour, flip + normalise (+ lighting)."""
        from nvidia.dali import fn, types

        cfg = self.cfg
        labels, params = fn.external_source(
            source=_then_repeat_last(self._train_batches(plan, start)), num_outputs=2, batch=True
        )
        anchor, shape, mean = params[0:2], params[2:4], params[5:8]  # see train_params
        flip = fn.cast(params[4], dtype=types.INT32)
        jpegs = self._read(plan, start)
        images = fn.decoders.image_slice(
            jpegs, anchor, shape, normalized_anchor=False, normalized_shape=False, **decoder
        )
        size = cfg.train_size
        images = fn.resize(
            images, resize_x=size, resize_y=size, interp_type=types.INTERP_LINEAR, antialias=True
        )
        if cfg.color_jitter > 0:
            b, c, s = params[8], params[9], params[10]
            images = fn.color_twist(images, brightness=b, contrast=c, saturation=s)
        std = [255 * v for v in cfg.std]
        images = fn.crop_mirror_normalize(
            images, mirror=flip, mean=mean, std=std, dtype=types.FLOAT, output_layout="CHW"
        )
        return images, labels

    def _val_graph(self, plan: RankPlan, start: int, decoder: dict):
        """Graph: full decode, resize to torchvision's size, centre crop + normalise."""
        from nvidia.dali import fn, types

        cfg = self.cfg
        labels, resize, pos = fn.external_source(
            source=_then_repeat_last(self._val_batches(plan, start)), num_outputs=3, batch=True
        )
        jpegs = self._read(plan, start)
        images = fn.decoders.image(jpegs, **decoder)
        images = fn.resize(
            images,
            resize_x=resize[0],
            resize_y=resize[1],
            interp_type=types.INTERP_LINEAR,
            antialias=True,
        )
        images = fn.crop_mirror_normalize(
            images,
            crop_w=cfg.val_crop,
            crop_h=cfg.val_crop,
            crop_pos_x=pos[0],
            crop_pos_y=pos[1],
            out_of_bounds_policy="pad",  # val_crop > val_resize: black padding, as torchvision
            fill_values=[-m / s for m, s in zip(cfg.mean, cfg.std, strict=True)],
            mean=[255 * v for v in cfg.mean],
            std=[255 * v for v in cfg.std],
            dtype=types.FLOAT,
            output_layout="CHW",
        )
        return images, labels

    def _pipeline(self, plan: RankPlan, start: int):
        """A DALI pipeline that runs this plan from batch `start` to the end of the epoch."""
        from nvidia.dali import pipeline_def, types

        gpu = self.device.type == "cuda"
        decoder = {
            "device": "mixed" if gpu else "cpu",
            "output_type": types.RGB,
            "adjust_orientation": False,  # like PIL, which the torchvision path uses
            "jpeg_fancy_upsampling": True,  # libjpeg's default, so chroma matches PIL's decode
        }
        if gpu:  # the share of JPEGs for the hardware decoder; DALI's default has moved
            decoder["hw_decoder_load"] = self.cfg.hw_decoder_load
        graph = self._train_graph if self.train else self._val_graph

        @pipeline_def(
            batch_size=self.batch_size,
            num_threads=self.cfg.num_threads,
            device_id=(self.device.index or 0) if gpu else None,
            prefetch_queue_depth=2,
        )
        def pipe():
            images, labels = graph(plan, start, decoder)
            # Labels come from the CPU feed; moved in the pipeline, they reach torch on the GPU
            # without a pageable host-to-device copy (which would synchronise every step).
            return images, (labels.gpu() if gpu else labels)

        return pipe()

    def __iter__(self):
        return self._run(*self._take_start())

    def _run(self, plan: RankPlan, start: int):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        if start >= plan.steps:
            return
        iterator = DALIGenericIterator(
            self._pipeline(plan, start), ["images", "labels"], reader_name=READER
        )
        for (out,) in iterator:
            labels = out["labels"].reshape(-1).to(self.device, non_blocking=True)
            yield out["images"].to(self.device, non_blocking=True), labels
