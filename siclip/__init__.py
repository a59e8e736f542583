"""The shared core used by every stage: what `pipeline`, `captioning` and `training` all need (one image
decode, shared constants) lives here, once. The stages import it, never each other; it imports only the
data root's contract below it (`manifests`)."""
