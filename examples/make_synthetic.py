"""Write the synthetic shapes task (LLaVA JSON + PNG) for the examples: ``python examples/make_synthetic.py OUT``."""

from __future__ import annotations

import argparse

from tokinteract.mllm.synthetic import SyntheticConfig, generate_dataset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out")
    p.add_argument("--train", type=int, default=512)
    p.add_argument("--test", type=int, default=128)
    p.add_argument("--captions", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--grid", type=int, default=2)
    p.add_argument("--turns", type=int, default=1)
    a = p.parse_args()
    cfg = SyntheticConfig(image_size=a.image_size, grid=a.grid, turns=a.turns)
    paths = generate_dataset(a.out, n_train=a.train, n_test=a.test, n_captions=a.captions, seed=a.seed, config=cfg)
    for name, path in paths.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
