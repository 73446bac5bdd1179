"""Text-to-image search over a folder of images.

    python examples/retrieval.py --checkpoint ckpt/ --images photos/ --query "a red car" --top 5
"""

import argparse
import os

import jax
import numpy as np

import pe_jax
from pe_jax.inference import run_batched
from pe_jax.transforms import get_image_transform, get_text_tokenizer, load_images


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="pe_jax checkpoint directory (or a PyTorch file)")
    parser.add_argument("--model", help="preset name, needed when --checkpoint is a PyTorch file")
    parser.add_argument("--images", required=True, help="a folder of images (searched recursively)")
    parser.add_argument("--query", required=True)
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)

    model = pe_jax.load_model(args.checkpoint, model=args.model)
    paths = sorted(os.path.join(root, f) for root, _, files in os.walk(args.images) for f in files)
    images, failures = load_images(paths, get_image_transform(model.config.vision.image_size), on_error="skip")
    for _, source, error in failures:
        print(f"skipped {source}: {error}")
    kept = [p for i, p in enumerate(paths) if i not in {i for i, _, _ in failures}]
    gallery = run_batched(lambda m, x: m.encode_image(x, normalize=True), model, images, batch_size=args.batch_size)
    query = model.encode_text(get_text_tokenizer(model.config.text.context_length)([args.query]), normalize=True)
    scores = np.asarray(query @ gallery.T)[0]
    top = np.argsort(-scores, kind="stable")[: args.top]
    for i in top:
        print(f"{scores[i]:.4f}  {kept[i]}")
    return [kept[i] for i in top], jax.numpy.asarray(scores[top])


if __name__ == "__main__":
    main()
