"""The commands beside training (`python -m hn_jax.tools.NAME`, or the `hn-NAME` scripts).

- `prepare`: a benchmark's published layout into TFDS ArrayRecord files, once.
- `embed`: a run's embeddings of a dataset split or an image folder, to `.npz`.
- `search`: the nearest neighbours of query images in such an index; contact sheets.
- `report`: event files (ours or the release's) to the paper's table and figures.
- `reproduce`: the paper's table on in-memory data: learning-rate search, seeds, table.
- `analysis`: gradient fields of one triplet's loss term.
- `convert_weights`: torchvision `.pth` weights to `.npz`/`.safetensors` (hosts without torch).

Each takes absl flags through `hn_jax.cli` (`--help` lists them).
"""
