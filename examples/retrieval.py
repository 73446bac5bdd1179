"""Text-to-image search over a folder of images (decoded a batch at a time).

    python examples/retrieval.py --checkpoint ckpt/ --images photos/ --query "a red car" --top 5
"""

import argparse
import sys

import numpy as np
from tqdm import tqdm

import pe_jax
from pe_jax.batching import apply_batches, round_batch_size
from pe_jax.data.sources import list_folder
from pe_jax.preprocess import get_image_transform, get_text_tokenizer, image_batches


def encode(model, images):
    return model.encode_image(images, normalize=True)


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
    paths = [it.source for it in list_folder(args.images)]
    transform = get_image_transform(model.config.vision.image_size)
    size, kept, failures = round_batch_size(args.batch_size), [], []

    def batches():
        for images, indices in image_batches(paths, transform, size, failures):
            kept.extend(indices)
            yield images

    with tqdm(total=len(paths), desc="encoding images (the first batch compiles)", unit="image") as bar:
        gallery = np.concatenate(list(apply_batches(encode, model, batches(), batch_size=size, progress=bar.update)))
    for f in failures:
        print(f"skipped {f['path']}: {f['error']}")
    query = model.encode_text(get_text_tokenizer(model.config.text.context_length)([args.query]), normalize=True)
    scores = np.asarray(query @ gallery.T)[0]
    top = np.argsort(-scores, kind="stable")[: args.top]
    for i in top:
        print(f"{scores[i]:.4f}  {paths[kept[i]]}")
    return [paths[kept[i]] for i in top], scores[top]


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError) as e:  # a bad path or file: a message, not a traceback
        sys.exit(f"error: {e}")
