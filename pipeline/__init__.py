"""Stage 1: URL list -> webdataset shards with img2dataset, under a storage budget planned up front."""
