# Mask R-CNN with ConvMAE-Base as a plain (ViTDet-style) backbone under detectron2's SimpleFeaturePyramid: the
# official recipe of OpenGVLab/Official-ConvMAE-Det (projects/ConvMAEDet/configs/COCO/mask_rcnn_vitdet_convmae_b_25ep.py
# with ../common/coco_loader_lsj.py; officially 53.9 box / 47.6 mask AP), value by value, on detectron2's own
# common configs (mask_rcnn_vitdet model, LSJ COCO data, AdamW, train). Only the imports differ.
# Train (8 GPUs; weights: a ConvMAE-Base pretraining checkpoint, official or tools/pretrain.py's):
#   python tools/d2_train.py --config-file configs/detectron2/mask_rcnn_vitdet_convmae_b_25ep.py --num-gpus 8 \
#       train.init_checkpoint=checkpoints/convmae-b_8xb128-1600e_in1k.pth
from functools import partial

import detectron2.data.transforms as T
import torch.nn as nn
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

from convmae_backbone.detectron2 import ConvViT, get_vit_lr_decay_rate

model = model_zoo.get_config("common/models/mask_rcnn_vitdet.py").model

model.backbone.net = L(ConvViT)(  # Single-scale ViT backbone
    img_size=1024,
    patch_size=(4, 2, 2),
    embed_dim=(256, 384, 768),
    depth=(2, 2, 11),
    num_heads=12,
    drop_path_rate=0.1,
    window_size=14,
    mlp_ratio=4,
    qkv_bias=True,
    norm_layer=partial(nn.LayerNorm, eps=1e-6),
    window_block_indexes=[0, 2, 3, 5, 6, 8, 9],  # 1, 4, 7, 10 for global attention
    use_rel_pos=True,
    pretrain_use_cls_token=False,
    out_feature="last_feat",
)

# Data using LSJ
image_size = 1024
dataloader = model_zoo.get_config("common/data/coco.py").dataloader
dataloader.train.mapper.augmentations = [
    L(T.RandomFlip)(horizontal=True),  # flip first
    L(T.ResizeScale)(min_scale=0.1, max_scale=2.0, target_height=image_size, target_width=image_size),
    L(T.FixedSizeCrop)(crop_size=(image_size, image_size), pad=False),
]
dataloader.train.mapper.image_format = "RGB"
dataloader.train.total_batch_size = 16
dataloader.train.mapper.recompute_boxes = True  # recompute boxes due to cropping
dataloader.test.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=image_size, max_size=image_size),
]

# Initialization and trainer settings
train = model_zoo.get_config("common/train.py").train
train.amp.enabled = True
train.ddp.fp16_compression = True
train.init_checkpoint = ""
train.output_dir = "./output/vitdet_convmae_base_mask_rcnn_25ep_LSJ"
train.checkpointer = dict(period=2500, max_to_keep=2)
train.eval_period = 7500

# Schedule: 25 ep = 184375 iters * 16 images/iter / 118000 images/ep
train.max_iter = 184375
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(
        values=[1.0, 0.1, 0.01],
        milestones=[163889, 177546],
        num_updates=train.max_iter,
    ),
    warmup_length=250 / train.max_iter,
    warmup_factor=0.001,
)

# Optimizer
optimizer = model_zoo.get_config("common/optim.py").AdamW
optimizer.params.lr_factor_func = partial(get_vit_lr_decay_rate, num_layers=11, lr_decay_rate=0.8)
optimizer.params.overrides = {"pos_embed": {"weight_decay": 0.0}}
