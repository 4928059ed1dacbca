# ConvMAE-Base pretraining with MR-MAE-style feature mimicking ("Mimic before Reconstruct", MR-MCMAE / ConvMAE-v2,
# arXiv 2303.05475) on ImageNet-1k: the 25% visible encoder tokens mimic the features of two frozen teachers, CLIP
# ViT-B/16 and DINO ViT-B/16 (timm), while the decoder reconstructs the 75% masked patches as in the ConvMAE recipe
# this inherits (mask ratio 0.75, norm-pix MSE, AdamW, 8 GPUs x 128 images, 40 warm-up epochs). The paper reports
# 85.7 ImageNet fine-tuning for ConvMAE-v2-B after 200 epochs; its training code was never published.
#
# Ours, not the paper's (it does not publish them): the teachers' layer (their last block after the final norm,
# timm's forward_features), one linear projection head per teacher on the visible stage-3 tokens the decoder
# receives, per-token LayerNorm of the teacher features, per-token MSE, weight 1 per teacher, and the schedule
# beyond the epoch count (the ConvMAE recipe's). See convmae_backbone/models/mimic.py for every setting.
#
#   python tools/pretrain.py configs/pretrain/mr-convmae-b_8xb128-200e_in1k.py \
#       --cfg-options train_dataloader.dataset.data_root=/data/imagenet
#   bash tools/dist_pretrain.sh configs/pretrain/mr-convmae-b_8xb128-200e_in1k.py 8
#
# The teachers' weights come from timm's hub on first use (pretrained=True) and are never saved in checkpoints:
# every run and every --resume builds them again from these names. Each teacher reads the unmasked image under its
# own normalisation (timm's pretrained_cfg mean/std: OpenAI CLIP's for CLIP, ImageNet's for DINO).
_base_ = ['./convmae-b_8xb128-1600e_in1k.py']

model = dict(
    mimic=dict(teachers=dict(
        clip=dict(timm='vit_base_patch16_clip_224.openai', pretrained=True),
        dino=dict(timm='vit_base_patch16_224.dino', pretrained=True),
    )))

train_cfg = dict(max_epochs=200)
