from .amp import BF16OptimWrapper
from .distributed import CPUSyncBatchNorm, DeviceAwareDistributedDataParallel
from .hooks import AtomicCheckpointHook, NonFiniteLossHook, PlainParamGroupsHook, ReseedHook
from .knn import KNNMonitorHook
from .optim import ConvMAELayerDecayOptimWrapperConstructor

__all__ = ['BF16OptimWrapper', 'CPUSyncBatchNorm', 'DeviceAwareDistributedDataParallel', 'AtomicCheckpointHook',
           'NonFiniteLossHook', 'PlainParamGroupsHook', 'ReseedHook', 'KNNMonitorHook',
           'ConvMAELayerDecayOptimWrapperConstructor']
