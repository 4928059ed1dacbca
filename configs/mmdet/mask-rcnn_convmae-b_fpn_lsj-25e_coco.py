# Mask R-CNN + FPN with a ConvMAE-Base backbone on COCO: the official ConvMAE (MCMAE) detection model and
# recipe (Alpha-VL/ConvMAE DET/configs/convmae/convmae_base_mask_rcnn_FPN_25ep.py, detectron2), in mmdet.
# Backbone as the official ConvViTDet: stage 3 with 16x16 window attention except the global blocks 0, 3, 6
# and 10, BEiT relative position tables shared by all windowed blocks (`windowed_rel_pos_bias`) and by all
# global blocks (`global_rel_pos_bias`), the pretrained position embedding resized once to the 64x64 grid and
# frozen, H/32 by 2x2 max-pooling. Large-scale jitter at 1024x1024 (scale 0.1-2.0), SyncBN in the FPN and the
# heads, a 2-conv RPN head and a 4conv1fc box head, AdamW (lr 8e-5, wd 0.1, no layer decay; no decay on norms,
# `pos_embed` and `relative_position_bias_table`, decay on biases as detectron2's defaults), linear warm-up over
# 0.5% of the iterations + cosine decay, mixed precision, 25 epochs at a total batch of 32.
# Deliberate differences from the official code:
# - 25 epochs of mmdet's filtered COCO train set at batch 32 (about 91.6k iterations; officially 92,187).
# - warm-up and cosine multiply (mmengine), so warm-up ends at 1.0 x cosine; detectron2 interpolates linearly to
#   the cosine value at 0.5% (at most 3e-4 of the lr apart, during warm-up only).
# - images are padded to 1024x1024 with the mean colour (0 after normalisation); detectron2's FixedSizeCrop pads
#   with grey 128.
#
# Train on 8 GPUs x 4 images:
#   bash tools/dist_train.sh configs/mmdet/mask-rcnn_convmae-b_fpn_lsj-25e_coco.py 8 \
#       --cfg-options model.backbone.init_cfg.checkpoint=checkpoints/convmae-b_8xb128-1600e_in1k.pth
# `model.backbone.init_cfg.checkpoint` overrides `pretrained` below; any checkpoint format the ConvMAE
# backbone reads works (official {'model': ...}, this project's pretraining checkpoints, plain state dicts).
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    'mmdet::common/lsj-100e_coco-instance.py',
]
custom_imports = dict(imports=['convmae_backbone'], allow_failed_imports=False)

pretrained = 'checkpoints/convmae-b_8xb128-1600e_in1k.pth'  # ConvMAE-Base pretraining (official download or ours)
image_size = (1024, 1024)
norm_cfg = dict(type='SyncBN', requires_grad=True)
batch_augments = [dict(type='BatchFixedSizePad', size=image_size, pad_mask=True)]

model = dict(
    # every image, at most 1024x1024 after resizing, is padded to 1024x1024 (0 after normalisation: the mean colour)
    data_preprocessor=dict(pad_size_divisor=1024, batch_augments=batch_augments),
    backbone=dict(
        _delete_=True,
        type='ConvMAE',
        img_size=1024,  # the 64x64 grid the pretrained position embedding is resized to, once, at load
        arch='base',  # ConvMAE-Base (convmae_backbone/models/arch.py)
        drop_path_rate=0.1,
        window_size=16,
        global_attn_indexes=(0, 3, 6, 10),
        rel_pos_bias='shared',
        norm_eps=1e-6,
        freeze_pos_embed=True,
        h32='maxpool',
        out_indices=(0, 1, 2, 3),
        with_cp=False,  # True trades compute for memory at 1024x1024
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[256, 384, 768, 768], out_channels=256, num_outs=5, norm_cfg=norm_cfg),
    rpn_head=dict(num_convs=2),
    roi_head=dict(
        bbox_head=dict(type='Shared4Conv1FCBBoxHead', conv_out_channels=256, norm_cfg=norm_cfg),
        mask_head=dict(norm_cfg=norm_cfg)))

# Test as officially: longer side 1024, padded to 1024x1024 (pad_size_divisor above; detectron2's FixedSizeCrop),
# so the backbone sees the 64x64 grid its position embedding and global table are built for.
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args={{_base_.backend_args}}),
    dict(type='Resize', scale=image_size, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
# 8 GPUs x 4 images; the base's RepeatDataset is kept with times=1, so an epoch is one pass over COCO.
train_dataloader = dict(batch_size=4, num_workers=4, dataset=dict(times=1))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

max_epochs = 25
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=max_epochs, val_interval=5)

optim_wrapper = dict(
    _delete_=True,
    type='AmpOptimWrapper',
    optimizer=dict(type='AdamW', lr=8e-5, betas=(0.9, 0.999), weight_decay=0.1),
    paramwise_cfg=dict(
        norm_decay_mult=0.0,
        custom_keys={
            'pos_embed': dict(decay_mult=0.0),
            'relative_position_bias_table': dict(decay_mult=0.0),
        }))

# Official: warm-up over 0.5% of the 92,187 iterations (461) from 0.001, cosine over all iterations to 0.
# LinearLR reaches 1.0 at step end - 1, so end=462 gives iterations 0-460 the official warm-up slope (1/461).
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=462),
    dict(type='CosineAnnealingLR', eta_min=0.0, by_epoch=True, begin=0, end=max_epochs,
         convert_to_iter_based=True),
]

default_hooks = dict(checkpoint=dict(type='CheckpointHook', interval=1, max_keep_ckpts=3))
# lr 8e-5 is for a total batch of 32; `--auto-scale-lr` rescales it for other batch sizes.
auto_scale_lr = dict(enable=False, base_batch_size=32)
