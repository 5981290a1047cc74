"""Many videos to embeddings (and zero-shot label probabilities), as fast as the encoder allows.

The pipeline behind ``pevideo embed`` / ``pevideo classify``, usable from Python. Modules, in the order a
clip meets them: :mod:`.inputs` (files, folders, list files -> paths), :mod:`.options` (a run's arguments,
checked once into one record), :mod:`.session` (model, processor, device, dtype), :mod:`.workers` (decode
+ resize in worker processes), :mod:`.encode` (the encoding loop); for a run into files, :mod:`.tofile`
(``embed_to_file``: planning, resuming, healing) over the output's modules: :mod:`.layout` (where files
go; the one check that nothing of the user's is written over), :mod:`.manifest` (the run's fingerprint,
its shards' checksums), :mod:`.writing` (shards, the joined file, the errors file), :mod:`.merging`
(joining shards), :mod:`.reading` (reading back, checked), :mod:`.records` (what a file holds, and its
checks), :mod:`.fingerprint` (what a resume must match) and :mod:`.safeio` (lock, atomic writes,
one-line :class:`StoreError` errors); :mod:`.distributed` (torchrun), :mod:`.api` (``embed_videos``,
``classify_videos``), :mod:`.tables` (classify's text / CSV / JSON tables) and :mod:`.cli` (``pevideo
embed`` / ``classify`` / ``merge``). Beside them, :mod:`.parquet` (Parquet outputs: rows,
duplicates, reading back), :mod:`.ray_run` (``pevideo embed --engine ray`` over :mod:`.ray_stages`, whose face is :mod:`pevideo.ray_data`)
and :mod:`.outputs` (``read_embeddings`` / ``merge_shards`` of either kind of output).

* :func:`embed_videos` yields one :class:`ClipResult` per video, in input order. Background worker
  processes (a ``torch.utils.data.DataLoader``) decode with PyAV and resize to the model's frame size,
  shipping uint8 frames (4× less than float32) in pinned memory, while the main process encodes the
  previous batch; normalization happens inside the model (``forward_uint8``). Clips of unequal length
  share a batch at no extra compute: the model never encodes padded frames.
* :func:`embed_to_file` runs that over a list of inputs and writes safetensors shards, each first under
  a temporary name and renamed when complete, next to a manifest recording what produced them. A rerun
  with the same arguments skips finished shards, tries failed clips again and re-embeds inputs whose
  file changed; one with different arguments is refused (:class:`ManifestMismatchError`). Videos that
  can't be read are recorded (path, reason) and skipped.
  Under ``torchrun`` each rank takes every WORLD_SIZE-th shard and rank 0 joins them at the end.
* :func:`read_embeddings` reads the result (one file or a folder of shards) back in input order;
  :func:`merge_shards` joins finished shards offline; :func:`classify_videos` scores clips against
  text labels (sigmoid probabilities, as PE's contrastive head is trained).

Output layout, for ``out="emb.safetensors"``: the file itself (shards are worked on in
``emb.safetensors.shards/`` and removed once joined) and ``emb.errors.jsonl``. For ``out="emb"`` (no
``.safetensors`` suffix): a folder ``emb/`` holding ``manifest.json``, ``shard-00000.safetensors``, ...
and ``errors.jsonl``. Every file holds ``video_embeds`` (N, D) float32, ``source_frame_counts`` (N,)
int64 (frames in the source video), ``sampled_frame_counts`` (N,) int64 (frames encoded; files from
before these names hold ``frame_counts``, the source's count, and still read), ``sampled_indices``
(N, T) int32 (−1 pads clips with fewer frames),
``input_index`` (N,) int64 (position in the input list), ``source_size`` / ``source_mtime_ns`` (N,) int64
(each input's size and modification time when it was embedded), optionally ``pooled`` (N, H) float32 (the
video encoder's pooled output, before the contrastive head), and in its metadata the ``paths`` of those
N clips and the ``errors`` as JSON. Failed videos have no row.
"""
from .api import ClassifyResult, classify_videos, embed_videos
from .encode import ClipResult, PipelineStats
from .inputs import expand_inputs
from .manifest import ManifestMismatchError
from .merging import EmbedSummary
from .reading import Embeddings, ShardsMissingError
from .safeio import DamagedOutputError, OutputLockedError, OutputPathError, StoreError
from .session import load_model
from .outputs import merge_shards, read_embeddings  # safetensors or Parquet
from .tofile import embed_to_file

__all__ = [
    "embed_videos",
    "embed_to_file",
    "classify_videos",
    "read_embeddings",
    "merge_shards",
    "expand_inputs",
    "load_model",
    "ClipResult",
    "ClassifyResult",
    "Embeddings",
    "EmbedSummary",
    "PipelineStats",
    "ManifestMismatchError",
    "StoreError",
    "OutputPathError",
    "OutputLockedError",
    "DamagedOutputError",
    "ShardsMissingError",
]
