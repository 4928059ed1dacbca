# UperNet with a ConvMAE-Base backbone on ADE20K: the official ConvMAE (MCMAE) segmentation model and recipe
# (Alpha-VL/ConvMAE SEG/configs/convmae/upernet_convmae_base_512_slide_160k_ade20k.py, mmseg 0.x), in mmseg 1.x.
# Backbone as the official one: a BEiT relative position table in every stage-3 block over the 32x32 grid,
# layer scale (init 1.0), stage-3 LayerNorm eps 1e-5, drop path 0.2, the position embedding learnt on the
# 32x32 grid (the pretrained one resized once at load), H/32 by the `fpn` branch (3x3 conv stride 2 -> SyncBN
# -> GELU; 15x15 for 512 crops). 512x512 crops, 160k iterations at a total batch of 16 (8 GPUs x 2), AdamW
# (lr 1e-4, wd 0.05) with layer-wise lr decay 0.75 (layers 0..12: stages 1-2, patch embeddings and pos_embed 0,
# blocks3.i i + 1, the rest 12), linear warm-up over 1500 iterations from 1e-6 times the poly schedule, poly
# decay (power 1) over all 160k iterations, mixed precision, sliding-window test.
# Deliberate difference from the official code: mixed precision by torch.amp (AmpOptimWrapper) instead of apex.
#
# Train on 8 GPUs:
#   bash tools/dist_train.sh configs/mmseg/upernet_convmae-b_8xb2-160k_ade20k-512x512.py 8 \
#       --cfg-options model.backbone.init_cfg.checkpoint=checkpoints/convmae-b_8xb128-1600e_in1k.pth
# `model.backbone.init_cfg.checkpoint` overrides `pretrained` below.
_base_ = [
    'mmseg::_base_/models/upernet_r50.py',
    'mmseg::_base_/datasets/ade20k.py',
    'mmseg::_base_/default_runtime.py',
    'mmseg::_base_/schedules/schedule_160k.py',
]
custom_imports = dict(imports=['convmae_backbone'], allow_failed_imports=False)

pretrained = 'checkpoints/convmae-b_8xb128-1600e_in1k.pth'  # ConvMAE-Base pretraining (official download or ours)
crop_size = (512, 512)
num_layers = 11  # stage-3 blocks of arch='base': the layers of the layer-wise lr decay

model = dict(
    data_preprocessor=dict(size=crop_size),
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type='ConvMAE',
        img_size=512,  # the 32x32 grid of the position embedding and the relative position tables
        arch='base',  # ConvMAE-Base (convmae_backbone/models/arch.py)
        drop_path_rate=0.2,
        rel_pos_bias='per_block',
        layer_scale_init_value=1.0,
        norm_eps=1e-5,
        h32='fpn',
        fpn_norm_cfg=dict(type='SyncBN', requires_grad=True),
        out_indices=(0, 1, 2, 3),  # H/4, H/8, H/16, H/32
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    decode_head=dict(in_channels=[256, 384, 768, 768], channels=768, num_classes=150),
    auxiliary_head=dict(in_channels=768, in_index=2, num_classes=150),
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(341, 341)))

optim_wrapper = dict(
    _delete_=True,
    type='AmpOptimWrapper',
    constructor='ConvMAELayerDecayOptimWrapperConstructor',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    # decay_position=True: as officially, weight decay on every parameter with ndim > 1 not ending in '.bias',
    # pos_embed and the relative position tables included (the official no-decay names lack the 'backbone.'
    # prefix and never match); False gives the clean rule (no decay on those either).
    paramwise_cfg=dict(num_layers=num_layers, layer_decay_rate=0.75, decay_position=True))

# As mmcv 1.x's poly schedule with linear warm-up: both from iteration 0, multiplied while both run,
# lr(t) = 1e-4 * (1 - t / 160000) * (1e-6 + (1 - 1e-6) * min(t, 1500) / 1500). mmengine's LinearLR and PolyLR
# reach their end value at step end - 1, hence the ends 1501 and 160001.
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1501),
    dict(type='PolyLR', power=1.0, eta_min=0.0, by_epoch=False, begin=0, end=160001),
]

# 8 GPUs x 2 images
train_dataloader = dict(batch_size=2)
val_dataloader = dict(batch_size=1)
test_dataloader = val_dataloader
