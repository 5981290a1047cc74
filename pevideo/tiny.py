"""A small random-weight PE Video checkpoint that works offline: ``pevideo tiny-checkpoint DIR``.

It has everything a released checkpoint folder has -- ``config.json`` and safetensors weights (written
by :meth:`PeVideoModel.save_pretrained`, so transformers loads them too), the video processor config and
a word-level tokenizer -- so ``pevideo embed`` / ``classify``, ``PeVideoModel.from_pretrained`` and
``PeVideoProcessor.from_pretrained`` run on it with no Hub access. The weights are random: the numbers
mean nothing, the plumbing is real. It also writes a short sample video (PyAV) to try it on.
"""
from __future__ import annotations

import argparse
import os

import torch

__all__ = ["tiny_config", "write_tiny_checkpoint", "write_tokenizer", "write_sample_video", "TINY_WORDS"]

FRAME_SIZE = 64  # pixels; 16 patches of 16 per frame
# The tokenizer's words: anything else maps to [UNK]. Enough for the README's examples.
TINY_WORDS = ("a an the of person people playing tennis cat cats sleeping dog dogs cooking running video "
              "man woman child ball car road water beach music dancing walking eating sitting").split()


def tiny_config(vocab_size: int = 97):
    """A ``PeVideoConfig`` with a PE-Core ViT of 2 blocks (64 wide, 4 heads, 64 px frames: every head, the
    pooling's too, fits the fused kernels) and a 2-layer text tower."""
    from transformers import PeVideoConfig

    text = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                vocab_size=vocab_size, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
                sep_token_id=2, global_attn_every_n_layers=2, local_attention=8)
    vision = dict(architecture="vit_pe_core_tiny_patch16_384", num_labels=24,
                  model_args=dict(embed_dim=64, depth=2, num_heads=4, img_size=FRAME_SIZE))
    video = dict(vision_config=vision, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, head_dim=12)
    return PeVideoConfig(text_config=text, video_config=video)


def write_tokenizer(folder, vocab_size: int = 97) -> None:
    """A word-level tokenizer (pad 0, cls 1, sep 2, unk 3; ``[CLS] text [SEP]``) saved as transformers does."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[CLS]": 1, "[SEP]": 2, "[UNK]": 3}
    for w in TINY_WORDS:
        vocab.setdefault(w, len(vocab))
    if len(vocab) > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is below the {len(vocab)} words of the tiny tokenizer")
    for i in range(len(vocab), vocab_size):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                                   unk_token="[UNK]")
    fast.save_pretrained(os.fspath(folder))


def write_sample_video(path, n_frames: int = 48, height: int = 90, width: int = 160, rate: int = 24) -> str:
    """``n_frames`` of moving colour bands, h264 (PyAV), at ``path``."""
    import av
    import numpy as np

    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    with av.open(os.fspath(path), "w") as c:
        s = c.add_stream("h264", rate=rate)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        for i in range(n_frames):
            img = np.stack([127 + 100 * np.sin(xx / (9 + k) + yy / (11 + k) + 0.3 * i + 2 * k) for k in range(3)], -1)
            for p in s.encode(av.VideoFrame.from_ndarray(img.astype(np.uint8), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return os.fspath(path)


@torch.no_grad()
def write_tiny_checkpoint(folder, *, seed: int = 0, video: str | os.PathLike | None = None) -> str:
    """Write a random tiny checkpoint (weights, processor config, tokenizer) to ``folder``; returns it.

    ``video``: also write a short sample clip there (needs PyAV). Weights are drawn with ``seed``; every
    parameter is perturbed, so no output is trivially zero (some modules start at 0).
    """
    from .modeling import PeVideoModel
    from .processing import PeVideoVideoProcessor

    folder = os.fspath(folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise FileExistsError(f"{folder} exists and is not a folder")
    if os.path.isdir(folder) and os.listdir(folder):
        raise FileExistsError(f"{folder} is not empty: tiny-checkpoint writes into a new or empty folder")
    gen = torch.Generator().manual_seed(seed)
    model = PeVideoModel(tiny_config())
    for name, p in model.named_parameters():
        # a scale and bias that put a random model's sigmoid probabilities near the middle, not all at 0
        if name.endswith("logit_scale"):
            p.fill_(1.0)
        elif name.endswith("logit_bias"):
            p.fill_(3.5)
        else:
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    model.save_pretrained(folder)
    PeVideoVideoProcessor(size={"height": FRAME_SIZE, "width": FRAME_SIZE}).save_pretrained(folder)
    write_tokenizer(folder)
    if video is not None:
        write_sample_video(video)
    return folder


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", help="new or empty folder for the checkpoint")
    p.add_argument("--video", default=None,
                   help="also write a short sample clip here (default: FOLDER/../FOLDER_NAME-sample.mp4; "
                        "'none' to skip)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights (default 0)")


def main(args: argparse.Namespace) -> int:
    import sys

    folder = os.path.normpath(args.folder)
    video = args.video
    if video is None:
        video = os.path.join(os.path.dirname(os.path.abspath(folder)), os.path.basename(folder) + "-sample.mp4")
    elif video.lower() == "none":
        video = None
    if video is not None and os.path.exists(video):
        print(f"pevideo tiny-checkpoint: {video} exists: give another --video path (or --video none)", file=sys.stderr)
        return 2
    try:
        write_tiny_checkpoint(folder, seed=args.seed, video=video)
    except FileExistsError as e:
        print(f"pevideo tiny-checkpoint: {e}", file=sys.stderr)
        return 2
    print(f"wrote a random tiny checkpoint to {folder}/ (config.json, model.safetensors, processor config, tokenizer)")
    if video is not None:
        print(f"wrote a sample clip to {video}")
    return 0
