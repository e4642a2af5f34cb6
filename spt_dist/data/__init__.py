"""Data pipeline: the webdataset shard writer (`shards`, a torch-free CLI) and rank-sharded streams (`loader`)."""
