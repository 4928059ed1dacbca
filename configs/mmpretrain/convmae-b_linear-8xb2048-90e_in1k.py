# Linear probing of a pretrained ConvMAE-Base on ImageNet-1k, the official recipe (main_linprobe.py,
# util/lars.py): frozen encoder, its averaged stage-3 tokens through fc_norm (LayerNorm, frozen at its
# initialisation), then BatchNorm without affine (eps 1e-6) and a linear head (trunc-normal std 0.01); LARS
# (momentum 0.9, weight decay 0), lr = blr 0.1 x 16384 / 256, 90 epochs (10 warm-up, then cosine to 0),
# RandomResizedCrop 224 (bicubic) + flip; evaluation: shorter side 256 (bicubic), centre crop 224.
# FINETUNE.md passes --global_pool in its multi-node command (what is used here); without it the official code
# would take norm(tokens)[:, 0], the top-left patch token (ConvViT has no class token).
#
#   python tools/train.py configs/mmpretrain/convmae-b_linear-8xb2048-90e_in1k.py \
#       --cfg-options model.backbone.init_cfg.checkpoint=checkpoints/convmae-b_8xb128-1600e_in1k.pth
# FINETUNE.md's own commands run a total batch of 4096 (lr 1.6); pass --auto-scale-lr (batch / 16384) or set lr.
_base_ = [
    'mmpretrain::_base_/datasets/imagenet_bs32_pil_resize.py',
    'mmpretrain::_base_/default_runtime.py',
]
custom_imports = dict(imports=['convmae_backbone'], allow_failed_imports=False)

pretrained = 'checkpoints/convmae-b_8xb128-1600e_in1k.pth'  # ConvMAE-Base pretraining (official download or ours)
lr = 0.1 * 16384 / 256
max_epochs = 90
warmup_epochs = 10

data_preprocessor = dict(num_classes=1000)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    # official: util/crop.py's single-draw crop (clamped to the image); mmpretrain retries up to 10 draws
    dict(type='RandomResizedCrop', scale=224, backend='pillow', interpolation='bicubic'),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='ResizeEdge', scale=256, edge='short', backend='pillow', interpolation='bicubic'),
    dict(type='CenterCrop', crop_size=224),
    dict(type='PackInputs'),
]
train_dataloader = dict(batch_size=2048, drop_last=True, dataset=dict(pipeline=train_pipeline))  # per GPU
val_dataloader = dict(batch_size=256, drop_last=False, dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

model = dict(
    type='ImageClassifier',
    backbone=dict(
        type='ConvMAE',
        img_size=224,
        arch='base',  # ConvMAE-Base (convmae_backbone/models/arch.py)
        drop_path_rate=0.0,
        out_type='avg_featmap',
        frozen_stages=3,  # the whole encoder, fc_norm included
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(type='ClsBatchNormNeck', input_features=768, affine=False, eps=1e-6),
    head=dict(
        type='LinearClsHead',
        num_classes=1000,
        in_channels=768,
        loss=dict(type='CrossEntropyLoss'),
        init_cfg=[dict(type='TruncNormal', layer='Linear', std=0.01)]))

optim_wrapper = dict(
    type='AmpOptimWrapper',
    # mmpretrain's LARS scales the update by lr before its momentum buffer (util/lars.py: after), which
    # differs only while the lr changes; as there, biases skip the trust ratio
    optimizer=dict(type='LARS', lr=lr, momentum=0.9, weight_decay=0.0),
    paramwise_cfg=dict(custom_keys={'.bias': dict(lars_exclude=True)}))

param_scheduler = [
    # official: linear from 0; mmengine's LinearLR needs a positive start factor
    dict(type='LinearLR', start_factor=1e-4, by_epoch=True, begin=0, end=warmup_epochs,
         convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=0.0, by_epoch=True, begin=warmup_epochs, end=max_epochs,
         convert_to_iter_based=True),
]
train_cfg = dict(by_epoch=True, max_epochs=max_epochs, val_interval=1)
val_cfg = dict()
test_cfg = dict()
auto_scale_lr = dict(base_batch_size=16384)

default_hooks = dict(
    checkpoint=dict(type='CheckpointHook', interval=1, max_keep_ckpts=3, save_best='auto'),
    logger=dict(type='LoggerHook', interval=10))
# NonFiniteLossHook: at a NaN/Inf loss roll back to the last checkpoint and continue, at most 3 times, then stop
# naming the iteration (the official loop stops at the first); ReseedHook: a run resumed from an epoch
# checkpoint draws the same crops, augmentations and mixes as an uninterrupted one
custom_hooks = [dict(type='NonFiniteLossHook'), dict(type='ReseedHook')]
randomness = dict(seed=0, diff_rank_seed=True)
