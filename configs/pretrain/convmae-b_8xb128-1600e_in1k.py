# ConvMAE-Base masked-autoencoder pretraining on ImageNet-1k, the paper recipe (MCMAE, NeurIPS 2022):
# 1600 epochs, 8 GPUs x 128 images, mask ratio 0.75, normalised-pixel MSE loss, AdamW (0.9, 0.95), wd 0.05,
# 40 warm-up epochs then cosine decay.
#
# Learning rate: blr 1.5e-4 scaled linearly by the total batch, lr = 1.5e-4 * 1024 / 256 = 6e-4 for
# 8 x 128. With another total batch either set optim_wrapper.optimizer.lr yourself or pass --auto-scale-lr to
# tools/pretrain.py (mmengine's auto_scale_lr rescales lr by real_batch / 1024).
#
#   python tools/pretrain.py configs/pretrain/convmae-b_8xb128-1600e_in1k.py \
#       --cfg-options train_dataloader.dataset.data_root=/data/imagenet
#   bash tools/dist_pretrain.sh configs/pretrain/convmae-b_8xb128-1600e_in1k.py 8
#
# The schedulers leave `end` unset, so they follow train_cfg.max_epochs (which must exceed the 40 warm-up
# epochs).
#
# Reliability: checkpoints are written atomically (AtomicCheckpointHook); a NaN/Inf loss rolls the run back to
# the last good checkpoint and it continues (at most 3 times, then it stops; the official code stops), and no
# checkpoint with non-finite weights is written (NonFiniteLossHook); `--resume` continues from the last epoch
# checkpoint with the same crops, flips and masks as an uninterrupted run (SeededSampler + RandomBlockMask;
# mmengine resumes at epoch boundaries, so keep checkpoints by epoch). `--amp`: bf16 autocast where the device
# has it (CPU, Ampere+ GPUs), else fp16 with dynamic loss scaling (convmae_backbone.engine.amp).
data_root = 'data/imagenet/'  # train/<class>/*.JPEG, or any (flat or nested) folder of images
img_size = 224
mask_ratio = 0.75  # the model's and the pipeline's (RandomBlockMask draws each sample's mask)

model = dict(
    type='ConvMAEPretrainer',
    img_size=img_size,
    arch='base',  # ConvMAE-Base: dims 256/384/768, depths 2/2/11, 12 heads (convmae_backbone/models/arch.py)
    drop_path_rate=0.0,
    decoder_embed_dim=512,
    decoder_depth=8,
    decoder_num_heads=16,
    mask_ratio=mask_ratio,
    norm_pix_loss=True,
    loss_type='mse',
    data_preprocessor=dict(
        type='ImgDataPreprocessor',  # ImageNet mean/std on RGB uint8 inputs
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        bgr_to_rgb=False))

train_pipeline = [
    # RandomResizedCrop(224, scale (0.2, 1), bicubic) as the official code, but decoding only what the crop needs
    # (JPEG DCT scaling when the crop is >= 2x the output; libjpeg-turbo via simplejpeg) and resizing uint8 with
    # torch's antialiased bicubic (PIL's filter), not PIL's: same crop distribution, pixels within ~1 level
    # (tests/test_input_pipeline.py). Any image mode -> 8-bit RGB; unreadable files are skipped with a warning.
    # `dict(type='LoadRGBImage'), dict(type='MAERandomResizedCrop', ...)` is the official-style pipeline.
    dict(type='DecodeRandomResizedCrop', size=img_size, scale=(0.2, 1.0), interpolation='bicubic'),
    dict(type='MAERandomFlip', prob=0.5),
    # the sample's mask, from its seed like the crop and flip: the same on any number of processes/workers
    # (the official code draws masks per process in the model)
    dict(type='RandomBlockMask', input_size=img_size, patch_size=16, mask_ratio=mask_ratio),
    dict(type='PackMAEInputs'),
]
train_dataloader = dict(
    batch_size=128,  # per GPU
    num_workers=8,
    persistent_workers=True,
    pin_memory=True,
    drop_last=True,
    sampler=dict(type='SeededSampler', shuffle=True),  # DefaultSampler + per-sample augmentation seeds
    # default_collate + the masks stacked: a batch crosses from a loader worker as two tensors, not 2 per sample
    collate_fn=dict(type='mae_collate'),
    dataset=dict(type='ImageFolderDataset', data_root=data_root, subdir='train', pipeline=train_pipeline))

optim_wrapper = dict(
    type='OptimWrapper',
    # fused=True: torch's single-kernel AdamW (CPU and CUDA, torch >= 2.4), faster than the per-parameter loop
    # and the same update up to rounding
    optimizer=dict(type='AdamW', lr=1.5e-4 * 1024 / 256, betas=(0.9, 0.95), weight_decay=0.05, fused=True),
    # ZeRO-1 (each DDP process keeps the AdamW state of 1/N of the parameters; same updates, same param groups
    # and layer decay), with tools/dist_pretrain.sh:
    #   --cfg-options optim_wrapper.optimizer.type=ZeroRedundancyOptimizer optim_wrapper.optimizer.optimizer_type=AdamW
    # checkpoints hold the full (gathered) optimizer state: --resume and the NaN rollback work with any number
    # of processes (tests/test_zero.py)
    # as in MAE: no weight decay on norms, biases (all 1-D parameters), position embeddings and the mask token
    paramwise_cfg=dict(
        flat_decay_mult=0.0,
        norm_decay_mult=0.0,
        bias_decay_mult=0.0,
        custom_keys={'pos_embed': dict(decay_mult=0.0), 'mask_token': dict(decay_mult=0.0)}))
auto_scale_lr = dict(enable=False, base_batch_size=1024)

param_scheduler = [
    dict(type='LinearLR', start_factor=1e-4, by_epoch=True, begin=0, end=40, convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=0.0, by_epoch=True, begin=40, convert_to_iter_based=True),
]
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=1600)

default_scope = 'mmengine'
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=100),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='AtomicCheckpointHook', interval=20, max_keep_ckpts=3),
    sampler_seed=dict(type='DistSamplerSeedHook'),
)
custom_hooks = [
    dict(type='NonFiniteLossHook', max_rollbacks=3),
    dict(type='ReseedHook'),
    dict(type='PlainParamGroupsHook'),  # lets `--cfg-options compile=True` (torch.compile) trace the optimizer
]
# Online k-NN monitor (off here): every 20 epochs, weighted k-NN (k 20, T 0.07) of the encoder's pooled features
# on a labelled folder <root>/{train,val}/<class>/*, logged as knn/top1 and knn/top5 (convmae_backbone/engine/knn.py).
# Every image of both splits is embedded each time: use a subset of ImageNet (a few dozen images per class).
# custom_hooks.append(dict(type='KNNMonitorHook', data_root='data/imagenet_knn', interval=20))

env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='nccl'))
log_processor = dict(window_size=10, by_epoch=True)
log_level = 'INFO'
load_from = None
resume = False
randomness = dict(seed=0, deterministic=False)
