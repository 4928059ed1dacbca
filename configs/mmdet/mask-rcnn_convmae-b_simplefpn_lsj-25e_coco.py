# Mask R-CNN with ConvMAE-Base as a plain ViTDet backbone and a simple feature pyramid, on COCO: the official
# ViTDet-style ConvMAE detector and recipe (OpenGVLab/Official-ConvMAE-Det, projects/ConvMAEDet/configs/COCO/
# mask_rcnn_vitdet_convmae_b_25ep.py on detectron2's configs/common/models/mask_rcnn_vitdet.py), in mmdet;
# officially 53.9 box / 47.6 mask AP.
# Backbone as the official ConvViT: the H/16 map alone, 14x14 windows except the global blocks 1, 4, 7 and 10,
# windows padded with zero tokens after norm1 that every token attends to, decomposed relative position (per
# block `rel_pos_h`/`rel_pos_w`; global tables for the 64x64 grid of img_size 1024), the 14x14 `pos_embed` of the
# 224 pretraining resized bicubically at every forward and trained, LayerNorm eps 1e-6 in all blocks (1e-5 in the
# patch embeddings). Simple feature pyramid (x4, x2, x1, x0.5 paths + subsampled stride 64, channels-first LN),
# 2-conv RPN head, 4conv1fc box head and 4-conv mask head with channels-first LN, AdamW (lr 1e-4, wd 0.1; no decay
# on the backbone's LayerNorms and `pos_embed` only), layer decay 0.8 over the 11 stage-3 blocks, warm-up over 250
# iterations from 0.001, steps x0.1 at iterations 163,889 and 177,546 of 184,375 (25 epochs at batch 16), AMP,
# LSJ at 1024 (scale 0.1-2.0), every image padded to 1024x1024 (0 after normalisation).
# Deliberate differences from the official code:
# - DDP all-reduces gradients in fp32 (officially compressed to fp16, `train.ddp.fp16_compression`).
# - the heads start from mmdet's initialisation (detectron2: MSRA fill of the convs, std 0.001 for the mask
#   predictor).
#
# Train on 8 GPUs x 2 images:
#   bash tools/dist_train.sh configs/mmdet/mask-rcnn_convmae-b_simplefpn_lsj-25e_coco.py 8 \
#       --cfg-options model.backbone.init_cfg.checkpoint=checkpoints/convmae-b_8xb128-1600e_in1k.pth
# The data pipeline (LSJ, test at longer side 1024, padding to 1024x1024) and the Mask R-CNN settings it shares
# with the FPN detector come from that config; everything else is replaced here.
_base_ = './mask-rcnn_convmae-b_fpn_lsj-25e_coco.py'

norm_cfg = dict(_delete_=True, type='ConvMAELN2d', eps=1e-6)  # detectron2's channels-first 'LN' (mmcv: eps 1e-5)

model = dict(
    backbone=dict(
        _delete_=True,
        type='ConvMAE',
        img_size=1024,  # the 64x64 grid of the global blocks' relative position tables
        pos_embed_grid=14,  # the 224 pretraining's grid, resized to the input's at every forward
        arch='base',  # ConvMAE-Base (convmae_backbone/models/arch.py)
        drop_path_rate=0.1,
        window_size=14,
        global_attn_indexes=(1, 4, 7, 10),
        window_padding='zeros',
        rel_pos_bias='decomposed',
        norm_eps=1e-6,
        conv_norm_eps=1e-6,
        freeze_pos_embed=False,
        out_indices=(2,),  # the H/16 map alone
        with_cp=False,  # True trades compute for memory at 1024x1024
        init_cfg=dict(type='Pretrained', checkpoint={{_base_.pretrained}})),
    neck=dict(
        _delete_=True,
        type='SimpleFeaturePyramid',
        in_channels=768,
        out_channels=256,
        scale_factors=(4.0, 2.0, 1.0, 0.5),
        num_outs=5,
        norm_eps=1e-6),
    roi_head=dict(bbox_head=dict(norm_cfg=norm_cfg), mask_head=dict(norm_cfg=norm_cfg)))

# 8 GPUs x 2 images, iterations (not epochs)
train_dataloader = dict(batch_size=2, sampler=dict(type='InfiniteSampler', shuffle=True))
max_iters = 184375  # 25 epochs of 118k images at batch 16
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=max_iters, val_interval=7500)

optim_wrapper = dict(
    _delete_=True,
    type='AmpOptimWrapper',
    constructor='ConvMAELayerDecayOptimWrapperConstructor',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.1),
    paramwise_cfg=dict(num_layers=11, layer_decay_rate=0.8, rules='vitdet'))

# detectron2's WarmupParamScheduler(warmup_length=250 / max_iter, warmup_factor=0.001): LinearLR reaches 1.0 at
# step end - 1, so end=251 gives iterations 0-250 the official slope (1/250).
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=251),
    dict(type='MultiStepLR', by_epoch=False, begin=0, end=max_iters, milestones=[163889, 177546], gamma=0.1),
]

default_hooks = dict(checkpoint=dict(by_epoch=False, interval=2500, max_keep_ckpts=2))
log_processor = dict(by_epoch=False)
# lr 1e-4 is for a total batch of 16; `--auto-scale-lr` rescales it for other batch sizes.
auto_scale_lr = dict(enable=False, base_batch_size=16)
