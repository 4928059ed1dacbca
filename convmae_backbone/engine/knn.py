"""Online k-NN monitor of the representation during pretraining.

:class:`KNNMonitorHook` takes a labelled image folder (ImageNet layout: ``<root>/<split>/<class>/<image>``),
embeds the ``train`` split (the memory bank) and the ``val`` split (the queries) with the encoder's unmasked
path (stage-3 map of ``forward_features``, mean-pooled, L2-normalised) and classifies every query by weighted
k-NN voting as DINO does (k = 20, temperature 0.07)::

    custom_hooks = [dict(type='KNNMonitorHook', data_root='data/imagenet_knn', interval=10)]

It logs ``knn/top1`` and ``knn/top5`` (percent) to the log and to the visualizer (``vis_data/scalars.json``,
with ``step`` = the number of finished epochs, 0 before training). :func:`plot_knn_curve` draws them.
Under DDP every rank embeds its share of the images and the features are gathered from all ranks.

The monitor never costs a run: it runs after the epoch's checkpoint is written (priority ``LOWEST``, after
``CheckpointHook``'s ``VERY_LOW``), an unreadable image is skipped with a warning naming it, and any other failure
is logged as an error and the run goes on. Under DDP the ranks first agree (an all-reduced flag) that every one
of them embedded its share before any features are gathered, so a rank that failed never leaves the others
waiting in ``all_gather``.
"""
import json
import logging
import os
import os.path as osp
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from mmengine.dist import all_gather, all_reduce, get_dist_info
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from ..datasets import list_images, to_rgb8
from ..registry import register

KNN_KEYS = ('knn/top1', 'knn/top5')


def list_labelled_images(folder: str) -> Tuple[List[str], List[int], List[str]]:
    """Images of ``folder/<class>/...`` (recursive below each class folder): (paths, labels, class names).

    Classes are the sub-folders in sorted order. Raises ``FileNotFoundError`` naming the folder when it is
    missing, has no class sub-folders or no images.
    """
    if not osp.isdir(folder):
        raise FileNotFoundError(f'k-NN image folder {folder!r} does not exist (expected <root>/<split>/<class>/*)')
    classes = sorted(d for d in os.listdir(folder) if osp.isdir(osp.join(folder, d)))
    if not classes:
        raise FileNotFoundError(f'k-NN image folder {folder!r} has no class sub-folders (expected <class>/*.jpg)')
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = list_images(osp.join(folder, name))
        paths.extend(files)
        labels.extend([label] * len(files))
    if not paths:
        raise FileNotFoundError(f'k-NN image folder {folder!r} holds no images in its class sub-folders')
    return paths, labels, classes


def load_eval_image(path: str, size: int) -> Tensor:
    """Evaluation view of an image: shorter side resized to ``size`` (bicubic), centre crop ``size`` x ``size``;
    uint8 tensor (3, size, size), RGB."""
    with Image.open(path) as img:
        img = to_rgb8(img)
        img = TF.center_crop(TF.resize(img, size, InterpolationMode.BICUBIC), [size, size])
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def knn_scores(bank: Tensor, bank_labels: Tensor, queries: Tensor, num_classes: int, k: int = 20,
               temperature: float = 0.07, chunk: int = 1024) -> Tensor:
    """Weighted k-NN class scores (DINO's formula).

    ``bank`` (N, D) and ``queries`` (M, D) are L2-normalised features, ``bank_labels`` (N,) int. Each query's
    k most cosine-similar bank entries vote for their class with weight ``exp(similarity / temperature)``.
    Returns (M, num_classes) summed votes. ``k`` is capped at N.
    """
    if bank.shape[0] != bank_labels.shape[0]:
        raise ValueError(f'{bank.shape[0]} bank features but {bank_labels.shape[0]} labels')
    k = min(k, bank.shape[0])
    scores = []
    for start in range(0, queries.shape[0], chunk):
        sim = queries[start:start + chunk] @ bank.t()  # (m, N)
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = F.one_hot(bank_labels[top_idx], num_classes).to(weights.dtype) * weights.unsqueeze(-1)
        scores.append(votes.sum(dim=1))
    return torch.cat(scores) if scores else queries.new_zeros(0, num_classes)


def topk_accuracy(scores: Tensor, labels: Tensor, topk: Sequence[int] = (1, 5)) -> Dict[int, float]:
    """Percentage of rows of ``scores`` (M, C) whose true class is among the k highest, for each k (capped at C)."""
    out = {}
    for k in topk:
        pred = scores.topk(min(k, scores.shape[1]), dim=1).indices
        out[k] = 100.0 * (pred == labels.unsqueeze(1)).any(dim=1).double().mean().item()
    return out


def normalise(model: nn.Module, images: Tensor) -> Tensor:
    """uint8 RGB images (B, 3, H, W) -> float, normalised with the mean and std (RGB order, as in every config
    here) of ``model.data_preprocessor``; its channel conversion, meant for BGR-loading pipelines, is not
    applied."""
    pre = getattr(model, 'data_preprocessor', None)
    x = images.float()
    if getattr(pre, '_enable_normalize', False):
        x = (x - pre.mean.to(x.device)) / pre.std.to(x.device)
    return x


def encoder_features(encoder: nn.Module, images: Tensor) -> Tensor:
    """L2-normalised mean of the unmasked stage-3 map: (B, 3, H, W), H and W multiples of 16 -> (B, C3)."""
    s3 = encoder.forward_features(images)[2]
    return F.normalize(s3.mean(dim=(2, 3)), dim=1)


def gather_rows(local: Tensor, local_index: Tensor, total: int) -> Tuple[Tensor, Tensor]:
    """Rows of all ranks in dataset order: rank r holds rows ``local_index`` (n_r, D) of a (total, D) table.

    Returns (table (total, D), present (total,) bool): rows no rank holds (e.g. unreadable images) are zero
    and not present. Works for any split whose shards differ in size (padded to the largest before
    ``mmengine.dist.all_gather``); in a single process it only reorders. A row held twice is an error.
    """
    counts = all_gather(torch.tensor([local.shape[0]], device=local.device))
    width = int(max(c.item() for c in counts))
    pad = width - local.shape[0]
    feats = all_gather(torch.cat([local, local.new_zeros(pad, local.shape[1])]))
    index = all_gather(torch.cat([local_index.to(local.device), local_index.new_full((pad,), -1).to(local.device)]))
    feats, index = torch.cat(feats), torch.cat(index)
    keep = index >= 0
    out = local.new_zeros(total, local.shape[1])
    out[index[keep]] = feats[keep]
    present = torch.zeros(total, dtype=torch.bool, device=local.device)
    present[index[keep]] = True
    if int(present.sum()) != int(keep.sum()):
        raise RuntimeError(f'gathered {int(keep.sum())} rows for {int(present.sum())} images: the ranks\' shards '
                           'overlap')
    return out, present


def gather_features(local: Tensor, local_index: Tensor, total: int) -> Tensor:
    """:func:`gather_rows` where the ranks' shards must cover the dataset exactly once: the (total, D) table."""
    out, present = gather_rows(local, local_index, total)
    if not present.all():
        raise RuntimeError(f'gathered {int(present.sum())} features for {total} images: the ranks\' shards do not '
                           'cover the dataset exactly once')
    return out


def raise_on_any_rank(error: Optional[Exception], what: str) -> None:
    """Raise ``error`` on the rank that had it and a ``RuntimeError`` naming ``what`` on every other rank when
    any rank had one (an all-reduced flag; every rank must call this); return on all ranks when none had."""
    failed = torch.tensor([float(error is not None)])
    all_reduce(failed, op='max')
    if error is not None:
        raise error
    if failed.item():
        raise RuntimeError(f'{what} failed on another process (see its log)')


@register('HOOKS')
class KNNMonitorHook(Hook):
    """Weighted k-NN accuracy of the encoder's features on a labelled image folder, every ``interval`` epochs.

    Args:
        data_root: folder holding ``train_split`` and ``val_split`` sub-folders of ``<class>/<image>``; None:
            the data root of the runner's ``train_dataloader`` (its ``val`` split is not used by pretraining).
        interval: evaluate after every ``interval``-th training epoch and after the last one.
        k, temperature: DINO's weighted k-NN (20, 0.07).
        img_size: evaluation size (shorter side resized, centre crop); default: the model's pretraining size.
        batch_size: images per forward pass.
        at_start: also evaluate before the first epoch (step 0: the initialisation).
        train_split, val_split: sub-folder names of the memory bank and the queries.

    The encoder is the runner's model (unwrapped from DDP) or its ``.backbone``: anything with ConvViT's
    ``forward_features``; images are normalised with the mean and std of the model's ``data_preprocessor``.
    Unreadable images are left out (a warning names each); :meth:`evaluate` raises on other failures, the hook's
    calls of it log them (``ERROR``) and return, the run continues.
    """

    priority = 'LOWEST'  # after CheckpointHook ('VERY_LOW'): the epoch's checkpoint is written first

    def __init__(self, data_root: Optional[str] = None, interval: int = 1, k: int = 20, temperature: float = 0.07,
                 img_size: Optional[int] = None, batch_size: int = 64, at_start: bool = True,
                 train_split: str = 'train', val_split: str = 'val'):
        if interval < 1:
            raise ValueError(f'interval must be >= 1, got {interval}')
        if k < 1 or temperature <= 0:
            raise ValueError(f'k must be >= 1 and temperature > 0, got k={k}, temperature={temperature}')
        self.data_root, self.interval, self.k, self.temperature = data_root, interval, k, temperature
        self.img_size, self.batch_size, self.at_start = img_size, batch_size, at_start
        self.splits = (train_split, val_split)
        self._data = None

    def _load_splits(self, runner) -> None:
        if self.data_root is None:
            self.data_root = runner.cfg.get('train_dataloader', {}).get('dataset', {}).get('data_root')
            if not self.data_root:
                raise ValueError('KNNMonitorHook: set data_root (the runner\'s train_dataloader has no data_root)')
        bank = list_labelled_images(osp.join(self.data_root, self.splits[0]))
        queries = list_labelled_images(osp.join(self.data_root, self.splits[1]))
        if bank[2] != queries[2]:
            raise ValueError(f'k-NN splits of {self.data_root!r} have different classes: {self.splits[0]} has '
                             f'{bank[2]}, {self.splits[1]} has {queries[2]}')
        self._data = (bank, queries)

    def _encoder(self, runner) -> Tuple[nn.Module, nn.Module]:
        """(model unwrapped from DDP, its encoder)."""
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        encoder = model if hasattr(model, 'forward_features') else getattr(model, 'backbone', None)
        if encoder is None or not hasattr(encoder, 'forward_features'):
            raise TypeError(f'KNNMonitorHook needs a ConvViT encoder (forward_features), got {type(model).__name__}')
        return model, encoder

    def _embed_local(self, model: nn.Module, encoder: nn.Module, paths: List[str],
                     size: int) -> Tuple[Tensor, Tensor]:
        """This rank's share of ``paths`` (every world-th image): (features (n, C3), their indices (n,)); images
        that cannot be read are left out with a warning naming the file."""
        rank, world = get_dist_info()
        device = next(encoder.parameters()).device
        feats, loaded = [], []
        share = list(range(rank, len(paths), world))
        for start in range(0, len(share), self.batch_size):
            batch = []
            for i in share[start:start + self.batch_size]:
                try:
                    batch.append(load_eval_image(paths[i], size))
                except Exception as exc:  # noqa: BLE001 - any decoding failure means: leave this image out
                    print_log(f'k-NN monitor: skipped unreadable image {paths[i]!r} ({type(exc).__name__}: {exc})',
                              logger='current', level=logging.WARNING)
                    continue
                loaded.append(i)
            if batch:
                images = normalise(model, torch.stack(batch).to(device))
                feats.append(encoder_features(encoder, images).float())
        local = torch.cat(feats) if feats else torch.zeros(0, encoder.embed_dims[2], device=device)
        return local, torch.tensor(loaded, dtype=torch.long)

    def _embed(self, model: nn.Module, encoder: nn.Module, paths: List[str],
               size: int) -> Tuple[Tensor, Tensor]:
        """(features (len(paths), C3), readable (len(paths),) bool) of every image, embedded by all ranks."""
        local, index = self._embed_local(model, encoder, paths, size)
        return gather_rows(local, index, len(paths))

    @torch.no_grad()
    def evaluate(self, runner, step: int) -> Dict[str, float]:
        """Embed both splits, classify the queries; log (at ``step``, the number of finished epochs) and return
        ``{'knn/top1': %, 'knn/top5': %}``.

        Each rank embeds its share; then all ranks agree whether every one succeeded before the features are
        gathered (all collectives are reached by all ranks or by none), and raise together if one did not."""
        error, local = None, None
        try:
            if self._data is None:
                self._load_splits(runner)
            model, encoder = self._encoder(runner)
            size = self.img_size or int(encoder.pos_grid[0] * 16)
            if size % 16:
                raise ValueError(f'KNNMonitorHook img_size must be a multiple of 16, got {size}')
            was_training = model.training
            model.eval()
            try:
                local = [self._embed_local(model, encoder, split[0], size) for split in self._data]
            finally:
                model.train(was_training)
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the other ranks know
            error = exc
        raise_on_any_rank(error, 'k-NN evaluation')
        (_, bank_labels, classes), (_, query_labels, _) = self._data
        (bank, bank_ok), (queries, query_ok) = (gather_rows(*feats, len(split[0]))
                                                for feats, split in zip(local, self._data))
        if not bank_ok.any() or not query_ok.any():
            split = self.splits[0] if not bank_ok.any() else self.splits[1]
            raise RuntimeError(f'no readable image in the {split!r} split of {self.data_root!r}')
        bank_labels = torch.tensor(bank_labels, device=bank.device)[bank_ok]
        scores = knn_scores(bank[bank_ok], bank_labels, queries[query_ok], len(classes), self.k, self.temperature)
        acc = topk_accuracy(scores, torch.tensor(query_labels, device=scores.device)[query_ok])
        result = {KNN_KEYS[0]: acc[1], KNN_KEYS[1]: acc[5]}
        for key, value in result.items():
            runner.message_hub.update_scalar(key, value)
        runner.visualizer.add_scalars(result, step=step)
        skipped = int((~bank_ok).sum()) + int((~query_ok).sum())
        print_log(f'k-NN (k={self.k}, T={self.temperature}) after epoch {step}: top-1 {acc[1]:.2f}%, '
                  f'top-5 {acc[5]:.2f}% ({int(query_ok.sum())} queries, {int(bank_ok.sum())} in the bank, '
                  f'{len(classes)} classes{f", {skipped} unreadable images left out" if skipped else ""})',
                  logger='current')
        return result

    def _evaluate_logged(self, runner, step: int) -> Optional[Dict[str, float]]:
        """:meth:`evaluate`; a failure is logged (ERROR) and None returned: the monitor never ends a run."""
        try:
            return self.evaluate(runner, step)
        except Exception as exc:  # noqa: BLE001 - the monitor must not cost the run
            print_log(f'k-NN monitor failed after epoch {step} ({type(exc).__name__}: {exc}); training goes on',
                      logger='current', level=logging.ERROR)
            return None

    def before_train(self, runner) -> None:
        error = None
        try:  # a wrong folder fails at the start (nothing trained yet), on every rank alike, not after an epoch
            if self._data is None:
                self._load_splits(runner)
        except Exception as exc:  # noqa: BLE001 - re-raised by raise_on_any_rank
            error = exc
        raise_on_any_rank(error, 'KNNMonitorHook: reading the k-NN folder')
        if self.at_start and runner.epoch == 0:
            self._evaluate_logged(runner, step=0)

    def after_train_epoch(self, runner) -> None:
        if self.every_n_epochs(runner, self.interval) or self.is_last_train_epoch(runner):
            self._evaluate_logged(runner, step=runner.epoch + 1)  # runner.epoch counts from 0 until this returns


def read_knn_curve(scalars_json: str, key: str = KNN_KEYS[0]) -> Tuple[List[int], List[float]]:
    """(epochs, values) of ``key`` from an mmengine ``vis_data/scalars.json`` (one JSON object per line)."""
    epochs, values = [], []
    with open(scalars_json) as f:
        for line in f:
            entry = json.loads(line)
            if key in entry:
                epochs.append(int(entry['step']))
                values.append(float(entry[key]))
    if not epochs:
        hook = 'KNNMonitorHook' if key in KNN_KEYS else 'the hook that logs it'
        raise ValueError(f'{scalars_json} holds no {key!r} entries (was {hook} in custom_hooks?)')
    return epochs, values


def plot_knn_curve(scalars_json: str, out_png: str, title: str = 'k-NN accuracy during pretraining') -> str:
    """Draw k-NN top-1 (and top-5 where logged) against the epoch as a PNG; returns ``out_png``."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key in KNN_KEYS:
        try:
            epochs, values = read_knn_curve(scalars_json, key)
        except ValueError:
            if key == KNN_KEYS[0]:
                raise
            continue
        ax.plot(epochs, values, marker='o', label=key.split('/')[1])
    ax.set_xlabel('epoch')
    ax.set_ylabel('k-NN accuracy (%)')
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(osp.dirname(osp.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    print_log(f'k-NN curve written to {out_png}', logger='current', level=logging.INFO)
    return out_png
