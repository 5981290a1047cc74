"""PE Video as Ray Data stages: decode on CPU workers, encode on GPU actors, write Parquet.

A pipeline of your own, five lines (``pip install 'pevideo[ray]'``)::

    import ray, pevideo.ray_data as prd
    ds = prd.video_dataset(["videos/", "more.txt"])                       # path, input_index
    ds = ds.map_batches(prd.Decode("facebook/pe-av-large", num_frames=16), batch_size=4, num_cpus=1)
    ds = ds.map_batches(prd.Encode, fn_constructor_args=("facebook/pe-av-large",), batch_size=32,
                        compute=ray.data.ActorPoolStrategy(size=8), num_gpus=1)  # 8 model copies, a GPU each
    ds.write_parquet("emb/")                                              # pevideo.read_embeddings("emb/")

:class:`Decode` runs the code ``pevideo embed`` runs for a clip (:class:`pevideo.embed.workers.ClipDataset`:
``load_video`` sampling the same frame indices, then the processor's resize to uint8), so the two
cannot drift apart; :class:`Encode` holds the model and runs ``pevideo embed``'s encoder
(:class:`pevideo.embed.encode.Encoder`) on each batch. Both are plain callables on dicts of numpy arrays,
usable from any engine that calls such (Ray is imported only by :func:`video_dataset` and
:func:`embed_dataset`). A video that cannot be read is a row with an ``error``, never a failed job.
The Parquet rows (:mod:`pevideo.embed.parquet`): path, input_index, frame_indices, source_frame_count,
embedding (fixed-size list of float32), fingerprint, error. ``pevideo embed --engine ray`` builds this
pipeline (:func:`embed_dataset`) and adds resuming and a manifest (:mod:`pevideo.embed.ray_run`).

Keep the decode stage's Ray arguments different from the encoder's (as ``num_gpus`` on a GPU cluster
makes them; on CPU only, give it ``memory=decode.task_memory(batch_size)`` as :func:`embed_dataset`
does): Ray fuses stages with equal arguments, and would then decode inside the model's actor, one clip
at a time. A task whose worker dies is retried by Ray (without limit, Ray Data's default, unless
:func:`embed_dataset` is given ``decode_retries``; ``pevideo embed --engine ray`` gives 2, then tries
what a dropped task held one video per task and writes a video that kills its decoder as its error).
"""
from .embed.ray_stages import Decode, Encode, embed_dataset, video_dataset

__all__ = ["Decode", "Encode", "video_dataset", "embed_dataset"]
