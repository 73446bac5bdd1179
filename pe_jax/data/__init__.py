"""The data room: what an input is (tar shards, a folder, a list, texts) and how its samples are grouped.

`sources` lists and reads inputs (webdataset tar shards, image folders, CSV / Parquet / JSONL lists, text
files); `samples` groups a shard's or folder's members into samples as webdataset does. Pixels and tokens are
made by `pe_jax.preprocess`.
"""
