"""Stage 2: synthetic captions and teacher embeddings into Arrow sidecars, one task per shard on dask."""
