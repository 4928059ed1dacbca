# A small ConvMAE pretrained for a few minutes on CPU on views of the photographs shipped with scikit-image
# (written by tools/demo.py, or convmae_backbone.testing.write_demo_images). Same recipe as the base config,
# scaled down: 128x128 inputs (8x8 patches of 16 px, 16 visible), tiny dims, higher lr, 12 epochs of 17
# iterations. The reconstruction monitor measures the masked-patch error (norm-pix MSE) on the held-out val/
# views under fixed masks, before training (the random init) and after every epoch.
_base_ = ['./convmae-b_8xb128-1600e_in1k.py']

data_root = 'demo_output/images/'
img_size = 128

model = dict(
    img_size=img_size,
    arch='demo',  # dims 32/64/128, depths 1/1/3, 4 heads (convmae_backbone/models/arch.py)
    decoder_embed_dim=96,
    decoder_depth=2,
    decoder_num_heads=4)

train_pipeline = [
    dict(type='DecodeRandomResizedCrop', size=img_size, scale=(0.2, 1.0), interpolation='bicubic'),
    dict(type='MAERandomFlip', prob=0.5),
    dict(type='RandomBlockMask', input_size=img_size, patch_size=16, mask_ratio={{_base_.mask_ratio}}),
    dict(type='PackMAEInputs'),
]
train_dataloader = dict(
    batch_size=32,
    num_workers=0,
    persistent_workers=False,
    pin_memory=False,
    dataset=dict(data_root=data_root, pipeline=train_pipeline))

optim_wrapper = dict(optimizer=dict(lr=2e-3))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=True, begin=0, end=1, convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=1e-5, by_epoch=True, begin=1, convert_to_iter_based=True),
]
train_cfg = dict(max_epochs=12)
default_hooks = dict(
    logger=dict(interval=5),
    checkpoint=dict(interval=4, max_keep_ckpts=1))
custom_hooks = [
    dict(type='NonFiniteLossHook', max_rollbacks=3),
    dict(type='ReseedHook'),
    dict(type='PlainParamGroupsHook'),
    dict(type='ReconstructionMonitorHook', interval=1),  # data_root: the training data root (val/ inside)
]
env_cfg = dict(dist_cfg=dict(backend='gloo'))
log_processor = dict(window_size=5)
