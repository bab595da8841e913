"""The DALI backend: decode, crop, resize, colour and flip in a DALI pipeline.

The pipeline reads its batches from `fn.external_source`: encoded file bytes, labels and each
sample's drawn augmentation parameters (augment.py), in the order of this rank's plan
(sharding.py). So the DALI and torchvision loaders see the same files in the same order with
the same crop windows and flips, reshuffling and resume are exact, and the DALI graph needs no
random operators. Decoding is `device="mixed"` (nvJPEG, with the hardware decoder where one
exists) when CUDA is available and the CPU otherwise (`device_id=None`); the graph is the same.

PCA lighting is one RGB shift per image, folded into each sample's normalisation mean
(augment.py), so `crop_mirror_normalize` applies it in the same pass. Colour jitter uses DALI's
`color_twist`, which applies brightness, contrast and saturation in one fixed-order step with
contrast around mid-grey, where torchvision applies them in random order with contrast around
the image's mean grey.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from pipeline.data.augment import draw_train_params, shifted_mean, val_geometry
from pipeline.data.base import PlannedLoader

if TYPE_CHECKING:
    from pipeline.data.sharding import RankPlan


def _read(path: str) -> np.ndarray:
    return np.fromfile(path, dtype=np.uint8)


class DaliLoader(PlannedLoader):
    """Iterable of (images, labels) on `device` for one rank; see pipeline/data/__init__.py."""

    def _train_batches(self, plan: RankPlan, start: int):
        """External-source feed: bytes, labels and drawn parameters of each planned batch."""
        cfg = self.cfg
        for ids, labels, seeds in plan.batches(start):
            drawn = zip(ids, seeds, strict=True)
            params = [draw_train_params(s, self.sizes[i], cfg) for i, s in drawn]
            columns = [
                [_read(self.files[i]) for i in ids],
                [np.array(y, np.int64) for y in labels],
                [np.array([p.crop[1], p.crop[0]], np.int32) for p in params],  # x, y
                [np.array([p.crop[3], p.crop[2]], np.int32) for p in params],  # w, h
                [np.array(p.flip, np.int32) for p in params],
                [np.array(shifted_mean(cfg.mean, p.alpha), np.float32) * 255 for p in params],
            ]
            if cfg.color_jitter > 0:
                columns += [
                    [np.array(p.brightness, np.float32) for p in params],
                    [np.array(p.contrast, np.float32) for p in params],
                    [np.array(p.saturation, np.float32) for p in params],
                ]
            yield tuple(columns)

    def _val_batches(self, plan: RankPlan, start: int):
        """External-source feed: bytes, labels, resized size and crop position of each batch."""
        crop = self.cfg.val_crop
        for ids, labels, _ in plan.batches(start):
            resize, pos = [], []
            for i in ids:
                new_w, new_h, top, left = val_geometry(self.sizes[i], self.cfg.val_resize, crop)
                resize.append(np.array([new_w, new_h], np.float32))
                # crop_mirror_normalize puts the window at pos · (size − crop); this pos lands
                # it on torchvision's (rounded) centre-crop corner.
                px = left / (new_w - crop) if new_w != crop else 0.0
                py = top / (new_h - crop) if new_h != crop else 0.0
                pos.append(np.array([px, py], np.float32))
            yield (
                [_read(self.files[i]) for i in ids],
                [np.array(y, np.int64) for y in labels],
                resize,
                pos,
            )

    def _train_graph(self, plan: RankPlan, start: int, decoder: dict):
        """Graph: sliced decode of the drawn crop, resize, colour, flip + normalise (+ lighting)."""
        from nvidia.dali import fn, types

        cfg = self.cfg
        outputs = 9 if cfg.color_jitter > 0 else 6
        jpegs, labels, anchor, shape, flip, mean, *jitter = fn.external_source(
            source=self._train_batches(plan, start), num_outputs=outputs
        )
        images = fn.decoders.image_slice(
            jpegs, anchor, shape, normalized_anchor=False, normalized_shape=False, **decoder
        )
        size = cfg.train_size
        images = fn.resize(
            images, resize_x=size, resize_y=size, interp_type=types.INTERP_LINEAR, antialias=True
        )
        if jitter:
            b, c, s = jitter
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
        jpegs, labels, resize, pos = fn.external_source(
            source=self._val_batches(plan, start), num_outputs=4
        )
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
        iterator = DALIGenericIterator(self._pipeline(plan, start), ["images", "labels"])
        for (out,) in iterator:
            labels = out["labels"].reshape(-1).to(self.device, non_blocking=True)
            yield out["images"].to(self.device, non_blocking=True), labels
