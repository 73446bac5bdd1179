"""Zero-shot classification of one image against captions (the reference README's example).

    python examples/zero_shot.py --checkpoint ckpt/ --image cat.png --captions "a diagram" "a dog" "a cat"
"""

import argparse
import sys

import jax

import pe_jax
from pe_jax.preprocess import decode_image, get_image_transform, get_text_tokenizer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="pe_jax checkpoint directory (or a PyTorch file)")
    parser.add_argument("--model", help="preset name, needed when --checkpoint is a PyTorch file")
    parser.add_argument("--image", required=True)
    parser.add_argument("--captions", nargs="+", default=["a diagram", "a dog", "a cat"])
    args = parser.parse_args(argv)

    model = pe_jax.load_model(args.checkpoint, model=args.model)
    image = get_image_transform(model.config.vision.image_size)(decode_image(args.image))[None]
    tokens = get_text_tokenizer(model.config.text.context_length)(args.captions)
    image_features, text_features, logit_scale = model(image, tokens)
    probs = jax.nn.softmax(logit_scale * image_features @ text_features.T, axis=-1)[0]
    for caption, p in zip(args.captions, probs, strict=True):
        print(f"{float(p):.4f}  {caption}")
    return probs


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError) as e:  # a bad path or file: a message, not a traceback
        sys.exit(f"error: {e}")
