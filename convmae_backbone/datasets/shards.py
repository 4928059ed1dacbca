"""Pretraining images in webdataset-style tar shards: a few large files instead of a million small ones.

A shard is a plain tar file; a sample is the group of members sharing a key (the member name up to the first dot
of its base name, as in webdataset: ``000000123.jpg``, ``000000123.path``...), its image the member with an
image extension. :func:`write_shards` writes the images of a folder, in the order of
:class:`~.image_folder.ImageFolderDataset`, as such shards.

:class:`TarShardDataset` indexes the members of every shard once (tar headers only) and reads one sample by
offset: sample ``i`` is the ``i``-th image over the shards in the order given, so with :class:`~.samplers.SeededSampler`
its crop, flip and mask are drawn from (seed, epoch, i), whatever the world size, the number of workers or a
resume, and equal those of the image folder the shards were written from.

Shards are local paths or any location mmengine's file backends read (``backend_args``, e.g. ``s3://``,
``petrel://``, ``http(s)://``): those are copied once, atomically, into ``cache_dir`` (shared by the workers and
the processes of a node) and read locally from then on.

Damaged data never ends a run: a member whose data is not in the shard (a sparse member, one claiming more bytes
than the shard holds, one cut off by a truncated shard) is indexed like any other and skipped with a warning when
it is read, as an unreadable image is (:class:`~.transforms.SkipUnreadable`); a shard cut off or damaged after
some members keeps those, with a warning naming it. A shard that cannot be read at all (missing, not a tar file,
no image) raises :class:`ShardError` naming it when the dataset is built.
"""
import hashlib
import io
import logging
import os
import os.path as osp
import re
import tarfile
from typing import Dict, List, Optional, Sequence, Union

from mmengine import fileio
from mmengine.logging import print_log

from ..checkpoint import atomic_write
from ..registry import register
from .image_folder import IMG_EXTENSIONS, list_images
from .samplers import SeededDataset

_BRACES = re.compile(r'\{(\d+)\.\.(\d+)\}')


class ShardError(ValueError):
    """A shard that cannot be used (not a tar file, no image, could not be fetched); the message names it."""


class ShardNotFoundError(ShardError, FileNotFoundError):
    """A shard that does not exist; the message names it."""


class _BoundedFile(io.FileIO):
    """A file opened for reading whose reads never ask for more than what is left of it: ``tarfile`` reads a
    header's extension (pax data, GNU long names) in one call of the size the header claims, which Python
    allocates before reading (a 1 KB file claiming 10^12 bytes would raise ``MemoryError``)."""

    def __init__(self, path: str):
        super().__init__(path, 'rb')
        self.length = os.fstat(self.fileno()).st_size

    def read(self, size: Optional[int] = -1) -> bytes:
        if size is not None and size > 0:
            size = min(size, max(0, self.length - self.tell()))
        return super().read(size)


def expand_shards(shards: Union[str, Sequence[str]]) -> List[str]:
    """Shard locations: a list as given, or one string with brace ranges, e.g. ``train-{000000..000127}.tar``
    (zero-padded as written), expanded in order."""
    if not isinstance(shards, str):
        return [str(s) for s in shards]
    match = _BRACES.search(shards)
    if match is None:
        return [shards]
    first, last = match.group(1), match.group(2)
    head, tail = shards[:match.start()], shards[match.end():]
    return [p for k in range(int(first), int(last) + 1) for p in expand_shards(f'{head}{k:0{len(first)}d}{tail}')]


def sample_key(member: str) -> str:
    """The webdataset key of a tar member: its path up to the first dot of the base name."""
    folder, base = osp.split(member)
    return osp.join(folder, base.split('.', 1)[0])


def write_shards(image_dir: str, out_dir: str, samples_per_shard: int = 1000, prefix: str = 'shard') -> List[str]:
    """Write every image below ``image_dir`` (:func:`~.image_folder.list_images` order) into tar shards
    ``out_dir/{prefix}-000000.tar``... of ``samples_per_shard`` samples: sample ``i`` is ``{i:09d}.<ext>`` (the
    file's bytes, extension lower-cased) and ``{i:09d}.path`` (its path relative to ``image_dir``). Each shard is
    written atomically. Returns the shard paths."""
    files = list_images(image_dir)
    if not files:
        raise FileNotFoundError(f'image folder {image_dir!r} holds no images with extensions {IMG_EXTENSIONS}')
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for first in range(0, len(files), samples_per_shard):
        path = osp.join(out_dir, f'{prefix}-{first // samples_per_shard:06d}.tar')

        def write(f, chunk=files[first:first + samples_per_shard], first=first):
            with tarfile.open(fileobj=f, mode='w', format=tarfile.USTAR_FORMAT) as tar:
                for index, file in enumerate(chunk, first):
                    with open(file, 'rb') as src:
                        image = src.read()
                    ext = osp.splitext(file)[1].lower()
                    for name, data in ((f'{index:09d}{ext}', image),
                                       (f'{index:09d}.path', osp.relpath(file, image_dir).encode())):
                        info = tarfile.TarInfo(name)
                        info.size, info.mode = len(data), 0o644
                        tar.addfile(info, io.BytesIO(data))

        atomic_write(path, write)
        paths.append(path)
    return paths


@register('DATASETS')
class TarShardDataset(SeededDataset):
    """Every image of webdataset-style tar shards, in shard order then member order (labels are not used).

    Args:
        shards: shard locations (a list, or a string with ``{a..b}`` ranges, :func:`expand_shards`); relative
            ones are taken below ``data_root``.
        backend_args: mmengine file-backend arguments for remote shards.
        cache_dir: where remote shards are copied (default: ``~/.cache/convmae_backbone/shards``).
        pipeline: the transforms; they get ``img_bytes`` (the encoded image) and ``img_path``
            (``<shard>/<member>``, which names the sample in warnings).

    A missing shard raises :class:`ShardNotFoundError` (a ``FileNotFoundError``), a shard that is not a tar file or
    holds no image :class:`ShardError`, naming it, when the dataset is built.
    """

    def __init__(self, shards: Union[str, Sequence[str]], backend_args: Optional[dict] = None,
                 cache_dir: Optional[str] = None, data_root: str = '', pipeline: Sequence = (), **kwargs):
        self.shards = [s if osp.isabs(s) or '://' in s or not data_root else osp.join(data_root, s)
                       for s in expand_shards(shards)]
        if not self.shards:
            raise ShardError('TarShardDataset needs at least one shard')
        self.backend_args = backend_args
        self.cache_dir = cache_dir or osp.join(osp.expanduser('~'), '.cache', 'convmae_backbone', 'shards')
        self._fds: Dict[str, int] = {}
        self._pid = os.getpid()
        super().__init__(data_root=data_root, pipeline=list(pipeline), **kwargs)

    @property
    def source(self) -> str:
        return f'{len(self.shards)} shard(s) {self.shards[0]!r}...'

    def local_path(self, shard: str) -> str:
        """The shard's local path: itself when local, else its copy in ``cache_dir`` (made on first use)."""
        backend = fileio.get_file_backend(shard, backend_args=self.backend_args)
        if isinstance(backend, fileio.LocalBackend):
            if not osp.isfile(shard):
                raise ShardNotFoundError(f'shard {shard!r} does not exist')
            return shard
        name = hashlib.sha1(shard.encode()).hexdigest()[:16] + '-' + osp.basename(shard)
        cached = osp.join(self.cache_dir, name)  # the hash prefix keeps any base name ('..' too) inside cache_dir
        if not osp.isfile(cached):
            try:  # not every backend has ``exists`` (mmengine's HTTPBackend has not): a missing shard fails here
                data = backend.get(shard)
            except Exception as exc:  # noqa: BLE001 - each backend raises its own (HTTPError, botocore's...)
                missing = isinstance(exc, FileNotFoundError) or getattr(exc, 'code', None) == 404
                raise (ShardNotFoundError if missing else ShardError)(
                    f'shard {shard!r} could not be fetched: {type(exc).__name__}: {exc}') from None
            atomic_write(cached, lambda f: f.write(data))
        return cached

    def load_data_list(self) -> List[dict]:
        data_list = []
        for shard in self.shards:
            images = self._index(shard, self.local_path(shard))
            if not images:
                raise ShardError(f'shard {shard!r} holds no images with extensions {IMG_EXTENSIONS}')
            data_list.extend(images)
        print_log(f'TarShardDataset: {len(data_list)} images in {len(self.shards)} shard(s)', logger='current')
        return data_list

    @staticmethod
    def _index(shard: str, path: str) -> List[dict]:
        """The image members of one shard (tar headers only), ``img_error`` set on those whose data is not in the
        file (:meth:`get_data_info` hands that to the loading transform, which skips the sample with a warning)."""
        images = []
        try:
            with _BoundedFile(path) as file, tarfile.open(fileobj=file, mode='r:') as tar:
                for member in tar:
                    if not (member.isfile() and member.name.lower().endswith(IMG_EXTENSIONS)):
                        continue
                    error = None
                    if member.issparse():
                        error = 'a sparse tar member (its data is not stored in full)'
                    elif member.offset_data + member.size > file.length:
                        error = (f'its {member.size} bytes run past the end of the shard ({file.length} bytes): '
                                 f'truncated or oversize')
                    images.append(dict(img_path=f'{shard}/{member.name}', shard=path, offset=member.offset_data,
                                       size=0 if error else member.size, key=sample_key(member.name),
                                       img_error=error))
        except (tarfile.TarError, OSError, ValueError, EOFError) as exc:  # a damaged header, a truncated file
            if not images:
                raise ShardError(f'shard {shard!r} could not be read as a tar file ({type(exc).__name__}: '
                                 f'{exc})') from None
            print_log(f'shard {shard!r} is damaged after {len(images)} image member(s) ({type(exc).__name__}: '
                      f'{exc}); those are used', logger='current', level=logging.WARNING)
        return images

    def _read(self, path: str, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` of a local shard (``os.pread``: no shared file position, fork-safe)."""
        if os.getpid() != self._pid:  # a forked loader worker: its own descriptors
            self._fds, self._pid = {}, os.getpid()
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return os.pread(self._fds[path], size, offset)

    def get_data_info(self, idx: int) -> dict:
        info = super().get_data_info(idx)
        if info['img_error'] is None:
            try:
                info['img_bytes'] = self._read(info['shard'], info['offset'], info['size'])
            except OSError as exc:  # the shard went away or cannot be read since it was indexed
                info['img_error'] = f'the shard could not be read ({type(exc).__name__}: {exc})'
            else:
                if len(info['img_bytes']) != info['size']:  # the shard was cut short since it was indexed
                    info['img_error'] = f'only {len(info["img_bytes"])} of its {info["size"]} bytes are in the shard'
        return info
