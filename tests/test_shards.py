"""Tar shards: written from an image folder, read back as the same samples with the same crops, flips and masks
for the same seed, in 1 process and split over 2 (gloo), through local paths and over http (mmengine's
HTTPBackend, from a server on 127.0.0.1)."""
import os
import re
import tarfile
import textwrap

import pytest
import torch
from mmengine.config import Config
from mmengine.dataset import pseudo_collate
from mmengine.registry import DATA_SAMPLERS, DATASETS

import convmae_backbone  # noqa: F401  (registers the datasets and transforms)
from convmae_backbone.datasets import expand_shards, write_shards
from convmae_backbone.datasets.shards import ShardError, ShardNotFoundError, TarShardDataset
from convmae_backbone.datasets.samplers import seeded_rngs
from helpers import ROOT, make_images, serve_folder

PIPELINE = [dict(type='DecodeRandomResizedCrop', size=32, scale=(0.2, 1.0)), dict(type='MAERandomFlip', prob=0.5),
            dict(type='RandomBlockMask', input_size=32, patch_size=16, mask_ratio=0.75), dict(type='PackMAEInputs')]


def folder_cfg(root) -> dict:
    return dict(type='ImageFolderDataset', data_root=str(root), pipeline=PIPELINE)


def shards_cfg(shards, **kwargs) -> dict:
    return dict(type='TarShardDataset', shards=shards, pipeline=PIPELINE, **kwargs)


def samples(dataset, epoch: int = 0, num_workers: int = 0) -> dict:
    """{index: (inputs, mask)} of what this process loads in ``epoch`` with SeededSampler (rank and world size
    from the process group, if any) through a DataLoader with ``num_workers`` workers."""
    sampler = DATA_SAMPLERS.build(dict(type='SeededSampler', shuffle=True, seed=5), default_args=dict(dataset=dataset))
    sampler.set_epoch(epoch)
    keys = list(sampler)
    loader = torch.utils.data.DataLoader(dataset, sampler=keys, batch_size=2, num_workers=num_workers,
                                         collate_fn=pseudo_collate)
    items = [item for batch in loader for item in zip(batch['inputs'], batch['data_samples'])]
    return {key[0]: (inputs, sample.mask) for key, (inputs, sample) in zip(keys, items)}


def _rank_worker(rank: int, world: int, init_file: str, cfgs: dict, out_dir: str) -> None:
    torch.distributed.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    for name, cfg in cfgs.items():
        torch.save({epoch: samples(DATASETS.build(cfg), epoch) for epoch in (0, 1)},
                   os.path.join(out_dir, f'{name}_{rank}.pt'))
    torch.distributed.destroy_process_group()


def test_expand_shards():
    assert expand_shards('s3://b/train-{000..002}.tar') == [f's3://b/train-{k:03d}.tar' for k in range(3)]
    assert expand_shards('a{8..10}b{0..1}') == ['a8b0', 'a8b1', 'a9b0', 'a9b1', 'a10b0', 'a10b1']
    assert expand_shards(['x.tar', 'y.tar']) == ['x.tar', 'y.tar']


def test_shards_give_the_folder_samples_crops_and_masks(tmp_path):
    """Same images as the folder in the same order, and per (seed, epoch, index) the same crop, flip and mask
    in 1 process (2 loader workers) and split over 2 processes (gloo); shards over http (a real server on
    127.0.0.1, mmengine's HTTPBackend, copied once into the cache) give the same samples."""
    root = make_images(tmp_path / 'data', n=7)
    shards = write_shards(str(root / 'train'), str(tmp_path / 'shards'), samples_per_shard=3)
    assert [os.path.basename(s) for s in shards] == ['shard-000000.tar', 'shard-000001.tar', 'shard-000002.tar']
    with tarfile.open(shards[1]) as tar:
        assert tar.getnames() == ['000000003.jpg', '000000003.path', '000000004.jpg', '000000004.path',
                                  '000000005.jpg', '000000005.path']
    folder = DATASETS.build(folder_cfg(root))
    ref = {epoch: samples(folder, epoch) for epoch in (0, 1)}
    assert sorted(ref[0]) == list(range(7))
    assert not torch.equal(ref[0][0][0], ref[1][0][0])  # new crops every epoch
    with serve_folder(tmp_path / 'shards') as url:
        cfgs = dict(local=shards_cfg(str(tmp_path / 'shards' / 'shard-{000000..000002}.tar')),
                    http=shards_cfg(f'{url}/shard-{{000000..000002}}.tar', cache_dir=str(tmp_path / 'cache')))
        torch.multiprocessing.spawn(_rank_worker, args=(2, str(tmp_path / 'init'), cfgs, str(tmp_path)), nprocs=2)
    assert len(os.listdir(tmp_path / 'cache')) == 3  # read from the cache from now on: the server is gone
    for name, cfg in cfgs.items():
        dataset = DATASETS.build(cfg)
        assert len(dataset) == 7 and dataset[0]['inputs'].shape == (3, 32, 32)
        ranks = [torch.load(tmp_path / f'{name}_{rank}.pt') for rank in (0, 1)]
        for epoch in (0, 1):
            one = samples(dataset, epoch, num_workers=2)
            two = {**ranks[0][epoch], **ranks[1][epoch]}
            assert len(ranks[0][epoch]) == len(ranks[1][epoch]) == 4  # 7 samples padded to 2 x 4
            for got in (one, two):
                assert sorted(got) == list(range(7))
                for index, (inputs, mask) in ref[epoch].items():
                    assert torch.equal(got[index][0], inputs) and torch.equal(got[index][1], mask), (name, index)


def test_http_shards_that_fail_name_the_shard_and_stay_in_the_cache(tmp_path):
    """A missing http shard is a ShardNotFoundError naming it (mmengine's HTTPBackend has no ``exists``: the
    download itself tells); a URL ending in '..' is cached inside ``cache_dir`` under a hashed name."""
    write_shards(str(make_images(tmp_path / 'data', n=2) / 'train'), str(tmp_path / 'served' / 'a'))
    cache = tmp_path / 'cache'
    with serve_folder(tmp_path / 'served') as url:
        with pytest.raises(ShardNotFoundError, match=re.escape(f'{url}/missing.tar') + '.*HTTPError.*404'):
            DATASETS.build(shards_cfg(f'{url}/missing.tar', cache_dir=str(cache)))
        with pytest.raises(ShardError, match=re.escape(f'{url}/a/..')):  # the server's listing: not a tar
            DATASETS.build(shards_cfg(f'{url}/a/..', cache_dir=str(cache)))
        assert len(DATASETS.build(shards_cfg(f'{url}/a/shard-000000.tar', cache_dir=str(cache)))) == 2
    assert sorted(p.parent for p in tmp_path.rglob('*') if p.is_file() and 'served' not in p.parts
                  and 'data' not in p.parts) == [cache, cache]


def test_bad_shards_fail_naming_the_cause(tmp_path):
    with pytest.raises(ShardNotFoundError, match='missing.tar'):
        DATASETS.build(shards_cfg(str(tmp_path / 'missing.tar')))
    empty = tmp_path / 'empty.tar'
    with tarfile.open(empty, 'w'):
        pass
    with pytest.raises(ShardError, match='empty.tar.* holds no images'):
        DATASETS.build(shards_cfg(str(empty)))
    with pytest.raises(ValueError, match='at least one shard'):
        TarShardDataset(shards=[])


def test_readme_shard_config(tmp_path):
    """The README's shard config, with its shards replaced by written ones, builds the dataset."""
    block = next(b for b in re.findall(r'```python\n(.*?)```', (ROOT / 'README.md').read_text(), re.S)
                 if "type='TarShardDataset'" in b)
    write_shards(str(make_images(tmp_path / 'data', n=5) / 'train'), str(tmp_path / 'shards'), samples_per_shard=2)
    text = textwrap.dedent(block).replace("'configs/", repr(str(ROOT / 'configs') + '/')[:-1])
    text = re.sub(r"shards='[^']*'", f"shards={str(tmp_path / 'shards' / 'shard-{000000..000002}.tar')!r}", text)
    (tmp_path / 'cfg.py').write_text(text)
    dataset = DATASETS.build(Config.fromfile(str(tmp_path / 'cfg.py')).train_dataloader.dataset)
    with seeded_rngs(0):
        assert len(dataset) == 5 and dataset[(0, 1)]['inputs'].shape == (3, 224, 224)
