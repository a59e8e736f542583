"""The data root's contract, shared by every stage: layout, manifests, storage accounting,
atomic file writes, configs, and reading a shard's samples joined with their sidecars."""

from siclip.manifests.errors import SiclipError

__all__ = ["SiclipError"]
