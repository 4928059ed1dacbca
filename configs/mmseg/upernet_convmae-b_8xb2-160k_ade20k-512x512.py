# UperNet with a ConvMAE-Base backbone on ADE20K, following the ConvMAE (MCMAE) segmentation recipe:
# 512x512 crops, 160k iterations at a total batch of 16 (8 GPUs x 2), AdamW (lr 1e-4, wd 0.05) with
# layer-wise lr decay 0.75 over the 11 stage-3 blocks, relative position bias, layer scale (init 1.0),
# drop path 0.2, 1500 iterations of linear warm-up then poly decay, mixed precision, sliding-window test.
#
# Train on 8 GPUs:
#   bash tools/dist_train.sh configs/mmseg/upernet_convmae-b_8xb2-160k_ade20k-512x512.py 8 \
#       --cfg-options model.backbone.init_cfg.checkpoint=/path/to/convmae_base_pretrain.pth
# `model.backbone.init_cfg.checkpoint` overrides `pretrained` below.
_base_ = [
    'mmseg::_base_/models/upernet_r50.py',
    'mmseg::_base_/datasets/ade20k.py',
    'mmseg::_base_/default_runtime.py',
    'mmseg::_base_/schedules/schedule_160k.py',
]
custom_imports = dict(imports=['convmae_backbone'], allow_failed_imports=False)

pretrained = 'work_dirs/convmae-b_pretrain/backbone.pth'  # ConvMAE-Base pretraining weights
crop_size = (512, 512)
num_layers = 11  # stage-3 blocks: the layers of the layer-wise lr decay

model = dict(
    data_preprocessor=dict(size=crop_size),
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type='ConvMAE',
        img_size=224,  # the pretraining grid; the position embedding is resized to the input
        embed_dims=(256, 384, 768),
        depths=(2, 2, num_layers),
        num_heads=12,
        mlp_ratios=(4, 4, 4),
        drop_path_rate=0.2,
        use_rel_pos_bias=True,
        layer_scale_init_value=1.0,
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
    paramwise_cfg=dict(num_layers=num_layers, layer_decay_rate=0.75))

param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', power=1.0, eta_min=0.0, by_epoch=False, begin=1500, end=160000),
]

# 8 GPUs x 2 images
train_dataloader = dict(batch_size=2)
val_dataloader = dict(batch_size=1)
test_dataloader = val_dataloader
