# Fast ConvMAE-Base pretraining on ImageNet-1k, the official recipe (Alpha-VL/FastConvMAE, PRETRAIN.md and
# main_pretrain.py): complementary masking (every image encoded under 4 disjoint 25% views in one step), 50 epochs,
# 8 GPUs x 64 images, mask ratio 0.75, normalised-pixel MSE, AdamW (0.9, 0.95), wd 0.05, blr 6e-4 scaled by the
# total batch (lr = 6e-4 * 512 / 256 = 1.2e-3), 10 warm-up epochs then cosine decay to 0. The official README
# reports 84.4 ImageNet fine-tuning and 51.0 box AP after these 50 epochs (266 GPU-hours).
#
#   python tools/pretrain.py configs/pretrain/fastconvmae-b_8xb64-50e_in1k.py \
#       --cfg-options train_dataloader.dataset.data_root=/data/imagenet
#   bash tools/dist_pretrain.sh configs/pretrain/fastconvmae-b_8xb64-50e_in1k.py 8
#
# Deliberate differences from the official code (one line each):
# - masks are drawn in the data pipeline from each sample's seed (the same on any number of GPUs); officially in the model, per process.
# - stages 1-2 run on the visible blocks of the 4 views (sparse layout, same values); officially densely, with 4 masked depthwise convolutions per block.
# - grids whose token count 4 does not divide leave the remainder masked in every view; the official code (224 only) gives it to the last view.
# - fp32 unless --amp (bf16 where supported, else fp16 with loss scaling); officially always fp16 autocast with a loss scaler.
# - warm-up starts at 1e-4 of the lr and reaches it one iteration early (mmengine's LinearLR); officially from 0.
# - the official main_pretrain.py builds `models_mae.__dict__[args.model]` (a name it never imports); this builds the model it names.
_base_ = ['./convmae-b_8xb128-1600e_in1k.py']

mask_ratio = 0.75  # only 0.75 is supported officially (4 views); any 1 / (1 - r) that is a whole number works here
masking = 'complementary'

model = dict(masking=masking, mask_ratio=mask_ratio)

train_pipeline = [
    dict(type='LoadRGBImage'),
    dict(type='MAERandomResizedCrop', size={{_base_.img_size}}, scale=(0.2, 1.0), interpolation='bicubic'),
    dict(type='MAERandomFlip', prob=0.5),
    # the sample's 4 complementary masks, (4, L), from its seed like the crop and flip
    dict(type='RandomBlockMask', input_size={{_base_.img_size}}, patch_size=16, mask_ratio=mask_ratio,
         masking=masking),
    dict(type='PackMAEInputs'),
]
train_dataloader = dict(batch_size=64, dataset=dict(pipeline=train_pipeline))  # per GPU, 8 GPUs

optim_wrapper = dict(
    optimizer=dict(lr=6.0e-4 * 512 / 256),
    # timm's add_weight_decay as officially: no decay on 1-D parameters and biases; the mask token is decayed
    paramwise_cfg=dict(custom_keys={'mask_token': dict(decay_mult=1.0)}))
auto_scale_lr = dict(enable=False, base_batch_size=512)

param_scheduler = [
    dict(type='LinearLR', start_factor=1e-4, by_epoch=True, begin=0, end=10, convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=0.0, by_epoch=True, begin=10, convert_to_iter_based=True),
]
train_cfg = dict(max_epochs=50)
