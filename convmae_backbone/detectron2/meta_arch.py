"""The meta-architecture the official ConvMAE FPN detector config needs (Alpha-VL/ConvMAE ``DET/configs/common.py``:
``GeneralizedRCNNImageListForward``), on detectron2's ``GeneralizedRCNN``."""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.modeling import GeneralizedRCNN, detector_postprocess
from detectron2.structures import ImageList, Instances


def lsj_postprocess(instances: Sequence[Instances], batched_inputs: Sequence[dict],
                    image_sizes: Sequence[Tuple[int, int]]) -> List[Dict[str, Instances]]:
    """Detections at the detector's input size -> at each image's original ``height`` x ``width``, for inputs that
    were resized keeping their aspect ratio and then padded (large-scale jitter, ``FixedSizeCrop``): boxes (and
    masks, keypoints) scale by the one factor max(width / w, height / h), not per axis as detectron2's
    ``detector_postprocess`` does for plain resizing (the official ``_postprocess``; it scales keypoints per axis)."""
    out = []
    for results, inputs, (h, w) in zip(instances, batched_inputs, image_sizes):
        height, width = inputs.get('height', h), inputs.get('width', w)
        scale = max(width / w, height / h)
        # detector_postprocess scales by output / image_size on each axis: give it the size that makes both `scale`
        unpadded = Instances((height / scale, width / scale), **results.get_fields())
        out.append({'instances': detector_postprocess(unpadded, height, width)})
    return out


class GeneralizedRCNNImageListForward(GeneralizedRCNN):
    """``GeneralizedRCNN`` whose backbone receives the ``ImageList`` (not its tensor), and which, with
    ``lsj_postprocess=True``, maps detections back to the original images with :func:`lsj_postprocess`.
    Constructor: ``lsj_postprocess`` and ``GeneralizedRCNN``'s arguments."""

    def __init__(self, *args, lsj_postprocess: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.lsj_postprocess = lsj_postprocess

    def forward(self, batched_inputs: List[Dict[str, torch.Tensor]]):
        if not self.training:
            return self.inference(batched_inputs)
        images = self.preprocess_image(batched_inputs)
        gt_instances = ([x['instances'].to(self.device) for x in batched_inputs]
                        if 'instances' in batched_inputs[0] else None)
        features = self.backbone(images)
        proposals, proposal_losses = self.proposal_generator(images, features, gt_instances)
        _, detector_losses = self.roi_heads(images, features, proposals, gt_instances)
        return {**detector_losses, **proposal_losses}

    def inference(self, batched_inputs: List[Dict[str, torch.Tensor]],
                  detected_instances: Optional[List[Instances]] = None, do_postprocess: bool = True):
        assert not self.training
        images: ImageList = self.preprocess_image(batched_inputs)
        features = self.backbone(images)
        if detected_instances is None:
            proposals, _ = self.proposal_generator(images, features, None)
            results, _ = self.roi_heads(images, features, proposals, None)
        else:
            results = self.roi_heads.forward_with_given_boxes(features,
                                                              [x.to(self.device) for x in detected_instances])
        if not do_postprocess:
            return results
        if self.lsj_postprocess:
            return lsj_postprocess(results, batched_inputs, images.image_sizes)
        return GeneralizedRCNN._postprocess(results, batched_inputs, images.image_sizes)
