"""Zero-shot video-text matching: frames sampled uniformly, embedded, averaged (CLIP.encode_video).

    python examples/video.py --checkpoint ckpt/ --video clip.mp4 --captions "a person cooking" "a dog running"
"""

import argparse
import sys

import jax

import pe_jax
from pe_jax.layers import l2_normalize
from pe_jax.preprocess import get_text_tokenizer
from pe_jax.preprocess.video import load_frames


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="pe_jax checkpoint directory (or a PyTorch file)")
    parser.add_argument("--model", help="preset name, needed when --checkpoint is a PyTorch file")
    parser.add_argument("--video", required=True)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--captions", nargs="+", required=True)
    args = parser.parse_args(argv)

    model = pe_jax.load_model(args.checkpoint, model=args.model)
    frames = load_frames(args.video, args.frames, image_size=model.config.vision.image_size)
    video = l2_normalize(model.encode_video(frames[None], normalize=True))  # the frame mean is not unit length
    text = model.encode_text(get_text_tokenizer(model.config.text.context_length)(args.captions), normalize=True)
    probs = jax.nn.softmax(jax.numpy.exp(model.logit_scale[...]) * video @ text.T, axis=-1)[0]
    for caption, p in zip(args.captions, probs, strict=True):
        print(f"{float(p):.4f}  {caption}")
    return probs


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError) as e:  # a bad path or file: a message, not a traceback
        sys.exit(f"error: {e}")
