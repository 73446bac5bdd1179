"""Zero-shot video-text matching: frames sampled uniformly, embedded, averaged (CLIP.encode_video).

    python examples/video.py --checkpoint ckpt/ --video clip.mp4 --captions "a person cooking" "a dog running"
"""

import argparse

import jax

import pe_jax
from pe_jax.transforms import get_text_tokenizer
from pe_jax.video import load_frames


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
    video = model.encode_video(frames[None], normalize=True)
    video = video / (video**2).sum(-1, keepdims=True) ** 0.5  # the frame mean is not unit length
    text = model.encode_text(get_text_tokenizer(model.config.text.context_length)(args.captions), normalize=True)
    probs = jax.nn.softmax(jax.numpy.exp(model.logit_scale[...]) * video @ text.T, axis=-1)[0]
    for caption, p in zip(args.captions, probs, strict=True):
        print(f"{float(p):.4f}  {caption}")
    return probs


if __name__ == "__main__":
    main()
