# ConvMAE-Base fine-tuned on ImageNet-1k for classification, the official recipe (FINETUNE.md and the defaults
# of main_finetune.py): total batch 1024 (8 GPUs x 128), lr = blr 5e-4 x 1024 / 256, AdamW (0.9, 0.999),
# weight decay 0.05, layer-wise lr decay 0.65 over the 11 stage-3 blocks, drop path 0.1, 100 epochs (5 warm-up,
# then cosine to 1e-6), mixup 0.8 / cutmix 1.0, label smoothing 0.1, RandAugment rand-m9-mstd0.5-inc1,
# random erasing 0.25, mixed precision. Head input: stage-3 tokens averaged, then fc_norm (LayerNorm).
# Evaluation: shorter side 256 (bicubic), centre crop 224, top-1 / top-5 (official checkpoint: 84.982 top-1).
#
#   python tools/train.py configs/mmpretrain/convmae-b_8xb128-100e_in1k.py \
#       --cfg-options model.backbone.init_cfg.checkpoint=checkpoints/convmae-b_8xb128-1600e_in1k.pth
#   bash tools/dist_train.sh configs/mmpretrain/convmae-b_8xb128-100e_in1k.py 8 --cfg-options ...
#   python tools/test.py configs/mmpretrain/convmae-b_8xb128-100e_in1k.py \
#       checkpoints/convmae-b_8xb128-100e_in1k_official.pth
# Another total batch: set optim_wrapper.optimizer.lr or pass --auto-scale-lr (scales by batch / 1024).
# Another dataset: model.head.num_classes and data_preprocessor.num_classes (mixup's one-hot labels).
_base_ = [
    'mmpretrain::_base_/datasets/imagenet_bs64_swin_224.py',
    'mmpretrain::_base_/schedules/imagenet_bs1024_adamw_swin.py',
    'mmpretrain::_base_/default_runtime.py',
]
custom_imports = dict(imports=['convmae_backbone'], allow_failed_imports=False)

pretrained = 'checkpoints/convmae-b_8xb128-1600e_in1k.pth'  # ConvMAE-Base pretraining (official download or ours)
lr = 5e-4 * 1024 / 256
min_lr = 1e-6
max_epochs = 100
warmup_epochs = 5

data_preprocessor = dict(num_classes=1000)
bgr_mean = [103.53, 116.28, 123.675]
bgr_std = [57.375, 57.12, 58.395]
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomResizedCrop', scale=224, backend='pillow', interpolation='bicubic'),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(  # timm's rand-m9-mstd0.5-inc1
        type='RandAugment',
        policies='timm_increasing',
        num_policies=2,
        total_level=10,
        magnitude_level=9,
        magnitude_std=0.5,
        hparams=dict(pad_val=[round(x) for x in bgr_mean], interpolation='bicubic')),
    dict(  # timm's RandomErasing(0.25, mode='pixel'): per-pixel normal noise in normalised space
        type='RandomErasing',
        erase_prob=0.25,
        mode='rand',
        min_area_ratio=0.02,
        max_area_ratio=1 / 3,
        fill_color=bgr_mean,
        fill_std=bgr_std),
    dict(type='PackInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='ResizeEdge', scale=256, edge='short', backend='pillow', interpolation='bicubic'),
    dict(type='CenterCrop', crop_size=224),
    dict(type='PackInputs'),
]
train_dataloader = dict(batch_size=128, dataset=dict(pipeline=train_pipeline))  # per GPU
val_dataloader = dict(batch_size=128, dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

model = dict(
    type='ImageClassifier',
    backbone=dict(
        type='ConvMAE',
        img_size=224,
        arch='base',  # ConvMAE-Base (convmae_backbone/models/arch.py)
        drop_path_rate=0.1,
        out_type='avg_featmap',
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=None,
    head=dict(
        type='LinearClsHead',
        num_classes=1000,
        in_channels=768,
        # with mixup / cutmix: the soft targets are smoothed, as timm's Mixup(label_smoothing=0.1) does
        loss=dict(type='LabelSmoothLoss', label_smooth_val=0.1, mode='original'),
        init_cfg=[dict(type='TruncNormal', layer='Linear', std=2e-5)]),
    # one of the two per batch, with equal probability (timm Mixup: prob 1.0, switch_prob 0.5)
    train_cfg=dict(augments=[dict(type='Mixup', alpha=0.8), dict(type='CutMix', alpha=1.0)]))

optim_wrapper = dict(
    _delete_=True,
    type='AmpOptimWrapper',
    # the official layer ids (util/lr_decay.py) over the backbone's stage-3 blocks; no weight decay for 1-D
    # parameters and pos_embed (main_finetune.py matches no_weight_decay() names: decay_position=False)
    constructor='ConvMAELayerDecayOptimWrapperConstructor',
    optimizer=dict(type='AdamW', lr=lr, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(layer_decay_rate=0.65, decay_position=False))

param_scheduler = [
    # official: linear from 0; mmengine's LinearLR needs a positive start factor
    dict(type='LinearLR', start_factor=1e-4, by_epoch=True, begin=0, end=warmup_epochs,
         convert_to_iter_based=True),
    # eta_min_ratio: every layer's lr ends at min_lr x its layer-decay scale, as in the official schedule
    dict(type='CosineAnnealingLR', eta_min_ratio=min_lr / lr, by_epoch=True, begin=warmup_epochs,
         end=max_epochs, convert_to_iter_based=True),
]
train_cfg = dict(by_epoch=True, max_epochs=max_epochs, val_interval=1)
auto_scale_lr = dict(base_batch_size=1024)

default_hooks = dict(checkpoint=dict(type='CheckpointHook', interval=1, max_keep_ckpts=3, save_best='auto'))
# NonFiniteLossHook: at a NaN/Inf loss roll back to the last checkpoint and continue, at most 3 times, then stop
# naming the iteration (the official loop stops at the first); ReseedHook: a run resumed from an epoch
# checkpoint draws the same crops, augmentations and mixes as an uninterrupted one
custom_hooks = [dict(type='NonFiniteLossHook'), dict(type='ReseedHook')]
randomness = dict(seed=0, diff_rank_seed=True)
