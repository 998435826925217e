"""Layer-wise execution (see :mod:`fusegpt.offload.store`): the block store, and loading and
saving models whose blocks live off the device (:mod:`fusegpt.offload.layerwise`, imported on
its own: it sits above the adapters, the store below them)."""

from .store import STORAGES, BlockOffloader, offloader_of

__all__ = ["STORAGES", "BlockOffloader", "offloader_of"]
